"""export_onnx: write a calibrated / QAT model as standard QDQ ONNX.

The exporter writes what the integer model computes, read from the one place that computes
it: a QAT model is converted with :func:`qatkit.convert_fx` (integer weights, int32 bias,
scales and rounding rules all come from there), and the ONNX graph is emitted from the
integer model's FX graph and its quantization annotation (:mod:`qatkit.annotation`); no scale
is re-derived from module attributes.  One run of the model on ``example_inputs`` (an
``fx.Interpreter``) records every tensor's shape, so reshapes, slices and pools get constant
attributes; a second run with the ``dynamic_axes`` grown finds which dims vary.

The graph is ai.onnx opset 21 (IR 10), the first opset with int16 QuantizeLinear /
DequantizeLinear.  The node patterns follow what onnxruntime fuses into integer kernels and
what NPU compilers import (docs/export.md):

* every quantized tensor gets one ``QuantizeLinear -> DequantizeLinear`` pair per consumer
  (zero point 0, typed int8 / int16), graph inputs and outputs included;
* conv / linear: ``DQ(x) -> Conv | Gemm(transB=1) (DQ(int8 weight, per channel),
  DQ(int32 bias, scale fl32(s_in * s_w))) -> Q``; a fused ReLU after its own ``Q -> DQ``; a
  fused add before the ``Q`` (the integer model rounds once);
* lookup-table ops as their float ONNX op between ``DQ`` and ``Q``;
* data-moving ops between ``DQ`` and ``Q`` at the same scale; float islands, 32-bit
  outputs and preserve-QAT ops as they run.

Every ONNX node and initializer is named after the model's op (``layer1.0.conv1``,
``layer1.0.conv1.weight``).  The file is written to a temporary file next to ``path``,
checked with ``onnx.checker.check_model(full_check=True)`` and only then moved to ``path``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Mapping, Sequence

import onnx
import torch
from onnx import helper
from torch import fx, nn

from .._version import __version__
from ..annotation import (
    AnnotatedOp,
    NodeAnnotation,
    bind_arguments,
    get_annotations,
    has_annotations,
    module_constants,
    module_signature,
    signature_names,
)
from ..fake_quantize import FakeQuantize
from ..fx import convert_fx
from ..fx.naming import op_base_name
from ..model_graph import annotated_graph
from ..quantized import QuantizedModule
from . import _ops_compute as _ops_compute  # noqa: F401  (registers emitters)
from . import _ops_eager as _ops_eager  # noqa: F401
from . import _ops_glue as _ops_glue  # noqa: F401
from . import _ops_lut as _ops_lut  # noqa: F401
from ._graph import EMITTERS, ExportError, FValue, OnnxGraph, OpCall, QValue, TensorMeta
from ._passes import guard_float_layers, live_nodes

__all__ = ["export_onnx", "write_onnx", "DEFAULT_OPSET", "SUPPORTED_OPSETS",
           "GLUE_SIGNATURES"]

#: opset 21: the first with int16 QuantizeLinear / DequantizeLinear (and GroupNormalization
#: with per-channel scales); 19 and 20 work for int8 models without those
DEFAULT_OPSET = 21
SUPPORTED_OPSETS = (19, 20, 21)
_IR_VERSION = {19: 9, 20: 9, 21: 10}

#: positional parameters of the data-moving functions / methods (by op base name), where
#: torch's own signature cannot be read (builtins) or names them differently
GLUE_SIGNATURES: dict[str, tuple[str, ...]] = {
    "flatten": ("input", "start_dim", "end_dim"), "unflatten": ("input", "dim", "sizes"),
    "reshape": ("input", "*shape"), "view": ("input", "*shape"),
    "view_as": ("input", "other"), "reshape_as": ("input", "other"),
    "permute": ("input", "*dims"), "transpose": ("input", "dim0", "dim1"),
    "swapaxes": ("input", "dim0", "dim1"), "swapdims": ("input", "dim0", "dim1"),
    "t": ("input",), "movedim": ("input", "source", "destination"),
    "squeeze": ("input", "dim"), "unsqueeze": ("input", "dim"),
    "chunk": ("input", "chunks", "dim"), "split": ("input", "split_size_or_sections", "dim"),
    "unbind": ("input", "dim"), "narrow": ("input", "dim", "start", "length"),
    "getitem": ("input", "index"), "expand": ("input", "*size"), "expand_as": ("input", "other"),
    "repeat": ("input", "*sizes"), "flip": ("input", "dims"),
    "contiguous": ("input",), "clone": ("input",), "detach": ("input",),
    "dropout": ("input", "p", "training", "inplace"),
    "stochastic_depth": ("input", "p", "mode", "training"),
    "pad": ("input", "pad", "mode", "value"), "pixel_shuffle": ("input", "upscale_factor"),
    "to": ("input", "*args"), "float": ("input",),
    "neg": ("input",), "div": ("input", "other", "rounding_mode"),
}
for _d in ("1d", "2d", "3d"):
    GLUE_SIGNATURES[f"max_pool{_d}"] = ("input", "kernel_size", "stride", "padding",
                                        "dilation", "ceil_mode", "return_indices")
    GLUE_SIGNATURES[f"adaptive_max_pool{_d}"] = ("input", "output_size", "return_indices")
    GLUE_SIGNATURES[f"dropout{_d}"] = ("input", "p", "training", "inplace")


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike,
                opset_version: int | None = None, input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None,
                dynamic_axes: Mapping[str, Any] | None = None) -> str:
    """Write ``model`` as QDQ ONNX (QuantizeLinear / DequantizeLinear, zero point 0).

    Args:
        model: a model made by :func:`qatkit.prepare_qat_fx` and calibrated (or trained with
            QAT), or the integer model :func:`qatkit.convert_fx` made from one.  It is not
            modified.
        example_inputs: the model's positional inputs (a tensor or a tuple of tensors); the
            model runs once on them to record shapes.
        path: the ``.onnx`` file to write; its folder must exist.
        opset_version: ai.onnx opset, default 21 (IR 10): int16 activations need 21; 19 and
            20 work for int8 models (GELU needs 20, group norm 21).
        input_names: names of the graph inputs (default: the model's argument names).
        output_names: names of the graph outputs (default ``output`` / ``output_<i>``).
        dynamic_axes: ``{name: {axis: "dim_name"}}`` or ``{name: [axis, ...]}`` for inputs and
            outputs whose size may vary (typically the batch axis); the model runs a second
            time with those axes grown by one to find every dim that follows them.

    Returns:
        ``path`` (as a string).

    Raises:
        ValueError: ``model`` is a float model, was never calibrated, or the arguments are
            inconsistent (the message says the fix).
        FileNotFoundError: the folder of ``path`` does not exist.
        NotImplementedError: an op cannot be exported (the message names it and the ways
            out: keep it float, preserve it in QAT form, or file an issue).

    Example::

        >>> qat = qatkit.prepare_qat_fx(model, {"": qatkit.default_qat_8bit_fake_quant_qconfig},
        ...                             example_inputs=(x,))
        >>> qatkit.set_fake_quant_state(qat, "calibration"); qat(x)
        >>> qatkit.set_fake_quant_state(qat, "validation")
        >>> qatkit.export_onnx(qat, (x,), "model.onnx", dynamic_axes={"x": {0: "batch"}})
        'model.onnx'
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"export_onnx: the folder '{folder}' of '{path}' does not exist; "
                                "create it first (os.makedirs) or write somewhere else")
    opset = DEFAULT_OPSET if opset_version is None else int(opset_version)
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"export_onnx: opset_version={opset_version} is not supported; use "
                         f"one of {SUPPORTED_OPSETS} (default {DEFAULT_OPSET})")
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return write_onnx(integer_model_for_export(model), tuple(inputs), path, opset, input_names,
                      output_names, dynamic_axes)


