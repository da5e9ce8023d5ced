"""The ONNX graph under construction, the values flowing through it, and the emitter registry.

* :class:`QValue` -- a quantized tensor: a float32 ONNX tensor on its grid and its scale.
  It is *not* quantized where it is made: every consumer gets its own ``QuantizeLinear ->
  DequantizeLinear`` pair (:meth:`OnnxGraph.qdq`), with its own scale / zero-point
  initializers (equal values, distinct names), because onnxruntime on x86 fuses a QDQ op
  only when its input ``Q`` has one consumer and would merge equal ``Q`` nodes back.
* :class:`FValue` -- a float tensor (a float island, a 32-bit output, a graph input).
* :class:`OnnxGraph` -- nodes, initializers and unique names; ``Q``/``DQ`` pairs and
  per-axis weight dequantization (whose scale lengths it checks: onnx's checker does not).
* :class:`OpCall` -- one FX node as an emitter sees it: its arguments bound by name, the
  float ONNX tensor of each tensor argument, its recorded shapes, its annotation.
* :data:`EMITTERS` -- op kind -> emitter, filled by :func:`register_emitter` (a new op is a
  new entry).  An emitter returns the float ONNX tensor(s) of the op's output; the exporter
  wraps them as the annotation says (quantized: a :class:`QValue` on the output grid), or it
  returns a value itself (data movement that only renames, a conv with its own requant).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

from ..annotation import NodeAnnotation, QuantSpec

if TYPE_CHECKING:  # pragma: no cover
    from .onnx import _Exporter

__all__ = ["QValue", "FValue", "TensorMeta", "OnnxGraph", "OpCall", "EMITTERS",
           "register_emitter", "ExportError"]

INT64_MAX = np.iinfo(np.int64).max


class ExportError(NotImplementedError):
    """An op that export_onnx cannot write; the message names the op and the way out."""


@dataclasses.dataclass(frozen=True)
class QValue:
    """A quantized tensor: float32 ONNX tensor ``name`` on the grid ``scale`` (per tensor)."""

    name: str
    scale: np.ndarray  # float32, shape []
    bits: int
    producer: str  # the op that made it, for the names of its Q / DQ nodes


@dataclasses.dataclass(frozen=True)
class FValue:
    """A float ONNX tensor."""

    name: str


@dataclasses.dataclass(frozen=True)
class TensorMeta:
    """What one run recorded of a tensor: shape, dtype and which dims vary with the
    dynamic axes (from a second run with those axes grown)."""

    shape: tuple[int, ...]
    dtype: Any
    dynamic: tuple[bool, ...]
    alt: tuple[int, ...] | None = None  # the shape in the second run (dynamic axes grown)

    @property
    def rank(self) -> int:
        return len(self.shape)


def _np_scalar_type(bits: int) -> type:
    if bits not in (8, 16):
        raise ValueError(f"export_onnx: {bits}-bit activations have no QDQ form here (int4 is "
                         "for weights): use int8 or int16 activations")
    return {8: np.int8, 16: np.int16}[bits]


class OnnxGraph:
    """Nodes and initializers of the graph being written, with unique names."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}
        self._tensor_names: set[str] = set()
        self._node_names: set[str] = set()

    # -- names ---------------------------------------------------------------------------------
    @staticmethod
    def _unique(name: str, taken: set[str]) -> str:
        out, k = name, 1
        while out in taken:
            out = f"{name}.{k}"
            k += 1
        taken.add(out)
        return out

    def tensor_name(self, name: str) -> str:
        """A fresh tensor name: ``name``, or ``name.1``, ``name.2``... when taken."""
        return self._unique(name, self._tensor_names)

    def reserve(self, name: str) -> None:
        """Claim a tensor name exactly (graph inputs and outputs)."""
        if name in self._tensor_names:
            raise ValueError(f"export_onnx: the name '{name}' is used twice (input / output "
                             "names must be distinct from each other)")
        self._tensor_names.add(name)

    # -- building --------------------------------------------------------------------------------
    def initializer(self, name: str, array: Any) -> str:
        """Add a constant; returns its (unique) name."""
        name = self.tensor_name(name)
        self.initializers[name] = numpy_helper.from_array(np.asarray(array), name)
        return name

    def int4_initializer(self, name: str, values: np.ndarray) -> str:
        """An INT4 constant (values in [-8, 7], packed two per byte by onnx)."""
        name = self.tensor_name(name)
        values = np.asarray(values)
        if values.size and (values.min() < -8 or values.max() > 7):
            raise ValueError(f"export_onnx: '{name}' holds values outside int4's [-8, 7]")
        self.initializers[name] = onnx.helper.make_tensor(
            name, onnx.TensorProto.INT4, list(values.shape), values.astype(np.int8).reshape(-1))
        return name

    def node(self, op_type: str, inputs: Sequence[str], name: str, outputs: int | Sequence[str]
             = 1, **attrs: Any) -> list[str]:
        """Add a node named ``name`` (made unique); returns its output tensor names (fresh
        names derived from ``name`` unless given)."""
        node_name = self._unique(name, self._node_names)
        if isinstance(outputs, int):
            outputs = [self.tensor_name(node_name if outputs == 1 else f"{node_name}:{i}")
                       for i in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=node_name,
                                           **attrs))
        return list(outputs)

    def node1(self, op_type: str, inputs: Sequence[str], name: str, **attrs: Any) -> str:
        """:meth:`node` with one output."""
        return self.node(op_type, inputs, name, 1, **attrs)[0]

    # -- quantization ----------------------------------------------------------------------------
    def qdq(self, value: QValue, consumer: str, out_name: str | None = None) -> str:
        """``QuantizeLinear -> DequantizeLinear`` of ``value`` for one consumer; returns the
        float tensor the consumer reads (``out_name`` if given)."""
        if value.bits == 16 and self.opset < 21:
            raise ExportError(f"export_onnx: '{value.producer}' is int16; int16 QuantizeLinear "
                              "needs opset_version >= 21 (the default)")
        tag = f"[{consumer}]"
        scale = self.initializer(f"{value.producer}.output_scale{tag}",
                                 np.asarray(value.scale, np.float32).reshape(()))
        zero = self.initializer(f"{value.producer}.output_zero_point{tag}",
                                np.zeros((), _np_scalar_type(value.bits)))
        q = self.node1("QuantizeLinear", [value.name, scale, zero],
                       f"{value.producer}.output_quantize{tag}")
        outputs: int | list[str] = 1 if out_name is None else [out_name]
        return self.node("DequantizeLinear", [q, scale, zero],
                         f"{value.producer}.output_dequantize{tag}", outputs)[0]

    def dequantize_constant(self, name: str, q: np.ndarray, scale: np.ndarray,
                            axis: int | None, bits: int | None = None) -> str:
        """``DequantizeLinear`` of integer initializer ``name`` (int8 / int16 / int32, or INT4
        when ``bits`` is 4: int4 weights, opset 21) with ``scale`` per tensor (``axis`` None)
        or per ``axis``; zero points are typed zeros.

        Raises:
            ValueError: a per-axis scale whose length is not ``q.shape[axis]`` (onnx's checker
                does not catch it; onnxruntime would fail at run time).
        """
        scale = np.asarray(scale, np.float32)
        if axis is None:
            if scale.size != 1:
                raise ValueError(f"export_onnx: '{name}': per-tensor scale with {scale.size} "
                                 "entries")
            scale = scale.reshape(())
        else:
            scale = scale.reshape(-1)
            if q.ndim <= axis or scale.size != q.shape[axis]:
                raise ValueError(f"export_onnx: '{name}': {scale.size} scales for axis {axis} "
                                 f"of a {list(q.shape)} tensor")
        s_name = self.initializer(f"{name}_scale", scale)
        if bits == 4:
            if self.opset < 21:
                raise ValueError(f"export_onnx: int4 weights ('{name}') need opset_version >= 21 "
                                 "(the default)")
            q_name = self.int4_initializer(name, q)
            z_name = self.int4_initializer(f"{name}_zero_point", np.zeros(scale.shape, np.int8))
        else:
            q_name = self.initializer(name, q)
            z_name = self.initializer(f"{name}_zero_point", np.zeros(scale.shape, q.dtype))
        return self.node1("DequantizeLinear", [q_name, s_name, z_name], f"{name}_dequantize",
                          axis=axis)

    def quantize_dequantize(self, x: str, scale: np.ndarray, bits: int, name: str) -> str:
        """A ``Q -> DQ`` pair inside one op (e.g. a conv's requantization before its ReLU)."""
        return self.qdq(QValue(x, np.asarray(scale, np.float32), bits, name), "requantize")


