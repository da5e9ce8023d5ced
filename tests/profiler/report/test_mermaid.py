"""similarity.mmd: nodes, edges, colours and safe names of the mermaid graph."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from qatkit.fx import symbolic_trace
from qatkit.fx.naming import float_node_names
from qatkit.profiler.report.mermaid import (
    GOOD_SIMILARITY,
    OK_SIMILARITY,
    _escape_label,
    similarity_class,
    write_similarity_mermaid,
)
from torch import nn

_NODE = re.compile(r'^    (\w+)(\(\[|\[)"(.*)"(\]\)|\])$')
_EDGE = re.compile(r"^    (\w+) --> (\w+)$")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()  # shared: called twice
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(x))
        z = self.relu(self.conv2(y)) + y
        return self.fc(torch.flatten(z.mean((2, 3)), 1))


def _unescape(label: str) -> str:
    return re.sub(r"#(\d+);", lambda m: chr(int(m.group(1))), label)


def _parse(text: str) -> tuple[dict[str, str], list[tuple[str, str]], dict[str, str]]:
    """Node id -> raw label, edges, node id -> class."""
    nodes, edges, classes = {}, [], {}
    for line in text.splitlines():
        if m := _NODE.match(line):
            nodes[m.group(1)] = m.group(3)
        elif m := _EDGE.match(line):
            edges.append((m.group(1), m.group(2)))
        elif line.startswith("    class "):
            members, name = line.split()[1:]
            classes.update({m: name for m in members.split(",")})
    return nodes, edges, classes


def test_small_model_graph(tmp_path: Path) -> None:
    gm = symbolic_trace(_Net())
    names = float_node_names(gm)
    ops = [names[n] for n in gm.graph.nodes if n.op in ("call_module", "call_function",
                                                          "call_method")]
    assert ops == ["conv", "relu(0)", "conv2", "relu(1)", "add", "mean", "flatten", "fc"]
    values = {"conv": 0.9995, "relu(0)": 0.9991, "conv2": 0.985, "relu(1)": 0.97, "add": 0.99,
              "fc": float("nan")}
    table = pd.DataFrame({"Module Name": list(values), "Similarity": list(values.values())})
    path = write_similarity_mermaid(gm, table, tmp_path / "out" / "similarity.mmd")
    text = path.read_text()
    assert text.startswith("flowchart TD\n")
    nodes, edges, classes = _parse(text)
    ident = {_unescape(label.split("<br/>")[0]): i for i, label in nodes.items()}
    assert set(ident) == {"input: x", "output", *ops}
    assert nodes[ident["conv2"]] == "conv2<br/>Conv2d<br/>0.985000"
    assert nodes[ident["relu(1)"]] == "relu#40;1#41;<br/>ReLU<br/>0.970000"
    assert nodes[ident["add"]] == "add<br/>add<br/>0.990000"
    assert nodes[ident["fc"]] == "fc<br/>Linear<br/>n/a"
    assert {k: classes[ident[k]] for k in ident} == {
        "input: x": "io", "output": "io", "conv": "good", "relu(0)": "good", "conv2": "ok",
        "relu(1)": "bad", "add": "good", "mean": "nodata", "flatten": "nodata", "fc": "nodata"}
    rename = {"x": "input: x"}
    expected = {(rename.get(names[src], names[src]), rename.get(names[dst], names[dst]))
                for dst in gm.graph.nodes for src in dst.all_input_nodes}
    label = {i: name for name, i in ident.items()}
    assert {(label[a], label[b]) for a, b in edges} == expected
    assert len(edges) == len(expected) == 10
    for name in ("good", "ok", "bad", "nodata", "io"):
        assert f"    classDef {name} fill:" in text


def test_special_characters_are_escaped(tmp_path: Path) -> None:
    # torch.fx cannot generate code for a module name with a double quote; the rest it can
    weird = "a'b<c>[d]{e}(f)|g#h;&`i"
    model = nn.Sequential()
    model.add_module(weird, nn.ReLU())
    model.add_module("end", nn.Identity())  # a mermaid keyword as a name
    gm = symbolic_trace(model)
    table = pd.DataFrame({"Module Name": [weird, "end"], "Similarity": [0.5, 0.999]})
    text = write_similarity_mermaid(gm, table, tmp_path / "s.mmd", direction="LR").read_text()
    assert text.startswith("flowchart LR\n")
    nodes, edges, classes = _parse(text)
    assert len(nodes) == 4 and len(edges) == 3
    ident, label = next((i, lb) for i, lb in nodes.items() if lb.endswith("<br/>0.500000"))
    name = label.split("<br/>")[0]
    assert name == "a#39;b#60;c#62;#91;d#93;#123;e#125;#40;f#41;#124;g#35;h#59;#38;#96;i"
    assert _unescape(name) == weird
    assert classes[ident] == "bad"
    for i in nodes:
        assert re.fullmatch(r"[A-Za-z0-9_]+", i) and i != "end"
    assert _escape_label('say "hi" <b>\n') == "say #34;hi#34; #60;b#62; "


def test_ids_stay_unique_when_names_collide(tmp_path: Path) -> None:
    model = nn.Sequential()
    model.add_module("a.b".replace(".", "_"), nn.ReLU())
    model.add_module("a-b", nn.ReLU())
    model.add_module("a b", nn.ReLU())
    gm = symbolic_trace(model)
    table = pd.DataFrame({"Module Name": ["a_b", "a-b", "a b"], "Similarity": [1.0, 1.0, 1.0]})
    nodes, edges, _ = _parse(write_similarity_mermaid(gm, table, tmp_path / "s.mmd").read_text())
    ops = [i for i, lb in nodes.items() if lb.endswith("1.000000")]
    assert len(ops) == 3 and len(set(ops)) == 3
    assert len(edges) == 4


def test_thresholds() -> None:
    assert (GOOD_SIMILARITY, OK_SIMILARITY) == (0.99, 0.98)
    assert [similarity_class(v) for v in (0.99, 0.9899, 0.98, 0.9799, None, float("nan"))] == [
        "good", "ok", "ok", "bad", "nodata", "nodata"]


def test_errors_name_the_fix(tmp_path: Path) -> None:
    gm = symbolic_trace(nn.Sequential(nn.ReLU()))
    with pytest.raises(KeyError, match="no column"):
        write_similarity_mermaid(gm, pd.DataFrame({"Name": []}), tmp_path / "s.mmd")
    with pytest.raises(TypeError, match="symbolic_trace"):
        write_similarity_mermaid(nn.ReLU(), pd.DataFrame(), tmp_path / "s.mmd")
    with pytest.raises(ValueError, match="direction"):
        write_similarity_mermaid(gm, pd.DataFrame(), tmp_path / "s.mmd", direction="up")
