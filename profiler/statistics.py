"""Feature-map statistics: ranges against what int8/int16 can hold, NaN/inf, outlier channels.

:func:`profile_featuremap` turns the records of :func:`~qatkit.profiler.get_raw_features`
into one row per recorded tensor, with what an NPU engineer checks first: how far the range
reaches in quantization steps (``Range (steps)`` above 127 means int8 cannot hold it at this
scale), which fraction of values sits on or beyond the ends of the integer range
(``Saturation Ratio``), and NaN/inf counts.  :func:`outlier_channels` shows, per tensor, how
many channels are dwarfed by the tensor's largest channel (powers of two), the signature of
the outlier channels that ruin per-tensor scales in transformers.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Sequence

import pandas as pd
import torch
from torch import Tensor

from .capture import FeatureRecord, write_table

__all__ = ["FeatureProfile", "profile_featuremap", "outlier_channels"]

STAT_COLUMNS = ["Module Name", "Module Type", "Attr", "Arg", "Min", "Max", "Mean", "Var",
                "Scale", "Dtype", "Saturation Ratio", "Range (steps)", "NaN", "Inf"]
OUTLIER_COLUMNS = ["Module Name", "Module Type", "Attr", "Channels", "Level>=3", "Level>=4",
                   "Level>=5", "Level>=6", "Max Level"]


class FeatureProfile(NamedTuple):
    """The two tables of :func:`profile_featuremap` (a tuple: ``table, by_range = ...``).

    Attributes:
        table: one row per record, in execution order.
        by_range: the same rows, largest ``Range (steps)`` first (rows without a scale after,
            by largest ``max(|Min|, |Max|)``).
    """

    table: pd.DataFrame
    by_range: pd.DataFrame


def _qrange(dtype: str) -> tuple[int, int] | None:
    if dtype.startswith("qint"):
        bits = int(dtype[4:])
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return None


def _stats_row(r: FeatureRecord) -> dict:
    # float32 passes (min/max, the saturation count) and float64 accumulation (mean, var):
    # a few passes per tensor, no float64 copy of the feature map
    # a fake-quant op's output: the value before its fake quant, so the range in steps and the
    # saturation show what the grid cuts off (after it, both are clamped to the grid's ends)
    is_int = r.is_int and r.unquantized is None
    x = (r.data if r.unquantized is None else r.unquantized).reshape(-1)
    if not x.is_floating_point() or x.dtype == torch.float16 or x.dtype == torch.bfloat16:
        x = x.to(torch.float32)
    n = x.numel()
    n_nan = n_inf = 0
    finite = x
    if n and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        finite = x[torch.isfinite(x)]
    m = finite.numel()
    if m:
        lo, hi = torch.aminmax(finite)
        mn, mx = float(lo), float(hi)
        mean = float(finite.sum(dtype=torch.float64)) / m
        centered = finite - torch.tensor(mean, dtype=finite.dtype)
        var = float(centered.square_().sum(dtype=torch.float64)) / m
    else:
        mn = mx = mean = var = math.nan
    scale = r.scale
    sat = steps = math.nan
    qr = _qrange(r.dtype)
    if scale is not None and not math.isnan(scale) and scale > 0 and n:
        if m:
            amax = max(abs(mn), abs(mx))
            steps = amax if is_int else amax / scale  # the range in quantization steps
        if qr is not None:
            # round(x * float32(1 / s)), as the fake quant computes it
            qi = finite if is_int else torch.round(finite * (1.0 / torch.tensor(
                scale, dtype=torch.float32)).to(finite.dtype))
            if r.unquantized is not None:  # the values the fake quant actually clamps
                at_ends = int(((qi < qr[0]) | (qi > qr[1])).sum()) + n_inf
            else:  # already on the grid: the values sitting at its ends
                at_ends = int(((qi <= qr[0]) | (qi >= qr[1])).sum()) + n_inf
            sat = at_ends / n
    return {"Module Name": r.name, "Module Type": r.module_type, "Attr": r.attr, "Arg": r.arg,
            "Min": mn, "Max": mx, "Mean": mean, "Var": var,
            "Scale": math.nan if scale is None else float(scale), "Dtype": r.dtype,
            "Saturation Ratio": sat, "Range (steps)": steps, "NaN": n_nan, "Inf": n_inf}


def profile_featuremap(features: Sequence[FeatureRecord], out_dir: str | os.PathLike | None = None,
                       file_name: str | None = None) -> FeatureProfile:
    """Statistics of every recorded tensor, and the same rows sorted by range.

    Columns: "Module Name", "Module Type", "Attr", "Arg", "Min", "Max", "Mean", "Var"
    (over the finite values), "Scale" (NaN for a float tensor), "Dtype",
    "Saturation Ratio" (fraction of values the grid clamps: with ``round(x / scale)`` beyond
    the dtype's range, infinities included; NaN without a scale), "Range (steps)" (``max|x| /
    scale``: above 127 an int8 tensor cannot hold its range at this scale; NaN without a
    scale), "NaN", "Inf" (counts).  The output of a fake-quant op is described by its value
    *before* the output fake quant (``FeatureRecord.unquantized``): that is what the grid has to
    hold, so a range beyond 127 steps and the clamped fraction are visible.  Tensors already on
    the grid (inputs, integer-model outputs) count the values at the grid's ends as saturated.
    Records captured with ``preserve_int`` hold the integers ``q``: Min/Max/Mean/Var are then
    in steps too.

    Args:
        features: records from :func:`~qatkit.profiler.get_raw_features`.
        out_dir: also write ``<file_name>.csv`` (execution order) and ``<file_name>.txt``
            (both tables) there.
        file_name: default ``"featuremap_statistics"``.

    Returns:
        a :class:`FeatureProfile` ``(table, by_range)``.

    Example::

        >>> table, by_range = profile_featuremap(get_raw_features(calib_model, x))
        >>> by_range[["Module Name", "Range (steps)", "Saturation Ratio"]].head(3)
    """
    rows = [_stats_row(r) for r in features]
    table = pd.DataFrame(rows, columns=STAT_COLUMNS)
    key = table["Range (steps)"].fillna(-1.0)
    amax = pd.concat([table["Min"].abs(), table["Max"].abs()], axis=1).max(axis=1).fillna(-1.0)
    order = sorted(range(len(table)), key=lambda i: (-key.iloc[i], -amax.iloc[i]))
    by_range = table.iloc[order].reset_index(drop=True)
    write_table(table, out_dir, file_name or "featuremap_statistics",
                "Feature map statistics (execution order)",
                extra=[("Sorted by range (steps)", by_range)])
    return FeatureProfile(table, by_range)


def _channel_axis(t: Tensor, channel_axis: int | None) -> int:
    if channel_axis is not None:
        return channel_axis % t.dim()
    return t.dim() - 1 if t.dim() == 3 else 1


def _levels(t: Tensor, axis: int) -> tuple[int, list[float]]:
    x = t.detach().to(torch.float64).abs().nan_to_num(nan=0.0)
    x = x.movedim(axis, 0).reshape(t.shape[axis], -1)
    cmax = x.max(dim=1).values if x.shape[1] else torch.zeros(x.shape[0], dtype=torch.float64)
    top = float(cmax.max()) if cmax.numel() else 0.0
    live = cmax[cmax > 0]
    if top == 0 or math.isinf(top):
        return int(t.shape[axis]), []
    return int(t.shape[axis]), torch.log2(top / live).tolist()


def outlier_channels(features: Sequence[FeatureRecord], channel_axis: int | None = None,
                     out_dir: str | os.PathLike | None = None,
                     file_name: str | None = None) -> pd.DataFrame:
    """How far each tensor's max exceeds its channels' maxima, in powers of two.

    For channel ``c`` with ``m_c = max |x[..., c, ...]|`` and the tensor's ``M = max_c m_c``,
    the level is ``log2(M / m_c)``.  A tensor whose scale is set by a few outlier channels
    has many channels at level >= 3 (8x below the max: they use at most 1/8 of the int8
    range).  All-zero channels (dead ReLUs) have nothing to lose and are not counted.  A
    fake-quant op's output is measured before its fake quant (``FeatureRecord.unquantized``),
    so channels the grid rounds to zero still count.

    Channel axis (``channel_axis=None``): dim 1 for 2-D tensors ``[N, C]`` and for conv-like
    tensors of 4 or more dims ``[N, C, H, W]``; the last dim for 3-D tensors, taken as
    linear/transformer tensors ``[B, T, C]``.  Pass ``channel_axis=1`` for conv1d models
    ``[N, C, L]``.  Tensors of fewer than 2 dims are skipped.

    Args:
        features: records from :func:`~qatkit.profiler.get_raw_features`.
        channel_axis: override the axis for every tensor.
        out_dir: also write ``<file_name>.csv`` / ``.txt`` there.
        file_name: default ``"outlier_channels"``.

    Returns:
        a DataFrame: "Module Name", "Module Type", "Attr", "Channels", "Level>=3" ...
        "Level>=6" (channel counts), "Max Level" (0.0 when no channel is below the max).

    Example::

        >>> t = outlier_channels(get_raw_features(vit, x, types=[torch.nn.LayerNorm]))
        >>> t.sort_values("Level>=6", ascending=False).head()
    """
    rows = []
    for r in features:
        data = r.data if r.unquantized is None else r.unquantized  # before the output grid
        if data.dim() < 2:
            continue
        axis = _channel_axis(data, channel_axis)
        channels, levels = _levels(data, axis)
        row = {"Module Name": r.name, "Module Type": r.module_type, "Attr": r.attr,
               "Channels": channels}
        for k in (3, 4, 5, 6):
            row[f"Level>={k}"] = sum(1 for v in levels if v >= k)
        row["Max Level"] = max(levels) if levels else 0.0
        rows.append(row)
    table = pd.DataFrame(rows, columns=OUTLIER_COLUMNS)
    write_table(table, out_dir, file_name or "outlier_channels", "Outlier channels")
    return table