#: op kind -> ``emitter(call) -> str | list[str] | value``
EMITTERS: dict[str, Callable[[OpCall], Any]] = {}


def register_emitter(*kinds: str) -> Callable[[Callable], Callable]:
    """Register an ONNX emitter for op kinds (the annotation's ``kind``).

    Example::

        >>> @register_emitter("relu")
        ... def _relu(call):
        ...     return call.emit("Relu", [call.tensor("input")])
    """

    def deco(fn: Callable) -> Callable:
        for kind in kinds:
            EMITTERS[kind] = fn
        return fn

    return deco


class OpCall:
    """One FX node as an emitter sees it.

    Attributes:
        name: the op's name (annotation ``name``: module name or functional op name); the
            ONNX node gets it, initializers are ``<name>.weight``...
        kind: the op kind (annotation ``kind``).
        args: the call's arguments bound by name (tensors as ``fx.Node``), completed with the
            module's constants (``dim`` of an ``nn.Softmax``...).
        module: the module called (``call_module``), else None.
        ann: the node's annotation.
    """

    def __init__(self, exporter: _Exporter, node: fx.Node, ann: NodeAnnotation,
                 args: dict[str, Any], module: nn.Module | None) -> None:
        self.exporter = exporter
        self.graph: OnnxGraph = exporter.graph
        self.node = node
        self.ann = ann
        self.name = ann.name
        self.kind = ann.kind
        self.args = args
        self.module = module

    def where(self) -> str:
        """``op 'layer1.0.add' (add)``: how errors name this op."""
        mod = f", {type(self.module).__name__}" if self.module is not None else ""
        return f"op '{self.name}' ({self.kind}{mod})"

    def unsupported(self, what: str) -> ExportError:
        """The error for an op (or an argument of it) that cannot be exported."""
        if self.ann.role == "passthrough":
            return ExportError(
                f"export_onnx cannot write {self.where()}: {what}. It moves data between "
                "quantized ops: rewrite it with supported data-moving ops (reshape, permute / "
                "transpose, slicing, cat, split, flip, pad), or file an issue")
        if not self.ann.is_quantized:  # already float: only a rewrite helps
            return ExportError(
                f"export_onnx cannot write {self.where()}: {what}. The op runs in float and "
                "has no ONNX form in qatkit's exporter: rewrite it with supported ops (e.g. "
                "linear, matmul, softmax for an attention module), or file an issue")
        return ExportError(
            f"export_onnx cannot write {self.where()}: {what}. Keep the op float (qconfig_dict "
            f"{{'module_name': [('{self.name}', None)]}} or hybrid_dict), keep it in fake-quant "
            "form (set_preserve_qat_mode), rewrite it with supported ops, or file an issue")

    # -- arguments -------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.args

    def const(self, key: str, default: Any = None) -> Any:
        """The constant argument ``key`` (a size computed in the graph is read from the
        recorded run; one that depends on a dynamic axis is an error)."""
        return self.static(self.args.get(key, default), key)

    def static(self, value: Any, key: str = "") -> Any:
        """``value`` with every graph node replaced by its recorded (static) value."""
        if isinstance(value, fx.Node):
            if value in self.exporter.dynamic_values:
                raise self.unsupported(f"argument '{key}' ({value.name}) depends on a dynamic "
                                       "axis; export without dynamic_axes for it")
            rec = self.exporter.records.get(value)
            if isinstance(rec, TensorMeta):
                raise self.unsupported(f"argument '{key}' is a tensor where a constant is "
                                       "expected")
            return rec
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            return type(value)(self.static(v, key) for v in value)
        return value

    def value(self, arg: Any) -> Any:
        """The exporter's value of a graph node (QValue / FValue / list / constant)."""
        if isinstance(arg, fx.Node):
            return self.exporter.values[arg]
        return arg

    def tensor(self, key: str | Any = "input") -> str:
        """The float ONNX tensor of tensor argument ``key`` (an argument name, or a node /
        constant itself): a quantized value is dequantized for this op (its own Q -> DQ)."""
        arg = self.args.get(key) if isinstance(key, str) else key
        return self.float_of(self.value(arg), key if isinstance(key, str) else "")

    def float_of(self, value: Any, key: str = "") -> str:
        if isinstance(value, QValue):
            return self.graph.qdq(value, self.name)
        if isinstance(value, FValue):
            return value.name
        if isinstance(value, bool) or value is None:
            raise self.unsupported(f"argument '{key}' is {value!r}, not a tensor")
        if isinstance(value, (int, float)):
            return self.graph.initializer(f"{self.name}.{key or 'constant'}",
                                          np.asarray(value, np.float32))
        raise self.unsupported(f"argument '{key}' is {type(value).__name__}, not a tensor")

    def meta(self, key: str | Any = "input") -> TensorMeta:
        """Recorded shape of tensor argument ``key``."""
        arg = self.args.get(key) if isinstance(key, str) else key
        rec = self.exporter.records.get(arg) if isinstance(arg, fx.Node) else None
        if not isinstance(rec, TensorMeta):
            raise self.unsupported(f"argument '{key}' is not a recorded tensor")
        return rec

    @property
    def out(self) -> TensorMeta:
        """Recorded shape of the output (a single tensor)."""
        rec = self.exporter.records.get(self.node)
        if not isinstance(rec, TensorMeta):
            raise self.unsupported("its output is not a single tensor")
        return rec

    @property
    def out_list(self) -> list[TensorMeta]:
        rec = self.exporter.records.get(self.node)
        if not isinstance(rec, (list, tuple)):
            raise self.unsupported("its output is not a list of tensors")
        return list(rec)

    # -- quantization of the output --------------------------------------------------------------
    @property
    def out_spec(self) -> QuantSpec | None:
        return self.ann.output

    def out_scale(self) -> np.ndarray:
        return _scale_of(self.ann.output, self.exporter.model, self.where())

    def spec_scale(self, spec: QuantSpec) -> np.ndarray:
        return _scale_of(spec, self.exporter.model, self.where())

    def requantize(self, x: str) -> str:
        """``Q -> DQ`` of ``x`` on the output grid, inside the op (conv -> Q -> DQ -> Relu)."""
        spec = self.ann.output
        return self.graph.quantize_dequantize(x, self.out_scale(), spec.bits, self.name)

    def same_grid(self, x: str, value: Any, suffix: str) -> str:
        """``x`` (a data-moving op's output on ``value``'s grid) through ``Q -> DQ`` at
        ``value``'s scale when ``value`` is quantized: after a Reshape / Unsqueeze / Pad inside
        an op, so that onnxruntime's QDQ propagation does not insert a Q of its own (which
        fails at session creation on x86 in onnxruntime 1.32)."""
        if not isinstance(value, QValue):
            return x
        return self.graph.quantize_dequantize(x, value.scale, value.bits, f"{self.name}.{suffix}")

    # -- emitting --------------------------------------------------------------------------------
    def emit(self, op_type: str, inputs: Sequence[str], suffix: str | None = None,
             outputs: int = 1, **attrs: Any) -> Any:
        """Add a node named after the op (``name`` or ``name.suffix``); its output name(s)."""
        name = self.name if suffix is None else f"{self.name}.{suffix}"
        out = self.graph.node(op_type, inputs, name, outputs, **attrs)
        return out[0] if outputs == 1 else out

    def initializer(self, suffix: str, array: Any) -> str:
        return self.graph.initializer(f"{self.name}.{suffix}", array)

    def ints(self, suffix: str, values: Sequence[int]) -> str:
        """An int64 1-D initializer (shapes, axes)."""
        return self.initializer(suffix, np.asarray(list(values), np.int64).reshape(-1))

    def reshape(self, x: str, out: TensorMeta, src: TensorMeta | None,
                suffix: str | None = None) -> str:
        """``Reshape`` of ``x`` (shaped ``src``) to the recorded shape ``out``: constant dims,
        ``0`` (copy) for a dynamic dim that the input has at the same index, ``-1`` for one
        other dynamic dim, and a graph input's dim (``Shape``) for any further one."""
        target: list[Any] = list(out.shape)
        dyn = [i for i, d in enumerate(out.dynamic) if d]
        if any(d == 0 for i, d in enumerate(out.shape) if i not in dyn):
            raise self.unsupported("a reshape to a zero-size dim")
        copy = [i for i in dyn if src is not None and i < src.rank and src.dynamic[i]
                and src.shape[i] == out.shape[i] and src.alt is not None and out.alt is not None
                and src.alt[i] == out.alt[i]]
        rest = [i for i in dyn if i not in copy]
        for i in copy:
            target[i] = 0
        for k, i in enumerate(rest):
            target[i] = -1 if k == 0 else self.dynamic_dim(out, i)
        shape = self.shape_input(f"{suffix or 'reshape'}_shape", target)
        return self.emit("Reshape", [x, shape], suffix)

    def dynamic_dim(self, meta: TensorMeta, i: int) -> str:
        """An int64 ``[1]`` tensor holding dim ``i`` of ``meta`` at run time, read with ``Shape``
        from a graph input that has a dynamic dim of the same size in both recorded runs (the
        batch axis...)."""
        size, alt = meta.shape[i], (meta.alt or meta.shape)[i]
        cache = self.exporter.dim_tensors
        for node, rec in self.exporter.records.items():
            if node.op != "placeholder" or not isinstance(rec, TensorMeta):
                continue
            for j, (d, a, dyn) in enumerate(zip(rec.shape, rec.alt or rec.shape, rec.dynamic,
                                                strict=True)):
                if dyn and d == size and a == alt:
                    name = self.exporter.values[node].name
                    if (name, j) not in cache:
                        cache[(name, j)] = self.graph.node1("Shape", [name], f"{name}.dim{j}",
                                                            start=j, end=j + 1)
                    return cache[(name, j)]
        raise self.unsupported(f"dim {i} of a {list(meta.shape)} tensor follows the dynamic axes "
                               "but is no graph input's dim; export with fewer dynamic axes")

    def shape_input(self, suffix: str, dims: Sequence[Any]) -> str:
        """A 1-D int64 shape: an initializer when every dim is an int, else a ``Concat`` of
        constants and run-time dims (names of ``[1]`` tensors, :meth:`dynamic_dim`)."""
        if all(isinstance(d, (int, np.integer)) for d in dims):
            return self.ints(suffix, dims)
        parts, run = [], []
        for d in list(dims) + [None]:
            if isinstance(d, (int, np.integer)):
                run.append(int(d))
                continue
            if run:
                parts.append(self.ints(f"{suffix}.{len(parts)}", run))
                run = []
            if d is not None:
                parts.append(d)
        return self.emit("Concat", parts, f"{suffix}", axis=0)

    def require_opset(self, opset: int, what: str) -> None:
        if self.graph.opset < opset:
            raise ExportError(f"export_onnx: {self.where()} needs {what}, available from opset "
                              f"{opset}; export with opset_version={opset} or more (default 21)")


def _scale_of(spec: QuantSpec | None, model: nn.Module, where: str) -> np.ndarray:
    if spec is None:
        raise ExportError(f"export_onnx: {where} has no quantized output")
    scale = spec.scale(model).detach().cpu().to(torch.float32).numpy()
    if scale.size != 1:
        raise ExportError(f"export_onnx: {where}: per-channel activation scales are not "
                          "supported")
    return scale.reshape(())
