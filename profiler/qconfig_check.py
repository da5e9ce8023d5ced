"""check_qconfig: each op's quantization configuration in a prepared model, and the risky ones.

Per op: the input dtypes (its producers', found through data-moving ops), output dtype, weight
dtype and channel axis, fixed output scale; warnings for an output left unquantized where it is
not a model output, a fixed scale, int16 weights, a dtype change between connected layers, a
32-bit output on a layer that is not last, and a user's own check. The model is not modified.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import pandas as pd
from qatkit.fake_quantize import FakeQuantize
from qatkit.fx import op_kind
from qatkit.fx.naming import float_node_names
from qatkit.fx.patterns import FLOAT_BOUNDARY_MODULES
from qatkit.observers import FixedScaleObserver
from torch import Tensor, fx, nn

from .capture import write_table
from .checks import (
    _is_non_tensor,
    _is_passthrough,
    _label,
    _print_table,
    _run_copy,
    _strip_call,
)

__all__ = ["check_qconfig", "QCONFIG_COLUMNS", "QCONFIG_WARNING_COLUMNS"]

QCONFIG_COLUMNS = ["Module Name", "Module Type", "Input Dtype", "Output Dtype", "Weight Dtype",
                   "Weight ch_axis", "Fixed Scale"]
QCONFIG_WARNING_COLUMNS = ["Module Name", "Warning"]


def _tensor_nodes(gm: fx.GraphModule, example_inputs: Any) -> dict[str, bool] | None:
    """Node name -> produces a floating tensor, measured on a copy (None without inputs)."""
    if example_inputs is None:
        return None
    seen: dict[str, bool] = {}

    def on_node(interp: fx.Interpreter, n: fx.Node, run: Callable) -> Any:
        value = run(n)
        seen[n.name] = isinstance(value, Tensor) and value.is_floating_point()
        return value

    _run_copy(gm, example_inputs, "check_qconfig", on_node)
    return seen


class _Dtypes:
    """Output dtype of each node of a prepared graph, producers found through data-moving ops."""

    def __init__(self, gm: fx.GraphModule, tensors: dict[str, bool] | None) -> None:
        self.gm, self.tensors = gm, tensors
        self.modules = dict(gm.named_modules())
        self.memo: dict[fx.Node, str | None] = {}

    def is_tensor(self, node: fx.Node) -> bool:
        if self.tensors is not None:
            return self.tensors.get(node.name, False)
        return node.op != "output" and not _is_non_tensor(node)  # inferred from the graph

    def producer(self, node: fx.Node) -> fx.Node:
        while _is_passthrough(node, self.modules) and node.all_input_nodes:
            node = node.all_input_nodes[0]
        return node

    def out(self, node: fx.Node) -> str | None:
        if node in self.memo:
            return self.memo[node]
        src = self.producer(node)
        dtype: str | None = "float32"
        if not self.is_tensor(node) or src.op == "get_attr":
            dtype = None
        elif src.op == "call_module" and hasattr(self.modules[src.target],
                                                 "activation_post_process"):
            fq = self.modules[src.target].activation_post_process
            dtype = fq.dtype if fq is not None else "float32"
        self.memo[node] = dtype
        return dtype

    def inputs(self, node: fx.Node) -> list[tuple[fx.Node, str]]:
        return [(self.producer(a), d) for a in node.all_input_nodes
                if (d := self.out(a)) is not None]

    def consumers(self, node: fx.Node) -> list[fx.Node]:
        """The ops using ``node``'s output (not the graph output), past data-moving ops and the
        QuantStubs prepare inserted, and DeQuantStubs: none for a model output."""
        out = []
        for u in node.users:
            if _is_passthrough(u, self.modules) or (
                    u.op == "call_module" and (
                        op_kind(self.modules[u.target]) == "quant_stub"
                        or isinstance(self.modules[u.target], FLOAT_BOUNDARY_MODULES))):
                out.extend(self.consumers(u))
            elif u.op != "output" and not _is_non_tensor(u):
                out.append(u)
        return out


def _is_compute(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op in ("call_module", "call_function", "call_method") and not (
        _is_passthrough(node, modules) or _is_non_tensor(node) or (
            node.op == "call_module" and isinstance(modules[node.target], FLOAT_BOUNDARY_MODULES)))


def _matches(name: str, mod: nn.Module | None, prefixes: list[str], types: list[Any]) -> bool:
    path = _strip_call(name)
    ok_prefix = not prefixes or any(path == p or path.startswith(p + ".") for p in prefixes)
    ok_type = not types or mod is not None and any(
        (isinstance(t, type) and isinstance(mod, t)) or t == op_kind(mod) or t == mod._get_name()
        for t in types)
    return ok_prefix and ok_type


def _layer_warnings(name: str, node: fx.Node, mod: nn.Module | None, dt: _Dtypes,
                    names: dict[fx.Node, str]) -> list[str]:
    out: list[str] = []
    fq = getattr(mod, "activation_post_process", None) if mod is not None else None
    wfq = getattr(mod, "weight_fake_quant", None) if mod is not None else None
    weighted = mod is not None and hasattr(mod, "weight_fake_quant")
    consumers = sorted({names[u] for u in dt.consumers(node)})[:4]
    if dt.out(node) == "float32" and consumers:
        if weighted:
            out.append(f"32-bit (unquantized) output on a layer that is not the last: it feeds "
                       f"{consumers}, which re-quantize it. Fix: give '{_strip_call(name)}' an "
                       "8-bit qconfig; keep 32-bit output for the model's final conv/linear only")
        else:
            what = "has no quantized implementation" if mod is None or not hasattr(
                mod, "activation_post_process") else "has a qconfig without activation"
            out.append(f"output not quantized ({what}) but it is not a model output: it feeds "
                       f"{consumers} and the NPU must leave it to the CPU. Fix: use a supported "
                       "op (qatkit.fx.patterns.QUANTIZED_FUNCTIONS) or an 8-bit qconfig for "
                       f"'{_strip_call(name)}'")
    if fq is not None and isinstance(fq.observer, FixedScaleObserver):
        s = float(fq.observer.scale)
        span = s * fq.quant_max
        msg = f"fixed output scale {s:.6g} (covers [-{span:.4g}, {span:.4g}])"
        obs = fq.observer
        if obs.min_val.numel():
            lo, hi = float(obs.min_val.min()), float(obs.max_val.max())
            msg += f"; observed data [{lo:.4g}, {hi:.4g}]"
            if max(-lo, hi) > span * (1 + 1 / fq.quant_max):
                msg += " exceeds it and saturates"
        out.append(msg + ". Fix: make sure the data stays inside the fixed range (normalize the "
                   "input to [-1, 1] for scale 1/128), or let calibration choose the scale")
    if wfq is not None and wfq.dtype == "qint16":
        out.append("int16 weight: most NPUs run int8 weights only (int16 doubles weight memory "
                   "and bandwidth). Fix: an 8-bit-weight qconfig such as "
                   "qatkit.default_qat_8bit_weight_16bit_act_fake_quant_qconfig")
    if fq is not None and not isinstance(mod, FLOAT_BOUNDARY_MODULES) and op_kind(mod) != (
            "quant_stub"):
        changed = [(names[p], d) for p, d in dt.inputs(node) if d not in ("float32", fq.dtype)]
        if changed:
            srcs = ", ".join(f"'{p}' ({d})" for p, d in changed)
            out.append(f"dtype change: input from {srcs}, output {fq.dtype}; the NPU needs a "
                       f"mixed-precision kernel or a requantization here. Fix: give the connected "
                       f"layers the same activation dtype")
    return out


def check_qconfig(model: fx.GraphModule, example_inputs: Any = None,
                  prefixes: Iterable[str] = (), types: Iterable[Any] = (),
                  custom_check_func: Callable[[str, nn.Module], str | None] | None = None,
                  out_dir: str | os.PathLike | None = None, print_tabulate: bool = True,
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Show each op's quantization configuration in a prepared model, and warn about risky ones.

    Per op (quantized or left float): input dtypes (its producers', through data-moving ops),
    output dtype, weight dtype and channel axis, fixed output scale. Warnings: output not
    quantized where the op is not a model output, fixed scale, int16 weight, dtype change
    between connected layers, 32-bit output on a layer that is not last, and
    ``custom_check_func``'s. The model is not modified. See docs/profiler_checks.md.

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

    Returns:
        ``(layers, warnings)``: ``layers`` has columns "Module Name", "Module Type", "Input
        Dtype", "Output Dtype", "Weight Dtype", "Weight ch_axis", "Fixed Scale" (one row per
        call; a module called k times appears as ``name(0)``...); ``warnings`` has columns
        "Module Name", "Warning" (each warning ends with "Fix: ...").

    Raises:
        ValueError: ``model`` has no fake quants (not prepared), or ``prefixes``/``types``
            match no op.

    Example::

        >>> layers, warns = check_qconfig(qat_model, (x,), out_dir="report")
        >>> layers.set_index("Module Name").loc["conv1", "Weight Dtype"]
        'qint8'
    """
    if not isinstance(model, fx.GraphModule) or not any(
            isinstance(m, FakeQuantize) for m in model.modules()):
        raise ValueError(f"check_qconfig needs a model made by qatkit.prepare_qat_fx; "
                         f"{type(model).__name__} has no fake quants. Fix: pass the prepared "
                         "(QAT / calibrated) model, not the float or converted one")
    prefixes, types = list(prefixes), list(types)
    modules = dict(model.named_modules())
    names = float_node_names(model)
    dt = _Dtypes(model, _tensor_nodes(model, example_inputs))
    rows, warns = [], []
    for node in model.graph.nodes:
        if not _is_compute(node, modules) or not dt.is_tensor(node):
            continue
        mod = modules[node.target] if node.op == "call_module" else None
        name = names[node]
        if not _matches(name, mod, prefixes, types):
            continue
        fq = getattr(mod, "activation_post_process", None)
        wfq = getattr(mod, "weight_fake_quant", None)
        ins = sorted({d for _, d in dt.inputs(node)}, key=["float32", "qint8", "qint16"].index)
        rows.append((name, mod._get_name() if mod is not None else _label(node, modules),
                     ", ".join(ins), dt.out(node),
                     (wfq.dtype if wfq is not None else "float32")
                     if hasattr(mod, "weight_fake_quant") else None,
                     wfq.ch_axis if wfq is not None else None,
                     float(fq.observer.scale) if fq is not None
                     and isinstance(fq.observer, FixedScaleObserver) else float("nan")))
        texts = _layer_warnings(name, node, mod, dt, names)
        if custom_check_func is not None and mod is not None:
            try:
                extra = custom_check_func(_strip_call(name), mod)
            except Exception as e:
                raise RuntimeError(f"check_qconfig: custom_check_func failed on '{name}': "
                                   f"{type(e).__name__}: {e}") from e
            if extra:
                texts.append(str(extra))
        warns.extend((name, t) for t in texts)
    if (prefixes or types) and not rows:
        raise ValueError(f"check_qconfig: prefixes {prefixes} / types {types} match no op of "
                         f"{type(model).__name__}; op names look like "
                         f"{[names[n] for n in model.graph.nodes if n.op == 'call_module'][:5]}")
    layers = pd.DataFrame(rows, columns=QCONFIG_COLUMNS)
    layers["Weight ch_axis"] = layers["Weight ch_axis"].astype("Int64")
    warn_df = pd.DataFrame(warns, columns=QCONFIG_WARNING_COLUMNS)
    write_table(layers, out_dir, "qconfig_info", "Quantization configuration per op",
                extra=[("Warnings", warn_df)])
    write_table(warn_df, out_dir, "qconfig_warnings", "qconfig warnings")
    if print_tabulate:
        _print_table("qconfig", layers)
        _print_table("qconfig warnings", warn_df)
    return layers, warn_df
