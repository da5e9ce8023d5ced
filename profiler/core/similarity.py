"""featuremap_similarity: compare two models op by op, end to end or per layer.

model1 (the reference: float, calibrated or QAT) is captured once
(:class:`~qatkit.profiler.core.capture.Capture`), keeping on the CPU the outputs model2 has
counterparts for (aligned by float name through :mod:`.alignment`, never guessed).  model2 then
runs through an Interpreter that compares each op's output with model1's as soon as it is
computed, so model2's feature maps are not stored (unless a report asks its end-to-end capture
to record them for the statistics, :func:`compare_models`):

* **end to end** -- model2 runs on its own: each row shows the error accumulated up to that op;
* **same input** -- every op of model2 that has a counterpart in model1 hands on model1's
  value instead of its own (after its own output was compared), so each op runs on exactly
  the input model1's op saw and its row shows the op's *own* error.

``method="EndToEnd"`` takes Similarity / Acc Error from the first run and "Op Error with Same
Input" from the second; ``method="PerLayer"`` runs only the second and takes every column
from it -- the distinction NPU toolchains make between end-to-end and per-layer precision
analysis.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from qatkit.fx.naming import float_node_names
from torch import Tensor, fx, nn

from .alignment import CALL_OPS, check_inputs, is_prepared, op_label, op_names, reference_names
from .capture import Capture, model_annotations, node_qparams, run_capture
from .metrics import Metric, chunk_pairs, cosine, cosine_and_max_abs, get_metric
from .running import analysis_model, as_tuple, device_pair, model_device, to_device
from .tables import write_table

__all__ = ["featuremap_similarity", "similarity_tables", "compare_models", "ModelComparison",
           "SIMILARITY_COLUMNS", "METHODS"]

SIMILARITY_COLUMNS = ["Index", "Module Name", "Module Type", "Similarity", "qscale",
                      "Acc Error (float atol)", "Acc Error (N out_qscale)",
                      "Op Error with Same Input (N out_qscale)"]
METHODS = ("EndToEnd", "PerLayer")

# Set by benchmarks/profiler.py (``_MemoryMeter``) to measure the bytes the profiler holds.
_METER: _MemoryMeter | None = None


class _MemoryMeter:
    """Peak bytes of distinct tensor storages held by the profiler: model1's records plus
    the live values of the interpreter that is running (its environment)."""

    def __init__(self) -> None:
        self.peak = 0

    def sample(self, records: dict, env: dict) -> None:
        seen: dict[int, int] = {}

        def add(v: Any) -> None:
            if isinstance(v, Tensor):
                s = v.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
            elif isinstance(v, (list, tuple)):
                for x in v:
                    add(x)

        for v in records.values():
            add(v)
        for v in env.values():
            add(v)
        self.peak = max(self.peak, sum(seen.values()))


def _parse_method(method: str) -> str:
    for m in METHODS:
        if m.lower() == str(method).lower():
            return m
    raise ValueError(f"unknown method {method!r}: choose one of {list(METHODS)}")


def _occurrences(names: dict[fx.Node, str]) -> dict[fx.Node, tuple[str, int]]:
    seen: Counter = Counter()
    out = {}
    for node, fname in names.items():
        out[node] = (fname, seen[fname])
        seen[fname] += 1
    return out


def _align(gm1: fx.GraphModule, gm2: fx.GraphModule) -> dict[fx.Node, tuple[str, int]]:
    """model2 node -> the key (float name, k) of its counterpart among model1's nodes.

    The k-th model2 node with float name F matches the k-th model1 node with F when both
    have the same number of them (calibrated vs integer), else model1's last one (a float
    model has one node per name; a prepared model may add a QuantStub with the same name).
    """
    occ1 = _occurrences(reference_names(gm1))
    count1 = Counter(f for f, _ in occ1.values())
    ref2 = reference_names(gm2)
    occ2 = _occurrences(ref2)
    count2 = Counter(f for f, _ in occ2.values())
    names2 = op_names(gm2)
    # a QuantStub prepare put on a constant (a buffer read by get_attr) has the constant's
    # name: model1 holds it as a constant, not an op; it has no row
    constants1 = {f for n, f in float_node_names(gm1).items() if n.op == "get_attr"}
    missing = [names2[n] + (f" (float name '{f}')" if f != names2[n] else "")
               for n, (f, _) in occ2.items()
               if n.op in CALL_OPS and f not in count1 and f not in constants1]
    if missing and is_prepared(gm2):
        raise ValueError(
            f"featuremap_similarity: model2 ({type(gm2).__name__}) has {len(missing)} op(s) with "
            f"no counterpart in model1 ({type(gm1).__name__}): {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}. The models do not correspond: model2 must "
            "be model1 prepared / calibrated / converted (or the float model it came from)")
    out = {}
    for node, (fname, k) in occ2.items():
        if fname not in count1:
            continue
        out[node] = (fname, k if count1[fname] == count2[fname] else count1[fname] - 1)
    if not any(n.op in CALL_OPS for n in out):
        raise ValueError(f"featuremap_similarity: no op of model2 ({type(gm2).__name__}) "
                         f"matches an op of model1 ({type(gm1).__name__}); the models do not "
                         "correspond")
    return out


class _Comparison:
    """``on_output`` of a model2 run: compares each aligned op's output with model1's kept
    output; with ``substitute``, hands model1's value on instead (the same-input run)."""

    def __init__(self, keys: dict[str, tuple[str, int]], kept: dict[tuple[str, int], Tensor],
                 metric: Metric | None, substitute: bool, names1: dict[tuple[str, int], str],
                 names2: dict[str, str]) -> None:
        self.keys, self.kept, self.metric, self.substitute = keys, kept, metric, substitute
        self.names1, self.names2 = names1, names2
        self.sim: dict[str, float] = {}
        self.atol: dict[str, float] = {}

    def __call__(self, interp: fx.Interpreter, n: fx.Node, out: Any) -> Any:
        key = self.keys.get(n.name)
        if n.op not in CALL_OPS or key not in self.kept or not isinstance(out, Tensor):
            return out
        ref = self.kept[key]
        if tuple(out.shape) != tuple(ref.shape):
            raise ValueError(
                f"featuremap_similarity: model1's op '{self.names1[key]}' (float name "
                f"'{key[0]}') outputs shape {list(ref.shape)} but model2's op "
                f"'{self.names2[n.name]}' outputs {list(out.shape)}: the models do not "
                "correspond at this layer (was model2 made from model1?)")
        cpu = out.detach().to("cpu")
        if self.metric is not None and self.metric.fn is cosine:
            self.sim[n.name], self.atol[n.name] = cosine_and_max_abs(ref, cpu)  # one pass
        else:
            if self.metric is not None:
                self.sim[n.name] = self.metric(ref, cpu)
            self.atol[n.name] = _max_abs(ref, cpu)
        if self.substitute:
            out = ref.to(device=out.device, dtype=out.dtype, copy=True)
        if _METER is not None:
            _METER.sample(self.kept, {**interp.env, n: out, "cpu": cpu})
        return out


