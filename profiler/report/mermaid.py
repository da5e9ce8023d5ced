"""Write a model's graph as a mermaid flowchart coloured by per-layer similarity.

``similarity.mmd`` shows every op of the traced model (``call_module``, ``call_function``,
``call_method`` nodes) as a box labelled with its name, its op and its cosine similarity, with
the model's inputs and output as rounded nodes.  Boxes are coloured by similarity: ``good``
(>= :data:`GOOD_SIMILARITY`), ``ok`` (>= :data:`OK_SIMILARITY`), ``bad`` (below) and ``nodata``
(no row in the similarity table).  Paste the file into any mermaid renderer (GitHub markdown,
mermaid.live, the VS Code preview).  Mermaid refuses diagrams over 500 edges or 50,000
characters unless its ``maxEdges`` / ``maxTextSize`` settings are raised by the renderer.

Names are made safe for mermaid: node ids keep only ``[A-Za-z0-9_]`` (made unique), and labels
encode every character mermaid could read as syntax (quotes, brackets, ``<``, ``>``, ``#``, ...)
as ``#<code>;`` entities, so any module name shows up verbatim.

Example::

    >>> gm = qatkit.fx.symbolic_trace(model)
    >>> table = featuremap_similarity(model, calib_model, x, method="EndToEnd")
    >>> write_similarity_mermaid(gm, table, "out/similarity.mmd")
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pandas as pd
from qatkit.fx.naming import float_node_names
from torch import fx

from ..core.alignment import CALL_OPS, op_label
from ..core.capture import model_annotations
from ..core.metrics import FINAL_SIMILARITY_THRESHOLD

__all__ = ["GOOD_SIMILARITY", "OK_SIMILARITY", "similarity_class", "write_similarity_mermaid"]

#: similarity at or above which a layer is drawn green
GOOD_SIMILARITY = 0.99
#: similarity at or above which a layer is drawn amber (below: red): the usual final-output rule
OK_SIMILARITY = FINAL_SIMILARITY_THRESHOLD

#: mermaid classDef styles
CLASS_STYLES: dict[str, str] = {
    "good": "fill:#dcf5e3,stroke:#2e7d32,color:#14381d",
    "ok": "fill:#fff1c2,stroke:#b7860b,color:#4a3500",
    "bad": "fill:#fbd5d3,stroke:#c62828,color:#5c0f0f",
    "nodata": "fill:#f1f1f1,stroke:#9e9e9e,color:#424242",
    "io": "fill:#e3ecfa,stroke:#3f6fb5,color:#173462",
}
_SAFE_LABEL = re.compile(r"[A-Za-z0-9 _.,:/+=-]")


def similarity_class(value: float | None) -> str:
    """The mermaid class of a similarity: ``good``, ``ok``, ``bad`` or ``nodata``.

    Args:
        value: cosine similarity, or None/NaN when unknown.

    Returns:
        The class name.

    Example::

        >>> similarity_class(0.995), similarity_class(0.985), similarity_class(0.5)
        ('good', 'ok', 'bad')
    """
    if value is None or not math.isfinite(value):
        return "nodata"
    if value >= GOOD_SIMILARITY:
        return "good"
    return "ok" if value >= OK_SIMILARITY else "bad"


def _escape_label(text: str) -> str:
    """Encode everything but plain name characters as mermaid ``#code;`` entities."""
    return "".join(c if _SAFE_LABEL.fullmatch(c) or (c.isalnum() and not c.isascii())
                   else f"#{ord(c)};" for c in text.replace("\n", " "))


