"""profiler.html: verdict, table payload, shared rows, escaping, size (no browser needed).

``resnet_like_tables`` fabricates realistic profiler tables (names, columns and value ranges of a
fused int8 ResNet) at any size; tests/profiler/report/test_browser.py loads it from this file.
"""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from qatkit.profiler.report.html import (
    FINAL_SIMILARITY_THRESHOLD,
    REPORT_SECTIONS,
    Verdict,
    build_verdict,
    render_html,
)

XSS_SCRIPT = "<script>alert(1)</script>"
XSS_ATTR = '"onmouseover=alert(2) x="'


def _ops(n_layers: int) -> list[tuple[str, str]]:
    """(op name, module type) of a fused ResNet-like model, in execution order."""
    ops = [("quant", "QuantStub"), ("conv1", "ConvBnReLU2d"), ("maxpool", "MaxPool2d")]
    stage, block = 1, 0
    while len(ops) < n_layers - 3:
        p = f"layer{stage}.{block}"
        ops += [(f"{p}.conv1", "ConvBnReLU2d"), (f"{p}.conv2", "ConvBn2d")]
        if block == 0 and stage > 1:
            ops.append((f"{p}.downsample.0", "ConvBn2d"))
        ops += [(f"{p}.add", "FunctionalOp[add]"), (f"{p}.relu(1)", "ReLU")]
        block += 1
        if block == 2:
            stage, block = stage + 1, 0
    tail = [("avgpool", "AdaptiveAvgPool2d"), ("flatten", "FunctionalOp[flatten]"),
            ("fc", "Linear")]
    return ops[:max(n_layers - 3, 0)] + tail