class _Hooked(fx.Interpreter):
    """An Interpreter that passes each op's output through ``on_output``."""

    def __init__(self, gm: fx.GraphModule, on_output: Any) -> None:
        super().__init__(gm)
        self.on_output = on_output

    def run_node(self, n: fx.Node) -> Any:
        return self.on_output(self, n, super().run_node(n))


def _sample_meter(interp: fx.Interpreter, n: fx.Node, out: Any) -> Any:
    """model1's ``on_output`` while a benchmark measures memory: its kept outputs and the
    interpreter's live values."""
    if _METER is not None:
        _METER.sample(interp.cap.kept, {**interp.env, n: out})
    return out


def _max_abs(a: Tensor, b: Tensor) -> float:
    """max |b - a|, in ``a``'s dtype (float64 for integers), chunk by chunk."""
    worst = 0.0
    for x, y in chunk_pairs(a, b, None if a.is_floating_point() else torch.float64):
        err = float((y - x).abs().max())
        if math.isnan(err):
            return math.nan
        worst = max(worst, err)
    return worst


def _steps(err: float, scale: float) -> float:
    if math.isnan(scale):
        return math.nan
    if scale == 0:
        return 0.0 if err == 0 else math.inf
    return err / scale


@dataclasses.dataclass(frozen=True, repr=False)
class ModelComparison:
    """The similarity tables of two models and the captures they were computed from.

    Attributes:
        tables: method (``"EndToEnd"``, ``"PerLayer"``) -> table (:data:`SIMILARITY_COLUMNS`).
        capture1: model1's capture (its outputs of the aligned ops in ``kept``).
        capture2: model2's end-to-end capture (None without ``"EndToEnd"``): its records,
            call counts and output come from the run that gave the end-to-end table.
    """

    tables: dict[str, pd.DataFrame]
    capture1: Capture
    capture2: Capture | None

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}: {len(v)} rows" for k, v in self.tables.items())
        return f"ModelComparison({sizes}, {self.capture1!r}, {self.capture2!r})"


