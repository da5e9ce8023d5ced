"""Integer grid_sample: an int16 grid, exact positions, one requantization.

``acc = sum_i w_i * q_i`` over the 4 bilinear taps (1 for nearest) at the grid's pixel
positions (:mod:`qatkit.grid_sample_rule`: exact for a power-of-two grid scale), then
``q_out = saturate(rint(fl64(acc * s_in) / s_out))`` (docs/npu_numerics_ops.md).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..grid_sample_rule import sample_grid
from ..nn.grid_sample_module import GridSample
from ..nn.qat.ops import grid_sample_call
from .base import BoundCall, TensorQParams, register_converter
from .ops import QuantizedOp, arg_qparams, resolve_call, unsupported

__all__ = ["QuantizedGridSample"]


class QuantizedGridSample(QuantizedOp):
    """``grid_sample`` of a quantized feature map at a (quantized) grid, in integers.

    Example::

        >>> qgs = CONVERTERS["grid_sample"](qat_gs, bind_call(qat_gs, qp_x, qp_grid), qp_out)
        >>> y = qgs(x, grid)
    """

    def __init__(self, kind: str, fn: Callable, in_qparams: Sequence[TensorQParams | None],
                 out_qparams: TensorQParams | None, call: BoundCall | None,
                 params: dict[str, Any], module: nn.Module | None = None) -> None:
        super().__init__(kind, fn, in_qparams, out_qparams, call)
        self.params = dict(params)
        self.float_module = module  # a GridSample module's float forward (float output)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.out_bits is None:
            if self.float_module is not None:
                return self.float_module(*args, **kwargs)
            return self.fn(*args, **kwargs)
        return self._int_forward(*args, **kwargs)

    def _int_forward(self, *args: Any, **kwargs: Any) -> Tensor:
        bound = {"input": self._arg(args, kwargs, "input"), "grid": self._arg(args, kwargs, "grid")}
        q = self._int(bound["input"], 0).to(torch.float64)
        grid = bound["grid"]
        if self.in_bits[1] is not None:  # exact grid values q_g * s_g
            grid = self._int(grid, 1).to(torch.float64) * self.in_scale[1].to(torch.float64)
        acc = sample_grid(q, grid.to(torch.float64), self.params["mode"],
                          self.params["padding_mode"], self.params["align_corners"],
                          self.params["normalized"])
        return self._finish((acc * self.in_scale[0].to(torch.float64)) / self._s_out())


@register_converter("grid_sample")
def _convert_grid_sample(qat_module: nn.Module, call: BoundCall,
                         out_qparams: TensorQParams | None) -> QuantizedGridSample:
    kind, fn, _, _, _ = resolve_call(qat_module, call) if not isinstance(
        qat_module, GridSample) else ("grid_sample", None, None, None, None)
    p = grid_sample_call(qat_module, call.args, call.kwargs)
    if arg_qparams(call.get("input")) is None:
        raise unsupported("input", kind, "the feature map is not quantized")
    for name in ("mode", "padding_mode", "align_corners"):
        if not isinstance(p[name], (str, bool)):
            raise unsupported(name, kind, f"{name} must be a constant")
    if p["mode"] not in ("bilinear", "nearest") or p["padding_mode"] not in ("zeros",
                                                                            "border"):
        raise unsupported("mode", kind, f"mode={p['mode']!r}, padding_mode="
                          f"{p['padding_mode']!r}: the integer sampler does bilinear / nearest "
                          "with zeros / border padding")
    params = {k: p[k] for k in ("mode", "padding_mode", "align_corners", "normalized")}
    module = None
    if isinstance(qat_module, GridSample):
        module = GridSample(**params)
    return QuantizedGridSample(kind, fn, [arg_qparams(call.get("input")),
                                          arg_qparams(call.get("grid"))],
                               out_qparams, call, params, module)