def resnet_like_tables(n_layers: int = 40, seed: int = 0, bad: str | None = "layer2.0.conv2",
                       extra_names: tuple[str, ...] = ()) -> dict[str, pd.DataFrame]:
    """Every report table for a fabricated ``n_layers``-op ResNet; ``bad`` loses accuracy."""
    rng = np.random.default_rng(seed)
    ops = _ops(n_layers) + [(name, "Conv2d") for name in extra_names]
    n = len(ops)
    names = [o[0] for o in ops]
    types = [o[1] for o in ops]
    own = 1 - 10 ** rng.uniform(-5.5, -3.3, n)
    if bad in names:
        own[names.index(bad)] = 0.9312
    e2e = np.cumprod(own) ** 0.5
    qscale = 2.0 ** rng.integers(-7, -2, n)
    acc = (1 - e2e) * 40 * qscale

    def similarity(sim: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame({
            "Index": np.arange(n), "Module Name": names, "Module Type": types, "Similarity": sim,
            "qscale": qscale, "Acc Error (float atol)": acc,
            "Acc Error (N out_qscale)": acc / qscale,
            "Op Error with Same Input (N out_qscale)": (1 - own) * 30})

    modules = sorted({re.sub(r"\(\d+\)$", "", m) for m in names})
    stats = []
    for name, mtype, s in zip(names, types, qscale, strict=True):
        for attr, arg in (("input", 0), ("input", 1), ("output", 0)):
            if attr == "input" and arg == 1 and "add" not in name:
                continue
            lo, hi = -rng.uniform(0.5, 8), rng.uniform(0.5, 12)
            stats.append([name, mtype, attr, arg, lo, hi, rng.normal(0, 0.3), rng.uniform(0, 4),
                          s, "qint8", max(0.0, rng.normal(0, 0.002)), max(-lo, hi) / s, 0, 0])
    while len(stats) < 3 * n:  # pad to ~3 rows per layer, as a real model with more inputs has
        stats.append(list(stats[len(stats) % len(names)]))
    stats[0][4:] = [float("nan")] * 4 + [float("nan"), "float32", float("nan"), float("nan"), 3, 0]
    conv = [(nm, t) for nm, t in ops if "Conv" in t or t == "Linear"]
    return {
        "similarity_end_to_end": similarity(e2e),
        "similarity_per_layer": similarity(own),
        "statistics": pd.DataFrame(stats, columns=[
            "Module Name", "Module Type", "Attr", "Arg", "Min", "Max", "Mean", "Var", "Scale",
            "Dtype", "Saturation Ratio", "Range (steps)", "NaN", "Inf"]),
        "outliers": pd.DataFrame({
            "Module Name": names, "Module Type": types, "Attr": "output",
            "Channels": rng.choice([64, 128, 256, 512], n),
            **{f"Level>={k}": rng.integers(0, 9 - k, n) for k in (3, 4, 5, 6)},
            "Max Level": rng.uniform(0.5, 7.5, n)}),
        "weights": pd.DataFrame({
            "Module Name": [nm for nm, _ in conv], "Module Type": [t for _, t in conv],
            "Similarity": 1 - 10 ** rng.uniform(-6, -4, len(conv)),
            "Max Abs Error": rng.uniform(1e-4, 4e-3, len(conv)),
            "Weight Scale": rng.uniform(1e-3, 2e-2, len(conv)),
            "Error (N weight scale)": rng.uniform(0.3, 0.5, len(conv))}),
        "called_count": pd.DataFrame({
            "Module Name": modules, "Module Type": "Module",
            "Called Count": [2 if m.endswith(".relu") else 1 for m in modules]}),
        "unfused": pd.DataFrame({
            "Module Name": [["layer1.0.conv2", "layer1.0.relu"], ["fc", "relu_out"]],
            "Pattern": ["conv+bn+add+relu", "linear+relu"],
            "Reason": ["relu module shared by two call sites", "relu is a functional call"],
            "Fix": ["use one nn.ReLU per call site", "use nn.ReLU and the fused pattern"]}),
        "qconfig": pd.DataFrame({
            "Module Name": names, "Module Type": types, "Input Dtype": "qint8",
            "Output Dtype": ["float32" if nm == "fc" else "qint8" for nm in names],
            "Weight Dtype": ["qint8" if "Conv" in t or t == "Linear" else "" for t in types],
            "Weight ch_axis": [0 if "Conv" in t or t == "Linear" else None for t in types],
            "Fixed Scale": [1 / 128 if nm == "quant" else float("nan") for nm in names]}),
        "qconfig_warnings": pd.DataFrame({
            "Module Name": ["fc"], "Warning": ["32-bit output: the next op must take float"]}),
        "findings": pd.DataFrame({
            "Severity": ["info", "warning", "error", "warning"],
            "Module Name": ["quant", "layer1.0.relu", bad or "fc", "layer3.1.conv2"],
            "Problem": ["input not normalized", "shared module", "low similarity", "saturation"],
            "Evidence": ["input range [0, 255]", "called 2 times", "per-layer similarity 0.9312",
                         "0.8% of values outside int8"],
            "Advice": ["normalize inputs to [-1, 1]", "one nn.ReLU per call site",
                       "try int16 for this layer", "try percentile calibration"]}),
    }


def _data(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="qk-data">(.*?)</script>', html, re.S)
    assert match, "the page has no data block"
    return json.loads(match.group(1))


def _table(data: dict, key: str) -> dict:
    return next(t for t in data["tables"] if t["key"] == key)


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))


def test_page_has_every_section_in_order(tmp_path: Path) -> None:
    tables = resnet_like_tables()
    tables["custom"] = pd.DataFrame({"a": [1]})
    html = render_html(tables, tmp_path / "sub" / "profiler.html", title="ResNet int8").read_text()
    ids = re.findall(r'<section class="qk-card[^"]*" id="([^"]+)"', html)
    expected = ["verdict", "chart"] + [f"sec-{k.replace('_', '-')}" for k in REPORT_SECTIONS]
    assert ids == expected + ["sec-custom"]
    assert "<title>ResNet int8</title>" in html
    data = _data(html)
    assert [t["key"] for t in data["tables"]] == list(REPORT_SECTIONS) + ["custom"]
    assert data["pageSize"] == 100


def test_verdict_numbers() -> None:
    tables = resnet_like_tables()
    e2e, per = tables["similarity_end_to_end"], tables["similarity_per_layer"]
    v = build_verdict(tables, n_worst=3)
    assert v.final_similarity == e2e["Similarity"].iloc[-1]
    assert v.passed is bool(e2e["Similarity"].iloc[-1] >= 0.98)
    worst = list(per.nsmallest(3, "Similarity")["Module Name"])
    assert [w.name for w in v.worst_per_layer] == worst
    assert worst[0] == "layer2.0.conv2" and v.worst_per_layer[0].similarity == 0.9312
    assert [w.similarity for w in v.worst_end_to_end] == sorted(e2e["Similarity"])[:3]
    assert [f.severity for f in v.top_findings] == ["error", "warning", "warning", "info"]
    assert v.top_findings[0].layer == "layer2.0.conv2"
    assert v.severity_counts == (("error", 1), ("warning", 2), ("info", 1))