class _Ids:
    """Unique mermaid node ids made of ``[A-Za-z0-9_]`` only."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def __call__(self, prefix: str, name: str) -> str:
        base = f"{prefix}_{re.sub(r'[^A-Za-z0-9_]', '_', name.encode('ascii', 'replace').decode())}"
        ident, k = base, 1
        while ident in self._used:
            k += 1
            ident = f"{base}_{k}"
        self._used.add(ident)
        return ident


def _similarity_lookup(similarity: pd.DataFrame, column: str) -> dict[str, float]:
    missing = [c for c in ("Module Name", column) if c not in similarity.columns]
    if missing:
        raise KeyError(f"write_similarity_mermaid: the similarity table has no column(s) "
                       f"{missing}; pass featuremap_similarity's table (columns 'Module Name', "
                       f"'Similarity') or name the value column with column=...")
    values = pd.to_numeric(similarity[column], errors="coerce").astype(float)
    return dict(zip(similarity["Module Name"].astype(str), values.tolist(), strict=True))


def write_similarity_mermaid(model: fx.GraphModule, similarity: pd.DataFrame,
                             path: str | os.PathLike, *, column: str = "Similarity",
                             direction: str = "TD") -> Path:
    """Write ``model``'s graph as a mermaid flowchart coloured by similarity.

    Graph nodes are matched to table rows by op name: the module's qualified name (``name(k)``
    for the k-th call of a shared module) or the functional op's name (``layer1.0.add``), as
    :func:`qatkit.fx.naming.float_node_names` and ``featuremap_similarity`` name them.

    Args:
        model: the traced model whose graph is drawn (the table's model 2, or the float model).
        similarity: a ``featuremap_similarity`` table ("Module Name", "Similarity").
        path: the ``.mmd`` file to write (parent folders are created).
        column: the table column holding the value to show and colour by.
        direction: mermaid flow direction: "TD" (top-down) or "LR" (left-right).

    Returns:
        The path written.

    Example::

        >>> write_similarity_mermaid(gm, table, "out/similarity.mmd").read_text()[:14]
        'flowchart TD\\n'
    """
    if direction not in ("TD", "TB", "BT", "LR", "RL"):
        raise ValueError(f"write_similarity_mermaid: direction={direction!r}; use 'TD' or 'LR'")
    if not isinstance(model, fx.GraphModule):
        raise TypeError(f"write_similarity_mermaid: got a {type(model).__name__}; pass a traced "
                        "torch.fx.GraphModule (qatkit.fx.symbolic_trace(model) or a prepared "
                        "model)")
    values = _similarity_lookup(similarity, column)
    names = float_node_names(model)
    anns, modules = model_annotations(model), dict(model.named_modules())
    ids = _Ids()
    node_ids: dict[fx.Node, str] = {}
    lines = [f"flowchart {direction}",
             f"%% qatkit similarity graph: {column}; good >= {GOOD_SIMILARITY}, "
             f"ok >= {OK_SIMILARITY}, bad below, nodata = no row in the table"]
    classes: dict[str, list[str]] = {k: [] for k in CLASS_STYLES}
    for node in model.graph.nodes:
        if node.op == "placeholder":
            ident = ids("in", str(node.target))
            label = _escape_label(f"input: {node.target}")
            lines.append(f'    {ident}(["{label}"])')
            classes["io"].append(ident)
        elif node.op == "output":
            ident = ids("out", node.name)
            lines.append(f'    {ident}(["output"])')
            classes["io"].append(ident)
        elif node.op in CALL_OPS:
            name = names.get(node, node.name)
            value = values.get(name, values.get(node.name))
            if value is None and node.op == "call_module":
                value = values.get(str(node.target))
            shown = "n/a" if value is None or not math.isfinite(value) else f"{value:.6f}"
            ident = ids("n", name)
            label = "<br/>".join(_escape_label(t)
                                 for t in (name, op_label(anns[node], modules), shown))
            lines.append(f'    {ident}["{label}"]')
            classes[similarity_class(value)].append(ident)
        else:  # get_attr: constants, drawn as part of the op that uses them
            continue
        node_ids[node] = ident
    for node in model.graph.nodes:
        if node not in node_ids:
            continue
        for source in node.all_input_nodes:
            if source in node_ids:
                lines.append(f"    {node_ids[source]} --> {node_ids[node]}")
    for name, style in CLASS_STYLES.items():
        lines.append(f"    classDef {name} {style}")
    for name, members in classes.items():
        if members:
            lines.append(f"    class {','.join(members)} {name}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
