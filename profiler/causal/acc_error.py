"""plot_acc_error: where error accumulates, and what leaving nodes float recovers.

Two views of a calibrated model against its own float data flow (every fake quant passing
its tensor through), as NPU debug guides draw them:

* ``quantize_node``: the **cumulative error curve** -- the metric of every quantized op's
  output along the model (execution order), one curve per configuration: only the weights
  quantized (``"weight"``), only the activations (``"activation"``), everything
  (``"node"``), or only the ops listed.  Which kind of quantizer dominates shows at a glance.
* ``non_quantize_node=[[...], [...]]``: the **partial un-quantization sweep** -- the metric of
  the output with each set of nodes left float (everything else quantized), e.g. the top 1, 2,
  3 nodes of a sensitivity ranking; the curve shows how much accuracy comes back.

Each view is written as PNG and SVG (matplotlib, no display needed) with its table (.csv,
.txt) into ``save_dir``.  The model is never changed.

Example::

    >>> res = plot_acc_error("out", data, calib_model, quantize_node=["weight", "activation"])
    >>> nodes = list(get_sensitivity_of_nodes(calib_model, calibrated_data=data))
    >>> res = plot_acc_error("out", data, calib_model,
    ...                      non_quantize_node=[nodes[:1], nodes[:2], nodes[:3]])
    >>> res.tables["non_quantize"]          # metric per set, with the baseline first
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
from qatkit.annotation import get_annotations
from torch import Tensor, fx
from tqdm.auto import tqdm

from ..core.metrics import BatchMetric, Metric
from ..core.running import collect_batches, private_model
from ..core.tables import write_table
from ._figures import cumulative_error_figure, sweep_figure
from .incremental import Evaluator, flat_output, metric_list
from .switches import NODE_TYPES, list_quantizers, resolve_quantizers

__all__ = ["plot_acc_error", "AccErrorResult"]

_CURVE_LABELS = {"weight": "only weights quantized", "activation": "only activations quantized",
                 "node": "everything quantized"}


@dataclasses.dataclass(frozen=True, repr=False)
class AccErrorResult:
    """What :func:`plot_acc_error` drew and wrote.

    Attributes:
        tables: ``"quantize"`` (Index, Node, Op Kind, one column per curve) and / or
            ``"non_quantize"`` (Set, Left Float, Count, the metric; row 0 is the baseline
            with nothing left float).
        figures: ``{"quantize": (png, svg), "non_quantize": (png, svg)}``.
        paths: every file written.
        metric: the metric's name.

    Example::

        >>> res.tables["non_quantize"]["Cosine"].tolist()
        [0.23, 0.9991, 0.9994]
    """

    tables: dict[str, pd.DataFrame]
    figures: dict[str, tuple[Path, Path]]
    paths: list[Path]
    metric: str

    def __repr__(self) -> str:
        return (f"AccErrorResult(metric={self.metric!r}, tables={list(self.tables)}, "
                f"{len(self.paths)} files)")


def _curve_sets(quantize_node: Sequence[Any], work: fx.GraphModule
                ) -> list[tuple[str, list[str]]]:
    """(label, fake quant paths switched on) per curve."""
    out = []
    every = list_quantizers(work, "node")
    for entry in quantize_node:
        if isinstance(entry, str) and entry in (*NODE_TYPES, "all"):
            kind = "node" if entry == "all" else entry
            paths = [p for q in list_quantizers(work, kind) for p in q.fake_quants]
            out.append((_CURVE_LABELS[kind], paths))
        else:
            names = [entry] if isinstance(entry, str) else list(entry)
            qs = resolve_quantizers(every, names, every, "quantize_node entry")
            label = "only " + ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
            out.append((label, [p for q in qs for p in q.fake_quants]))
    return out


def _op_nodes(work: fx.GraphModule, needed: set[fx.Node]) -> list[tuple[fx.Node, str, str]]:
    """(node, op name, kind) of every quantized op call whose output the curve shows."""
    out = []
    for node, ann in get_annotations(work).items():
        if ann.is_quantized and node.op == "call_module" and node in needed:
            out.append((node, ann.name, ann.kind))
    return out


def plot_acc_error(save_dir: str | os.PathLike, calibrated_data: Any, model_or_file: Any,
                   quantize_node: Sequence[Any] | None = None,
                   non_quantize_node: Sequence[Sequence[str]] | None = None,
                   output_node: Any = None, metric: Any = "cosine-similarity",
                   average_mode: bool = False, data_num: int | None = None, device: Any = None,
                   verbose: bool = True, incremental: bool = True,
                   input_fn: Callable[[Any], Any] | None = None,
                   node_type: str = "node") -> AccErrorResult:
    """Draw the cumulative error curve and / or the partial un-quantization sweep.

    Args:
        save_dir: the folder written (PNG, SVG, .csv, .txt).
        calibrated_data: the data compared on (any form :func:`get_sensitivity_of_nodes`
            takes).
        model_or_file: a calibrated / QAT model (or the path of one saved with torch.save).
        quantize_node: curves to draw, each ``"weight"``, ``"activation"``, ``"node"`` (all)
            or a list of names quantized alone.  Default ``["weight", "activation"]`` when
            ``non_quantize_node`` is not given either.
        non_quantize_node: sets of names left float (op names, or fake quant paths), e.g.
            ``[nodes[:1], nodes[:2], nodes[:3]]`` of a sensitivity ranking.
        output_node: what the sweep scores (None: every output; an int; an op name).
        metric: the comparison metric (``"cosine-similarity"``, ``"mse"``, ...).
        average_mode: the mean of the per-batch metrics instead of the metric over all the
            data at once.
        data_num: use the first ``data_num`` samples.
        device: run on this device (a copy); None: where the model is.
        verbose: progress bars.
        incremental: run only what follows each change in the sweep.
        input_fn: ``batch -> model input`` when batches hold more than the inputs.
        node_type: which quantizers of an op named in ``non_quantize_node`` are left float:
            ``"node"`` (all of them), ``"weight"`` or ``"activation"`` -- pass the
            ``node_type`` of the ranking the names come from.

    Returns:
        an :class:`AccErrorResult` (tables, figure paths).

    Raises:
        ValueError: unknown names (the closest are listed), a model not calibrated, data
            that does not fit.

    Example::

        >>> plot_acc_error(save_dir="./", calibrated_data=data, model_or_file=calib_model,
        ...                quantize_node=["weight", "activation"], metric="cosine-similarity",
        ...                average_mode=False)
    """
    if quantize_node is None and non_quantize_node is None:
        quantize_node = ["weight", "activation"]
    if isinstance(quantize_node, str):
        quantize_node = [quantize_node]
    mets = metric_list(metric)[:1]
    _, work = private_model(model_or_file, device=device)
    batches = collect_batches(work, calibrated_data, data_num, input_fn=input_fn)
    tables: dict[str, pd.DataFrame] = {}
    figures: dict[str, tuple[Path, Path]] = {}
    paths: list[Path] = []
    if quantize_node:
        curves = _curve_sets(quantize_node, work)
        ev = Evaluator(work, batches, mets, None, None, incremental)
        ev.set_reference(as_base=True)
        table = _curves(ev, curves, mets[0], average_mode, verbose)
        ev.set_flags(ev.given)  # the copy as given again, for the sweep below
        tables["quantize"] = table
        figures["quantize"] = cumulative_error_figure(table, [c[0] for c in curves], mets[0],
                                                      save_dir)
    if non_quantize_node:
        sets = [[s] if isinstance(s, str) else list(s) for s in non_quantize_node]
        if node_type not in NODE_TYPES:
            raise ValueError(f"node_type={node_type!r}: choose one of {list(NODE_TYPES)}")
        every = list_quantizers(work, "node")
        kind = list_quantizers(work, node_type)
        resolved = [resolve_quantizers(kind, s, every, "non_quantize_node entry") for s in sets]
        ev = Evaluator(work, batches, mets, output_node, None, incremental)
        ev.set_reference()
        baseline = ev.set_base(ev.all(True))
        if average_mode:
            baseline = _average(ev, [], {}, mets[0])
        rows = [{"Set": 0, "Left Float": "(none)", "Count": 0, **baseline}]
        for i, (names, qs) in enumerate(tqdm(list(zip(sets, resolved, strict=True)),
                                             desc="partial un-quantization", unit="set",
                                             disable=not verbose, leave=False)):
            paths_off = {p: False for q in qs for p in q.fake_quants}
            starts = [n for q in qs for n in q.nodes]
            if average_mode:
                scores = _average(ev, starts, paths_off, mets[0])
            else:
                scores = ev.measure(starts, enabled=paths_off)
            rows.append({"Set": i + 1, "Left Float": ", ".join(names), "Count": len(names),
                         **scores})
        table = pd.DataFrame(rows)
        tables["non_quantize"] = table
        figures["non_quantize"] = sweep_figure(table, mets[0], save_dir)
    for key, table in tables.items():
        paths += [Path(p) for p in write_table(table, save_dir, f"acc_error_{key}",
                                               f"plot_acc_error ({key}, {mets[0].name})")]
        paths += list(figures[key])
    return AccErrorResult(tables, figures, paths, mets[0].name)


def _average(ev: Evaluator, starts: list[str], enabled: dict[str, bool], metric: Metric
             ) -> dict[str, float]:
    """The mean over batches of the metric of each batch's output (average_mode)."""
    with ev.flags(enabled):
        outs = ev.runner.run_from(starts)
    vals = [metric(ref, flat_output(o, ev.leaf).float().to(ref.device))
            for ref, o in zip(ev.reference_batches, outs, strict=True)]
    return {metric.name: sum(vals) / len(vals)}


