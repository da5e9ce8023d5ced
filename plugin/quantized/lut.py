"""Lookup tables for unary elementwise ops (ReLU, sigmoid, GELU, ...): exact by construction.

A quantized input takes at most ``2**bits`` values, so an elementwise op is a table: at
convert time :func:`convert_lut` evaluates the QAT op's float function on every input grid value
``q * s_in`` (float32, the very values the fake-quant model sees), with the call's constant
arguments (``negative_slope``, ``min``/``max``, ``approximate``...), and quantizes the results
exactly as the output fake quant does::

    table[q - qmin] = clamp(round(f(q * s_in) / s_out), out_qmin, out_qmax)   # float32 division

256 entries for an int8 input, 65536 for int16; at run time ``out = table[q - qmin]``.  Without
an output fake quant the table holds the float results.  Inputs outside a function's domain
(``sqrt`` / ``log`` / ``rsqrt`` of a negative number: NaN in float) take the entry of the
nearest input inside it (``sqrt(0) = 0``, ``log(0) = -inf``: saturated); infinities saturate.
See docs/npu_numerics.md, "Lookup tables".
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .._modules import module_device
from ..annotation import bind_arguments, module_constants
from ..nn.qat.ops import FunctionalOp
from .base import BoundCall, QuantizedModule, TensorQParams, from_int, register_converter, to_int

__all__ = ["LUT_OPS", "QuantizedLookupTable", "convert_lut", "lookup_table"]

#: op kinds converted to a lookup table
LUT_OPS: tuple[str, ...] = (
    "relu", "relu6", "hardtanh", "clamp", "sigmoid", "tanh", "exp", "hardswish", "hardsigmoid",
    "silu", "gelu", "mish", "elu", "leaky_relu", "sqrt", "rsqrt", "reciprocal", "log",
)


class QuantizedLookupTable(QuantizedModule):
    """``table[q - qmin]``: a unary elementwise op on a quantized input.

    Called like the QAT module it replaces (``forward(*args, **kwargs)``); the tensor input is
    the argument named ``input_name`` of the call (bound by ``signature``), every other
    argument was a constant baked into the table.  Inputs outside the input range saturate
    to it.

    Args:
        table: ``2**in_bits`` outputs, one per input integer from ``qmin`` up: integers
            (int8/int16 tensor) with ``output_qparams``, float32 without.
        input_qparams: scale and bits of the input.
        output_qparams: of the output, ``None`` for a float output.
        input_name: the name of the tensor argument (``"input"``).
        op: the op kind (``"sigmoid"``...).
        signature: the call's positional parameter names (default ``("input",)``).
        fixed: the constants of a module-form op baked into the table (a LeakyReLU's
            ``negative_slope``...), kept for the exporter and ``repr``; a functional call keeps
            them in its call instead.

    Example::

        >>> qp = TensorQParams(torch.tensor([1 / 16]), 8)
        >>> table = torch.arange(-128, 128).clamp(min=0).to(torch.int8)   # ReLU, s_out = s_in
        >>> relu = QuantizedLookupTable(table, qp, qp, op="relu")
        >>> relu(torch.tensor([-0.5, 0.25]))
        tensor([0.0000, 0.2500])
    """

    def __init__(self, table: Tensor, input_qparams: TensorQParams,
                 output_qparams: TensorQParams | None, input_name: str = "input",
                 op: str = "lut", signature: Sequence[str] = ("input",),
                 fixed: dict[str, Any] | None = None) -> None:
        super().__init__()
        if table.numel() != 2**input_qparams.bits:
            raise ValueError(f"a lookup table for int{input_qparams.bits} inputs has "
                             f"{2**input_qparams.bits} entries, got {table.numel()}")
        self.op = op
        self.qatkit_op_kind = op
        self.qatkit_signature = tuple(signature)
        self.input_name = input_name
        self.fixed = dict(fixed or {})
        self.in_bits = input_qparams.bits
        self.out_bits = None if output_qparams is None else output_qparams.bits
        self.register_buffer("table", table.detach().reshape(-1).clone())
        self.register_buffer("input_scale", input_qparams.scale.clone())
        self.register_buffer("output_scale", None if output_qparams is None
                             else output_qparams.scale.clone())

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """The op's output for the tensor argument ``input_name``."""
        x = bind_arguments(self.qatkit_signature, args, kwargs)[self.input_name]
        qp = TensorQParams(self.input_scale, self.in_bits)
        index = (to_int(x, qp).clamp_(qp.quant_min, qp.quant_max) - qp.quant_min)
        out = self.table[index]
        if self.output_scale is None:
            return out
        return from_int(out, TensorQParams(self.output_scale, self.out_bits))

    def extra_repr(self) -> str:
        out = "float32" if self.out_bits is None else f"int{self.out_bits}"
        consts = "".join(f", {k}={v}" for k, v in self.fixed.items())
        return (f"op={self.op}{consts}, in=int{self.in_bits}, out={out}, "
                f"entries={self.table.numel()}")


