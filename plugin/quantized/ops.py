"""Integer modules for the weightless ops: add/sub/mul, cat/stack, matmul/einsum, mean and
average pools, interpolate (softmax and the norms are in :mod:`qatkit.quantized.norm`).

Each module recovers its inputs' integers ``q = round(x / s)`` (see :mod:`.base`), computes in
integers, and returns ``q_out * s_out``.  Three kinds of arithmetic (docs/npu_numerics_ops.md
gives each op in C terms):

* rescaling (add, sub, cat, stack, nearest interpolate): int64 fixed point with a 31-bit
  multiplier at one common shift;
* products (mul, matmul, einsum): the multiplier and shift of :func:`~.base.requantize`;
* averages (mean, avg pools, other interpolations): IEEE double on exact integer sums.

All three round ties to even, exactly: the simulator's one rounding rule (the same
:func:`~.base.requantize` as conv / linear) and the fake quant's own.  Exact ties are common
where scales are powers of two apart (a saturated sigmoid's scale is exactly 1/128, so
``x * sigmoid(...)`` in a squeeze-excitation block lands on ties), and there both models then
agree.

A module whose output is float (``out_qparams is None``) runs the float op on its grid inputs,
which is what the fake-quant model does.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..annotation import bind_arguments, module_constants
from ..nn.qat.ops import FunctionalOp
from .base import (
    BoundCall,
    QuantizedModule,
    TensorArg,
    TensorQParams,
    quantize_multiplier,
    register_converter,
    requantize,
)
from .lut import lookup_table

__all__ = ["QuantizedAdd", "QuantizedMul", "QuantizedDivide", "QuantizedCat", "QuantizedMatmul",
           "QuantizedAverage", "QuantizedInterpolate", "MODULE_FUNCTIONS", "QuantizedOp",
           "resolve_call", "arg_qparams", "unsupported"]

#: float module class -> the function its forward calls (with the module's attributes of
#: :data:`~qatkit.annotation.MODULE_CONSTANTS` as keywords)
MODULE_FUNCTIONS: dict[type[nn.Module], Callable] = {
    nn.AvgPool1d: F.avg_pool1d, nn.AvgPool2d: F.avg_pool2d, nn.AvgPool3d: F.avg_pool3d,
    nn.AdaptiveAvgPool1d: F.adaptive_avg_pool1d, nn.AdaptiveAvgPool2d: F.adaptive_avg_pool2d,
    nn.AdaptiveAvgPool3d: F.adaptive_avg_pool3d, nn.Upsample: F.interpolate,
    nn.Softmax: F.softmax, nn.LogSoftmax: F.log_softmax,
}

_EXACT = 2**53  # float64 holds every integer below this exactly
_NEAREST = ("nearest", "nearest-exact")


# -- convert-time helpers --------------------------------------------------------------------
def arg_qparams(arg: Any) -> TensorQParams | None:
    """The qparams of a bound argument (None: float tensor or a constant).

    Example::

        >>> arg_qparams(call["input"])
        TensorQParams(scale=[0.0213], bits=8)
    """
    return arg.qparams if isinstance(arg, TensorArg) else None


def _label(name: str, kind: str) -> str:
    return f"argument {name!r} of a {kind!r} op ({kind})"


def unsupported(name: str, kind: str, what: str) -> NotImplementedError:
    """The error a converter raises for an argument it cannot convert, with the two fixes.

    Example::

        >>> raise unsupported("dim", "softmax", "dim must be a constant")
    """
    return NotImplementedError(
        f"convert failed at {_label(name, kind)}: {what}. Fix: keep the op float (qconfig_dict "
        "entry None or hybrid_dict) or keep it in fake-quant form (set_preserve_qat_mode)")


def resolve_call(qat_module: nn.Module, call: BoundCall) -> tuple[str, Callable, dict[str, Any],
                                                                 tuple, dict]:
    """``(kind, fn, fixed kwargs, args, kwargs)`` of a QAT op, tensors as ``TensorArg``.

    A ``FunctionalOp`` calls its function with the call's own arguments; a module kind calls
    the function of :data:`MODULE_FUNCTIONS` with ``input`` and the module's attributes.

    Example::

        >>> kind, fn, fixed, args, kwargs = resolve_call(qat.AvgPool2d(2), call)
        >>> fn is F.avg_pool2d, fixed["kernel_size"]
        (True, 2)
    """
    kind = qat_module.qatkit_op_kind
    for name, arg in call.tensors():
        qp = arg.qparams
        if qp is not None and qp.scale.numel() != 1:
            raise ValueError(f"convert failed at {_label(name, kind)}: input qparams must be per "
                             f"tensor, got {qp}")
    if isinstance(qat_module, FunctionalOp):
        return kind, qat_module.fn, {}, call.args, call.kwargs
    for cls in type(qat_module).__mro__:
        if cls in MODULE_FUNCTIONS:
            fn = MODULE_FUNCTIONS[cls]
            if len(call.tensors()) != 1:
                raise ValueError(f"convert failed at a {kind!r} module: a module call takes "
                                 f"one input, got {call!r}")
            return kind, fn, module_constants(qat_module, kind), (call["input"],), {}
    raise unsupported(type(qat_module).__name__, kind,
                       f"no integer implementation of {type(qat_module).__name__}")


def _fixed_point(mult: Tensor) -> tuple[Tensor, Tensor]:
    """Signed int64 multipliers at one common shift: ``m_i = rint(M_i * 2**S)``, with ``S`` the
    shift that puts ``max |M_i|`` in ``[2**30, 2**31)``, clamped to ``[1, 62]``."""
    mult = mult.to(torch.float64)
    _, shift = quantize_multiplier(mult.abs().max().reshape(1))
    shift = shift.clamp(1, 62).reshape(())
    m = torch.round(torch.ldexp(mult, shift)).clamp(-(2.0**46), 2.0**46).to(torch.int64)
    return m, shift


def _round_shift(acc: Tensor, shift: Tensor) -> Tensor:
    """``acc / 2**shift`` rounded half to even, exactly (int64, ``shift >= 1``)."""
    one = torch.ones_like(shift)
    q = acc >> shift  # floor
    rem = acc & ((one << shift) - 1)  # acc - q * 2**shift, in [0, 2**shift)
    half = one << (shift - 1)
    return q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(torch.int64)


# -- the shared module -----------------------------------------------------------------------
class QuantizedOp(QuantizedModule):
    """Input scales (``in_scale``, NaN for a non-quantized argument) and the output scale as
    buffers; ``fn`` is the float op, ``fixed`` the keywords a module kind adds to it;
    ``qatkit_signature`` binds a call's arguments by name (:meth:`_arg`).  The base of the
    weightless integer ops (here and in :mod:`qatkit.quantized.norm`)."""

    def __init__(self, kind: str, fn: Callable, in_qparams: Sequence[TensorQParams | None],
                 out_qparams: TensorQParams | None, call: BoundCall | None = None,
                 fixed: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.op = kind
        self.qatkit_op_kind = kind
        self.qatkit_signature = call.names if call is not None else ("input",)
        self.fn = fn
        self.fixed = dict(fixed or {})
        self.in_bits = [qp.bits if qp is not None else None for qp in in_qparams]
        scales = [qp.scale.reshape(1) if qp is not None else torch.full([1], math.nan)
                  for qp in in_qparams]
        self.register_buffer("in_scale", torch.cat(scales) if scales else torch.zeros(0))
        self.out_bits = out_qparams.bits if out_qparams is not None else None
        self.register_buffer("output_scale", out_qparams.scale.reshape(1).clone()
                             if out_qparams is not None else torch.ones(1))
        if out_qparams is not None:
            self.quant_min, self.quant_max = out_qparams.quant_min, out_qparams.quant_max

    def _arg(self, args: Sequence[Any], kwargs: dict[str, Any], name: str,
             default: Any = None) -> Any:
        """The call's argument ``name`` (bound by ``qatkit_signature``), else ``default``."""
        return bind_arguments(self.qatkit_signature, args, kwargs).get(name, default)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.out_bits is None:  # float output: the float op, as in the fake-quant model
            return self.fn(*args, **self.fixed, **kwargs)
        return self._int_forward(*args, **kwargs)

    def _int_forward(self, *args: Any, **kwargs: Any) -> Tensor:
        raise NotImplementedError

    def _int(self, x: Any, i: int) -> Tensor:
        """The int64 integers of grid tensor ``x`` (input ``i``)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{self._where()}: input {i} should be a "
                            f"quantized tensor, got {type(x).__name__}")
        return torch.round(x.to(torch.float64) / self.in_scale[i].to(torch.float64)).to(
            torch.int64)

    def _s_out(self) -> Tensor:
        """The output scale in float64 (0-d): results are divided by it, as the fake quant
        divides."""
        return self.output_scale.to(torch.float64).reshape(())

    def _ratio(self, i: int) -> Tensor:
        """``M = s_in[i] / s_out`` in float64."""
        return self.in_scale[i].to(torch.float64) / self._s_out()

    def _from_int(self, q: Tensor) -> Tensor:
        return q.to(torch.float32) * self.output_scale.reshape(())  # 0-d: keeps the shape of q

    def _finish(self, u: Tensor) -> Tensor:
        """Float64 ``u`` in output LSBs -> rint (half to even), saturate, to the output grid."""
        return self._from_int(torch.round(u).clamp_(self.quant_min, self.quant_max))

    def _const(self, c: Any) -> Tensor:
        """A non-quantized operand (python number or float tensor) as float64, through float32
        as the fake-quant model sees it."""
        if isinstance(c, Tensor):
            c = c.detach()
        return torch.as_tensor(c, dtype=torch.float32, device=self.output_scale.device).to(
            torch.float64)

    def extra_repr(self) -> str:
        return f"in_bits={self.in_bits}, out_bits={self.out_bits}"


# -- add / sub -------------------------------------------------------------------------------
class QuantizedAdd(QuantizedOp):
    """``input + c * other`` (``c = alpha``, or ``-alpha`` for sub) on the output grid.

    ``acc = q_a * m_a + q_b * m_b`` in int64 with ``m_i = rint(s_i * c_i / s_out * 2**S)`` at one
    common shift ``S``; a non-quantized operand (``x + 1``, a float parameter) enters as
    ``rint(v * c / s_out * 2**S)``; ``q = saturate(round_half_even(acc / 2**S))``.

    Example::

        >>> qat = FunctionalOp("add", operator.add, qatkit.FakeQuantize())
        >>> ...  # calibrate, then:
        >>> qadd = CONVERTERS["add"](qat, bind_call(qat, qp_a, qp_b), qp_out)
        >>> y = qadd(a, b)  # a, b on their grids; y on the output grid
    """

    def __init__(self, kind: str, fn: Callable, in_qparams: Sequence[TensorQParams | None],
                 out_qparams: TensorQParams | None, call: BoundCall | None,
                 coef: tuple[float, float]) -> None:
        super().__init__(kind, fn, in_qparams, out_qparams, call)
        self.coef = tuple(float(c) for c in coef)
        s_out = self._s_out()
        mult = torch.stack([self.in_scale[i].to(torch.float64) * c / s_out
                            if in_qparams[i] is not None else torch.zeros((), dtype=torch.float64)
                            for i, c in enumerate(self.coef)])
        m, shift = _fixed_point(mult)
        self.register_buffer("multiplier", m)
        self.register_buffer("shift", shift)

    def _int_forward(self, *args: Any, **kwargs: Any) -> Tensor:
        a, b = self._arg(args, kwargs, "input"), self._arg(args, kwargs, "other")
        acc = self._term(a, 0) + self._term(b, 1)
        return self._from_int(_round_shift(acc, self.shift).clamp_(self.quant_min,
                                                                    self.quant_max))

    def _term(self, v: Any, i: int) -> Tensor:
        if self.in_bits[i] is not None:
            return self._int(v, i) * self.multiplier[i]
        k = torch.ldexp(self._const(v) * self.coef[i] / self._s_out(), self.shift)
        return torch.round(k).clamp_(-(2.0**61), 2.0**61).to(torch.int64)


@register_converter("add", "sub")
def _convert_add(qat_module: nn.Module, call: BoundCall,
                 out_qparams: TensorQParams | None) -> QuantizedAdd:
    kind, fn, _, _, _ = resolve_call(qat_module, call)
    a, b = call.get("input"), call.get("other")
    alpha = call.get("alpha", 1)
    if isinstance(alpha, TensorArg) or not isinstance(alpha, (int, float)):
        raise unsupported("alpha", kind, f"alpha must be a python number, got {alpha!r}")
    if arg_qparams(a) is None and arg_qparams(b) is None:
        raise unsupported("input", kind, "no operand is a quantized tensor")
    coef = (1.0, float(alpha) * (-1.0 if kind == "sub" else 1.0))
    return QuantizedAdd(kind, fn, [arg_qparams(a), arg_qparams(b)], out_qparams, call, coef)


# -- mul -------------------------------------------------------------------------------------
class QuantizedMul(QuantizedOp):
    """``a * b``: ``requantize(q_a * q_b, M = s_a * s_b / s_out)``.

    With a non-quantized operand ``c`` (python number or float tensor, e.g. a layer scale):
    ``requantize(q_a * sign(c), M = s_a * |c| / s_out)``, the multiplier per element of
    ``c``; :func:`~.base.requantize` rounds ties to even.

    Example::

        >>> qmul = CONVERTERS["mul"](qat_mul, bind_call(qat_mul, qp_a, qp_b), qp_out)
        >>> y = qmul(a, b)
    """

    def __init__(self, kind: str, fn: Callable, in_qparams: Sequence[TensorQParams | None],
                 out_qparams: TensorQParams | None, call: BoundCall | None,
                 divide: bool = False) -> None:
        super().__init__(kind, fn, in_qparams, out_qparams, call)
        self.divide = divide  # ``input / c``: the constant operand divides
        s = self.in_scale.to(torch.float64).nan_to_num(1.0)
        m, shift = quantize_multiplier((s[0] * s[1] / self._s_out()).reshape(1))
        self.register_buffer("multiplier", m)
        self.register_buffer("shift", shift)

    def _int_forward(self, *args: Any, **kwargs: Any) -> Tensor:
        ops = [self._arg(args, kwargs, "input"), self._arg(args, kwargs, "other")]
        if None not in self.in_bits:
            acc = self._int(ops[0], 0) * self._int(ops[1], 1)
            return self._from_int(requantize(acc, self.multiplier, self.shift,
                                                   self.quant_min, self.quant_max))
        i = 0 if self.in_bits[0] is not None else 1
        c = self._const(ops[1 - i])
        mult = self._ratio(i) / c.abs() if self.divide else self._ratio(i) * c.abs()
        m, shift = quantize_multiplier(mult.clamp(max=2.0**40))
        acc = self._int(ops[i], i) * torch.sign(c).to(torch.int64)
        return self._from_int(requantize(acc, m, shift, self.quant_min, self.quant_max))


@register_converter("mul")
def _convert_mul(qat_module: nn.Module, call: BoundCall,
                 out_qparams: TensorQParams | None) -> QuantizedMul:
    kind, fn, _, _, _ = resolve_call(qat_module, call)
    a, b = call.get("input"), call.get("other")
    if arg_qparams(a) is None and arg_qparams(b) is None:
        raise unsupported("input", kind, "no operand is a quantized tensor")
    return QuantizedMul(kind, fn, [arg_qparams(a), arg_qparams(b)], out_qparams, call)


# -- div -------------------------------------------------------------------------------------
class QuantizedDivide(QuantizedOp):
    """``input / other`` for a quantized ``other``: ``q_r = table[q_other]`` (the reciprocal's
    lookup table, on the scale ``s_r`` of the QAT module's ``reciprocal_post_process``), then
    ``requantize(q_input * q_r, M = s_input * s_r / s_out)``; a constant ``input`` (``1 / x``)
    multiplies ``q_r`` by it as :class:`QuantizedMul` does.

    Example::

        >>> qdiv = CONVERTERS["div"](qat_div, bind_call(qat_div, qp_x, qp_y), qp_out)
        >>> y = qdiv(a, b)
    """

    def __init__(self, kind: str, fn: Callable, in_qparams: Sequence[TensorQParams | None],
                 out_qparams: TensorQParams | None, call: BoundCall | None, table: Tensor,
                 reciprocal_qparams: TensorQParams) -> None:
        super().__init__(kind, fn, in_qparams, out_qparams, call)
        self.register_buffer("reciprocal_table", table.detach().reshape(-1).clone())
        self.register_buffer("reciprocal_scale", reciprocal_qparams.scale.reshape(1).clone())
        self.reciprocal_bits = reciprocal_qparams.bits
        s_x = self.in_scale[0].to(torch.float64).nan_to_num(1.0)
        m, shift = quantize_multiplier((s_x * self.reciprocal_scale.double()[0] /
                                        self._s_out()).reshape(1))
        self.register_buffer("multiplier", m)
        self.register_buffer("shift", shift)

    def _int_forward(self, *args: Any, **kwargs: Any) -> Tensor:
        x, y = self._arg(args, kwargs, "input"), self._arg(args, kwargs, "other")
        qmin = -(2 ** (self.in_bits[1] - 1))
        q_y = self._int(y, 1).clamp(qmin, 2 ** (self.in_bits[1] - 1) - 1)
        q_r = self.reciprocal_table[q_y - qmin].to(torch.int64)
        if self.in_bits[0] is not None:
            acc = self._int(x, 0) * q_r
            return self._from_int(requantize(acc, self.multiplier, self.shift,
                                             self.quant_min, self.quant_max))
        c = self._const(x)
        mult = self.reciprocal_scale.double()[0] * c.abs() / self._s_out()
        m, shift = quantize_multiplier(mult.clamp(max=2.0**40).reshape(-1))
        acc = q_r * torch.sign(c).to(torch.int64)
        m, shift = m.reshape(c.shape), shift.reshape(c.shape)
        return self._from_int(requantize(acc, m, shift, self.quant_min, self.quant_max))


@register_converter("div")
def _convert_div(qat_module: nn.Module, call: BoundCall,
                 out_qparams: TensorQParams | None) -> nn.Module:
    kind, fn, _, _, _ = resolve_call(qat_module, call)
    x, y = call.get("input"), call.get("other")
    rfq = getattr(qat_module, "reciprocal_post_process", None)
    if isinstance(y, TensorArg) and rfq is not None:
        y_qp = arg_qparams(y)
        if y_qp is None:
            raise unsupported("other", kind, "the divisor is not quantized")
        r_qp = TensorQParams(rfq.scale, rfq.bits)
        table = lookup_table(torch.reciprocal, y_qp, r_qp, torch.device("cpu"),
                             f"the reciprocal of {qat_module._get_name()}")
        return QuantizedDivide(kind, fn, [arg_qparams(x), y_qp], out_qparams, call, table, r_qp)
    if arg_qparams(x) is None:
        raise unsupported("input", kind, "the dividend is not a quantized tensor")
    return QuantizedMul(kind, fn, [arg_qparams(x), None], out_qparams, call, divide=True)


# -- cat / stack -----------------------------------------------------------------------------
class QuantizedCat(QuantizedOp):
    """``torch.cat`` / ``torch.stack`` of the inputs rescaled to the output grid.

    Input ``i``: ``saturate(round_half_even(q_i * m_i / 2**S_i))`` with ``m_i / 2**S_i`` the
    31-bit fixed point of ``s_i / s_out`` (``s_i == s_out`` gives ``m = 2**30, S = 30``: the
    identity).  A non-quantized input becomes ``saturate(rint(x / s_out))``.

    Example::

        >>> qcat = CONVERTERS["cat"](qat_cat, bind_call(qat_cat, [qp_a, qp_b], 1), qp_out)
        >>> y = qcat([a, b], 1)
    """

    def __init__(self, kind: str, fn: Callable, in_qparams: Sequence[TensorQParams | None],
                 out_qparams: TensorQParams | None, call: BoundCall | None,
                 one_node: bool) -> None:
        super().__init__(kind, fn, in_qparams, out_qparams, call)
        self.one_node = one_node  # one Node yields all tensors (e.g. the output of chunk)
        ms, shifts = [], []
        for i in range(len(self.in_bits)):
            m, shift = _fixed_point(self._ratio(i).nan_to_num(0.0).reshape(1))
            ms.append(m)
            shifts.append(shift.reshape(1))
        self.register_buffer("multiplier", torch.cat(ms))
        self.register_buffer("shift", torch.cat(shifts))

    def _int_forward(self, *args: Any, **kwargs: Any) -> Tensor:
        tensors = self._arg(args, kwargs, "tensors")
        rest = {k: v for k, v in kwargs.items() if k != "tensors"}
        roles = [0] * len(tensors) if self.one_node else range(len(tensors))
        qs = [self._rescale(t, i) for t, i in zip(tensors, roles, strict=True)]
        return self._from_int(self.fn(qs, *args[1:], **rest))

    def _rescale(self, x: Tensor, i: int) -> Tensor:
        if self.in_bits[i] is None:
            q = torch.round(x.to(torch.float64) / self._s_out())
            return q.clamp_(self.quant_min, self.quant_max).to(torch.int64)
        q = _round_shift(self._int(x, i) * self.multiplier[i], self.shift[i])
        return q.clamp_(self.quant_min, self.quant_max)


@register_converter("cat", "stack")
def _convert_cat(qat_module: nn.Module, call: BoundCall,
                 out_qparams: TensorQParams | None) -> QuantizedCat:
    kind, fn, _, _, _ = resolve_call(qat_module, call)
    tensors = call.get("tensors")
    if isinstance(tensors, TensorArg):
        qps, one_node = [tensors.qparams], True
    elif isinstance(tensors, (list, tuple)) and all(isinstance(t, TensorArg) for t in tensors):
        qps, one_node = [t.qparams for t in tensors], False
    else:
        raise unsupported("tensors", kind, f"expected a list of tensors, got {tensors!r}")
    if all(qp is None for qp in qps):
        raise unsupported("tensors", kind, "no input is a quantized tensor")
    return QuantizedCat(kind, fn, qps, out_qparams, call, one_node)


# -- matmul / einsum -------------------------------------------------------------------------
def _einsum_terms(equation: str, shapes: Sequence[Sequence[int]]) -> int:
    """How many products each output element of ``einsum(equation, ...)`` sums."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    if not arrow:  # implicit output: the letters seen once, sorted
        letters = [c for c in lhs if c.isalpha()]
        rhs = ("..." if "..." in lhs else "") + "".join(
            sorted(c for c in set(letters) if letters.count(c) == 1))
    sizes: dict[str, int] = {}
    ellipsis = 1
    for sub, shape in zip(lhs.split(","), shapes, strict=True):
        pre, dots, post = sub.partition("...")
        dims = list(zip(pre, shape[:len(pre)], strict=False))
        if dots:
            dims += list(zip(post, shape[len(shape) - len(post):], strict=False))
            ellipsis = max(ellipsis, math.prod(shape[len(pre):len(shape) - len(post)]))
        for c, n in dims:
            sizes[c] = max(sizes.get(c, 1), int(n))
    terms = math.prod(n for c, n in sizes.items() if c not in rhs)
    return terms * (ellipsis if "..." in lhs and "..." not in rhs else 1)


class QuantizedMatmul(QuantizedOp):
    """``matmul`` / ``bmm`` / ``einsum`` of quantized tensors.

    The integer products are summed exactly in float64 (every partial sum is an integer below
    2**53, checked), then ``requantize(acc, M = prod(s_i) / s_out)`` (ties to even).

    Example::

        >>> qmm = CONVERTERS["matmul"](qat_matmul, bind_call(qat_matmul, qp_a, qp_b), qp_out)
        >>> y = qmm(a, b)
    """

    def __init__(self, kind: str, fn: Callable, in_qparams: Sequence[TensorQParams | None],
                 out_qparams: TensorQParams | None, call: BoundCall | None) -> None:
        super().__init__(kind, fn, in_qparams, out_qparams, call)
        mult = torch.prod(self.in_scale.to(torch.float64)) / self._s_out()
        m, shift = quantize_multiplier(mult.reshape(1))
        self.register_buffer("multiplier", m)
        self.register_buffer("shift", shift)

    def _int_forward(self, *args: Any, **kwargs: Any) -> Tensor:
        bound = bind_arguments(self.qatkit_signature, args, kwargs)
        if self.op == "einsum":
            equation = bound["equation"]
            ops = _operands(bound)
            terms = _einsum_terms(equation, [o.shape for o in ops])
        else:
            ops = [bound["input"], bound["other"]]
            terms = ops[0].shape[-1]
        bound = terms * math.prod(2 ** (b - 1) for b in self.in_bits)
        if bound >= _EXACT:
            raise RuntimeError(
                f"{self._where()}: sums of {terms} products of "
                f"{self.in_bits}-bit integers may exceed 2**53, where float64 is no longer "
                "exact. Fix: split the contraction or use 8-bit inputs")
        qs = [self._int(o, i).to(torch.float64) for i, o in enumerate(ops)]
        acc = self.fn(equation, *qs) if self.op == "einsum" else self.fn(*qs)
        return self._from_int(requantize(acc.to(torch.int64), self.multiplier,
                                               self.shift, self.quant_min, self.quant_max))


def _operands(bound: dict[str, Any] | BoundCall) -> list[Any]:
    """einsum's operands: ``einsum(eq, a, b)`` or ``einsum(eq, [a, b])``."""
    ops = list(bound.get("operands", []))
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    return ops


@register_converter("matmul", "einsum")
def _convert_matmul(qat_module: nn.Module, call: BoundCall,
                    out_qparams: TensorQParams | None) -> QuantizedMatmul:
    kind, fn, _, _, _ = resolve_call(qat_module, call)
    if kind == "einsum":
        ops = _operands(call)
        if not isinstance(call.get("equation"), str):
            raise unsupported("equation", kind, "the equation must be a constant string")
    else:
        ops = [call.get("input"), call.get("other")]
    for i, o in enumerate(ops):
        if arg_qparams(o) is None:
            raise unsupported(f"operand {i}", kind, f"operand {i} is not a quantized tensor (a "
                               "float parameter?); quantize it in the model (QuantStub) or use "
                               "nn.Linear for a weight")
    return QuantizedMatmul(kind, fn, [arg_qparams(o) for o in ops], out_qparams, call)


# -- mean / avg pools ------------------------------------------------------------------------
class QuantizedAverage(QuantizedOp):
    """``mean``, ``avg_pool``, ``adaptive_avg_pool``: ``rint((S / n) * M)`` in IEEE double.

    ``S`` is the exact integer sum of each window (float64), ``n`` its divisor (torch's rule for
    padding, ``ceil_mode``, ``count_include_pad``, ``divisor_override``), ``M = s_in / s_out``.
    The pools call the same torch function on the float64 integers: it computes ``S / n``.

    Example::

        >>> pool = qat.AvgPool2d(2)   # a module kind
        >>> qpool = CONVERTERS["avg_pool"](pool, bind_call(pool, qp_in), qp_out)
        >>> y = qpool(x)
    """

    def _int_forward(self, *args: Any, **kwargs: Any) -> Tensor:
        x = self._arg(args, kwargs, "input")
        q = self._int(x, 0).to(torch.float64)
        if self.op == "mean":
            dim = self._arg(args, kwargs, "dim")
            keepdim = bool(self._arg(args, kwargs, "keepdim", False))
            total = q.sum(dim=dim, keepdim=keepdim)
            avg = total / (q.numel() // max(total.numel(), 1))
        else:
            rest = {k: v for k, v in kwargs.items() if k != "input"}
            avg = self.fn(q, *args[1:], **self.fixed, **rest)
        return self._finish(avg * self._ratio(0))


@register_converter("mean", "avg_pool", "adaptive_avg_pool")
def _convert_average(qat_module: nn.Module, call: BoundCall,
                     out_qparams: TensorQParams | None) -> QuantizedAverage:
    kind, fn, fixed, _, _ = resolve_call(qat_module, call)
    x = call.get("input")
    if arg_qparams(x) is None:
        raise unsupported("input", kind, "the input is not a quantized tensor")
    dtype = call.get("dtype")
    if dtype not in (None, torch.float32):
        raise unsupported("dtype", kind, f"dtype={dtype} (the integer model outputs float32)")
    return QuantizedAverage(kind, fn, [arg_qparams(x)], out_qparams, call, fixed)


# -- interpolate -----------------------------------------------------------------------------
class QuantizedInterpolate(QuantizedOp):
    """``F.interpolate`` on the integers.

    Nearest modes pick integers, then rescale them like :class:`QuantizedCat` (identity when
    ``s_in == s_out``); the others interpolate the integers in float64 (torch's weights) and
    return ``saturate(rint(v * s_in / s_out))``.

    Example::

        >>> up = qat.Upsample(scale_factor=2)
        >>> qup = CONVERTERS["interpolate"](up, bind_call(up, qp_in), qp_out)
        >>> y = qup(x)
    """

    def __init__(self, kind: str, fn: Callable, in_qparams: Sequence[TensorQParams | None],
                 out_qparams: TensorQParams | None, call: BoundCall | None,
                 fixed: dict[str, Any], nearest: bool) -> None:
        super().__init__(kind, fn, in_qparams, out_qparams, call, fixed)
        self.nearest = nearest
        m, shift = _fixed_point(self._ratio(0).reshape(1))
        self.register_buffer("multiplier", m)
        self.register_buffer("shift", shift)

    def _int_forward(self, *args: Any, **kwargs: Any) -> Tensor:
        x = self._arg(args, kwargs, "input")
        rest = {k: v for k, v in kwargs.items() if k != "input"}
        v = self.fn(self._int(x, 0).to(torch.float64), *args[1:], **self.fixed, **rest)
        if not self.nearest:
            return self._finish(v * self._ratio(0))
        q = _round_shift(v.to(torch.int64) * self.multiplier[0], self.shift)
        return self._from_int(q.clamp_(self.quant_min, self.quant_max))


@register_converter("interpolate")
def _convert_interpolate(qat_module: nn.Module, call: BoundCall,
                         out_qparams: TensorQParams | None) -> QuantizedInterpolate:
    kind, fn, fixed, _, _ = resolve_call(qat_module, call)
    x = call.get("input")
    if arg_qparams(x) is None:
        raise unsupported("input", kind, "the input is not a quantized tensor")
    mode = fixed.get("mode", call.get("mode", "nearest"))
    if not isinstance(mode, str):
        raise unsupported("mode", kind, f"mode must be a constant string, got {mode!r}")
    return QuantizedInterpolate(kind, fn, [arg_qparams(x)], out_qparams, call, fixed,
                                mode in _NEAREST)
