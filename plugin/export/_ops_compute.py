"""ONNX emitters for the compute ops: conv / conv-transpose / linear, elementwise arithmetic,
matmul / einsum, cat / stack, averages, resize, softmax, the norms, and the stubs.

Each emitter reads its op's arguments bound by name (:class:`~._graph.OpCall`) and returns
the float ONNX tensor of the op's output; the exporter wraps it as the annotation says.  An
integer conv / linear is written with its integer weights and int32 bias
(``DequantizeLinear`` of initializers) and its own requantization (see :func:`_conv`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..nn.qat.ops import grid_sample_call
from ..quantized.conv import QuantizedConv
from ._graph import FValue, OpCall, QValue, register_emitter

__all__: list[str] = []

_FLOAT_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FLOAT_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _f32(v: Any) -> np.ndarray:
    return np.asarray(v, np.float32)


# -- conv / conv-transpose / linear -----------------------------------------------------------
@dataclasses.dataclass
class _Layer:
    """What the ONNX conv / gemm needs of a layer (integer or float weights)."""

    kind: str  # "Conv", "ConvTranspose" or "Linear"
    weight: np.ndarray  # int8 / int16, or float32
    weight_scale: np.ndarray | None  # float32 per channel / per tensor; None: float weight
    weight_axis: int | None
    bias: np.ndarray | None  # integers (int64) on the accumulator grid, or float32
    bias_scale: np.ndarray | None  # float32 fl32(s_in * s_w[o]) per output channel
    act: str | None = None
    with_add: bool = False
    weight_bits: int | None = None  # 4: INT4 initializer


def _layer_kind(mod: nn.Module) -> str:
    kind = getattr(mod, "_kind", None) or getattr(mod, "_KIND", None)
    if kind:
        return kind
    if isinstance(mod, nn.Linear):
        return "Linear"
    return "ConvTranspose" if isinstance(mod, _FLOAT_CONV_T) else "Conv"


def _out_channel_scales(s_w: np.ndarray, kind: str, mod: nn.Module, out: int) -> np.ndarray:
    """The weight scale of each output channel (grouped ConvTranspose: ``s_w[j]`` for output
    ``g * out / groups + j``)."""
    s_w = s_w.reshape(-1).astype(np.float64)
    if s_w.size == 1:
        return np.repeat(s_w, out)
    return np.tile(s_w, out // s_w.size)


def _integer_layer(call: OpCall, mod: nn.Module) -> _Layer:
    """Integer weights and bias of an integer conv (or of a QAT conv kept in fake-quant form:
    the same rules, ``quantize_weight`` / ``quantize_bias``)."""
    kind = _layer_kind(mod)
    in_spec = call.ann.input_spec("input")
    w_spec = call.ann.weight
    if in_spec is None or w_spec is None:
        raise call.unsupported("a quantized conv / linear needs a quantized input and weight")
    s_in_t = in_spec.scale(call.exporter.model).detach().cpu().float()
    s_w = _np(w_spec.scale(call.exporter.model).float()).reshape(-1)
    s_w = np.maximum(s_w, np.finfo(np.float32).eps)  # as the QAT modules use it (LSQ)
    if isinstance(mod, QuantizedConv):
        weight = _np(mod.weight)
        bias = _np(mod.bias).astype(np.int64)
    else:  # a QAT module preserved in fake-quant form
        with torch.no_grad():
            w = mod.quantize_weight()
            b, _ = mod.quantize_bias(mod.folded_weight_bias()[1], s_in_t, in_spec.bits)
        weight = _np(w).astype(np.int8 if w_spec.bits <= 8 else np.int16)
        bias = _np(b).astype(np.int64)
    out = bias.size
    s_in = np.float64(_np(s_in_t).reshape(()))
    bias_scale = (s_in * _out_channel_scales(s_w, kind, mod, out)).astype(np.float32)
    axis = None if w_spec.ch_axis is None else w_spec.ch_axis % weight.ndim
    return _Layer(kind, weight, s_w, axis, bias, bias_scale, getattr(mod, "act", None),
                  bool(getattr(mod, "with_add", False)), w_spec.bits)


def _float_layer(call: OpCall, mod: nn.Module) -> _Layer:
    with torch.no_grad():
        if hasattr(mod, "folded_weight_bias"):
            w, b = mod.folded_weight_bias()
        else:
            w, b = mod.weight, mod.bias
    return _Layer(_layer_kind(mod), _np(w).astype(np.float32), None, None,
                  None if b is None else _np(b).astype(np.float32), None,
                  getattr(mod, "act", None), bool(getattr(mod, "with_add", False)))


def _layer(call: OpCall) -> _Layer:
    mod = call.module
    if isinstance(mod, QuantizedConv):
        return _integer_layer(call, mod)
    if hasattr(mod, "weight_fake_quant"):  # preserve-QAT module
        if mod.weight_fake_quant is None:
            return _float_layer(call, mod)
        if call.ann.input_spec("input") is None:
            raise call.unsupported("its input is float, so its fake-quantized weights have no "
                                   "integer form; quantize the input (QuantStub)")
        return _integer_layer(call, mod)
    if isinstance(mod, (nn.Linear,) + _FLOAT_CONV + _FLOAT_CONV_T):
        return _float_layer(call, mod)
    raise call.unsupported("not a conv / conv-transpose / linear module")


def _weight_inputs(call: OpCall, layer: _Layer) -> tuple[list[str], str | None]:
    """The weight and bias inputs of the ONNX op, and a float bias to add after it (None).

    The bias is an int32 ``DequantizeLinear`` at ``fl32(s_in * s_w)``, the scale onnxruntime
    requires to fuse.  A 48-bit bias (16-bit input and weight) has no int32 form; it is added
    in float after the op: as the op's float bias input, onnxruntime would quantize it to
    int32 itself and saturate it (onnxruntime 1.32, at every optimization level but
    ``disable``)."""
    g = call.graph
    if layer.weight_scale is None:
        w = g.initializer(f"{call.name}.weight", layer.weight)
        b = [] if layer.bias is None else [g.initializer(f"{call.name}.bias", layer.bias)]
        return [w] + b, None
    w = g.dequantize_constant(f"{call.name}.weight", layer.weight, layer.weight_scale,
                              layer.weight_axis, layer.weight_bits)
    bias = layer.bias
    if np.abs(bias).max(initial=0) < 2**31:
        b = g.dequantize_constant(f"{call.name}.bias", bias.astype(np.int32), layer.bias_scale, 0)
        return [w, b], None
    exact = bias.astype(np.float64) * layer.bias_scale.astype(np.float64)
    shape = (-1,) if layer.kind == "Linear" else (-1,) + (1,) * (layer.weight.ndim - 2)
    return [w], g.initializer(f"{call.name}.bias", exact.astype(np.float32).reshape(shape))


def _act(call: OpCall, y: str, act: str | None) -> str:
    if act is None:
        return y
    if act == "relu":
        return call.emit("Relu", [y], "relu")
    if act == "relu6":
        return call.emit("Clip", [y, call.initializer("relu6_min", _f32(0.0)),
                                  call.initializer("relu6_max", _f32(6.0))], "relu6")
    raise call.unsupported(f"fused activation {act!r}")


def _conv_padding(call: OpCall, mod: nn.Module, x: str, dims: int,
                  kernel: list[int]) -> tuple[str, list[int]]:
    padding = mod.padding
    dilation = list(mod.dilation)
    if isinstance(padding, str):
        if padding == "valid":
            begin = end = [0] * dims
        else:  # "same": torch pads total // 2 before, the rest after
            total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
            begin = [t // 2 for t in total]
            end = [t - b for t, b in zip(total, begin, strict=True)]
    else:
        begin = end = list(padding)
    mode = getattr(mod, "padding_mode", "zeros")
    if mode == "zeros" or not any(begin + end):
        return x, begin + end
    if mode not in _PAD_MODES:
        raise call.unsupported(f"padding_mode={mode!r}")
    pads = call.ints("pads", [0, 0] + begin + [0, 0] + end)
    x = call.emit("Pad", [x, pads], "pad", mode=_PAD_MODES[mode])
    return call.same_grid(x, call.value(call.args["input"]), "pad"), [0] * (2 * dims)


@register_emitter("conv", "linear")
def _conv(call: OpCall) -> Any:
    """Integer layer: ``DQ(x) -> Conv | ConvTranspose | Gemm(transB=1) (DQ weight, DQ bias)``,
    then ``-> Q`` (the consumer's), or ``-> Q -> DQ -> Relu`` with a fused ReLU, or ``-> Add
    (DQ other) -> Relu`` with a fused add (one rounding, as the integer model); a 32-bit
    output stays float.  Linear inputs of rank != 2 are reshaped to 2-D around the Gemm."""
    mod = call.module
    layer = _layer(call)
    x = call.tensor("input")
    src = call.meta("input")
    inputs, late_bias = _weight_inputs(call, layer)
    flat = False
    if layer.kind == "Linear":
        if src.rank != 2:
            flat = True
            k = layer.weight.shape[1]
            x = call.emit("Reshape", [x, call.ints("input_shape", [-1, k])], "flatten_input")
            x = call.same_grid(x, call.value(call.args["input"]), "flatten_input")
        y = call.emit("Gemm", [x] + inputs, transB=1)
    else:
        dims = layer.weight.ndim - 2
        kernel = list(layer.weight.shape[2:])
        x, pads = _conv_padding(call, mod, x, dims, kernel)
        attrs: dict[str, Any] = dict(kernel_shape=kernel, strides=list(mod.stride),
                                     dilations=list(mod.dilation), group=int(mod.groups))
        if layer.kind == "Conv":
            y = call.emit("Conv", [x] + inputs, pads=pads, **attrs)
        else:
            out = call.out
            op = []
            for i in range(dims):
                size = (src.shape[2 + i] - 1) * mod.stride[i] - 2 * mod.padding[i] + \
                    mod.dilation[i] * (kernel[i] - 1) + 1
                op.append(out.shape[2 + i] - size)
            y = call.emit("ConvTranspose", [x] + inputs, pads=list(mod.padding) * 2,
                          output_padding=op, **attrs)

    if late_bias is not None:
        y = call.emit("Add", [y, late_bias], "bias")

    def back(t: str) -> str:  # the 2-D Gemm output back to the recorded shape
        return call.reshape(t, call.out, None, "reshape_output") if flat else t

    if call.ann.output is None or layer.with_add:  # one rounding after the add, or none
        y = back(y)
        if layer.with_add:
            y = call.emit("Add", [y, call.tensor("other")], "add")
        y = _act(call, y, layer.act)
        return FValue(y) if call.ann.output is None else y
    if layer.act is not None or flat:
        y = call.requantize(y)  # Conv -> Q -> DQ -> Relu keeps the conv fusable
        y = back(_act(call, y, layer.act))
    return y


# -- elementwise arithmetic -------------------------------------------------------------------
@register_emitter("add", "sub")
def _add(call: OpCall) -> str:
    a, b = call.tensor("input"), call.tensor("other")
    alpha = call.const("alpha", 1)
    if alpha != 1:
        b = call.emit("Mul", [b, call.initializer("alpha", _f32(alpha))], "alpha")
    return call.emit("Add" if call.kind == "add" else "Sub", [a, b])


@register_emitter("mul")
def _mul(call: OpCall) -> str:
    return call.emit("Mul", [call.tensor("input"), call.tensor("other")])


@register_emitter("div")
def _div(call: OpCall) -> str:
    """``Div`` by a constant; by an activation, as the NPU divides (qatkit.nn.qat.Divide):
    ``Reciprocal`` on its own grid (``Q -> DQ`` at the reciprocal's scale), then ``Mul``."""
    if call.const("rounding_mode") is not None:
        raise call.unsupported("division with a rounding_mode")
    recip = _reciprocal_scale(call.module)
    if recip is None or not isinstance(call.value(call.args.get("other")), QValue):
        return call.emit("Div", [call.tensor("input"), call.tensor("other")])
    scale, bits = recip
    r = call.emit("Reciprocal", [call.tensor("other")], "reciprocal")
    r = call.graph.quantize_dequantize(r, scale, bits, f"{call.name}.reciprocal")
    return call.emit("Mul", [call.tensor("input"), r])


def _reciprocal_scale(mod: nn.Module) -> tuple[np.ndarray, int] | None:
    """The scale and bits of a division's ``1 / other`` (QAT ``Divide`` or integer
    ``QuantizedDivide``); None for a division by a constant."""
    fq = getattr(mod, "reciprocal_post_process", None)
    if fq is not None:
        return fq.scale.detach().cpu().numpy().astype(np.float32).reshape(-1), fq.bits
    scale = getattr(mod, "reciprocal_scale", None)
    if isinstance(scale, torch.Tensor):
        return scale.detach().cpu().numpy().astype(np.float32).reshape(-1), mod.reciprocal_bits
    return None


@register_emitter("grid_sample")
def _grid_sample(call: OpCall) -> str:
    """``GridSample`` (opset 16+, modes renamed ``linear`` at 20); a pixel grid
    (``qatkit.nn.GridSample(normalized=False)``) is normalized first, in float."""
    call.require_opset(16, "GridSample")
    p = grid_sample_call(call.module, tuple(call.node.args), dict(call.node.kwargs)) \
        if not hasattr(call.module, "params") else {**call.module.params}
    grid = call.tensor("grid")
    if not p.get("normalized", True):
        meta = call.meta("input")
        h, w = int(meta.shape[-2]), int(meta.shape[-1])
        size = np.asarray([w, h], np.float32)
        if p["align_corners"]:
            scale, shift = 2 / (size - 1), np.float32(-1)
        else:
            scale, shift = 2 / size, 1 / size - 1
        grid = call.emit("Mul", [grid, call.initializer("grid_scale", scale.astype(np.float32))],
                         "grid_scale")
        grid = call.emit("Add", [grid, call.initializer("grid_shift",
                                                        np.asarray(shift, np.float32))],
                         "grid_shift")
    mode = p["mode"]
    if call.graph.opset >= 20:
        mode = {"bilinear": "linear"}.get(mode, mode)
    return call.emit("GridSample", [call.tensor("input"), grid], mode=mode,
                     padding_mode=p["padding_mode"], align_corners=int(bool(p["align_corners"])))


#: float elementwise ops of one tensor (they run in float between quantized ops)
FLOAT_UNARY: dict[str, str] = {"neg": "Neg", "abs": "Abs", "floor": "Floor", "ceil": "Ceil",
                               "sign": "Sign", "erf": "Erf", "sin": "Sin", "cos": "Cos"}


@register_emitter(*FLOAT_UNARY)
def _float_unary(call: OpCall) -> str:
    return call.emit(FLOAT_UNARY[call.kind], [call.tensor("input")])


@register_emitter("matmul")
def _matmul(call: OpCall) -> str:
    return call.emit("MatMul", [call.tensor("input"), call.tensor("other")])


@register_emitter("einsum")
def _einsum(call: OpCall) -> str:
    ops = list(call.args.get("operands", []))
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    equation = call.const("equation")
    if not isinstance(equation, str):
        raise call.unsupported("the equation must be a constant string")
    return call.emit("Einsum", [call.tensor(o) for o in ops], equation=equation.replace(" ", ""))


@register_emitter("cat", "stack")
def _cat(call: OpCall) -> str:
    tensors = call.args.get("tensors")
    values = call.value(tensors) if isinstance(tensors, fx.Node) else [
        call.value(t) for t in tensors]
    names = [call.float_of(v, f"tensors.{i}") for i, v in enumerate(values)]
    rank = call.out.rank
    dim = int(call.const("dim", 0)) % rank
    if call.kind == "stack":
        axes = call.ints("axes", [dim])
        names = [call.same_grid(call.emit("Unsqueeze", [n, axes], f"unsqueeze_{i}"), v,
                                f"unsqueeze_{i}")
                 for i, (n, v) in enumerate(zip(names, values, strict=True))]
    return call.emit("Concat", names, axis=dim)


# -- averages ---------------------------------------------------------------------------------
def _axes(dim: Any, rank: int) -> list[int]:
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(rank))
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    return sorted(int(d) % rank for d in dims)


@register_emitter("mean")
def _mean(call: OpCall) -> str:
    if call.const("dtype") not in (None, torch.float32):
        raise call.unsupported("mean with a dtype")
    src = call.meta()
    axes = _axes(call.const("dim"), src.rank)
    keep = bool(call.const("keepdim", False))
    x = call.tensor("input")
    if keep and src.rank >= 3 and axes == list(range(2, src.rank)):
        return call.emit("GlobalAveragePool", [x])
    return call.emit("ReduceMean", [x, call.ints("axes", axes)], keepdims=int(keep))


def _tuple(v: Any, n: int) -> list[int]:
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return [int(v[0])] * n
        return [int(x) for x in v]
    return [int(v)] * n


@register_emitter("avg_pool")
def _avg_pool(call: OpCall) -> str:
    src = call.meta()
    dims = src.rank - 2
    if call.const("divisor_override") is not None:
        raise call.unsupported("avg_pool with divisor_override")
    kernel = _tuple(call.const("kernel_size"), dims)
    stride = call.const("stride")
    stride = kernel if stride is None or stride == [] or stride == () else _tuple(stride, dims)
    pad = _tuple(call.const("padding", 0), dims)
    return call.emit("AveragePool", [call.tensor("input")], kernel_shape=kernel, strides=stride,
                     pads=pad * 2, ceil_mode=int(bool(call.const("ceil_mode", False))),
                     count_include_pad=int(bool(call.const("count_include_pad", True))))


@register_emitter("adaptive_avg_pool")
def _adaptive_avg_pool(call: OpCall) -> str:
    src, out = call.meta(), call.out
    ins, outs = src.shape[2:], out.shape[2:]
    x = call.tensor("input")
    if all(o == 1 for o in outs):
        return call.emit("GlobalAveragePool", [x])
    if any(src.dynamic[2:]):
        raise call.unsupported("adaptive average pooling of a dynamic spatial size")
    if not any(i % o for i, o in zip(ins, outs, strict=True)):
        kernel = [i // o for i, o in zip(ins, outs, strict=True)]
        return call.emit("AveragePool", [x], kernel_shape=kernel, strides=kernel)
    if len(ins) > 2:
        raise call.unsupported(f"adaptive average pooling of {list(ins)} to {list(outs)}")
    # windows of unequal sizes (or an output larger than the input): one averaging matrix
    # per spatial axis, [out, in] with 1/n over torch's window [floor(i*in/out), ceil(...))
    for axis in range(len(ins)):
        n_in, n_out = ins[-1 - axis], outs[-1 - axis]
        if n_in == n_out:
            continue
        a = np.zeros((n_out, n_in), np.float32)
        for i in range(n_out):
            lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
            a[i, lo:hi] = 1.0 / (hi - lo)
        if axis == 0:
            x = call.emit("MatMul", [x, call.initializer("pool_w", a.T.copy())], "pool_w")
        else:
            x = call.emit("MatMul", [call.initializer("pool_h", a), x], "pool_h")
    return x


# -- resize -----------------------------------------------------------------------------------
@register_emitter("interpolate")
def _interpolate(call: OpCall) -> str:
    """``Resize``: nearest as torch (asymmetric, floor), nearest-exact (half_pixel,
    round_prefer_ceil), (bi/tri)linear and bicubic (half_pixel or align_corners)."""
    if call.const("antialias", False):
        raise call.unsupported("interpolate with antialias=True")
    mode = call.const("mode", "nearest")
    align = bool(call.const("align_corners", False))
    src, out = call.meta(), call.out
    dims = src.rank - 2
    attrs: dict[str, Any]
    if mode == "nearest":
        attrs = dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                     nearest_mode="floor")
    elif mode == "nearest-exact":
        attrs = dict(mode="nearest", coordinate_transformation_mode="half_pixel",
                     nearest_mode="round_prefer_ceil")
    elif mode in ("linear", "bilinear", "trilinear", "bicubic"):
        attrs = dict(mode="cubic" if mode == "bicubic" else "linear",
                     coordinate_transformation_mode="align_corners" if align
                     else "pytorch_half_pixel")
        if mode == "bicubic":
            attrs["cubic_coeff_a"] = -0.75
    else:
        raise call.unsupported(f"interpolate mode {mode!r}")
    x = call.tensor("input")
    scale = call.const("scale_factor")
    if scale is not None and not call.const("recompute_scale_factor") and not align:
        scales = _f32([1.0, 1.0] + [float(s) for s in (
            scale if isinstance(scale, (list, tuple)) else [scale] * dims)])
        return call.emit("Resize", [x, "", call.initializer("scales", scales)], **attrs)
    if any(out.dynamic[2:]):
        raise call.unsupported("a resize to a dynamic size")
    sizes = call.ints("sizes", out.shape[2:])
    return call.emit("Resize", [x, "", "", sizes], axes=list(range(2, src.rank)), **attrs)


# -- softmax, norms ---------------------------------------------------------------------------
@register_emitter("softmax", "log_softmax")
def _softmax(call: OpCall) -> str:
    if call.const("dtype") not in (None, torch.float32):
        raise call.unsupported("softmax with a dtype")
    rank = call.meta().rank
    dim = call.const("dim")
    if dim is None:  # torch's legacy rule
        dim = 0 if rank in (0, 1, 3) else 1
    op = "Softmax" if call.kind == "softmax" else "LogSoftmax"
    spec = call.ann.output
    if op == "Softmax" and spec is not None and spec.bits == 8 and call.ann.input_spec("input"):
        inv = 1.0 / float(call.out_scale())
        if abs(inv - round(inv)) > 1e-6 * inv:
            warnings.warn(
                f"export_onnx: softmax '{call.name}' has output scale 1/{inv:.4g}; onnxruntime "
                "(ORT_ENABLE_ALL) runs it as QLinearSoftmax, which multiplies by floor(1 / "
                "scale) and so differs from the integer model by 1 LSB on some outputs. A "
                "softmax lies in [0, 1]: fix its output scale at 1/128 (a FixedScaleObserver "
                "qconfig for this op) to make the fused kernel exact (docs/export.md)",
                stacklevel=2)
    return call.emit(op, [call.tensor("input")], axis=int(dim) % rank)


def _param(call: OpCall, key: str, default: np.ndarray) -> str:
    """A norm's tensor argument: an initializer (module parameter, buffer), a graph tensor
    (functional call), or ``default``."""
    v = call.args.get(key)
    if isinstance(v, fx.Node):
        return call.tensor(key)
    if isinstance(v, torch.Tensor):
        return call.initializer(key, _np(v.float()))
    return call.initializer(key, default)


@register_emitter("layer_norm")
def _layer_norm(call: OpCall) -> str:
    shape = call.const("normalized_shape")
    shape = [int(shape)] if isinstance(shape, int) else [int(s) for s in shape]
    scale = _param(call, "weight", np.ones(shape, np.float32))
    bias = _param(call, "bias", np.zeros(shape, np.float32))
    return call.emit("LayerNormalization", [call.tensor("input"), scale, bias],
                     axis=-len(shape), epsilon=float(call.const("eps", 1e-5)))


@register_emitter("group_norm")
def _group_norm(call: OpCall) -> str:
    call.require_opset(21, "GroupNormalization with per-channel scale")
    c = call.meta().shape[1]
    scale = _param(call, "weight", np.ones(c, np.float32))
    bias = _param(call, "bias", np.zeros(c, np.float32))
    return call.emit("GroupNormalization", [call.tensor("input"), scale, bias],
                     num_groups=int(call.const("num_groups")),
                     epsilon=float(call.const("eps", 1e-5)))


@register_emitter("batch_norm")
def _batch_norm(call: OpCall) -> str:
    if call.const("training", False) or call.args.get("running_mean") is None:
        raise call.unsupported("batch_norm with batch statistics (training); use eval mode")
    c = call.meta().shape[1]
    inputs = [call.tensor("input"), _param(call, "weight", np.ones(c, np.float32)),
              _param(call, "bias", np.zeros(c, np.float32)),
              _param(call, "running_mean", np.zeros(c, np.float32)),
              _param(call, "running_var", np.ones(c, np.float32))]
    return call.emit("BatchNormalization", inputs, epsilon=float(call.const("eps", 1e-5)))


# -- stubs ------------------------------------------------------------------------------------
def _only_tensor(call: OpCall) -> Any:
    nodes = [v for v in call.args.values() if isinstance(v, fx.Node)]
    if len(nodes) != 1:
        raise call.unsupported("expected one tensor argument")
    return nodes[0]


@register_emitter("quant_stub")
def _quant_stub(call: OpCall) -> Any:
    """A float tensor quantized: each consumer's ``Q -> DQ`` does it.  A tensor already on
    another grid is requantized through a single-input ``Concat``: two adjacent ``Q/DQ``
    pairs would be collapsed into one by onnxruntime."""
    arg = _only_tensor(call)
    value = call.value(arg)
    if call.ann.output is None:
        return value
    if isinstance(value, FValue):
        return QValue(value.name, call.out_scale(), call.ann.output.bits, call.name)
    if isinstance(value, QValue):
        return call.emit("Concat", [call.float_of(value)], axis=0)
    raise call.unsupported("the input is not a tensor")


@register_emitter("dequant_stub")
def _dequant_stub(call: OpCall) -> FValue:
    return FValue(call.tensor(_only_tensor(call)))
