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
from typing import Iterator, NamedTuple, Sequence

import pandas as pd
import torch
from torch import Tensor

from .capture import FeatureRecord
from .tables import write_table

__all__ = ["FeatureProfile", "profile_featuremap", "outlier_channels"]

STAT_COLUMNS = ["Module Name", "Module Type", "Op Kind", "Attr", "Arg", "Source", "Source Kind",
                "Min", "Max", "Mean", "Var", "Scale", "Dtype", "Saturation Ratio",
                "Range (steps)", "NaN", "Inf"]
OUTLIER_COLUMNS = ["Module Name", "Module Type", "Op Kind", "Attr", "Channels", "Level>=3",
                   "Level>=4", "Level>=5", "Level>=6", "Max Level"]


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


#: elements per chunk: one chunk (1 MB of float32) stays in the CPU cache while all its
#: statistics are taken, and small temporaries are reused by the allocator (a whole feature
#: map would be a fresh, page-faulting allocation for every temporary)
_CHUNK = 1 << 18


def _chunks(x: Tensor) -> Iterator[Tensor]:
    for i in range(0, x.numel(), _CHUNK):
        yield x[i:i + _CHUNK]


def _edge(k: int, inv: Tensor, above: bool) -> Tensor | None:
    """For ``f(c) = round(c * inv)`` (float32 arithmetic, as the fake quant computes it), the
    smallest ``c`` with ``f(c) > k`` (``above``), or the largest with ``f(c) < k``: ``f`` is
    monotonic, so one comparison per element counts what lies beyond.  None if ``inv`` is not
    finite."""
    if not bool(torch.isfinite(inv)) or float(inv) <= 0:
        return None
    c = torch.tensor((k + (0.5 if above else -0.5)) / float(inv), dtype=inv.dtype)
    up = torch.tensor(math.inf, dtype=inv.dtype)
    down = -up

    def f(v: Tensor) -> float:
        return float(torch.round(v * inv))

    beyond = (lambda v: f(v) > k) if above else (lambda v: f(v) < k)
    inward, outward = (down, up) if above else (up, down)
    for _ in range(64):  # the guess is within a few ulps
        if not beyond(c):
            break
        c = torch.nextafter(c, inward)
    for _ in range(128):
        if beyond(c):
            return c
        c = torch.nextafter(c, outward)
    return None


class _Grid:
    """Counts the values whose ``round(x * float32(1 / s))`` (as the fake quant computes it)
    lies beyond the integer range (``beyond``: what a fake quant clamps) or on / beyond its
    ends (a tensor already on the grid), by two thresholds on ``x``."""

    def __init__(self, dtype: torch.dtype, is_int: bool, scale: float, qr: tuple[int, int],
                 beyond: bool) -> None:
        self.inv = (torch.tensor(1.0, dtype=dtype) if is_int else
                    (1.0 / torch.tensor(scale, dtype=torch.float32)).to(dtype))
        # beyond: f < qmin or f > qmax; at the ends: f < qmin + 1 or f > qmax - 1
        self.k_lo, self.k_hi = (qr[0], qr[1]) if beyond else (qr[0] + 1, qr[1] - 1)
        self.t_hi = _edge(self.k_hi, self.inv, above=True)
        self.t_lo = _edge(self.k_lo, self.inv, above=False)

    def count(self, c: Tensor, lo: float, hi: float) -> int:
        """Values of ``c`` (whose min and max are ``lo``, ``hi``) beyond the range."""
        if self.t_hi is None or self.t_lo is None:  # a scale beyond float32: round each value
            q = torch.round(c * self.inv)
            return int(((q < self.k_lo) | (q > self.k_hi)).sum())
        n = 0
        if hi >= float(self.t_hi):
            n += int(torch.count_nonzero(c >= self.t_hi))
        if lo <= float(self.t_lo):
            n += int(torch.count_nonzero(c <= self.t_lo))
        return n


def _moments(x: Tensor, grid: _Grid | None) -> tuple[float, float, float, float, int] | None:
    """``(min, max, mean, var, values beyond the grid)`` of a flat tensor in one pass over
    cache-sized chunks (sums of deviations from a pilot mean, no cancellation: per chunk in
    the tensor's dtype, ~1e-7 relative, over the chunks in float64); None as soon as a chunk
    holds a NaN or an infinity."""
    m = x.numel()
    center = (x[:_CHUNK].sum(dtype=torch.float64) / min(m, _CHUNK)).to(x.dtype)
    lo, hi, s1, s2, at_ends = math.inf, -math.inf, 0.0, 0.0, 0
    for c in _chunks(x):
        a, b = torch.aminmax(c)
        a, b = float(a), float(b)
        if not (math.isfinite(a) and math.isfinite(b)):
            return None
        lo, hi = min(lo, a), max(hi, b)
        if grid is not None:
            at_ends += grid.count(c, a, b)
        d = c - center
        s1 += float(d.sum())
        s2 += float(torch.dot(d, d))
    shift = s1 / m
    return lo, hi, float(center) + shift, max(s2 / m - shift * shift, 0.0), at_ends