def compare_models(model1: nn.Module, model2: nn.Module, inputs: Any, metric: Metric,
                   devices: Any = None, methods: Sequence[str] = METHODS,
                   records2: Mapping[str, Any] | None = None) -> ModelComparison:
    """The tables of :func:`featuremap_similarity` for several methods from one set of runs,
    with the captures a report's other tools read.

    model1 runs once (its :class:`~qatkit.profiler.core.capture.Capture` keeps the outputs of the
    aligned ops); model2 runs end to end once (a capture too: with ``records2`` it records its
    feature maps, as :func:`~qatkit.profiler.get_raw_features` does) and once with model1's
    values handed on (PerLayer).  ``methods=("EndToEnd", "PerLayer")`` costs what
    ``"EndToEnd"`` alone costs.

    Args:
        model1, model2, inputs, devices: as in :func:`featuremap_similarity`.
        metric: a :class:`~qatkit.profiler.core.metrics.Metric`.
        methods: the tables to compute.
        records2: record model2's feature maps with these :func:`run_capture` arguments
            (``{}`` for all; ``prefixes``, ``types``, ``preserve_int``); None: none.

    Example::

        >>> cmp = compare_models(float_model, calib_model, (x,), get_metric("Cosine"),
        ...                      records2={})
        >>> cmp.tables["PerLayer"].head(), len(cmp.capture2.records)
    """
    methods = [_parse_method(m) for m in methods]
    inputs = as_tuple(inputs)
    dev1, dev2 = device_pair(devices)
    with analysis_model(model1, "model1", dev1) as gm1, \
            analysis_model(model2, "model2", dev2) as gm2:
        check_inputs(gm1, inputs, "model1")
        check_inputs(gm2, inputs, "model2")
        keys = {n.name: k for n, k in _align(gm1, gm2).items()}
        occ1 = _occurrences(reference_names(gm1))
        wanted = set(keys.values())
        op1 = op_names(gm1)
        cap1 = run_capture(gm1, inputs, model1, "model1",
                           keep={op1[n] for n, k in occ1.items() if k in wanted},
                           on_output=None if _METER is None else _sample_meter)
        kept = {k: cap1.kept[op1[n]] for n, k in occ1.items() if op1[n] in cap1.kept}
        names1 = {k: op1[n] for n, k in occ1.items()}
        names2 = {n.name: name for n, name in op_names(gm2).items()}
        runs: dict[str, _Comparison] = {}
        cap2 = None
        if "EndToEnd" in methods:
            runs["e2e"] = _Comparison(keys, kept, metric, False, names1, names2)
            cap2 = run_capture(gm2, inputs, model2, "model2", records=records2 is not None,
                               on_output=runs["e2e"], **dict(records2 or {}))
        runs["same"] = _Comparison(keys, kept, metric if "PerLayer" in methods else None, True,
                                   names1, names2)
        with torch.no_grad():
            _Hooked(gm2, runs["same"]).run(*to_device(inputs, model_device(gm2)))
        qparams1 = node_qparams(gm1)
        qp1 = {k: qparams1[n][0] for n, k in occ1.items()}
        qp2 = node_qparams(gm2)
        modules2 = dict(gm2.named_modules())
        anns2 = model_annotations(gm2)
        tables = {}
        for method in methods:
            main = runs["e2e" if method == "EndToEnd" else "same"]
            rows = []
            for node in gm2.graph.nodes:
                if node.name not in main.atol:
                    continue
                scale = qp2[node][0]
                if scale is None:
                    scale = qp1.get(keys[node.name])
                scale = math.nan if scale is None else float(scale)
                atol = main.atol[node.name]
                rows.append({"Index": len(rows), "Module Name": names2[node.name],
                             "Module Type": op_label(anns2[node], modules2),
                             "Similarity": main.sim[node.name], "qscale": scale,
                             "Acc Error (float atol)": atol,
                             "Acc Error (N out_qscale)": _steps(atol, scale),
                             "Op Error with Same Input (N out_qscale)":
                                 _steps(runs["same"].atol.get(node.name, math.nan), scale)})
            tables[method] = pd.DataFrame(rows, columns=SIMILARITY_COLUMNS)
    return ModelComparison(tables, cap1, cap2)