def write_onnx(int_model: fx.GraphModule, inputs: tuple, path: str, opset: int = DEFAULT_OPSET,
               input_names: Sequence[str] | None = None,
               output_names: Sequence[str] | None = None,
               dynamic_axes: Mapping[str, Any] | None = None) -> str:
    """:func:`export_onnx` of an integer model (its modules keep every constant the ONNX ops
    need, lookup tables included).

    Example::

        >>> write_onnx(qatkit.convert_fx(qat), (x,), "model.onnx")
        'model.onnx'
    """
    exporter = _Exporter(int_model, opset)
    proto = exporter.build(inputs, input_names, output_names, dynamic_axes)
    _write_checked(proto, path)
    return path


# -- the model to export ----------------------------------------------------------------------
def integer_model_for_export(model: Any) -> fx.GraphModule:
    """The integer model of a model to export (a calibrated prepared model, converted; an
    integer model, itself); a float or uncalibrated model is refused with the fix.

    Example::

        >>> int_model = integer_model_for_export(qat_model)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx takes an nn.Module, got {type(model).__name__}")
    model = annotated_graph(model)  # an eager-mode model: its annotated trace
    if not has_annotations(model):
        raise ValueError(
            f"export_onnx takes a model prepared with qatkit.prepare_qat_fx and calibrated (or "
            f"the integer model qatkit.convert_fx made of one); {type(model).__name__} is a "
            "float model. Prepare and calibrate it first: qat = qatkit.prepare_qat_fx(model, "
            "{'': qatkit.default_qat_8bit_fake_quant_qconfig}, example_inputs=(x,)); "
            "qatkit.set_fake_quant_state(qat, 'calibration'); run representative data; "
            "qatkit.set_fake_quant_state(qat, 'validation'); then export qat")
    missing = [name for name, m in model.named_modules()
               if isinstance(m, FakeQuantize) and not m.has_scale]
    if missing:
        shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
        raise ValueError(
            f"export_onnx: the model was never calibrated: {len(missing)} fake quant(s) have no "
            f"scale ({shown}). Calibrate first: qatkit.set_fake_quant_state(model, 'calibration'), "
            "run representative data through it, then qatkit.set_fake_quant_state(model, "
            "'validation')")
    anns = get_annotations(model)
    quantized = [a for a in anns.values() if a.is_quantized]
    if not quantized:
        raise ValueError("export_onnx: the model has no quantized op (every qconfig is None?); "
                         "a float model exports with torch.onnx.export")
    if any(isinstance(model.get_submodule(a.module), QuantizedModule)
           for a in quantized if a.module is not None):
        return model  # already an integer model
    try:
        return convert_fx(model)
    except (ValueError, NotImplementedError) as e:
        raise type(e)(f"export_onnx converts the model with qatkit.convert_fx, which failed: "
                      f"{e}") from e


# -- recording shapes -------------------------------------------------------------------------
class _Recorder(fx.Interpreter):
    """Runs the model and describes every node's output (shapes of tensors, values of the
    rest)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.records: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.records[n] = _describe(out)
        return out


