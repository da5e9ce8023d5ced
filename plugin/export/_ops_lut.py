"""ONNX emitters for the lookup-table ops (relu, sigmoid, gelu, ...).

The integer model runs them as tables (:mod:`qatkit.quantized.lut`), built by evaluating the
float function on every input code; the QDQ file writes the float function itself between the
input's ``DequantizeLinear`` and the output's ``QuantizeLinear``, which is what the table
means (an NPU compiler rebuilds its table from it).  :data:`LUT_EXPORTS` maps each op kind to
its ONNX form and to the torch function it stands for, and each export is checked against the
integer model's table: a table that the written op does not reproduce within 1 LSB is an error
(an integer model does not keep a module's constants, e.g. a ``LeakyReLU``'s slope; the QAT
model does).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..quantized.lut import QuantizedLookupTable
from ._graph import OpCall, register_emitter

__all__ = ["LUT_EXPORTS", "LutExport"]


@dataclasses.dataclass(frozen=True)
class LutExport:
    """How one lookup-table op is written.

    Attributes:
        emit: ``emit(call, x, params) -> y``: the ONNX nodes of the float op on ``x``.
        reference: ``reference(t, params)``: the same function in torch.
        params: the op's constants and their defaults (argument names of the torch op).
    """

    emit: Callable[[OpCall, str, dict[str, Any]], str]
    reference: Callable[[Tensor, dict[str, Any]], Tensor]
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


def _f32(v: float) -> np.ndarray:
    return np.asarray(v, np.float32)


def _clip(call: OpCall, x: str, lo: float | None, hi: float | None) -> str:
    bounds = [call.initializer(k, _f32(v)) if v is not None else ""
              for k, v in (("min", lo), ("max", hi))]
    while bounds and bounds[-1] == "":
        bounds.pop()
    return call.emit("Clip", [x] + bounds)


def _unary(op: str, **attrs: Any) -> Callable[[OpCall, str, dict[str, Any]], str]:
    return lambda call, x, p: call.emit(op, [x], **attrs)


def _gelu(call: OpCall, x: str, p: dict[str, Any]) -> str:
    call.require_opset(20, "Gelu")
    return call.emit("Gelu", [x], approximate=str(p["approximate"]))


def _silu(call: OpCall, x: str, p: dict[str, Any]) -> str:
    return call.emit("Mul", [x, call.emit("Sigmoid", [x], "sigmoid")])


def _on_domain(*ops: str) -> Callable[[OpCall, str, dict[str, Any]], str]:
    """``ops`` applied to ``max(x, 0)``: a function defined for ``x >= 0`` only (sqrt, log),
    whose table gives a negative input the value at 0 (qatkit.quantized.lut)."""
    def emit(call: OpCall, x: str, p: dict[str, Any]) -> str:
        y = call.emit("Max", [x, call.initializer("domain", _f32(0.0))], "domain")
        for i, op in enumerate(ops):
            y = call.emit(op, [y], None if i == len(ops) - 1 else op.lower())
        return y
    return emit


#: op kind -> how it is written
LUT_EXPORTS: dict[str, LutExport] = {
    "relu": LutExport(_unary("Relu"), lambda t, p: F.relu(t)),
    "relu6": LutExport(lambda c, x, p: _clip(c, x, 0.0, 6.0), lambda t, p: F.relu6(t)),
    "hardtanh": LutExport(lambda c, x, p: _clip(c, x, p["min_val"], p["max_val"]),
                          lambda t, p: F.hardtanh(t, p["min_val"], p["max_val"]),
                          {"min_val": -1.0, "max_val": 1.0}),
    "clamp": LutExport(lambda c, x, p: _clip(c, x, p["min"], p["max"]),
                       lambda t, p: torch.clamp(t, p["min"], p["max"]),
                       {"min": None, "max": None}),
    "sigmoid": LutExport(_unary("Sigmoid"), lambda t, p: torch.sigmoid(t)),
    "tanh": LutExport(_unary("Tanh"), lambda t, p: torch.tanh(t)),
    "exp": LutExport(_unary("Exp"), lambda t, p: torch.exp(t)),
    "hardswish": LutExport(_unary("HardSwish"), lambda t, p: F.hardswish(t)),
    "hardsigmoid": LutExport(_unary("HardSigmoid", alpha=1.0 / 6.0, beta=0.5),
                             lambda t, p: F.hardsigmoid(t)),
    "silu": LutExport(_silu, lambda t, p: F.silu(t)),
    "gelu": LutExport(_gelu, lambda t, p: F.gelu(t, approximate=p["approximate"]),
                      {"approximate": "none"}),
    "mish": LutExport(_unary("Mish"), lambda t, p: F.mish(t)),
    "elu": LutExport(lambda c, x, p: c.emit("Elu", [x], alpha=float(p["alpha"])),
                     lambda t, p: F.elu(t, p["alpha"]), {"alpha": 1.0}),
    "sqrt": LutExport(_on_domain("Sqrt"), lambda t, p: torch.sqrt(t.clamp(min=0))),
    "rsqrt": LutExport(_on_domain("Sqrt", "Reciprocal"),
                       lambda t, p: torch.reciprocal(torch.sqrt(t.clamp(min=0)))),
    "reciprocal": LutExport(_unary("Reciprocal"), lambda t, p: torch.reciprocal(t)),
    "log": LutExport(_on_domain("Log"), lambda t, p: torch.log(t.clamp(min=0))),
    "leaky_relu": LutExport(lambda c, x, p: c.emit("LeakyRelu", [x],
                                                   alpha=float(p["negative_slope"])),
                            lambda t, p: F.leaky_relu(t, p["negative_slope"]),
                            {"negative_slope": 0.01}),
}


@register_emitter(*LUT_EXPORTS)
def _lut(call: OpCall) -> str:
    spec = LUT_EXPORTS[call.kind]
    params = {}
    for name, default in spec.params.items():
        value = call.const(name, default)
        if isinstance(value, Tensor):
            raise call.unsupported(f"'{name}' is a tensor, not a constant")
        params[name] = default if value is None and default is not None else value
    if isinstance(call.module, QuantizedLookupTable):
        _check_table(call, call.module, spec, params)
    return spec.emit(call, call.tensor(_input_key(call)), params)


def _input_key(call: OpCall) -> str:
    name = getattr(call.module, "input_name", None)
    return name if isinstance(name, str) else "input"


def _check_table(call: OpCall, mod: QuantizedLookupTable, spec: LutExport,
                 params: dict[str, Any]) -> None:
    """The written op must reproduce the integer table within 1 LSB on every input code."""
    bits = mod.in_bits
    grid = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.float32) * \
        mod.input_scale.detach().cpu().float()
    with torch.no_grad():
        y = spec.reference(grid, params).float()
    table = mod.table.detach().cpu()
    if mod.output_scale is None:
        ok = torch.allclose(y, table.float(), rtol=1e-5, atol=1e-6)
    else:
        lim = 2 ** (mod.out_bits - 1)
        q = torch.round(y / mod.output_scale.detach().cpu().float()).clamp(-lim, lim - 1)
        ok = bool((q - table.float()).abs().max() <= 1)
    if not ok:
        raise call.unsupported(
            f"its lookup table does not match {call.kind}({params}) (a table built from other "
            "constants than the module keeps, e.g. an integer model saved by an older qatkit): "
            "export the calibrated / QAT model itself, qatkit.export_onnx(qat_model, ...)")
