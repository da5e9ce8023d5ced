"""Integer conv / conv-transpose / linear with fused BatchNorm, add and ReLU/ReLU6.

:class:`QuantizedConv` is what :func:`qatkit.convert_fx` puts in place of a QAT
``Conv1d/2d/3d``, ``ConvTranspose1d/2d`` or ``Linear`` (any fused variant, see
:class:`qatkit.nn.qat.FusedMixin`): the BatchNorm folded into int8 (or int16) weights per output
channel, an int32 bias at scale ``s_in * s_w`` (48-bit with int16 activations or weights),
and per-channel fixed-point requantization.
Numerics (docs/npu_numerics.md, "Conv and linear")::

    acc = sum(q_x * w_q) + bias_q                               # exact, int64
    q   = clamp(rhe(acc * m / 2**shift), lo, hi)                # no add: base.requantize
    q   = clamp(rhe(acc * m / 2**shift + q_o * m2 / 2**sh2), lo, hi)  # fused add, exact:
                                                                # see _requantize_add
    out = q * s_out                                             # float32, on the output grid

``rhe`` rounds half to even (the fake quant's ``torch.round``), exactly: the simulator's one
rounding rule for every requantization.

``[lo, hi]`` is the output range, narrowed to ``[0, hi]`` by a fused ReLU and to
``[0, min(hi, round(6 / s_out))]`` by a fused ReLU6.  Without an output fake quant (a
"32-bit out" layer) the module returns ``acc * s_in * s_w`` (plus the add input) in float32.

The accumulation is exact (int64): torch has no integer conv, so the module convolves
integer-valued floats, the cheapest exact way that static per-channel bounds allow (see
``_refresh_exactness``): on CPU, float32 when every partial sum, bias included, stays below
2**24, else two float32 convs of the int8 weight's halves ``w = 16 * hi + lo`` when each
stays below 2**24; float64 (exact below 2**53, checked at convert time) otherwise, on other
devices (TF32, Winograd), or when torch's CPU float32 kernels are not plain IEEE ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._exact import F32_EXACT as _F32_EXACT
from .._exact import F64_EXACT as _F64_EXACT
from .._exact import acc_bound as _acc_bound
from .._exact import cpu_fp32_is_ieee as _cpu_fp32_is_ieee
from .._exact import grid_int as _grid_int
from .._exact import split_weight
from ..annotation import QuantSpec
from .base import (
    BoundCall,
    QuantizedModule,
    TensorQParams,
    from_int,
    quantize_multiplier,
    register_converter,
    requantize,
)

__all__ = ["QuantizedConv", "convert_conv"]

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FNS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MIN_ADD_FRAC_BITS = 8


class QuantizedConv(QuantizedModule):
    """Integer conv / conv-transpose / linear, with the fusions of its QAT module.

    Built from a calibrated QAT module (``qatkit.nn.qat.Conv2d``...); called like it:
    ``forward(input, other=None, output_size=None)`` (``other`` iff an add is fused,
    ``output_size`` for conv-transpose only).  Inputs are float32 tensors on their grids.

    Args:
        qat_module: a ``qatkit.nn.qat`` conv / conv-transpose / linear with a weight fake quant
            that has a scale.  It is not modified.
        input_qparams: scale and bits of ``input``.
        output_qparams: of the output, ``None`` for a 32-bit (float) output.
        add_qparams: of ``other`` when an add is fused (ignored for a 32-bit output).

    Buffers: ``weight`` (int8/int16), ``weight_scale`` (float32, per output channel: the
    weight fake quant's), ``bias`` (int32; int64 holding 48 bits when the input
    or the weight is int16), ``multiplier``/``shift`` (int32, per output channel),
    ``add_multiplier``/``add_shift``/``add_frac_bits`` (int32, fused add),
    ``out_min``/``out_max`` (int32 clamp bounds, activation included), ``acc_scale``
    (float64 ``s_in * s_w`` per channel, the 32-bit output's scale), ``input_scale``,
    ``output_scale``, ``add_scale`` (float32).

    Raises:
        ValueError: no weight fake quant or no weight scale, an input without qparams, or
            ranges that an exact 64-bit computation cannot hold.

    Example::

        >>> qconv = QuantizedConv(qat_conv, TensorQParams(torch.tensor([1 / 64]), 8),
        ...                       TensorQParams(qat_conv.activation_post_process.scale, 8))
        >>> y = qconv(x)          # x on the 1/64 grid; y == qat_conv(x) (eval, VALIDATION)
    """

    def __init__(self, qat_module: nn.Module, input_qparams: TensorQParams,
                 output_qparams: TensorQParams | None,
                 add_qparams: TensorQParams | None = None) -> None:
        super().__init__()
        self._copy_structure(qat_module)
        self.in_bits = input_qparams.bits
        self.out_bits = None if output_qparams is None else output_qparams.bits
        w_q, w_bits = _quantize_weight(qat_module)
        with torch.no_grad():
            b_fold = qat_module.folded_weight_bias()[1]
        # the QAT module's own rule, so the fake-quant model holds the very same bias
        bias_q, acc_scale = qat_module.quantize_bias(b_fold, input_qparams.scale, self.in_bits)
        bias_q, acc_scale = bias_q.cpu(), acc_scale.cpu()  # acc_scale: exact s_in * s_w
        # int32; with int16 on either side s_in * s_w is ~2**16 finer: a 48-bit bias
        bias_q = bias_q.to(torch.int32 if self.in_bits <= 8 and w_bits <= 8 else torch.int64)
        self.w_bits = w_bits
        # int4 weights are held in int8 storage (values in [-8, 7])
        self.register_buffer("weight", w_q.to(torch.int8 if w_bits <= 8 else torch.int16))
        self.register_buffer("weight_scale", _weight_scale(qat_module).cpu())
        self.register_buffer("bias", bias_q)
        self.register_buffer("acc_scale", acc_scale)
        self.register_buffer("input_scale", input_qparams.scale.clone().cpu())
        bound = _acc_bound(self.weight, self.groups, self._kind, self.in_bits)
        if int(bound.max()) >= _F64_EXACT:
            raise ValueError(f"{qat_module._get_name()}: accumulators may reach "
                             f"{int(bound.max())} >= 2**53, beyond exact float64 accumulation")
        acc_max = bound + bias_q.abs().to(torch.int64)
        if output_qparams is None:
            for name in ("multiplier", "shift", "add_multiplier", "add_shift", "add_frac_bits",
                         "out_min", "out_max", "output_scale", "add_scale"):
                self.register_buffer(name, None)
        else:
            self._init_requant(acc_scale, acc_max, output_qparams, add_qparams)
        self._refresh_exactness()

    # -- construction ---------------------------------------------------------------------------
    def qatkit_weight_spec(self, path: str) -> QuantSpec | None:
        """The weight's spec: ``<path>.weight_scale``, per output channel (ConvTranspose's
        weight ``[in, out / groups, *k]``: axis 1)."""
        return QuantSpec(source=f"{path}.weight_scale" if path else "weight_scale",
                         dtype=f"qint{self.w_bits}",
                         ch_axis=1 if self._kind == "ConvTranspose" else 0)

    def _copy_structure(self, qat: nn.Module) -> None:
        kind = getattr(qat, "_KIND", None)
        if kind not in ("Conv", "ConvTranspose", "Linear"):
            raise ValueError(f"{type(qat).__name__} is not a qatkit.nn.qat conv / conv-transpose "
                             "/ linear module")
        self._kind = kind
        self.qatkit_op_kind = qat.qatkit_op_kind
        self.qatkit_signature = qat.qatkit_signature
        self.with_add = bool(qat.with_add)
        self.act = qat.act
        self.groups = getattr(qat, "groups", 1)
        if kind == "Linear":
            self.op = "linear"
            self.in_features, self.out_features = qat.in_features, qat.out_features
            return
        self.dim = len(qat.kernel_size)
        self.op = ("conv" if kind == "Conv" else "conv_transpose") + f"{self.dim}d"
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                     "dilation", "padding_mode"):
            setattr(self, name, getattr(qat, name))
        if kind == "Conv":
            self._reversed_padding_repeated_twice = list(qat._reversed_padding_repeated_twice)
        else:
            self.output_padding = qat.output_padding

    def _init_requant(self, acc_scale: Tensor, acc_max: Tensor, out_qp: TensorQParams,
                      add_qp: TensorQParams | None) -> None:
        s_out = float(out_qp.scale)  # M = s_in * s_w / s_out, in float64
        m, shift = quantize_multiplier(acc_scale / s_out)
        if bool((shift <= 0).any()):
            raise ValueError(f"{self._get_name()}: requantization multiplier s_in*s_w/s_out >= "
                             "2**30: the output scale is far too fine; recalibrate")
        self.register_buffer("multiplier", m.to(torch.int32))
        self.register_buffer("shift", shift.to(torch.int32))
        lo, hi = out_qp.quant_min, out_qp.quant_max
        if self.act in ("relu", "relu6"):
            lo = 0
        if self.act == "relu6":  # what the (exact) fake quant makes of 6.0: round(6 / s_out)
            hi = min(hi, int(torch.round(torch.tensor(6.0, dtype=torch.float64) / s_out)))
        self.register_buffer("out_min", torch.tensor(lo, dtype=torch.int32))
        self.register_buffer("out_max", torch.tensor(hi, dtype=torch.int32))
        self.register_buffer("output_scale", out_qp.scale.clone().cpu())
        if not self.with_add:
            for name in ("add_multiplier", "add_shift", "add_frac_bits", "add_scale"):
                self.register_buffer(name, None)
            return
        if add_qp is None:
            raise ValueError(f"{self._get_name()}: the fused add's second input is not "
                             "quantized (no scale); quantize it or keep the add unfused")
        m2, sh2 = quantize_multiplier(add_qp.scale.double().cpu() / s_out)
        self.add_bits = add_qp.bits
        frac = _add_frac_bits(acc_max, m, shift, add_qp.bits, m2, sh2)
        if frac < _MIN_ADD_FRAC_BITS:
            raise ValueError(
                f"{self._get_name()}: the fused add's scales are too far apart for 64-bit "
                f"requantization (s_in*s_w/s_out up to {float((acc_scale / s_out).max()):.3g}, "
                f"s_other/s_out = {float(add_qp.scale) / s_out:.3g}); recalibrate, or keep "
                "the add unfused")
        self.register_buffer("add_multiplier", m2.to(torch.int32))
        self.register_buffer("add_shift", sh2.to(torch.int32))
        self.register_buffer("add_frac_bits", torch.tensor(frac, dtype=torch.int32))
        self.register_buffer("add_scale", add_qp.scale.clone().cpu())

    def _refresh_exactness(self) -> None:
        """Static bounds (from the buffers) that pick exact fast paths; see docs."""
        bound = _acc_bound(self.weight, self.groups, self._kind, self.in_bits)
        acc_max = int((bound + self.bias.abs().to(torch.int64)).max())
        self._weight_cache: dict[tuple, tuple[Tensor, ...]] = {}
        self._plan = "f64"  # how to accumulate exactly on CPU (see _accumulate)
        if acc_max < _F32_EXACT:
            self._plan = "f32"
        elif self.w_bits <= 8:
            if max(int(_acc_bound(t, self.groups, self._kind, self.in_bits).max())
                   for t in split_weight(self.weight)) < _F32_EXACT:
                self._plan = "f32x2"
        shift = self.shift
        # |acc| < 2**31 and m < 2**31: acc * m fits in int64, no hi/lo split needed
        self._small_acc = shift is not None and acc_max < 2**31 and int(shift.max()) <= 62
        # shift <= 31 (M >= 0.5): any |acc| >= 2**31 saturates anyway; clamping it first is
        # cheap insurance (base.requantize clamps too)
        self._clamp_acc = shift is not None and bool((shift <= 31).any())
        if self.out_min is not None:  # python ints: no device sync per forward
            self._out_range = (int(self.out_min), int(self.out_max))
        if self.add_frac_bits is not None:
            self._frac = int(self.add_frac_bits)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh_exactness()  # the weights may have changed

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, input: Tensor, other: Tensor | None = None,
                output_size: list[int] | None = None) -> Tensor:
        """``act(op(input) [+ other])`` on the output grid (float32 if 32-bit out)."""
        if (other is not None) != self.with_add:
            raise ValueError(f"{self._where()}: " + (
                "a fused add needs forward(input, other)" if self.with_add
                else "got a second input but no add is fused"))
        if output_size is not None and self._kind != "ConvTranspose":
            raise ValueError(f"{self._where()}: output_size is for conv-transpose only")
        q_x = _grid_int(input, self.input_scale)
        shape = (-1,) if self._kind == "Linear" else (-1,) + (1,) * self.dim
        acc = self._accumulate(q_x, output_size, shape)  # bias included
        if self.multiplier is None:
            return self._float_out(acc, other, shape)
        m, shift = self.multiplier.view(shape).to(torch.int64), self.shift.view(shape)
        if other is not None:
            q_o = _grid_int(other, self.add_scale).to(torch.int64)
            q = _requantize_add(acc, m, shift, q_o, self.add_multiplier, self.add_shift,
                                self._frac, self._small_acc)
        elif self._small_acc:  # == requantize(acc, m, shift), with |acc * m| < 2**62
            q = _round_shift_even(acc.mul_(m), shift.to(torch.int64))
        else:
            if self._clamp_acc:
                acc = torch.where(shift <= 31, acc.clamp(-(2**31), 2**31 - 1), acc)
            qmin, qmax = -(2 ** (self.out_bits - 1)), 2 ** (self.out_bits - 1) - 1
            q = requantize(acc, m, shift, qmin, qmax)
        q = q.clamp_(*self._out_range)
        return from_int(q, TensorQParams(self.output_scale, self.out_bits))

    def _accumulate(self, q_x: Tensor, output_size: list[int] | None,
                    shape: tuple[int, ...]) -> Tensor:
        """``sum(q_x * w_q) + bias`` per output element, exact, as int64 (``q_x`` float32)."""
        plan = self._plan if q_x.device.type == "cpu" and _cpu_fp32_is_ieee(
            "matmul" if self._kind == "Linear" else "conv") else "f64"
        weights = self._float_weights(plan, q_x.device)
        if plan == "f32":  # every partial sum, bias included, is an integer below 2**24
            return self._op(q_x, weights[0], weights[1], output_size).to(torch.int64)
        if plan == "f64":
            # a direct / GEMM algorithm is exact; round() also absorbs the tiny error of a
            # transform-based float64 one (FFT, Winograd) on large accumulators
            acc = torch.round(self._op(q_x.to(torch.float64), weights[0], None,
                                       output_size)).to(torch.int64)
        else:  # "f32x2": w = 16 * hi + lo with hi, lo in [-8, 8]: two exact float32 convs
            acc = self._op(q_x, weights[0], None, output_size).to(torch.int64) << 4
            acc.add_(self._op(q_x, weights[1], None, output_size).to(torch.int64))
        return acc.add_(self.bias.view(shape))

    def _float_weights(self, plan: str, device: torch.device) -> tuple[Tensor, ...]:
        """The integer weights (and bias) as the float tensors ``plan`` convolves with, cached
        per device (the cache is dropped by ``load_state_dict`` and ``.to()``)."""
        key = (plan, device)
        if key not in self._weight_cache:
            w = self.weight.to(device)
            if plan == "f32":
                tensors = (w.to(torch.float32), self.bias.to(device, torch.float32))
            elif plan == "f64":
                tensors = (w.to(torch.float64),)
            else:
                tensors = tuple(t.to(torch.float32) for t in split_weight(w))
            self._weight_cache = {key: tensors}
        return self._weight_cache[key]

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> QuantizedConv:
        self._weight_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None,
            output_size: list[int] | None) -> Tensor:
        """The float conv / linear of integer-valued ``x``, ``w`` and ``b``."""
        if self._kind == "Linear":
            return F.linear(x, w, b)
        if self._kind == "Conv":
            fn = _CONV_FNS[self.dim]
            if self.padding_mode != "zeros":
                x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
                return fn(x, w, b, self.stride, 0, self.dilation, self.groups)
            return fn(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        output_padding = nn.modules.conv._ConvTransposeNd._output_padding(
            self, x, output_size, self.stride, self.padding, self.kernel_size, self.dim,
            self.dilation)
        return _CONV_T_FNS[self.dim](x, w, b, self.stride, self.padding, output_padding,
                                     self.groups, self.dilation)

    def _float_out(self, acc: Tensor, other: Tensor | None, shape: tuple[int, ...]) -> Tensor:
        y = (acc.to(torch.float64) * self.acc_scale.view(shape)).to(torch.float32)
        if other is not None:
            y = y + other
        if self.act == "relu":
            y = F.relu(y)
        elif self.act == "relu6":
            y = F.hardtanh(y, 0.0, 6.0)
        return y

    def extra_repr(self) -> str:
        out = "float32" if self.out_bits is None else f"int{self.out_bits}"
        return (f"in=int{self.in_bits}, weight=int{self.w_bits}, out={out}, "
                f"add={self.with_add}, act={self.act}")


# -- converter ------------------------------------------------------------------------------------
@register_converter("conv", "linear")
def convert_conv(qat_module: nn.Module, call: BoundCall,
                 out_qparams: TensorQParams | None) -> QuantizedConv:
    """The :class:`QuantizedConv` of a calibrated QAT conv / conv-transpose / linear.

    Args:
        qat_module: the QAT module (any fused variant).
        call: the call's arguments bound by name: ``input`` and, with a fused add,
            ``other`` (:class:`~qatkit.quantized.base.BoundCall`).
        out_qparams: of the output fake quant, ``None`` for a 32-bit output.

    Raises:
        ValueError: the input (or the fused add's other input) is not quantized, or see
            :class:`QuantizedConv`.

    Example::

        >>> in_qp = TensorQParams(torch.tensor([1 / 64]), 8)
        >>> out_qp = TensorQParams(qat_conv.activation_post_process.scale, 8)
        >>> qconv = convert_conv(qat_conv, bind_call(qat_conv, in_qp), out_qp)
    """
    in_qp = call.qparams("input")
    if in_qp is None:
        raise ValueError(f"the input of {qat_module._get_name()} is not quantized (float): an "
                         "integer conv needs a quantized input; put a QuantStub before it or "
                         "keep the layer float")
    add_qp = call.qparams("other") if qat_module.with_add else None
    return QuantizedConv(qat_module, in_qp, out_qparams, add_qp)


# -- numerics helpers ---------------------------------------------------------------------------
def _weight_scale(qat: nn.Module) -> Tensor:
    """The weight fake quant's scale as the QAT module uses it (LSQ clamps it at eps)."""
    s_w = qat.weight_fake_quant.scale.detach().to(torch.float32)
    return s_w.clamp(min=torch.finfo(torch.float32).eps).clone()


def _quantize_weight(qat: nn.Module) -> tuple[Tensor, int]:
    """``clamp(round(w_fold * float32(1/s_w)))``, the QAT module's own rule
    (``quantize_weight``), after checking that it can be applied."""
    wfq = getattr(qat, "weight_fake_quant", None)
    if wfq is None:
        raise ValueError(f"{qat._get_name()} has no weight fake quant (qconfig.weight is None): "
                         "float weights have no integer form. Give it a weight qconfig, or keep "
                         "the layer float (qconfig None)")
    if not wfq.has_scale:
        raise ValueError(f"{qat._get_name()}: its weight fake quant has no scale. Calibrate "
                         "first (set_fake_quant_state CALIBRATION, run data, then VALIDATION)")
    w = qat.weight
    if wfq.ch_axis is not None and wfq.scale.numel() != w.shape[wfq.ch_axis % w.dim()]:
        raise ValueError(f"{qat._get_name()}: weight scale has {wfq.scale.numel()} entries for "
                         f"weight axis {wfq.ch_axis} of size {w.shape[wfq.ch_axis]}")
    return qat.quantize_weight().cpu(), wfq.bits


def _add_frac_bits(acc_max: Tensor, m1: Tensor, sh1: Tensor, add_bits: int, m2: Tensor,
                   sh2: Tensor) -> int:
    """The largest ``F <= 31`` for which :func:`_requantize_add` is exact in int64, or ``0``.

    Needs ``|T| < 2**61`` for both terms (``T = floor(x * m / 2**(sh - F))``) and ``1 <= sh - F
    <= 62`` for every multiplier (so each floor remainder fits in int64).  ``0`` when no ``F``
    satisfies all of them (the caller rejects ``F`` below ``_MIN_ADD_FRAC_BITS``).
    """
    frac, need = 31, 0
    terms = list(zip(acc_max.tolist(), m1.tolist(), sh1.tolist(), strict=True))
    terms.append((2 ** (add_bits - 1), int(m2.reshape(-1)[0]), int(sh2.reshape(-1)[0])))
    for x_max, m, sh in terms:
        frac = min(frac, sh - 1, 61 + sh - (x_max * m).bit_length())
        need = max(need, sh - 62)
    return frac if frac >= need else 0


def _mul_shift_divmod(x: Tensor, m: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """``(floor(x * m / 2**s), x * m mod 2**s)`` exactly, for int64 ``|x| < 2**62``, ``0 <= m <
    2**31``, ``1 <= s <= 62`` and a quotient below ``2**61`` in magnitude.

    Via ``x = hi * 2**31 + lo``, ``0 <= lo < 2**31``, so ``x * m = hi*m * 2**31 + lo*m`` with
    both partial products below ``2**62``.  ``s >= 31``: ``u = hi*m + (lo*m >> 31)``, quotient
    ``u >> (s - 31)``, remainder ``(u mod 2**(s-31)) * 2**31 + (lo*m mod 2**31)``; ``s < 31``:
    quotient ``(hi*m << (31 - s)) + (lo*m >> s)``, remainder ``lo*m mod 2**s``.
    """
    m = m.to(torch.int64)
    s = s.to(torch.int64)
    hi = x >> 31
    lo = x & (2**31 - 1)
    hm, lm = hi * m, lo * m
    u = hm + (lm >> 31)
    s_big = (s - 31).clamp(0, 31)
    big_q = u >> s_big
    big_r = ((u & ((1 << s_big) - 1)) << 31) | (lm & (2**31 - 1))
    s_small = s.clamp(1, 31)
    small_q = (hm << (31 - s).clamp(0, 30)) + (lm >> s_small)
    small_r = lm & ((1 << s_small) - 1)
    big = s >= 31
    return torch.where(big, big_q, small_q), torch.where(big, big_r, small_r)


def _round_shift_even(x: Tensor, s: Tensor) -> Tensor:
    """``round_half_even(x / 2**s)`` exactly, for int64 ``x`` and ``1 <= s <= 62``: the floor
    ``x >> s`` plus one if the remainder ``x mod 2**s`` exceeds ``2**(s-1)``, or equals it (an
    exact tie) and the floor is odd."""
    one = torch.ones_like(s)
    q = x >> s
    rem = x & ((one << s) - 1)
    half = one << (s - 1)
    return q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(torch.int64)


def _requantize_add(acc: Tensor, m1: Tensor, sh1: Tensor, q_o: Tensor, m2: Tensor, sh2: Tensor,
                    frac: int, small: bool = False) -> Tensor:
    """``round_half_even(acc * m1 / 2**sh1 + q_o * m2 / 2**sh2)`` exactly (unsaturated).

    With ``F = frac`` fraction bits, ``s1 = sh1 - F`` and ``s2 = sh2 - F`` (both in ``[1, 62]``,
    see :func:`_add_frac_bits`), each term splits exactly into a floor and a remainder:
    ``acc * m1 = T1 * 2**s1 + r1``, ``q_o * m2 = T2 * 2**s2 + r2``, ``0 <= r_i < 2**s_i``.  So
    ``V * 2**F = T1 + T2 + f`` with ``f = r1 / 2**s1 + r2 / 2**s2`` in ``[0, 2)``.  At the common
    precision ``s = max(s1, s2) <= 62``, ``R = r1 * 2**(s-s1) + r2 * 2**(s-s2) < 2**63`` is an
    exact int64: ``carry = R >= 2**s`` and ``sticky = R mod 2**s != 0``.  With ``S = T1 + T2 +
    carry`` (``V * 2**F = S + f'``, ``f'`` in ``[0, 1)``, ``f' > 0`` iff ``sticky``), the result
    is ``S >> F`` plus one if ``S mod 2**F`` is above ``2**(F-1)``, or equal to it and
    (``sticky`` or ``S >> F`` odd): an exact tie (``sticky`` false) goes to the even neighbour.
    ``small``: ``|acc| < 2**31``, so both products fit in int64 and plain shifts and masks give
    the same floors and remainders.
    """
    s1 = sh1.to(torch.int64) - frac
    s2 = sh2.to(torch.int64) - frac
    if small:
        p1 = torch.mul(acc, m1)
        p2 = torch.mul(q_o, m2.to(torch.int64))
        t1, r1 = p1 >> s1, p1 & ((1 << s1) - 1)
        t2, r2 = p2 >> s2, p2 & ((1 << s2) - 1)
    else:
        t1, r1 = _mul_shift_divmod(acc, m1, s1)
        t2, r2 = _mul_shift_divmod(q_o, m2, s2)
    s = torch.maximum(s1, s2)
    rem = (r1 << (s - s1)) + (r2 << (s - s2))  # < 2**(s+1) <= 2**63: exact
    one = torch.ones_like(s) << s
    carry = rem >= one
    sticky = (rem != 0) & (rem != one)
    total = t1 + t2 + carry.to(torch.int64)
    q = total >> frac
    low = total & ((1 << frac) - 1)
    half = 1 << (frac - 1)
    up = (low > half) | ((low == half) & (sticky | ((q & 1) == 1)))
    return q + up.to(torch.int64)



