"""Integer modules for the normalizing ops: softmax, log_softmax, layer_norm, group_norm and
(standalone, eval) batch_norm.

* softmax: ``k = max(q) - q`` along ``dim``, ``e = LUT[k]`` with
  ``LUT[k] = rint(exp(-k * s_in) * 2**30)`` (int64, a buffer), ``S = sum(e)`` exact in int64,
  ``q_out = saturate(rint((e / S) / s_out))`` in IEEE double.
* layer_norm / group_norm: exact ``S1 = sum(q)``, ``S2 = sum(q*q)``, ``V = n*S2 - S1**2``,
  ``D = n*q - S1`` in int64; one double "rsqrt unit" per row,
  ``r = s_in / sqrt(s_in**2 * V + eps * n**2)``; ``q_out = saturate(rint((D * r) * g + b))``
  with ``g = gamma / s_out``, ``b = beta / s_out``.
* batch_norm: per channel ``A = s_in * gamma / sqrt(var + eps) / s_out``,
  ``C = (beta - mean * gamma / sqrt(var + eps)) / s_out``, ``q_out = saturate(rint(q * A + C))``.

docs/npu_numerics_ops.md gives the exact order of the double operations.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..annotation import bind_arguments, module_constants
from ..nn.qat.ops import FunctionalOp
from .base import BoundCall, TensorArg, TensorQParams, register_converter
from .ops import QuantizedOp, arg_qparams, resolve_call, unsupported

__all__ = ["QuantizedSoftmax", "QuantizedLayerNorm", "QuantizedGroupNorm",
           "QuantizedBatchNorm", "EXP_LUT_BITS"]

#: fixed-point bits of the softmax exp table: LUT[k] = rint(exp(-k * s_in) * 2**EXP_LUT_BITS)
EXP_LUT_BITS = 30


def _exp_lut(scale: Tensor, bits: int) -> Tensor:
    """``rint(exp(-k * s) * 2**30)`` for ``k = 0 .. 2**bits - 1``, cut after its first 0."""
    k = torch.arange(2**bits, dtype=torch.float64)
    lut = torch.round(torch.exp(-k * scale.to(torch.float64).reshape(())) * 2.0**EXP_LUT_BITS)
    zeros = (lut == 0).nonzero()
    if len(zeros):
        lut = lut[: int(zeros[0]) + 1]
    return lut.to(torch.int64)


def _softmax_dim(dim: Any, ndim: int) -> int:
    return dim if dim is not None else (0 if ndim in (0, 1, 3) else 1)  # torch's legacy rule


class QuantizedSoftmax(QuantizedOp):
    """Softmax / log_softmax along ``dim`` through an exp lookup table (buffer ``exp_lut``).

    log_softmax: ``q_out = saturate(rint((-k * s_in - ln(S / 2**30)) / s_out))``.

    Example::

        >>> sm = qat.Softmax(dim=-1)
        >>> qsm = CONVERTERS["softmax"](sm, bind_call(sm, qp_in), qp_out)
        >>> y = qsm(x)
    """

    def __init__(self, kind: str, fn: Callable, in_qparams: Sequence[TensorQParams | None],
                 out_qparams: TensorQParams | None, call: BoundCall | None,
                 fixed: dict[str, Any]) -> None:
        super().__init__(kind, fn, in_qparams, out_qparams, call, fixed)
        self.register_buffer("exp_lut", _exp_lut(self.in_scale[0], self.in_bits[0]))

    def _int_forward(self, *args: Any, **kwargs: Any) -> Tensor:
        x = self._arg(args, kwargs, "input")
        q = self._int(x, 0)
        dim = _softmax_dim(self._arg(args, {**self.fixed, **kwargs}, "dim"), q.dim())
        k = q.amax(dim=dim, keepdim=True) - q
        e = self.exp_lut[k.clamp(max=self.exp_lut.numel() - 1)]
        total = e.sum(dim=dim, keepdim=True).to(torch.float64)
        s_out = self._s_out()  # divided by, as the output fake quant divides
        if self.op == "log_softmax":
            s_in = self.in_scale[0].to(torch.float64)
            log_sum = torch.log(total / 2.0**EXP_LUT_BITS)
            return self._finish((-k.to(torch.float64) * s_in - log_sum) / s_out)
        return self._finish((e.to(torch.float64) / total) / s_out)


@register_converter("softmax", "log_softmax")
def _convert_softmax(qat_module: nn.Module, call: BoundCall,
                     out_qparams: TensorQParams | None) -> QuantizedSoftmax:
    kind, fn, fixed, _, _ = resolve_call(qat_module, call)
    if arg_qparams(call.get("input")) is None:
        raise unsupported("input", kind, "the input is not a quantized tensor")
    dtype = call.get("dtype")
    if dtype not in (None, torch.float32):
        raise unsupported("dtype", kind, f"dtype={dtype} (the integer model outputs float32)")
    if isinstance(fixed.get("dim", call.get("dim")), TensorArg):
        raise unsupported("dim", kind, "dim must be a constant")
    return QuantizedSoftmax(kind, fn, [arg_qparams(call.get("input"))], out_qparams, call, fixed)


# -- layer_norm / group_norm -----------------------------------------------------------------
def _centered(q: Tensor, n: int, bits: int, s_in: Tensor, eps: float,
              name: str) -> tuple[Tensor, Tensor]:
    """``D = n*q - S1`` (int64, over the last dim) and ``r = s / sqrt(s*s*V + eps*n*n)``."""
    if n * n * 4 ** (bits - 1) >= 2**62:
        raise RuntimeError(f"{name}: {n} elements of {bits}-bit integers per normalized row "
                           "overflow the int64 statistics; normalize fewer elements per row")
    s1 = q.sum(dim=-1, keepdim=True)
    s2 = (q * q).sum(dim=-1, keepdim=True)
    var = (n * s2 - s1 * s1).to(torch.float64)
    s = s_in.to(torch.float64)
    r = s / torch.sqrt(s * s * var + eps * n * n)
    return n * q - s1, r


def _affine(t: Tensor, weight: Tensor | None, bias: Tensor | None, s_out: Tensor,
            shape: Sequence[int]) -> Tensor:
    """``(t * weight + bias) / s_out`` in double, ``weight``/``bias`` shaped ``shape``
    (divided by the output scale, as the output fake quant divides)."""
    if weight is not None:
        t = t * weight.to(torch.float64).reshape(shape)
    if bias is not None:
        t = t + bias.to(torch.float64).reshape(shape)
    return t / s_out


class _Norm(QuantizedOp):
    """A norm: the module kinds own their float parameters as buffers (``weight``, ``bias``,
    running statistics), the functional kinds receive them as arguments."""

    _SIGNATURE: tuple[str, ...] = ()  # the functional form's positional parameters
    _DEFAULTS: dict[str, Any] = {}

    def __init__(self, kind: str, fn: Callable, in_qparams: Sequence[TensorQParams | None],
                 out_qparams: TensorQParams | None, call: BoundCall | None,
                 fixed: dict[str, Any], tensors: dict[str, Tensor | None]) -> None:
        super().__init__(kind, fn, in_qparams, out_qparams, call, fixed)
        for name, t in tensors.items():
            self.register_buffer(name, t.detach().to(torch.float32).clone()
                                 if t is not None else None)
        self.owned = tuple(tensors)

    def _bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = dict(self._DEFAULTS)
        bound.update(self.fixed)
        bound.update({name: getattr(self, name) for name in self.owned})
        bound.update(bind_arguments(self.qatkit_signature, args, kwargs))
        return bound

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        p = self._bind(args, kwargs)
        if self.out_bits is None:
            return self.fn(**{k: p[k] for k in self._SIGNATURE if k in p})
        return self._int_forward(p)


class QuantizedLayerNorm(_Norm):
    """``layer_norm`` over the last ``len(normalized_shape)`` dims (module docstring).

    Example::

        >>> qln = CONVERTERS["layer_norm"](qat.LayerNorm(64), [qp_in], qp_out)
        >>> y = qln(x)
    """

    _SIGNATURE = ("input", "normalized_shape", "weight", "bias", "eps")
    _DEFAULTS = {"weight": None, "bias": None, "eps": 1e-5}

    def _int_forward(self, p: dict[str, Any]) -> Tensor:
        q = self._int(p["input"], 0)
        shape = tuple(p["normalized_shape"]) if not isinstance(p["normalized_shape"], int) \
            else (p["normalized_shape"],)
        rows = q.reshape(*q.shape[: q.dim() - len(shape)], -1)
        d, r = _centered(rows, math.prod(shape), self.in_bits[0], self.in_scale[0],
                         float(p["eps"]), self._where())
        t = (d.to(torch.float64) * r).reshape(q.shape)
        return self._finish(_affine(t, p["weight"], p["bias"], self._s_out(), shape))


class QuantizedGroupNorm(_Norm):
    """``group_norm`` over each group of channels (module docstring).

    Example::

        >>> qgn = CONVERTERS["group_norm"](qat.GroupNorm(4, 32), [qp_in], qp_out)
        >>> y = qgn(x)
    """

    _SIGNATURE = ("input", "num_groups", "weight", "bias", "eps")
    _DEFAULTS = {"weight": None, "bias": None, "eps": 1e-5}

    def _int_forward(self, p: dict[str, Any]) -> Tensor:
        q = self._int(p["input"], 0)
        groups = int(p["num_groups"])
        rows = q.reshape(q.shape[0], groups, -1)
        d, r = _centered(rows, rows.shape[-1], self.in_bits[0], self.in_scale[0],
                         float(p["eps"]), self._where())
        t = (d.to(torch.float64) * r).reshape(q.shape)
        shape = (-1,) + (1,) * (q.dim() - 2)
        return self._finish(_affine(t, p["weight"], p["bias"], self._s_out(), shape))


class QuantizedBatchNorm(_Norm):
    """Eval ``batch_norm`` with running statistics: a per-channel affine (module docstring).

    Example::

        >>> qbn = CONVERTERS["batch_norm"](qat.BatchNorm2d(16).eval(), [qp_in], qp_out)
        >>> y = qbn(x)
    """

    _SIGNATURE = ("input", "running_mean", "running_var", "weight", "bias", "training",
                  "momentum", "eps")
    _DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}

    def _int_forward(self, p: dict[str, Any]) -> Tensor:
        q = self._int(p["input"], 0)
        shape = (-1,) + (1,) * (q.dim() - 2)
        inv = 1.0 / torch.sqrt(p["running_var"].to(torch.float64) + float(p["eps"]))
        gamma = p["weight"].to(torch.float64) if p["weight"] is not None else 1.0
        beta = p["bias"].to(torch.float64) if p["bias"] is not None else 0.0
        a = gamma * inv
        c = beta - p["running_mean"].to(torch.float64) * a
        mult = (self.in_scale[0].to(torch.float64) * a).reshape(shape)
        return self._finish((q.to(torch.float64) * mult + c.reshape(shape)) / self._s_out())


_NORMS: dict[str, tuple[type[_Norm], tuple[str, ...]]] = {
    # kind: (class, module tensors owned as buffers); the module's other attributes of
    # MODULE_CONSTANTS[kind] are passed as constants
    "layer_norm": (QuantizedLayerNorm, ("weight", "bias")),
    "group_norm": (QuantizedGroupNorm, ("weight", "bias")),
    "batch_norm": (QuantizedBatchNorm, ("running_mean", "running_var", "weight", "bias")),
}
_NORM_FUNCTIONS = {"layer_norm": F.layer_norm, "group_norm": F.group_norm,
                   "batch_norm": F.batch_norm}


@register_converter("layer_norm", "group_norm", "batch_norm")
def _convert_norm(qat_module: nn.Module, call: BoundCall,
                  out_qparams: TensorQParams | None) -> _Norm:
    kind = qat_module.qatkit_op_kind
    cls, owned = _NORMS[kind]
    if isinstance(qat_module, FunctionalOp):
        kind, fn, fixed, _, _ = resolve_call(qat_module, call)
        p = {**cls._DEFAULTS, **call}
        tensors: dict[str, Tensor | None] = {}
        for name, value in p.items():
            if name not in ("input", "weight", "bias", "running_mean", "running_var") \
                    and isinstance(value, TensorArg):
                raise unsupported(name, kind, f"{name} must be a constant")
    else:
        if len(call.tensors()) != 1:
            raise ValueError(f"convert failed at a {kind!r} module: one input expected, got "
                             f"{call!r}")
        fn = _NORM_FUNCTIONS[kind]
        fixed = {a: v for a, v in module_constants(qat_module, kind).items() if a not in owned}
        tensors = {name: getattr(qat_module, name) for name in owned}
        p = {"input": call["input"], "training": False}
        if kind == "batch_norm" and tensors["running_mean"] is None:
            raise unsupported("input", kind, f"{type(qat_module).__name__} has no running "
                               "statistics (track_running_stats=False)")
    if arg_qparams(p.get("input")) is None:
        raise unsupported("input", kind, "the input is not a quantized tensor")
    if kind == "batch_norm" and (p.get("training") is not False or
                                 p.get("running_mean", 0) is None):
        raise unsupported("training", kind,
                           "batch_norm must use running statistics (training=False)")
    return cls(kind, fn, [arg_qparams(p["input"])], out_qparams, call, fixed, tensors)
