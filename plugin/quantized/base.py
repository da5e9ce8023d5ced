"""The integer simulator's shared numerics and the converter registry.

Representation: tensors flow between ops as float32 tensors whose values lie on their integer
grid, ``x = q * s`` (``q`` an integer in the dtype's range, ``s`` the producer's scale).  Each
quantized module recovers ``q = round(x / s)`` exactly, computes in integers (int64, or float64
holding integers where torch has no integer kernel; both exact below 2**53), requantizes to its
output grid, and returns ``q_out * s_out`` in float32, which is bit-identical to the value the
fake-quant model produces when ``q_out`` agrees.  So float in, float out; float islands and
data-moving ops work unchanged; and every op can be compared with the fake-quant model by name.

Requantization (docs/npu_numerics.md): a real multiplier ``M > 0`` is stored as an integer
``m`` in ``[2**30, 2**31)`` and a ``shift`` with ``M ~= m * 2**-shift``; an int64 accumulator
``acc`` maps to ``(acc * m + 2**(shift - 1)) >> shift`` (arithmetic shift: round half up),
then saturates to the output range.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["QuantizedModule", "TensorQParams", "quantize_multiplier", "requantize",
           "to_int", "from_int", "register_converter", "CONVERTERS", "saturate", "float_op"]


class TensorQParams:
    """Scale and bit width of one quantized tensor (per tensor, symmetric).

    Example::

        >>> qp = TensorQParams(torch.tensor([0.5]), 8)
        >>> qp.quant_min, qp.quant_max
        (-128, 127)
    """

    def __init__(self, scale: Tensor, bits: int) -> None:
        self.scale = scale.detach().to(torch.float32).reshape(-1)
        self.bits = int(bits)
        self.quant_min = -(2 ** (self.bits - 1))
        self.quant_max = 2 ** (self.bits - 1) - 1

    def __repr__(self) -> str:
        return f"TensorQParams(scale={self.scale.tolist()}, bits={self.bits})"


def quantize_multiplier(multiplier: Tensor) -> tuple[Tensor, Tensor]:
    """Split positive real multipliers into int64 ``m`` in ``[2**30, 2**31)`` and ``shift``.

    ``multiplier ~= m * 2**-shift`` with a relative error below ``2**-31``.  A zero multiplier
    gives ``m = 0, shift = 31``.

    Example::

        >>> m, s = quantize_multiplier(torch.tensor([0.75], dtype=torch.float64))
        >>> int(m), int(s)
        (1610612736, 31)
    """
    mult = multiplier.detach().to(torch.float64)
    if bool((mult < 0).any()) or not bool(torch.isfinite(mult).all()):
        raise ValueError(f"requantization multipliers must be finite and >= 0, got {mult}")
    mant, exp = torch.frexp(mult)  # mult = mant * 2**exp, mant in [0.5, 1)
    m = torch.round(mant * 2.0**31).to(torch.int64)
    carry = m == 2**31  # mantissa rounded up to 1.0
    m = torch.where(carry, m // 2, m)
    exp = exp.to(torch.int64) + carry.to(torch.int64)
    shift = 31 - exp
    zero = mult == 0
    m = torch.where(zero, torch.zeros_like(m), m)
    shift = torch.where(zero, torch.full_like(shift, 31), shift)
    return m, shift


def requantize(acc: Tensor, m: Tensor, shift: Tensor, quant_min: int, quant_max: int) -> Tensor:
    """``saturate(floor((acc * m + 2**(shift-1)) / 2**shift))`` exactly (round half up).

    ``acc`` is int64 with ``|acc| < 2**62``; ``m`` (int64, ``< 2**31``) and ``shift`` broadcast
    against it (per channel: shape ``[C, 1, 1]``).  ``acc * m`` may not fit in 64 bits (16-bit
    activations), so ``acc`` is split as ``hi * 2**31 + lo`` and the product is shifted in two
    exact steps; results beyond the output range saturate.

    Example::

        >>> m, s = quantize_multiplier(torch.tensor([0.5], dtype=torch.float64))
        >>> requantize(torch.tensor([3, -3, 1000]), m, s, -128, 127)
        tensor([   2,   -1,  127])
    """
    acc = acc.to(torch.int64)
    m = m.to(torch.int64)
    shift = shift.to(torch.int64).clamp(max=93)
    hi = acc >> 31
    lo = acc & (2**31 - 1)
    a = hi * m  # |a| < 2**62
    b = lo * m  # < 2**62
    # shift in [1, 31]: floor((a*2**31 + b + 2**(s-1)) / 2**s) = a*2**(31-s) + floor((b + r)/2**s);
    # there the result is at least |acc| / 2, so a large hi saturates anyway (clamp a)
    s_small = shift.clamp(1, 31)
    small = ((a.clamp(-(2**31), 2**31) << (31 - s_small))
             + ((b + (torch.ones_like(s_small) << (s_small - 1))) >> s_small))
    # shift >= 32: floor((floor(X / 2**31) + 2**(s-32)) / 2**(s-31)), X = a*2**31 + b
    s_large = shift.clamp(32, 93)
    large = ((a + (b >> 31)) + (torch.ones_like(s_large) << (s_large - 32).clamp(max=61))) \
        >> (s_large - 31).clamp(max=62)
    pos = shift > 0
    nonpos = (acc.clamp(-(2**31), 2**31) * m) << (-shift).clamp(0, 31)
    out = torch.where(shift > 31, large, torch.where(pos, small, nonpos))
    return out.clamp_(quant_min, quant_max)


def saturate(q: Tensor, qp: TensorQParams) -> Tensor:
    """Clamp integers to the range of ``qp``."""
    return q.clamp(qp.quant_min, qp.quant_max)


def to_int(x: Tensor, qp: TensorQParams) -> Tensor:
    """The integers ``q`` of a float tensor on ``qp``'s grid, as int64.

    Raises:
        ValueError: ``x`` is not on the grid (an op received a value it did not expect).
    """
    q = torch.round(x.to(torch.float64) / qp.scale.to(x.device, torch.float64))
    return q.to(torch.int64)


def from_int(q: Tensor, qp: TensorQParams) -> Tensor:
    """``q * scale`` in float32: the same float the fake-quant model computes for ``q``."""
    return q.to(torch.float32) * qp.scale.to(q.device)


class QuantizedModule(nn.Module):
    """Base of the integer modules: float grid values in, float grid values out.

    Subclasses keep every quantity they need (int weights, multipliers, LUTs) as buffers, so
    ``state_dict()`` loads back with ``torch.load(..., weights_only=True)``.
    """

    _qatkit_leaf = True
    op: str = "op"

    def _get_name(self) -> str:
        return f"Quantized[{self.op}]"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing,
                              unexpected, error_msgs):
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if key in state_dict and buf is not None and state_dict[key].shape != buf.shape:
                self._buffers[name] = buf.new_empty(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing,
                                      unexpected, error_msgs)


#: converter for each op kind: (qat_module, input qparams, output qparams or None) -> module
CONVERTERS: dict[str, Callable[..., nn.Module]] = {}


def register_converter(*kinds: str) -> Callable[[Callable], Callable]:
    """Register a converter for op kinds (``"add"``, ``"conv"``, ``"sigmoid"``...).

    A converter is called as ``fn(qat_module, in_qparams, out_qparams)`` where
    ``in_qparams`` is a list with one :class:`TensorQParams` (or ``None`` for a float /
    non-tensor argument) per tensor argument of the op, in the order the tensors appear in
    the op's flattened arguments, and ``out_qparams`` is the output's (``None`` for a 32-bit
    output).  It returns a module with the same call signature as the QAT module.
    """
    def deco(fn: Callable) -> Callable:
        for kind in kinds:
            CONVERTERS[kind] = fn
        return fn

    return deco



def float_op(qat_module: nn.Module) -> Callable[..., Any]:
    """The op of a QAT module without its output fake quant, called like the module.

    ``FunctionalOp`` -> its function; an output-quantized module (``qat.ReLU``...) -> the float
    class's forward bound to it; anything else -> its ``forward`` unchanged.

    Example::

        >>> float_op(qatkit.nn.qat.FunctionalOp("add", operator.add, None))(1, 2)
        3
    """
    from ..nn.qat.ops import FunctionalOp, OutputQuantMixin

    if isinstance(qat_module, FunctionalOp):
        return qat_module.fn
    if isinstance(qat_module, OutputQuantMixin):
        float_cls = next(c for c in type(qat_module).__mro__[1:]
                         if issubclass(c, nn.Module) and not issubclass(c, OutputQuantMixin))
        return functools.partial(float_cls.forward, qat_module)
    return qat_module.forward
