"""grid_sample on an NPU: an int16 grid, exact sampling positions, one requantization.

NPUs sample a feature map at positions given by a quantized grid.  The grid travels as int16
with a fixed power-of-two scale (:func:`grid_sample_scale`), so every position is an exact
dyadic number of pixels; bilinear weights of such positions are exact too.  This module holds
the one rule both the fake-quant model (in exact evaluation) and the integer simulator follow:

* :func:`pixel_coordinates` turns a grid into pixel positions (torch's ``grid_sample``
  conventions: normalized ``[-1, 1]`` with ``align_corners``, or pixels);
* :func:`sample` takes the integer feature values ``q`` (float64) and the positions, and
  returns ``sum_i w_i * q_i`` in float64 (bilinear: 4 taps; nearest: 1), with ``zeros`` or
  ``border`` padding -- exact when the positions are dyadic with at most 26 fractional bits
  (the grid of :func:`grid_sample_scale` has at most 8).

The result ``acc`` becomes the output integer ``rint(fl64(acc * s_in) / s_out)``
(docs/npu_numerics_ops.md, "grid_sample").
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["grid_sample_scale", "pixel_coordinates", "sample", "sample_grid", "GRID_SAMPLE_MODES",
           "GRID_SAMPLE_PADDING"]

GRID_SAMPLE_MODES = ("bilinear", "nearest")
GRID_SAMPLE_PADDING = ("zeros", "border")


def grid_sample_scale(feature_size: int | Sequence[int], normalized: bool = False) -> float:
    """The fixed scale of an int16 grid for sampling a feature map of ``feature_size``.

    The largest pixel coordinate ``max_coord = max(H, W) - 1`` needs ``ceil(log2(max_coord +
    1))`` integer bits; int16 keeps 15 magnitude bits, the rest are fractional:
    ``shift = 15 - ceil(log2(max_coord + 1))``, clamped to ``[0, 8]`` (more than 1/256 of a pixel
    changes no bilinear result that matters), ``scale = 2**-shift``.  With ``normalized=True``
    (a grid in ``[-1, 1]``, torch's convention) the coordinate needs 1 integer bit: the scale is
    ``2**-8`` whatever the size.

    Args:
        feature_size: ``W``, or ``(H, W)`` (any sequence: its largest entry counts).
        normalized: the grid is normalized to ``[-1, 1]`` instead of in pixels.

    Example::

        >>> grid_sample_scale((64, 200))      # max_coord 199: 8 integer bits, 7 fractional
        0.0078125
        >>> qatkit.QuantStub(scale=grid_sample_scale((64, 200)), dtype="qint16")
    """
    sizes = [feature_size] if isinstance(feature_size, int) else list(feature_size)
    if not sizes or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"grid_sample_scale: feature_size must be a positive int or a sequence "
                         f"of them, got {feature_size!r}")
    max_coord = 1 if normalized else max(sizes) - 1
    shift = 15 - math.ceil(math.log2(max_coord + 1))
    return 2.0 ** -min(max(shift, 0), 8)


def pixel_coordinates(grid: Tensor, height: int, width: int, align_corners: bool,
                      normalized: bool = True) -> tuple[Tensor, Tensor]:
    """``(x, y)`` pixel positions (float64) of ``grid`` ``[N, H_out, W_out, 2]`` (x first).

    Normalized grids follow ``torch.nn.functional.grid_sample``: ``x = (g + 1) / 2 * (W - 1)``
    with ``align_corners``, else ``x = ((g + 1) * W - 1) / 2``.

    Example::

        >>> x, y = pixel_coordinates(torch.zeros(1, 1, 1, 2), 5, 5, align_corners=True)
        >>> float(x), float(y)
        (2.0, 2.0)
    """
    g = grid.to(torch.float64)
    gx, gy = g[..., 0], g[..., 1]
    if not normalized:
        return gx, gy
    if align_corners:
        return (gx + 1) / 2 * (width - 1), (gy + 1) / 2 * (height - 1)
    return ((gx + 1) * width - 1) / 2, ((gy + 1) * height - 1) / 2


def sample(q: Tensor, x: Tensor, y: Tensor, mode: str = "bilinear",
           padding_mode: str = "zeros") -> Tensor:
    """``sum_i w_i * q[..., y_i, x_i]`` for input ``q`` ``[N, C, H, W]`` (float64 values) at
    pixel positions ``x``, ``y`` ``[N, H_out, W_out]``: ``[N, C, H_out, W_out]`` float64.

    ``border`` clamps the positions into the image first; ``zeros`` gives taps outside it a
    value of 0.  ``nearest`` rounds positions half to even (as torch does).

    Example::

        >>> q = torch.arange(4.0, dtype=torch.float64).reshape(1, 1, 2, 2)
        >>> sample(q, torch.tensor([[[0.5]]]), torch.tensor([[[0.0]]]))
        tensor([[[[0.5000]]]], dtype=torch.float64)
    """
    if mode not in GRID_SAMPLE_MODES:
        raise ValueError(f"grid_sample mode {mode!r} has no integer form: use one of "
                         f"{GRID_SAMPLE_MODES}")
    if padding_mode not in GRID_SAMPLE_PADDING:
        raise ValueError(f"grid_sample padding_mode {padding_mode!r} has no integer form: use "
                         f"one of {GRID_SAMPLE_PADDING}")
    n, c, h, w = q.shape
    if padding_mode == "border":
        x, y = x.clamp(0, w - 1), y.clamp(0, h - 1)
    flat = q.reshape(n, c, h * w)

    def tap(xi: Tensor, yi: Tensor) -> Tensor:
        inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
        idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().reshape(n, 1, -1)
        vals = torch.gather(flat, 2, idx.expand(n, c, idx.shape[-1]))
        return vals.reshape(n, c, *xi.shape[1:]) * inside.unsqueeze(1)

    if mode == "nearest":
        return tap(torch.round(x), torch.round(y))
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = (x - x0).unsqueeze(1), (y - y0).unsqueeze(1)
    return (tap(x0, y0) * ((1 - fx) * (1 - fy)) + tap(x0 + 1, y0) * (fx * (1 - fy))
            + tap(x0, y0 + 1) * ((1 - fx) * fy) + tap(x0 + 1, y0 + 1) * (fx * fy))


def sample_grid(q: Tensor, grid: Tensor, mode: str, padding_mode: str, align_corners: bool,
                normalized: bool = True) -> Tensor:
    """:func:`sample` of integer feature values ``q`` ``[N, C, H, W]`` at ``grid``
    ``[N, H_out, W_out, 2]`` (float64 values: ``q_g * s_g`` exactly for a quantized grid).

    Example::

        >>> sample_grid(q, grid, "bilinear", "zeros", align_corners=False)
    """
    x, y = pixel_coordinates(grid, q.shape[-2], q.shape[-1], align_corners, normalized)
    return sample(q.to(torch.float64), x, y, mode, padding_mode)