def _describe(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return TensorMeta(tuple(int(d) for d in v.shape), v.dtype, (False,) * v.dim())
    if isinstance(v, torch.Size):
        return tuple(int(d) for d in v)
    if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
        return type(v)(_describe(x) for x in v)
    return v


def _merge(a: Any, b: Any, node: fx.Node, dynamic: set[fx.Node]) -> Any:
    """Run 1's description with the dims / values that changed in run 2 marked dynamic."""
    if isinstance(a, TensorMeta):
        if not isinstance(b, TensorMeta) or b.rank != a.rank:
            raise ValueError(f"export_onnx: node {node.format_node()} changes rank with the "
                             "dynamic axes; export without dynamic_axes")
        return dataclasses.replace(a, dynamic=tuple(x != y for x, y in zip(a.shape, b.shape,
                                                                            strict=True)),
                                   alt=b.shape)
    if isinstance(a, (list, tuple)) and not hasattr(a, "_fields") and any(
            isinstance(x, TensorMeta) for x in a):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            raise ValueError(f"export_onnx: node {node.format_node()} returns a different "
                             "number of tensors with the dynamic axes; export without them")
        return type(a)(_merge(x, y, node, dynamic) for x, y in zip(a, b, strict=True))
    try:
        same = bool(a == b)
    except Exception:  # noqa: BLE001 - values without a plain == (they are not sizes)
        same = True
    if not same:
        dynamic.add(node)
    return a


# -- the exporter -----------------------------------------------------------------------------
class _Exporter:
    """Emits one ONNX graph from an integer model (see the module docstring)."""

    def __init__(self, model: fx.GraphModule, opset: int) -> None:
        self.model = model
        self.graph = OnnxGraph(opset)
        self.values: dict[fx.Node, Any] = {}
        self.records: dict[fx.Node, Any] = {}
        self.dynamic_values: set[fx.Node] = set()
        self.dim_tensors: dict[tuple[str, int], str] = {}  # (graph input, dim) -> Shape output
        self.modules = dict(model.named_modules())

    def build(self, inputs: tuple, input_names: Sequence[str] | None,
              output_names: Sequence[str] | None,
              dynamic_axes: Mapping[str, Any] | None) -> onnx.ModelProto:
        gm = self.model
        anns = get_annotations(gm)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(inputs) != len(placeholders):
            raise ValueError(f"export_onnx: the model takes {len(placeholders)} input(s) "
                             f"({[p.target for p in placeholders]}), example_inputs has "
                             f"{len(inputs)}")
        for p, x in zip(placeholders, inputs, strict=True):
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"export_onnx: example input '{p.target}' is a "
                                 f"{type(x).__name__}; only tensor inputs can be exported")
        in_names = list(input_names) if input_names is not None else [
            str(p.target) for p in placeholders]
        if len(in_names) != len(placeholders):
            raise ValueError(f"export_onnx: {len(in_names)} input_names for "
                             f"{len(placeholders)} inputs")
        out_leaves = output_leaves(next(n for n in gm.graph.nodes if n.op == "output"))
        out_names = list(output_names) if output_names is not None else (
            ["output"] if len(out_leaves) == 1 else [f"output_{i}" for i in
                                                     range(len(out_leaves))])
        if len(out_names) != len(out_leaves):
            raise ValueError(f"export_onnx: {len(out_names)} output_names for "
                             f"{len(out_leaves)} outputs")
        axes = _dynamic_axes(dynamic_axes, in_names, out_names)
        self._record(inputs, [axes.get(n, {}) for n in in_names])
        for name in in_names + out_names:
            self.graph.reserve(name)

        graph_inputs = []
        k = 0
        for node in gm.graph.nodes:
            ann = anns[node]
            if node.op == "placeholder":
                meta = self.records[node]
                graph_inputs.append(_value_info(in_names[k], meta, axes.get(in_names[k], {})))
                self.values[node] = FValue(in_names[k])
                k += 1
            elif node.op == "output":
                continue
            else:
                self.values[node] = self._emit(node, ann)
        graph_outputs = []
        for name, leaf in zip(out_names, out_leaves, strict=True):
            graph_outputs.append(self._output(name, leaf, axes.get(name, {})))
        nodes = live_nodes(guard_float_layers(self.graph), [o.name for o in graph_outputs])
        used = {i for n in nodes for i in n.input}
        inits = [t for name, t in self.graph.initializers.items() if name in used]
        graph = helper.make_graph(nodes, "qatkit", graph_inputs, graph_outputs,
                                  initializer=inits)
        proto = helper.make_model(graph, producer_name="qatkit", producer_version=__version__,
                                  opset_imports=[helper.make_opsetid("", self.graph.opset)])
        proto.ir_version = _IR_VERSION[self.graph.opset]
        proto.doc_string = ("QDQ export of a qatkit integer model: symmetric quantization "
                            "(zero point 0), per-channel int8 weights, int32 bias at "
                            "s_in * s_w; see qatkit's docs/export.md and docs/npu_numerics.md")
        return proto

    # -- recording ------------------------------------------------------------------------------
    def _record(self, inputs: tuple, axes: list[dict[int, str]]) -> None:
        with torch.no_grad():
            rec = _Recorder(self.model)
            rec.run(*inputs)
            self.records = rec.records
            if not any(axes):
                return
            grown = []
            for x, ax in zip(inputs, axes, strict=True):
                for a in ax:
                    if not -x.dim() <= a < x.dim():
                        raise ValueError(f"export_onnx: dynamic axis {a} of a {x.dim()}-d input")
                    x = torch.cat([x, x.narrow(a, 0, 1)], dim=a)
                grown.append(x)
            rec2 = _Recorder(self.model)
            try:
                rec2.run(*grown)
            except Exception as e:
                raise ValueError("export_onnx: the model does not run with the dynamic axes "
                                 f"grown by one ({e}); check dynamic_axes") from e
        for node, a in self.records.items():
            self.records[node] = _merge(a, rec2.records[node], node, self.dynamic_values)

    # -- one node -------------------------------------------------------------------------------
    def _emit(self, node: fx.Node, ann: NodeAnnotation) -> Any:
        if ann.role == "non_tensor":
            rec = self.records.get(node)
            if not _holds_tensor(rec):
                return rec
            # a tensor that the annotation counts among sizes (e.g. a parameter expanded to
            # the batch size): computed in float
            kind = type(self.modules[str(node.target)]).__name__.lower() \
                if node.op == "call_module" else ann.kind
            ann = dataclasses.replace(ann, kind=kind, role="float", output=None,
                                      output_mode="float")
        if node.op == "get_attr":
            return self._attr(node)
        module = self.modules.get(str(node.target)) if node.op == "call_module" else None
        emitter = EMITTERS.get(ann.kind)
        call = OpCall(self, node, ann, self._bind(node, ann, module), module)
        if emitter is None:
            raise call.unsupported("no ONNX emitter for this op kind")
        try:
            out = emitter(call)
        except (ExportError, ValueError):
            raise
        except Exception as e:
            raise RuntimeError(f"export_onnx failed at {call.where()} (node "
                               f"{node.format_node()}): {e}") from e
        return self._wrap(call, out)

    def _wrap(self, call: OpCall, out: Any) -> Any:
        if isinstance(out, str):
            spec = call.ann.output
            if spec is not None and call.ann.output_mode in ("quantized", "shared"):
                return QValue(out, call.out_scale(), spec.bits, call.name)
            return FValue(out)
        if isinstance(out, list):
            return [self._wrap(call, o) for o in out]
        return out

    def _attr(self, node: fx.Node) -> Any:
        value = self.model
        for part in str(node.target).split("."):
            value = getattr(value, part)
        if not isinstance(value, torch.Tensor):
            return value
        array = value.detach().cpu().numpy()
        return FValue(self.graph.initializer(str(node.target), array))

    def _bind(self, node: fx.Node, ann: NodeAnnotation,
              module: nn.Module | None) -> dict[str, Any]:
        if module is not None:
            names = module.qatkit_signature if isinstance(module, AnnotatedOp) else \
                module_signature(module.forward)
            args = bind_arguments(names, node.args, node.kwargs)
            return {**self._module_constants(module, ann.kind), **args}
        base = op_base_name(node)
        if base in GLUE_SIGNATURES:
            names = GLUE_SIGNATURES[base]
        elif node.op == "call_method":
            names = signature_names(getattr(torch.Tensor, str(node.target), None), ann.kind)
        else:
            names = signature_names(node.target, ann.kind)
        return bind_arguments(names, node.args, node.kwargs)

    def _module_constants(self, module: nn.Module, kind: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        fixed = getattr(module, "fixed", None)
        if isinstance(module, QuantizedModule) and isinstance(fixed, dict):
            out.update(fixed)
            out.update({name: getattr(module, name) for name in getattr(module, "owned", ())})
            return out
        return module_constants(module, kind)

    # -- outputs --------------------------------------------------------------------------------
    def _output(self, name: str, leaf: Any, axes: dict[int, str]) -> onnx.ValueInfoProto:
        if not isinstance(leaf, fx.Node):
            raise ValueError(f"export_onnx: output '{name}' is {leaf!r}, not a tensor")
        value = self.values[leaf]
        meta = self.records.get(leaf)
        if not isinstance(meta, TensorMeta):
            raise ValueError(f"export_onnx: output '{name}' ({leaf.name}) is not a tensor")
        if isinstance(value, QValue):
            self.graph.qdq(value, name, out_name=name)
        elif isinstance(value, FValue):
            self.graph.node("Identity", [value.name], name, [name])
        else:
            raise ValueError(f"export_onnx: output '{name}' ({leaf.name}) is not a tensor")
        return _value_info(name, meta, axes)


def _holds_tensor(rec: Any) -> bool:
    if isinstance(rec, TensorMeta):
        return True
    return isinstance(rec, (list, tuple)) and any(_holds_tensor(r) for r in rec)


def output_leaves(out: fx.Node) -> list[Any]:
    """The values a graph's ``output`` node returns, flattened (lists, tuples, dict values in
    order; a node or constant is a leaf).

    Example::

        >>> output_leaves(next(n for n in gm.graph.nodes if n.op == "output"))
        [fc]
    """
    leaves: list[Any] = []

    def walk(v: Any) -> None:
        if isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        else:
            leaves.append(v)

    walk(out.args[0] if out.args else None)
    return leaves


def _dynamic_axes(dynamic_axes: Mapping[str, Any] | None, in_names: list[str],
                  out_names: list[str]) -> dict[str, dict[int, str]]:
    out: dict[str, dict[int, str]] = {}
    for name, axes in (dynamic_axes or {}).items():
        if name not in in_names and name not in out_names:
            raise ValueError(f"export_onnx: dynamic_axes names '{name}', which is neither an "
                             f"input {in_names} nor an output {out_names}")
        if isinstance(axes, Mapping):
            out[name] = {int(a): str(d) for a, d in axes.items()}
        else:
            out[name] = {int(a): f"{name}_dim{int(a)}" for a in axes}
    return out


def _value_info(name: str, meta: Any, axes: dict[int, str]) -> onnx.ValueInfoProto:
    if not isinstance(meta, TensorMeta):
        raise ValueError(f"export_onnx: '{name}' is not a tensor")
    rank = meta.rank
    axes = {a % rank if rank else a: d for a, d in axes.items()}
    dims: list[Any] = []
    for i, (d, dyn) in enumerate(zip(meta.shape, meta.dynamic, strict=True)):
        dims.append(axes.get(i, f"{name}_dim{i}") if dyn or i in axes else d)
    elem = helper.np_dtype_to_tensor_dtype(torch.empty((), dtype=meta.dtype).numpy().dtype)
    return helper.make_tensor_value_info(name, elem, dims)


def _write_checked(proto: onnx.ModelProto, path: str) -> None:
    """Write to a temporary file next to ``path``, check it, then move it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".qatkit-export-", suffix=".onnx", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        onnx.checker.check_model(tmp, full_check=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