def similarity_tables(model1: nn.Module, model2: nn.Module, inputs: Any, metric: Metric,
                      devices: Any = None, methods: Sequence[str] = METHODS,
                      ) -> tuple[dict[str, pd.DataFrame], tuple[Any, Any]]:
    """The tables of :func:`featuremap_similarity` for several methods from one set of runs,
    and the two models' outputs (model2's from its end-to-end run; None without EndToEnd).

    model1 runs once, model2 once per kind of run needed (end to end; same input), so
    ``methods=("EndToEnd", "PerLayer")`` costs what ``"EndToEnd"`` alone costs.  See
    :func:`compare_models` for the captures behind them.

    Example::

        >>> tables, (out1, out2) = similarity_tables(float_model, calib_model, (x,),
        ...                                          get_metric("Cosine"))
        >>> tables["PerLayer"].head()
    """
    cmp = compare_models(model1, model2, inputs, metric, devices, methods)
    out2 = None if cmp.capture2 is None else cmp.capture2.output
    return cmp.tables, (cmp.capture1.output, out2)


def featuremap_similarity(model1: nn.Module, model2: nn.Module, inputs: Any,
                          similarity_func: Any = "Cosine", threshold: float | None = None,
                          devices: Any = None, out_dir: str | os.PathLike | None = None,
                          method: str = "EndToEnd") -> pd.DataFrame:
    """Compare model2's ops with model1's, op by op, for one batch.

    Works for float vs calibrated/QAT, calibrated vs integer, QAT vs integer (and float vs
    integer).  Ops are aligned by float name through prepare's provenance: a fused
    conv+bn+relu of model2 is compared with the float relu's output.  Both models run in
    eval mode without gradients and are not changed (see
    :func:`qatkit.profiler.core.running.analysis_model`).

    Args:
        model1: the reference model (float, or the less quantized one).
        model2: the model analysed.
        inputs: the models' input, or a tuple of inputs (one batch).
        similarity_func: ``"Cosine"``, ``"MSE"``, ``"L1"``, ``"KL"``, ``"SQNR"``,
            ``"MaxAbs"`` (see :mod:`qatkit.profiler.core.metrics`) or a callable
            ``fn(model1_tensor, model2_tensor) -> float`` (higher is better unless it has
            ``higher_is_better = False``).
        threshold: when given, only the rows whose Similarity is strictly worse than it are
            returned (below it for Cosine / SQNR, above it for MSE / L1 / KL / MaxAbs; NaN
            always counts as worse), with their Index from the full table.  ``out_dir`` still
            gets the full table, and the .txt lists the flagged rows after it.
        devices: one device for both models or a pair ``(model1's, model2's)``; a model on
            another device runs as a copy.  None: each where it is.
        out_dir: also write ``<out_dir>/featuremap_similarity.csv`` and ``.txt``.
        method: ``"EndToEnd"`` (Similarity and Acc Error of model2 run on its own) or
            ``"PerLayer"`` (every op of model2 runs on the input model1's op saw: each row
            is the op's own error).  "Op Error with Same Input" is the per-layer error in
            both.

    Returns:
        a DataFrame, one row per op of model2 that has a counterpart in model1, in execution
        order: "Index", "Module Name" (model2's op), "Module Type", "Similarity", "qscale"
        (model2's output scale; model1's if model2's output is float; NaN if neither),
        "Acc Error (float atol)" (max |model2 - model1|), "Acc Error (N out_qscale)" (the
        same in steps of qscale), "Op Error with Same Input (N out_qscale)".  Integer ops
        round their (substituted) input to their input grid, so for an integer model2 the
        op error includes the rounding of its input.

    Raises:
        ValueError: the inputs do not fit a model, a model is in CALIBRATION state (fake
            quantization off; the fix is in the message), an unknown similarity_func or
            method, or the models do not correspond (the message names the layer).

    Example::

        >>> table = featuremap_similarity(float_model, calib_model, x, method="PerLayer")
        >>> table.sort_values("Similarity").head(3)[["Module Name", "Similarity"]]
    """
    metric = get_metric(similarity_func)
    method = _parse_method(method)
    table = similarity_tables(model1, model2, inputs, metric, devices, (method,))[0][method]
    flagged = table
    if threshold is not None:
        mask = [metric.is_worse(float(v), threshold) for v in table["Similarity"]]
        flagged = table[mask].reset_index(drop=True)
    title = (f"featuremap_similarity ({method}, {metric.name}): model1 "
             f"{type(model1).__name__} vs model2 {type(model2).__name__}")
    extra: Sequence[tuple[str, pd.DataFrame]] = ()
    if threshold is not None:
        extra = [(f"Rows with {metric.name} worse than {threshold}", flagged)]
    write_table(table, out_dir, "featuremap_similarity", title, extra=extra)
    return flagged
