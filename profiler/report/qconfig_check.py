"""check_qconfig: each op's quantization configuration in a prepared model, and the risky ones.

Everything is read from the model's quantization annotation (:mod:`qatkit.annotation`): per op
the dtypes of its inputs (the spec of each tensor argument), of its output and of its weight,
the weight's channel axis and a fixed output scale; warnings for an output left unquantized
where it is not a model output, a fixed scale, int16 weights, a dtype change between connected
layers, a 32-bit output on a layer that is not last, and a user's own check.  Which nodes
produce tensors is measured once (a :class:`~qatkit.profiler.core.capture.Capture`), or read from
the annotation without example inputs.  The model is not modified.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping

import pandas as pd
from qatkit.annotation import (
    NodeAnnotation,
    QuantSpec,
    get_annotations,
    has_annotations,
    source_annotation,
)
from qatkit.fake_quantize import FakeQuantize
from torch import fx, nn

from ..core.alignment import op_label
from ..core.capture import Capture, capture_model
from ..core.tables import print_table, qconfig_key, write_table

__all__ = ["check_qconfig", "QCONFIG_COLUMNS", "QCONFIG_WARNING_COLUMNS"]

QCONFIG_COLUMNS = ["Module Name", "Module Type", "Input Dtype", "Output Dtype", "Weight Dtype",
                   "Weight ch_axis", "Fixed Scale"]
QCONFIG_WARNING_COLUMNS = ["Module Name", "Warning"]
#: annotation kinds that end or restart quantization without computing anything: a consumer
#: behind them is looked for further on
_BOUNDARY_KINDS = ("quant_stub", "dequant_stub")
#: kinds of the QAT modules that own a weight (their "Weight Dtype" is float32 without a
#: weight fake quant)
_WEIGHTED_KINDS = ("conv", "linear")
_DTYPE_ORDER = ["float32", "qint8", "qint16"]


def _dtype(spec: QuantSpec | None) -> str:
    return "float32" if spec is None else spec.dtype


class _Graph:
    """The annotation of a prepared graph, and which of its nodes produce tensors."""

    def __init__(self, gm: fx.GraphModule, tensors: Mapping[str, bool] | None) -> None:
        self.gm = gm
        self.anns = {a.node: a for a in get_annotations(gm).values()}
        self.tensors = tensors
        self.users: dict[str, list[str]] = {n.name: [u.name for u in n.users]
                                            for n in gm.graph.nodes}

    def is_tensor(self, ann: NodeAnnotation) -> bool:
        if self.tensors is not None:
            return self.tensors.get(ann.name, False)
        return ann.role not in ("output", "non_tensor", "attr")  # inferred from the graph

    def inputs(self, ann: NodeAnnotation) -> list[tuple[NodeAnnotation, str]]:
        """(source op, dtype) of each tensor argument (sources through data-moving ops)."""
        out = []
        for arg in ann.inputs:
            producer = self.anns[arg.node]
            if producer.role == "attr" or not self.is_tensor(producer):
                continue
            out.append((source_annotation(producer, self.anns), _dtype(arg.spec)))
        return out

    def consumers(self, ann: NodeAnnotation) -> list[NodeAnnotation]:
        """The ops using ``ann``'s output (not the graph output), past data-moving ops and the
        QuantStubs prepare inserted, and DeQuantStubs: none for a model output."""
        out = []
        for name in self.users[ann.node]:
            user = self.anns[name]
            if user.role == "passthrough" or user.kind in _BOUNDARY_KINDS:
                out.extend(self.consumers(user))
            elif user.role not in ("output", "non_tensor"):
                out.append(user)
        return out


def _is_compute(ann: NodeAnnotation) -> bool:
    return ann.role in ("quantized", "float") and ann.kind != "dequant_stub"


def _matches(ann: NodeAnnotation, mod: nn.Module | None, prefixes: list[str],
             types: list[Any]) -> bool:
    path = qconfig_key(ann.name)
    ok_prefix = not prefixes or any(path == p or path.startswith(p + ".") for p in prefixes)
    ok_type = not types or any(
        (isinstance(t, type) and isinstance(mod, t)) or t == ann.kind
        or (mod is not None and t == mod._get_name()) for t in types)
    return ok_prefix and ok_type


def _fixed_scale_warning(gm: fx.GraphModule, spec: QuantSpec) -> str:
    s = float(spec.fixed_scale)
    span = s * spec.quant_max
    msg = f"fixed output scale {s:.6g} (covers [-{span:.4g}, {span:.4g}])"
    obs = getattr(gm.get_submodule(spec.module_path), "observer", None)
    if obs is not None and obs.min_val.numel():
        lo, hi = float(obs.min_val.min()), float(obs.max_val.max())
        msg += f"; observed data [{lo:.4g}, {hi:.4g}]"
        if max(-lo, hi) > span * (1 + 1 / spec.quant_max):
            msg += " exceeds it and saturates"
    return msg + (". Fix: make sure the data stays inside the fixed range (normalize the "
                  "input to [-1, 1] for scale 1/128), or let calibration choose the scale")


def _layer_warnings(ann: NodeAnnotation, graph: _Graph) -> list[str]:
    out: list[str] = []
    weighted = ann.kind in _WEIGHTED_KINDS and ann.is_quantized
    consumers = sorted({c.name for c in graph.consumers(ann)})[:4]
    key = qconfig_key(ann.name)
    if ann.output is None and consumers:
        if weighted:
            out.append(f"32-bit (unquantized) output on a layer that is not the last: it feeds "
                       f"{consumers}, which re-quantize it. Fix: give '{key}' an "
                       "8-bit qconfig; keep 32-bit output for the model's final conv/linear only")
        else:
            what = ("has a qconfig without activation" if ann.is_quantized
                    else "has no quantized implementation")
            out.append(f"output not quantized ({what}) but it is not a model output: it feeds "
                       f"{consumers} and the NPU must leave it to the CPU. Fix: use a supported "
                       "op (qatkit.fx.patterns.QUANTIZED_FUNCTIONS) or an 8-bit qconfig for "
                       f"'{key}'")
    if ann.output is not None and ann.output.fixed_scale is not None:
        out.append(_fixed_scale_warning(graph.gm, ann.output))
    if ann.weight is not None and ann.weight.dtype == "qint16":
        out.append("int16 weight: most NPUs run int8 weights only (int16 doubles weight memory "
                   "and bandwidth). Fix: an 8-bit-weight qconfig such as "
                   "qatkit.default_qat_8bit_weight_16bit_act_fake_quant_qconfig")
    if ann.output is not None and ann.kind not in _BOUNDARY_KINDS:
        dtype = ann.output.dtype
        changed = [(src.name, d) for src, d in graph.inputs(ann) if d not in ("float32", dtype)]
        if changed:
            srcs = ", ".join(f"'{p}' ({d})" for p, d in changed)
            out.append(f"dtype change: input from {srcs}, output {dtype}; the NPU needs a "
                       f"mixed-precision kernel or a requantization here. Fix: give the connected "
                       f"layers the same activation dtype")
    return out


def _row(ann: NodeAnnotation, graph: _Graph, modules: Mapping[str, nn.Module]) -> tuple:
    ins = sorted({d for _, d in graph.inputs(ann)}, key=lambda d: (
        _DTYPE_ORDER.index(d) if d in _DTYPE_ORDER else len(_DTYPE_ORDER), d))
    weighted = ann.kind in _WEIGHTED_KINDS and ann.is_quantized
    spec = ann.output
    return (ann.name, op_label(ann, modules), ", ".join(ins), _dtype(spec),
            _dtype(ann.weight) if weighted else None,
            ann.weight.ch_axis if ann.weight is not None else None,
            spec.fixed_scale if spec is not None and spec.fixed_scale is not None
            else float("nan"))


def check_qconfig(model: fx.GraphModule, example_inputs: Any = None,
                  prefixes: Iterable[str] = (), types: Iterable[Any] = (),
                  custom_check_func: Callable[[str, nn.Module], str | None] | None = None,
                  out_dir: str | os.PathLike | None = None, print_tabulate: bool = True,
                  capture: Capture | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Show each op's quantization configuration in a prepared model, and warn about risky ones.

    Per op (quantized or left float), read from the quantization annotation: input dtypes (the
    spec of each tensor argument), output dtype, weight dtype and channel axis, fixed output
    scale. Warnings: output not quantized where the op is not a model output, fixed scale,
    int16 weight, dtype change between connected layers, 32-bit output on a layer that is not
    last, and ``custom_check_func``'s. The model is not modified. See docs/profiler_checks.md.

    Args:
        model: a prepared (QAT / calibrated) model.
        example_inputs: the forward's arguments; used to tell tensors from other values (None:
            inferred from the graph).
        prefixes: only ops whose name is (or is inside) one of these names.
        types: only ops of these classes (QAT or float class), op kinds (``"add"``) or module
            type names (``"ConvBnReLU2d"``).
        custom_check_func: ``f(name, module) -> str | None``; a string becomes a warning.
        out_dir: if given, ``qconfig_info.csv`` / ``.txt`` (both tables in the .txt) and
            ``qconfig_warnings.csv`` / ``.txt`` are written there.
        print_tabulate: print both tables.
        capture: a :class:`~qatkit.profiler.core.capture.Capture` of ``model``: which nodes produce
            tensors is read from it instead of running ``example_inputs``.

    Returns:
        ``(layers, warnings)``: ``layers`` has columns "Module Name", "Module Type", "Input
        Dtype", "Output Dtype", "Weight Dtype", "Weight ch_axis", "Fixed Scale" (one row per
        call; a module called k times appears as ``name(0)``...); ``warnings`` has columns
        "Module Name", "Warning" (each warning ends with "Fix: ...").

    Raises:
        ValueError: ``model`` has no fake quants (not prepared), ``capture`` is another
            model's, or ``prefixes``/``types`` match no op.

    Example::

        >>> layers, warns = check_qconfig(qat_model, (x,), out_dir="report")
        >>> layers.set_index("Module Name").loc["conv1", "Weight Dtype"]
        'qint8'
    """
    if not has_annotations(model) or not any(isinstance(m, FakeQuantize)
                                             for m in model.modules()):
        raise ValueError(f"check_qconfig needs a model made by qatkit.prepare_qat_fx; "
                         f"{type(model).__name__} has no fake quants. Fix: pass the prepared "
                         "(QAT / calibrated) model, not the float or converted one")
    prefixes, types = list(prefixes), list(types)
    if capture is not None:
        capture.check_model(model, "check_qconfig")
    elif example_inputs is not None:
        try:
            capture = capture_model(model, example_inputs, "model", float_flow=True)
        except Exception as e:
            raise RuntimeError(f"check_qconfig: running example_inputs through "
                               f"{type(model).__name__} failed: {type(e).__name__}: {e}") from e
    graph = _Graph(model, None if capture is None else capture.tensors)
    modules = dict(model.named_modules())
    rows, warns = [], []
    for node in model.graph.nodes:
        ann = graph.anns[node.name]
        if not _is_compute(ann) or not graph.is_tensor(ann):
            continue
        mod = modules[str(node.target)] if node.op == "call_module" else None
        if not _matches(ann, mod, prefixes, types):
            continue
        rows.append(_row(ann, graph, modules))
        texts = _layer_warnings(ann, graph)
        if custom_check_func is not None and mod is not None:
            try:
                extra = custom_check_func(qconfig_key(ann.name), mod)
            except Exception as e:
                raise RuntimeError(f"check_qconfig: custom_check_func failed on '{ann.name}': "
                                   f"{type(e).__name__}: {e}") from e
            if extra:
                texts.append(str(extra))
        warns.extend((ann.name, t) for t in texts)
    if (prefixes or types) and not rows:
        raise ValueError(f"check_qconfig: prefixes {prefixes} / types {types} match no op of "
                         f"{type(model).__name__}; op names look like "
                         f"{[a.name for a in graph.anns.values() if a.module][:5]}")
    layers = pd.DataFrame(rows, columns=QCONFIG_COLUMNS)
    layers["Weight ch_axis"] = layers["Weight ch_axis"].astype("Int64")
    warn_df = pd.DataFrame(warns, columns=QCONFIG_WARNING_COLUMNS)
    write_table(layers, out_dir, "qconfig_info", "Quantization configuration per op",
                extra=[("Warnings", warn_df)])
    write_table(warn_df, out_dir, "qconfig_warnings", "qconfig warnings")
    if print_tabulate:
        print_table("qconfig", layers)
        print_table("qconfig warnings", warn_df)
    return layers, warn_df