@register_converter(*LUT_OPS)
def convert_lut(qat_module: nn.Module, call: BoundCall,
                out_qparams: TensorQParams | None) -> QuantizedLookupTable:
    """The lookup table of a QAT unary elementwise op (``qat.Sigmoid``, ``FunctionalOp``...).

    Args:
        qat_module: the QAT op module; its ``float_forward`` (the op without its output fake
            quant) is evaluated on the input grid, with the call's constant arguments.
        call: the call bound by name (:class:`~qatkit.quantized.base.BoundCall`): exactly one
            tensor argument, quantized.
        out_qparams: of the output fake quant, ``None`` for a float output.

    Raises:
        ValueError: the call has several tensor arguments (not unary), a float input, or the
            function is not elementwise / gives NaN on the grid.

    Example::

        >>> sig = convert_lut(qat_model.sigmoid, bind_call(qat_model.sigmoid,
        ...                   TensorQParams(torch.tensor([1 / 32]), 8)),
        ...                   TensorQParams(qat_model.sigmoid.activation_post_process.scale, 8))
    """
    where = f"{qat_module._get_name()} {call!r}"
    tensors = call.tensors()
    if len(tensors) != 1:
        raise ValueError(f"{where}: a lookup table takes exactly one tensor input, the call has "
                         f"{len(tensors)}")
    input_name, arg = tensors[0]
    in_qp = arg.qparams
    if in_qp is None:
        raise ValueError(f"{where}: the input is not quantized (float); a lookup table needs a "
                         "quantized input")
    device = module_device(qat_module, torch.device("cpu"))
    table = lookup_table(lambda grid: call.evaluate(qat_module.float_forward,
                                                    lambda name, a: grid),
                         in_qp, out_qparams, device, where)

    kind = qat_module.qatkit_op_kind
    fixed = {} if isinstance(qat_module, FunctionalOp) else module_constants(qat_module, kind)
    return QuantizedLookupTable(table, in_qp, out_qparams, input_name, op=kind,
                                signature=call.names, fixed=fixed)


def lookup_table(fn: Any, in_qparams: TensorQParams, out_qparams: TensorQParams | None,
                 device: torch.device | None = None, where: str = "lookup table") -> Tensor:
    """The table of elementwise ``fn`` on every input grid value: ``fn(q * s_in)`` in float32,
    quantized as the output fake quant does (``round(y / s_out)``, float32 division), int8 /
    int16; float32 results without ``out_qparams``.  The one rule for every table.

    Example::

        >>> lookup_table(torch.sigmoid, TensorQParams(torch.tensor([1 / 16]), 8),
        ...              TensorQParams(torch.tensor([1 / 128]), 8)).shape
        torch.Size([256])
    """
    grid = torch.arange(in_qparams.quant_min, in_qparams.quant_max + 1, device=device,
                        dtype=torch.float32) * in_qparams.scale.to(device)  # == from_int(q)
    with torch.no_grad():
        y = fn(grid)
    if not isinstance(y, Tensor) or y.shape != grid.shape or not y.is_floating_point():
        raise ValueError(f"{where}: not a float elementwise op (on a [{grid.numel()}] input it "
                         f"returned {getattr(y, 'shape', type(y).__name__)}); no lookup table")
    y = _fill_outside_domain(y.to(torch.float32), where)
    if out_qparams is None:
        return y
    scale = out_qparams.scale.to(device)  # float32 division, as the fake quant
    q = torch.div(y, scale).round_().clamp_(out_qparams.quant_min, out_qparams.quant_max)
    return q.to(torch.int8 if out_qparams.bits == 8 else torch.int16)


def _fill_outside_domain(y: Tensor, where: str) -> Tensor:
    """``y`` with each NaN (an input outside the function's domain) replaced by the value at
    the nearest input inside it (ties: the lower input)."""
    nan = torch.isnan(y)
    if not bool(nan.any()):
        return y
    if bool(nan.all()):
        raise ValueError(f"{where}: the function gives NaN on the whole input grid; no lookup "
                         "table")
    idx = torch.arange(y.numel(), device=y.device)
    valid = idx[~nan]
    nearest = valid[torch.searchsorted(valid, idx).clamp(max=valid.numel() - 1)]
    below = valid[(torch.searchsorted(valid, idx, right=True) - 1).clamp(min=0)]
    pick = torch.where((idx - below).abs() <= (nearest - idx).abs(), below, nearest)
    return torch.where(nan, y[pick], y)
