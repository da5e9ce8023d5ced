"""GridSample: ``F.grid_sample`` as a module, with pixel or normalized grids."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GridSample"]


class GridSample(nn.Module):
    """Sample ``input`` ``[N, C, H, W]`` at the positions of ``grid`` ``[N, H_out, W_out, 2]``
    (x first), as ``F.grid_sample`` does; quantized by prepare (an int16 grid with a fixed
    scale gives exact positions: :func:`qatkit.grid_sample_scale`).

    Args:
        mode: ``"bilinear"`` or ``"nearest"``.
        padding_mode: ``"zeros"`` or ``"border"``.
        align_corners: as ``F.grid_sample``.
        normalized: the grid is normalized to ``[-1, 1]`` (torch's convention); False: the
            grid holds pixel coordinates (x in ``[0, W - 1]``), as NPU toolchains' grid
            samplers take them.

    Example::

        >>> gs = GridSample(normalized=False)
        >>> gs(torch.ones(1, 1, 4, 4), torch.full((1, 2, 2, 2), 1.5)).shape
        torch.Size([1, 1, 2, 2])
    """

    _qatkit_leaf = True  # one op for qatkit's tracer (it is quantized as a whole)

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros",
                 align_corners: bool = False, normalized: bool = True) -> None:
        super().__init__()
        self.mode, self.padding_mode = mode, padding_mode
        self.align_corners, self.normalized = bool(align_corners), bool(normalized)

    def forward(self, input: Tensor, grid: Tensor) -> Tensor:
        if not self.normalized:  # pixels -> [-1, 1], the inverse of torch's unnormalization
            h, w = input.shape[-2], input.shape[-1]
            scale = grid.new_tensor([w, h])
            if self.align_corners:
                grid = grid * 2 / (scale - 1) - 1
            else:
                grid = (grid * 2 + 1) / scale - 1
        return F.grid_sample(input, grid, mode=self.mode, padding_mode=self.padding_mode,
                             align_corners=self.align_corners)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, padding_mode={self.padding_mode!r}, "
                f"align_corners={self.align_corners}, normalized={self.normalized}")
