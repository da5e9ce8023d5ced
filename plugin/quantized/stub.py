"""Integer version of qatkit.nn.qat.QuantStub: float in, values on the int grid out."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import BoundCall, QuantizedModule, TensorQParams, register_converter

__all__ = ["Quantize"]


class Quantize(QuantizedModule):
    """``clamp(round(x / s), qmin, qmax) * s``: the input quantization of an NPU (ONNX
    ``QuantizeLinear``: one float32 division, round half to even).

    Identical to the fake quant it replaces in VALIDATION state (round half to even).

    Example::

        >>> Quantize(TensorQParams(torch.tensor([1 / 128]), 8))(torch.tensor([0.3, 2.0]))
        tensor([0.2969, 0.9922])
    """

    op = "quantize"
    qatkit_op_kind = "quant_stub"

    def __init__(self, qparams: TensorQParams) -> None:
        super().__init__()
        self.register_buffer("output_scale", qparams.scale.clone())
        self.out_bits = qparams.bits
        self.quant_min, self.quant_max = qparams.quant_min, qparams.quant_max

    def forward(self, x: Any) -> Any:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return x
        q = torch.div(x.float(), self.output_scale).round_().clamp_(self.quant_min,
                                                                    self.quant_max)
        return q * self.output_scale

    def extra_repr(self) -> str:
        return (f"scale={self.output_scale.tolist()}, "
                f"range=[{self.quant_min}, {self.quant_max}]")


@register_converter("quant_stub")
def _convert_quant_stub(qat_module: nn.Module, call: BoundCall,
                        out_qparams: TensorQParams | None) -> nn.Module:
    if out_qparams is None:
        return nn.Identity()
    return Quantize(out_qparams)
