"""QuantStub / DeQuantStub: markers users put in float models where quantization starts/ends.

In a float model both are identities.  ``prepare_qat_fx`` replaces a QuantStub with the
graph input's fake quant (a fixed scale when ``scale`` is given) and a DeQuantStub with a
float output.
"""

from __future__ import annotations

import math
import numbers

from torch import Tensor, nn

from ..observers import dtype_to_bits

__all__ = ["QuantStub", "DeQuantStub"]


class QuantStub(nn.Module):
    """Marks where a float tensor enters the quantized part of a model.

    Args:
        scale: a fixed input scale (e.g. ``1/128`` for inputs normalized to [-1, 1]);
            ``None`` lets the observer choose it during calibration.
        dtype: ``"qint8"`` or ``"qint16"``; ``None`` follows the qconfig.

    Example::

        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.quant = QuantStub(scale=1 / 128)
        ...         self.conv = nn.Conv2d(3, 8, 3)
        ...     def forward(self, x):
        ...         return self.conv(self.quant(x))
    """

    def __init__(self, scale: float | None = None, dtype: str | None = None) -> None:
        super().__init__()
        if scale is not None and not (
            isinstance(scale, numbers.Real) and not isinstance(scale, bool)
            and math.isfinite(scale) and scale > 0
        ):
            raise ValueError(
                f"QuantStub scale must be a positive finite number (e.g. 1/128 for inputs in "
                f"[-1, 1]) or None to calibrate it, got {scale!r}"
            )
        if dtype is not None:
            dtype_to_bits(dtype)  # raises ValueError naming the valid choices
        self.scale = None if scale is None else float(scale)
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"scale={self.scale}, dtype={self.dtype}"


class DeQuantStub(nn.Module):
    """Marks where a tensor leaves the quantized part of a model (float from here on).

    Example::

        >>> y = DeQuantStub()(torch.ones(2))
    """

    def forward(self, x: Tensor) -> Tensor:
        return x
