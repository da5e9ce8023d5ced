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
``acc`` maps to ``acc * m / 2**shift`` rounded half to even (the fake quant's ``torch.round``),
computed exactly, then saturates to the output range.  This is the simulator's one rounding
rule: every requantization (conv / linear, fused add, add, mul, matmul, cat, pools, ...)
rounds half to even, exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .._modules import ResizeBuffersOnLoad
from ..annotation import (
    AnnotatedOp,
    QuantSpec,
    bind_arguments,
    flat_tensor_args,
    map_arguments,
)

__all__ = ["QuantizedModule", "TensorQParams", "quantize_multiplier", "requantize",
           "trailing_zeros", "to_int", "from_int", "register_converter", "CONVERTERS", "saturate",
           "TensorArg", "BoundCall", "bind_call", "spec_qparams"]


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


def spec_qparams(spec: QuantSpec | None, model: nn.Module) -> TensorQParams | None:
    """The :class:`TensorQParams` of an annotation's spec, read from ``model`` (None for a
    float tensor).

    Example::

        >>> spec_qparams(get_annotations(qat_model)[node].output, qat_model)
        TensorQParams(scale=[0.0123], bits=8)
    """
    if spec is None:
        return None
    return TensorQParams(spec.scale(model), spec.bits)


class TensorArg:
    """A tensor argument of an op at conversion: its qparams, None for a float tensor.

    Example::

        >>> TensorArg(TensorQParams(torch.tensor([0.5]), 8)).qparams.bits
        8
    """

    __slots__ = ("qparams",)

    def __init__(self, qparams: TensorQParams | None) -> None:
        self.qparams = qparams

    def __repr__(self) -> str:
        return f"TensorArg({self.qparams!r})"


def _is_tensor_arg(v: Any) -> bool:
    return isinstance(v, TensorArg)


class BoundCall(Mapping):
    """One call of a quantized op, as its converter sees it: the arguments of the call, tensors
    replaced by :class:`TensorArg`, bound by name to the op's parameters (``call["input"]``,
    ``call["other"]``, ``call["tensors"][1]``, ``call["dim"]``).

    ``args`` / ``kwargs`` keep the call's own layout, for converters that evaluate the float op
    (:meth:`evaluate`).  Built by :func:`qatkit.convert_fx` from the graph and its
    quantization annotation, or by hand with :func:`bind_call`.

    Example::

        >>> call = bind_call(qat_add, TensorQParams(torch.tensor([0.1]), 8),
        ...                  TensorQParams(torch.tensor([0.2]), 8))
        >>> call["other"].qparams.scale
        tensor([0.2000])
    """

    def __init__(self, names: Sequence[str], args: Sequence[Any],
                 kwargs: Mapping[str, Any] | None = None) -> None:
        self.names = tuple(names)
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self._bound = bind_arguments(self.names, self.args, self.kwargs)

    def __getitem__(self, name: str) -> Any:
        return self._bound[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._bound)

    def __len__(self) -> int:
        return len(self._bound)

    def qparams(self, name: str) -> TensorQParams | None:
        """The qparams of tensor argument ``name`` (None: float, absent or not a tensor)."""
        value = self._bound.get(name)
        return value.qparams if isinstance(value, TensorArg) else None

    def tensors(self) -> list[tuple[str, TensorArg]]:
        """Every tensor argument as ``(name, TensorArg)``, nested ones as ``tensors.1``."""
        return list(flat_tensor_args(self._bound, _is_tensor_arg))

    def evaluate(self, fn: Callable[..., Any], value: Callable[[str, TensorArg], Any]) -> Any:
        """``fn`` called with the call's own arguments, each tensor argument replaced by
        ``value(name, arg)``."""
        args, kwargs = map_arguments(self.names, self.args, self.kwargs, value, _is_tensor_arg)
        return fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"BoundCall({self._bound!r})"


def bind_call(qat_module: nn.Module, *args: Any, **kwargs: Any) -> BoundCall:
    """A :class:`BoundCall` built by hand, to convert one QAT module without a graph.

    Tensor arguments are given as :class:`TensorQParams` (quantized) or :class:`TensorArg`
    (``TensorArg(None)`` for a float tensor); other arguments are the call's constants.

    Example::

        >>> qconv = CONVERTERS["conv"](qat_conv, bind_call(qat_conv, qp_in), qp_out)
        >>> qcat = CONVERTERS["cat"](qat_cat, bind_call(qat_cat, [qp_a, qp_b], 1), qp_out)
    """
    def wrap(v: Any) -> Any:
        if isinstance(v, TensorQParams):
            return TensorArg(v)
        if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
            return type(v)(wrap(x) for x in v)
        return v

    names = getattr(qat_module, "qatkit_signature", ("input",))
    return BoundCall(names, [wrap(a) for a in args], {k: wrap(v) for k, v in kwargs.items()})


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


def trailing_zeros(x: Tensor) -> Tensor:
    """How many times 2 divides each int64 ``x != 0`` (``-1`` for ``x == 0``): its lowest set
    bit ``x & -x`` is a power of two, exact in float64, whose exponent frexp returns."""
    return torch.frexp((x & -x).to(torch.float64))[1].to(torch.int64) - 1


def requantize(acc: Tensor, m: Tensor, shift: Tensor, quant_min: int, quant_max: int) -> Tensor:
    """``saturate(round_half_even(acc * m / 2**shift))`` exactly.

    ``acc`` is int64 with ``|acc| < 2**62``; ``m`` and ``shift`` are as
    :func:`quantize_multiplier` makes them (int64, ``m`` in ``[2**30, 2**31)`` or ``0``, any
    shift) and broadcast against ``acc`` (per channel: shape ``[C, 1, 1]``); the output range
    lies within int32.  ``acc * m`` may not fit in 64 bits
    (16-bit activations), so the half-up result ``floor((acc * m + 2**(shift-1)) / 2**shift)`` is
    computed in exact 64-bit steps (below), and then corrected at exact ties: ``acc * m /
    2**shift`` is a tie exactly when ``acc * m`` is an odd multiple of ``2**(shift-1)``, i.e.
    when ``tz(acc) + tz(m) == shift - 1`` (``tz``: trailing zero bits, ``acc, m != 0``,
    ``shift >= 1``); there the half-up result is ``floor + 1``, and clearing its last bit
    (``q & -2``) gives the even neighbour.  Results beyond the output range saturate.

    Example::

        >>> m, s = quantize_multiplier(torch.tensor([0.5], dtype=torch.float64))
        >>> requantize(torch.tensor([3, -3, 5, 1000]), m, s, -128, 127)
        tensor([   2,   -2,    2,  127])
    """
    acc = acc.to(torch.int64)
    m = m.to(torch.int64)
    shift = shift.to(torch.int64)
    s_cap = shift.clamp(max=93)
    # shift in [1, 31]: M >= 1/2, so |acc| >= 2**32 gives |result| >= 2**31: saturated anyway;
    # clamping acc first keeps every product below 2**63 and the result exact
    acc_small = acc.clamp(-(2**32), 2**32)
    s_small = s_cap.clamp(1, 31)
    small = (acc_small * m + (torch.ones_like(s_small) << (s_small - 1))) >> s_small
    # shift >= 32: split acc = hi * 2**31 + lo; floor((X + 2**(s-1)) / 2**s) with X = acc * m
    # equals floor((floor(X / 2**31) + 2**(s-32)) / 2**(s-31))
    hi = acc >> 31
    lo = acc & (2**31 - 1)
    a = hi * m  # |a| < 2**62 for |acc| < 2**62
    b = lo * m  # < 2**62
    s_large = s_cap.clamp(32, 93)
    large = ((a + (b >> 31)) + (torch.ones_like(s_large) << (s_large - 32).clamp(max=61))) \
        >> (s_large - 31).clamp(max=62)
    # shift >= 94: |acc * m| < 2**93 <= 2**(shift-1), strictly below one half: 0
    large = torch.where(shift > 93, torch.zeros_like(large), large)
    pos = shift > 0
    # shift <= 0: M = m * 2**-shift >= 2**30 is an integer; |acc * M| >= 2**31 saturates, so
    # clamping acc, the product and the shift at 2**31 keeps it exact and below 2**63
    lim = 2**31
    nonpos = ((acc.clamp(-lim, lim) * m).clamp(-lim, lim) << (-shift).clamp(0, 31)).clamp(-lim,
                                                                                          lim)
    out = torch.where(shift > 31, large, torch.where(pos, small, nonpos))
    # exact ties (acc * m an odd multiple of 2**(shift-1)): half up -> half to even
    tie = (acc != 0) & (m != 0) & pos & (trailing_zeros(acc) + trailing_zeros(m) == shift - 1)
    out = torch.where(tie, out & -2, out)
    return out.clamp_(quant_min, quant_max)


def saturate(q: Tensor, qp: TensorQParams) -> Tensor:
    """Clamp integers to the range of ``qp``."""
    return q.clamp(qp.quant_min, qp.quant_max)


def to_int(x: Tensor, qp: TensorQParams) -> Tensor:
    """The integers ``q`` of a float tensor on ``qp``'s grid, as int64.

    ``round(x / s)`` in float64: exact for values on the grid (the only values an integer
    module receives from ``convert_fx``'s graph).  Off-grid values are rounded to the nearest
    integer, not rejected: a check would cost a pass over every activation.

    Example::

        >>> to_int(torch.tensor([0.25, -1.0]), TensorQParams(torch.tensor([0.125]), 8))
        tensor([ 2, -8])
    """
    q = torch.round(x.to(torch.float64) / qp.scale.to(x.device, torch.float64))
    return q.to(torch.int64)


def from_int(q: Tensor, qp: TensorQParams) -> Tensor:
    """``q * scale`` in float32: the same float the fake-quant model computes for ``q``."""
    return q.to(torch.float32) * qp.scale.to(q.device).reshape(())


class QuantizedModule(AnnotatedOp, ResizeBuffersOnLoad):
    """Base of the integer modules: float grid values in, float grid values out.

    Subclasses keep every quantity they need (int weights, multipliers, LUTs) as buffers, so
    ``state_dict()`` loads back with ``torch.load(..., weights_only=True)``.  Every one holds
    its output's scale in the buffer ``output_scale`` and its bit width in ``out_bits`` (None
    for a float output): the quantization annotation of the integer model points there.

    Example::

        >>> class Double(QuantizedModule):     # q -> 2q on the same grid
        ...     op = "double"
        ...     def __init__(self, qp):
        ...         super().__init__(); self.qp = qp
        ...     def forward(self, x):
        ...         return from_int(saturate(2 * to_int(x, self.qp), self.qp), self.qp)
    """

    _qatkit_leaf = True
    op: str = "op"
    out_bits: int | None = None
    #: the op's name in its model (convert_fx sets it), for error messages
    qatkit_name: str = ""

    def _where(self) -> str:
        """``Quantized[matmul] 'blocks.0.matmul'``: how errors name this module."""
        return f"{self._get_name()} '{self.qatkit_name}'" if self.qatkit_name else \
            self._get_name()

    def qatkit_output_spec(self, path: str) -> QuantSpec | None:
        """The spec of the output: ``<path>.output_scale`` at ``out_bits``."""
        scale = getattr(self, "output_scale", None)
        if self.out_bits is None or not isinstance(scale, Tensor):
            return None
        return QuantSpec(source=f"{path}.output_scale" if path else "output_scale",
                         dtype=f"qint{self.out_bits}")

    def qatkit_weight_spec(self, path: str) -> QuantSpec | None:
        return None

    def _get_name(self) -> str:
        return f"Quantized[{self.op}]"


#: converter for each op kind: ``fn(qat_module, call, out_qparams) -> module``
CONVERTERS: dict[str, Callable[..., nn.Module]] = {}


def register_converter(*kinds: str) -> Callable[[Callable], Callable]:
    """Register a converter for op kinds (``"add"``, ``"conv"``, ``"sigmoid"``...).

    A converter is called as ``fn(qat_module, call, out_qparams)``: ``call`` is a
    :class:`BoundCall` (the op's arguments bound by name, each tensor a :class:`TensorArg`
    with its qparams, the constants as given), ``out_qparams`` the output's
    :class:`TensorQParams` (``None`` for a 32-bit / float output).  It returns a module called
    like the QAT module.  :func:`qatkit.convert_fx` builds ``call`` from the graph's
    quantization annotation; :func:`bind_call` builds one by hand.

    Example::

        >>> @register_converter("double")
        ... def convert_double(qat_module, call, out_qparams):
        ...     return Double(out_qparams)
    """

    def deco(fn: Callable) -> Callable:
        for kind in kinds:
            CONVERTERS[kind] = fn
        return fn

    return deco