def _tensor_stats(t: Tensor, is_int: bool, scale: float | None, dtype: str,
                  beyond: bool) -> dict:
    x = t.reshape(-1)
    if not x.is_floating_point() or x.dtype == torch.float16 or x.dtype == torch.bfloat16:
        x = x.to(torch.float32)
    n = x.numel()
    qr = _qrange(dtype)
    has_scale = scale is not None and not math.isnan(scale) and scale > 0
    grid = _Grid(x.dtype, is_int, scale, qr, beyond) if has_scale and qr and n else None
    n_nan = n_inf = 0
    mn = mx = mean = var = math.nan
    at_ends = 0
    got = _moments(x, grid) if n else None
    if got is None and n:  # NaN / inf: statistics over the finite values, both counted
        finite = x[torch.isfinite(x)]
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        got = _moments(finite, grid) if finite.numel() else None
    if got is not None:
        mn, mx, mean, var, at_ends = got
    sat = steps = math.nan
    if has_scale and n:
        if not math.isnan(mn):
            amax = max(abs(mn), abs(mx))
            steps = amax if is_int else amax / scale  # the range in quantization steps
        if qr is not None:
            sat = (at_ends + n_inf) / n
    return {"Min": mn, "Max": mx, "Mean": mean, "Var": var,
            "Scale": math.nan if scale is None else float(scale), "Dtype": dtype,
            "Saturation Ratio": sat, "Range (steps)": steps, "NaN": n_nan, "Inf": n_inf}


def _stats_row(r: FeatureRecord, memo: dict) -> dict:
    # a fake-quant op's output: the value before its fake quant, so the range in steps and the
    # saturation show what the grid cuts off (after it, both are clamped to the grid's ends)
    t = r.data if r.unquantized is None else r.unquantized
    is_int = r.is_int and r.unquantized is None
    beyond = r.unquantized is not None
    # one tensor recorded several times (an op's output is the next ops' input) is measured
    # once; the records hold it, so its id stays valid
    key = (id(t), is_int, r.scale, r.dtype, beyond)
    if key not in memo:
        memo[key] = _tensor_stats(t, is_int, r.scale, r.dtype, beyond)
    return {"Module Name": r.name, "Module Type": r.module_type, "Op Kind": r.kind,
            "Attr": r.attr, "Arg": r.arg, "Source": r.source, "Source Kind": r.source_kind,
            **memo[key]}


def profile_featuremap(features: Sequence[FeatureRecord], out_dir: str | os.PathLike | None = None,
                       file_name: str | None = None) -> FeatureProfile:
    """Statistics of every recorded tensor, and the same rows sorted by range.

    Columns: "Module Name", "Module Type", "Op Kind" (from the quantization annotation:
    ``conv``, ``add``, ``quant_stub``, ``sigmoid``...; the op's base name for other ops),
    "Attr", "Arg", "Source" and "Source Kind" (for an input: the op whose output it is, looked
    up through data-moving ops, and its kind -- ``input`` for a model input; empty for an
    output), "Min", "Max", "Mean", "Var" (over the finite values), "Scale" (NaN for a float
    tensor), "Dtype", "Saturation Ratio" (fraction of values the grid clamps: with
    ``round(x / scale)`` beyond the dtype's range, infinities included; NaN without a scale),
    "Range (steps)" (``max|x| / scale``: above 127 an int8 tensor cannot hold its range at
    this scale; NaN without a scale), "NaN", "Inf" (counts).  The output of a fake-quant op is
    described by its value *before* the output fake quant (``FeatureRecord.unquantized``):
    that is what the grid has to hold, so a range beyond 127 steps and the clamped fraction
    are visible.  Tensors already on the grid (inputs, integer-model outputs) count the values
    at the grid's ends as saturated.  Records captured with ``preserve_int`` hold the integers
    ``q``: Min/Max/Mean/Var are then in steps too.

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
    memo: dict = {}
    rows = [_stats_row(r, memo) for r in features]
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


def _channel_max(t: Tensor, axis: int) -> Tensor:
    """max |x| per channel (float64; NaNs ignored), by reductions that copy nothing."""
    x = t.detach()
    if not x.is_floating_point():
        x = x.to(torch.float64)
    if x.numel() == 0:
        return torch.zeros(t.shape[axis], dtype=torch.float64)
    dims = [d for d in range(x.dim()) if d != axis]
    cmax = torch.maximum(x.amax(dim=dims), -x.amin(dim=dims)).to(torch.float64)
    if bool(torch.isnan(cmax).any()):  # NaNs count as 0, as for a dead channel
        x = x.to(torch.float64).abs().nan_to_num(nan=0.0).movedim(axis, 0)
        cmax = x.reshape(t.shape[axis], -1).max(dim=1).values
    return cmax


def _levels(t: Tensor, axis: int) -> tuple[int, list[float]]:
    cmax = _channel_max(t, axis)
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
        a DataFrame: "Module Name", "Module Type", "Op Kind", "Attr", "Channels", "Level>=3" ...
        "Level>=6" (channel counts), "Max Level" (0.0 when no channel is below the max).

    Example::

        >>> t = outlier_channels(get_raw_features(vit, x, types=[torch.nn.LayerNorm]))
        >>> t.sort_values("Level>=6", ascending=False).head()
    """
    rows = []
    memo: dict[tuple[int, int], tuple[int, list[float]]] = {}  # a tensor recorded twice
    for r in features:
        data = r.data if r.unquantized is None else r.unquantized  # before the output grid
        if data.dim() < 2:
            continue
        axis = _channel_axis(data, channel_axis)
        if (id(data), axis) not in memo:
            memo[id(data), axis] = _levels(data, axis)
        channels, levels = memo[id(data), axis]
        row = {"Module Name": r.name, "Module Type": r.module_type, "Op Kind": r.kind,
               "Attr": r.attr, "Channels": channels}
        for k in (3, 4, 5, 6):
            row[f"Level>={k}"] = sum(1 for v in levels if v >= k)
        row["Max Level"] = max(levels) if levels else 0.0
        rows.append(row)
    table = pd.DataFrame(rows, columns=OUTLIER_COLUMNS)
    write_table(table, out_dir, file_name or "outlier_channels", "Outlier channels")
    return table