@pytest.mark.parametrize("final, passed, css", [(0.98, True, "pass"), (0.9799, False, "fail"),
                                                (None, None, "unknown")])
def test_verdict_threshold(tmp_path: Path, final: float | None, passed: bool | None,
                           css: str) -> None:
    tables = {"similarity_per_layer": resnet_like_tables(12)["similarity_per_layer"]}
    v = build_verdict(tables, final_similarity=final)
    assert v.passed is passed and FINAL_SIMILARITY_THRESHOLD == 0.98
    html = render_html(tables, tmp_path / "p.html", verdict=v).read_text()
    assert f'class="qk-card qk-verdict {css}"' in html
    if final is not None:
        assert f'<b id="final-similarity">{final:.6f}</b>' in html


def test_verdict_rejects_a_bad_threshold() -> None:
    with pytest.raises(ValueError, match="cosine similarity"):
        Verdict(final_similarity=0.9, threshold=98)


def test_payload_keeps_raw_values_and_column_kinds(tmp_path: Path) -> None:
    tables = resnet_like_tables()
    html = render_html(tables, tmp_path / "p.html").read_text()
    data = _data(html)
    e2e = _table(data, "similarity_end_to_end")
    assert e2e["kinds"] == ["int", "text", "text", "sim", "num", "num", "num", "num"]
    df = tables["similarity_end_to_end"]
    assert [r[3] for r in e2e["rows"]] == df["Similarity"].tolist()  # raw, bit-exact
    assert [r[0] for r in e2e["rows"]] == list(range(len(df)))
    stats = _table(data, "statistics")
    assert stats["kinds"][3] == "int" and stats["kinds"][9] == "text"
    assert stats["rows"][0][8] is None  # NaN scale -> null -> a grey dash in the browser
    findings = _table(data, "findings")
    assert findings["kinds"][0] == "severity"
    assert [r[0] for r in findings["rows"]] == ["error", "warning", "warning", "info"]
    assert [r[1] for r in findings["rows"]] == ["layer2.0.conv2", "layer1.0.relu",
                                                "layer3.1.conv2", "quant"]
    assert _table(data, "unfused")["rows"][0][0] == "layer1.0.conv2, layer1.0.relu"
    qconfig = _table(data, "qconfig")
    assert qconfig["kinds"][6] == "num"
    assert qconfig["rows"][0][6] == 1 / 128


def test_special_numbers_and_mixed_columns(tmp_path: Path) -> None:
    df = pd.DataFrame({"Module Name": ["a", "b", "c"], "Max": [1.5, math.inf, -math.inf],
                       "Count": [1.0, 2.0, float("nan")], "Mixed": [1, 2.5, None],
                       "Flag": [True, False, True]})
    data = _data(render_html({"x": df}, tmp_path / "p.html").read_text())
    spec = _table(data, "x")
    assert spec["kinds"] == ["text", "num", "int", "num", "text"]
    assert [r[1] for r in spec["rows"]] == [1.5, "inf", "-inf"]
    assert [r[2] for r in spec["rows"]] == [1.0, 2.0, None]
    assert [r[4] for r in spec["rows"]] == ["True", "False", "True"]
    odd = pd.DataFrame([[1, 0.5, "a"]], columns=[0, "x", "x"])  # int and repeated names
    spec = _table(_data(render_html({"odd": odd}, tmp_path / "q.html").read_text()), "odd")
    assert spec["columns"] == ["0", "x", "x"] and spec["rows"] == [[1, 0.5, "a"]]


def test_shared_rows_from_call_counts(tmp_path: Path) -> None:
    tables = resnet_like_tables()
    data = _data(render_html(tables, tmp_path / "p.html").read_text())
    shared = set(tables["called_count"].query("`Called Count` > 1")["Module Name"])
    assert shared and all(s.endswith(".relu") for s in shared)
    for key, column in [("similarity_end_to_end", "Module Name"), ("statistics", "Module Name"),
                        ("findings", "Module Name"), ("called_count", "Module Name")]:
        spec = _table(data, key)  # rows in the order served (findings: most severe first)
        names = [row[spec["columns"].index(column)] for row in spec["rows"]]
        assert sorted(names) == sorted(tables[key][column])
        expected = [i for i, nm in enumerate(names) if re.sub(r"\(\d+\)$", "", nm) in shared]
        assert _table(data, key)["shared"] == expected, key
        assert expected, f"{key} should have shared rows"
    assert _table(data, "unfused")["shared"] == [0]
    assert _table(data, "weights")["shared"] == []
    # an explicit set wins over the call counts
    data = _data(render_html(tables, tmp_path / "q.html", shared={"fc"}).read_text())
    weights = tables["weights"]["Module Name"].tolist()
    assert _table(data, "weights")["shared"] == [weights.index("fc")]
    assert _table(data, "unfused")["shared"] == [1]