def _curves(ev: Evaluator, curves: list[tuple[str, list[str]]], metric: Metric,
            average_mode: bool, verbose: bool) -> pd.DataFrame:
    """The metric of every quantized op's output (and the model output) per curve."""
    runner = ev.runner
    ops = _op_nodes(ev.work, runner.needed)
    out_node = runner.target
    columns: dict[str, list[float]] = {}
    for label, paths in tqdm(curves, desc="cumulative error", unit="curve",
                             disable=not verbose, leave=False):
        accs = [BatchMetric(metric) for _ in range(len(ops) + 1)]
        per_batch: list[list[float]] = [[] for _ in range(len(ops) + 1)]
        with ev.flags({p: True for p in paths if ev.given[p]}):
            for b, base in enumerate(runner.base):
                env = runner.runner.run_list(runner._env(b), runner.compute)
                pairs = [(base[n], env[n]) for n, _, _ in ops]
                pairs.append((flat_output(base[out_node]), flat_output(env[out_node])))
                for i, (ref, val) in enumerate(pairs):
                    if not (isinstance(ref, Tensor) and ref.is_floating_point()):
                        continue
                    if average_mode:
                        per_batch[i].append(metric(ref, val))
                    else:
                        accs[i].add(ref, val)
        if average_mode:
            columns[label] = [sum(v) / len(v) if v else float("nan") for v in per_batch]
        else:
            columns[label] = [a.value() for a in accs]
    names = [name for _, name, _ in ops] + ["output"]
    kinds = [kind for _, _, kind in ops] + ["output"]
    return pd.DataFrame({"Index": range(len(names)), "Module Name": names, "Op Kind": kinds,
                         **columns})