def test_model_strings_are_escaped(tmp_path: Path) -> None:
    tables = resnet_like_tables(12, bad=XSS_SCRIPT, extra_names=(XSS_SCRIPT, XSS_ATTR))
    tables["called_count"].loc[0, "Module Name"] = XSS_ATTR
    tables["called_count"].loc[0, "Called Count"] = 3
    html = render_html(tables, tmp_path / "p.html", title=XSS_SCRIPT,
                       meta={"model": XSS_ATTR}).read_text()
    assert "alert(1)</script>" not in html and "<script>alert" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # verdict, chart, title
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in html  # JSON payload
    parser = _Tags()
    parser.feed(html)
    assert [t for t, _ in parser.tags].count("script") == 2
    assert not [a for _, attrs in parser.tags for a in attrs if a.startswith("on")]
    names = {t["key"]: t for t in _data(html)["tables"]}["similarity_end_to_end"]["rows"]
    assert [r[1] for r in names][-2:] == [XSS_SCRIPT, XSS_ATTR]
    shared_rows = _table(_data(html), "similarity_end_to_end")["shared"]
    assert len(names) - 1 in shared_rows and len(names) - 2 not in shared_rows


def test_500_layers_stay_under_5_mb(tmp_path: Path) -> None:
    tables = resnet_like_tables(500)
    assert len(tables["similarity_end_to_end"]) == 500 and len(tables["statistics"]) >= 1500
    path = render_html(tables, tmp_path / "p.html")
    size = path.stat().st_size
    assert size < 5 * 2**20, f"profiler.html is {size / 2**20:.2f} MB for 500 layers"
    assert size < 2 * 2**20, f"{size} bytes: the compact payload got bigger than expected"
    assert len(_table(_data(path.read_text()), "statistics")["rows"]) == len(tables["statistics"])


def test_missing_empty_and_no_similarity(tmp_path: Path) -> None:
    empty = pd.DataFrame(columns=["Module Name", "Pattern", "Reason", "Fix"])
    html = render_html({"unfused": empty, "weights": None}, tmp_path / "p.html").read_text()
    assert "No rows: nothing to report here." in html
    assert 'id="sec-weights"' not in html and 'id="chart"' not in html
    assert 'class="qk-card qk-verdict unknown"' in html


def test_chart_points_name_layers(tmp_path: Path) -> None:
    tables = resnet_like_tables(20)
    html = render_html(tables, tmp_path / "p.html").read_text()
    svg = html[html.index("<svg"):html.index("</svg>")]
    assert svg.count("<circle class=\"pt") == 2 * 20 + 1  # two series + the shared-op legend
    per = tables["similarity_per_layer"]
    row = per.iloc[7]
    assert f"{row['Module Name']} ({row['Module Type']})\nper layer (same input): " \
           f"{row['Similarity']:.6f}" in svg
    n_shared = sum(name.endswith(".relu(1)") for name in per["Module Name"])
    assert n_shared == 3 and svg.count('class="pt shared"') == 2 * n_shared + 1


def test_images_are_inlined(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
    (tmp_path / "fig.png").write_bytes(png)
    html = render_html({}, tmp_path / "p.html",
                       images={"bytes": png, "file": tmp_path / "fig.png"}).read_text()
    assert html.count("data:image/png;base64,iVBORw0KGgo") == 2
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html


def test_bad_arguments_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="'statistics' is a dict; pass a pandas DataFrame"):
        render_html({"statistics": {"a": 1}}, tmp_path / "p.html")
    with pytest.raises(ValueError, match="page_size=0"):
        render_html({}, tmp_path / "p.html", page_size=0)
    with pytest.raises(ValueError, match="unsupported type"):
        render_html({}, tmp_path / "p.html", images={"x": tmp_path / "x.bmp"})
