"""plot_distribution: what a quantizer has to hold -- its values' histogram and channel ranges.

For each node listed, and each of its fake quants, the values that fake quant quantizes: the
weight (BatchNorm folded, as it is quantized) or the activation over the data (the float data
flow: every fake quant passing its tensor through, so upstream quantization does not blur it).
Two plots per tensor (PNG and SVG) and three verdicts:

* a histogram (log counts) with a **unimodality verdict**: the modes of the histogram smoothed
  by a Gaussian kernel, peaks separated by a valley below 70% of the lower peak counted apart.
  Several modes (or one spike far from the bulk) waste a uniform grid's levels;
* a per-channel **box plot** with the **channel range spread**: the largest channel's range
  over the median channel's.  A per-tensor scale is set by the largest channel, so the median
  channel gets ``quant_max / spread`` levels: a spread of 2^3 or more puts per-tensor
  quantization at risk (int16, or per-channel scales where the NPU has them, or balancing the
  ranges); per-channel quantized weights absorb it;
* the **median value's levels**: how many quantization levels the median nonzero magnitude
  gets under the scale (per channel: in the worst channel).  Below 2, an outlier sets the
  scale and most values round to 0 or 1 level -- a weight outlier inside a channel, that no
  per-channel scale absorbs.

Example::

    >>> res = plot_distribution("out", calib_model, data, nodes_list=["mid", "cat"])
    >>> res.table[["Module Name", "Modes", "Channel Spread (log2)", "Per-Tensor Risk"]]
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
import torch
from qatkit.fake_quantize import FakeQuantize
from torch import Tensor, fx
from tqdm.auto import tqdm

from ..core.running import check_fits, collect_batches, private_model
from ..core.tables import write_table
from ._figures import distribution_figure, safe_stem, save_figure
from .switches import list_quantizers, resolve_quantizers

__all__ = ["plot_distribution", "DistributionResult", "count_modes", "SPREAD_RISK_LOG2",
           "RESOLUTION_RISK_LEVELS"]

#: channel range spread (log2) from which per-tensor quantization is at risk
SPREAD_RISK_LOG2 = 3.0
#: fewer levels than this for the median value: an outlier sets the scale
RESOLUTION_RISK_LEVELS = 2.0
_BINS = 128
_PER_CHANNEL = 2048  # values kept per channel for the box plot


@dataclasses.dataclass(frozen=True, repr=False)
class DistributionResult:
    """What :func:`plot_distribution` found and wrote.

    Attributes:
        table: one row per tensor: Node, Fake Quant, Tensor (weight / activation), Shape,
            Min, Max, Mean, Std, Modes, Unimodal, Channels, Channel Spread (log2), Median
            Channel Levels, Per-Tensor Risk, Median Value Levels, Resolution Risk, Verdict.
        figures: fake quant path -> (png, svg).
        paths: every file written.

    Example::

        >>> res.table.loc[0, "Verdict"]
        'unimodal; per-tensor at risk: the widest channel is 2^9.0 x the median channel'
    """

    table: pd.DataFrame
    figures: dict[str, tuple[Path, Path]]
    paths: list[Path]

    def __repr__(self) -> str:
        return f"DistributionResult({len(self.table)} tensors, {len(self.paths)} files)"


def count_modes(hist: Tensor, sigma: float = 2.0, min_height: float = 0.02,
                valley: float = 0.7) -> int:
    """The modes of a histogram (see the module docstring).

    Example::

        >>> count_modes(torch.histc(torch.cat([torch.randn(9999) - 6, torch.randn(9999) + 6]),
        ...                         128))
        2
    """
    h = hist.double().reshape(1, 1, -1)
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).reshape(1, 1, -1)
    s = torch.nn.functional.conv1d(torch.nn.functional.pad(h, (radius, radius)),
                                   kernel).reshape(-1)
    top = float(s.max())
    if top <= 0:
        return 0
    n = s.numel()
    peaks = [i for i in range(n) if s[i] >= min_height * top
             and (i == 0 or s[i] > s[i - 1]) and (i == n - 1 or s[i] >= s[i + 1])]
    merged: list[int] = []
    for p in peaks:
        if merged:
            q = merged[-1]
            low = float(s[q:p + 1].min())
            if low > valley * min(float(s[q]), float(s[p])):  # no real valley between
                if s[p] > s[q]:
                    merged[-1] = p
                continue
        merged.append(p)
    return len(merged)


class _Collector:
    """Streaming statistics and samples of one tensor's values (all channels)."""

    def __init__(self, ch_axis: int | None, max_values: int, seed: int) -> None:
        self.ch_axis, self.max_values = ch_axis, max_values
        self.gen = torch.Generator().manual_seed(seed)
        self.n = 0
        self.sum = self.sumsq = 0.0
        self.lo, self.hi = math.inf, -math.inf
        self.samples: list[Tensor] = []
        self.ch_absmax: Tensor | None = None
        self.ch_samples: list[Tensor] = []
        self.shape: tuple[int, ...] = ()

    def add(self, t: Tensor) -> None:
        t = t.detach().float().cpu()
        self.shape = tuple(t.shape)
        flat = t.reshape(-1)
        self.n += flat.numel()
        self.sum += float(flat.double().sum())
        self.sumsq += float(flat.double().pow(2).sum())
        self.lo, self.hi = min(self.lo, float(flat.min())), max(self.hi, float(flat.max()))
        keep = min(flat.numel(), self.max_values)
        idx = torch.randperm(flat.numel(), generator=self.gen)[:keep]
        self.samples.append(flat[idx])
        if self.ch_axis is not None and t.dim() > 1:
            per = t.transpose(0, self.ch_axis % t.dim()).reshape(t.shape[self.ch_axis], -1)
            amax = per.abs().amax(dim=1)
            self.ch_absmax = amax if self.ch_absmax is None else torch.maximum(
                self.ch_absmax, amax)
            cols = min(per.shape[1], _PER_CHANNEL)
            pick = torch.randperm(per.shape[1], generator=self.gen)[:cols]
            self.ch_samples.append(per[:, pick])

    def values(self) -> Tensor:
        v = torch.cat(self.samples)
        if v.numel() > self.max_values:
            v = v[torch.randperm(v.numel(), generator=self.gen)[:self.max_values]]
        return v

    def channels(self) -> Tensor | None:
        if not self.ch_samples:
            return None
        per = torch.cat(self.ch_samples, dim=1)
        if per.shape[1] > _PER_CHANNEL:
            per = per[:, torch.randperm(per.shape[1], generator=self.gen)[:_PER_CHANNEL]]
        return per


def plot_distribution(save_dir: str | os.PathLike, model_or_file: Any, calibrated_data: Any,
                      nodes_list: Iterable[str] | str, data_num: int | None = None,
                      channel_axis: int = 1, max_values: int = 200_000,
                      device: Any = None, verbose: bool = True,
                      input_fn: Callable[[Any], Any] | None = None) -> DistributionResult:
    """Histogram and per-channel box plot of each listed node's weights and activations.

    Args:
        save_dir: the folder written (``distribution_<fake quant>.png`` / ``.svg``,
            ``distribution.csv`` / ``.txt``).
        model_or_file: a calibrated / QAT model (or the path of one saved with torch.save).
        calibrated_data: the data the activations are collected over (any form
            :func:`get_sensitivity_of_nodes` takes).
        nodes_list: op names (every fake quant of the op), fake quant paths, or float names.
        data_num: use the first ``data_num`` samples.
        channel_axis: the channel axis of activations (1 for NCHW / [N, C]; -1 for
            transformer tokens [N, T, C]); weights use their fake quant's axis.
        max_values: values kept per tensor for the histogram (a uniform random sample).
        device: run on this device (a copy); None: where the model is.
        verbose: progress bar over the batches.
        input_fn: ``batch -> model input`` when batches hold more than the inputs.

    Returns:
        a :class:`DistributionResult`.

    Raises:
        ValueError: unknown names (the closest are listed), a model not calibrated, data
            that does not fit.

    Example::

        >>> plot_distribution(save_dir="./", model_or_file=calib_model, calibrated_data=data,
        ...                   nodes_list=nodes[:5])
    """
    _, work = private_model(model_or_file, device=device)
    every = list_quantizers(work, "node")
    quantizers = resolve_quantizers(every, nodes_list, every, "nodes_list entry")
    fqs = {n: m for n, m in work.named_modules() if isinstance(m, FakeQuantize)}
    wanted = [(q, p) for q in quantizers for p in q.fake_quants]
    collectors: dict[str, _Collector] = {}
    acts = []
    for i, (_, path) in enumerate(wanted):
        is_weight = path.endswith("weight_fake_quant")
        axis = fqs[path].ch_axis if is_weight else channel_axis
        collectors[path] = _Collector(axis, max_values, seed=i)
        if is_weight:
            collectors[path].add(_weight(work, path))
        else:
            acts.append(path)
    if acts:
        _collect_activations(work, fqs, acts, collectors, calibrated_data, data_num, verbose,
                             input_fn)
    rows, figures, paths = [], {}, []
    for q, path in wanted:
        row, fig = _summarize(q.name, path, collectors[path], fqs[path])
        rows.append(row)
        figures[path] = save_figure(fig, save_dir, f"distribution_{safe_stem(path)}")
        paths += list(figures[path])
    table = pd.DataFrame(rows)
    paths = [Path(p) for p in write_table(table, save_dir, "distribution",
                                          "plot_distribution")] + paths
    return DistributionResult(table, figures, paths)


@torch.no_grad()
def _weight(work: fx.GraphModule, path: str) -> Tensor:
    """The weight a weight fake quant quantizes (BatchNorm folded)."""
    mod = work.get_submodule(path.rpartition(".")[0])
    fold = getattr(mod, "folded_weight_bias", None)
    return fold()[0] if callable(fold) else mod.weight


def _collect_activations(work: fx.GraphModule, fqs: dict[str, FakeQuantize], acts: list[str],
                         collectors: dict[str, _Collector], data: Any, data_num: int | None,
                         verbose: bool, input_fn: Callable[[Any], Any] | None) -> None:
    batches = collect_batches(work, data, data_num, input_fn=input_fn)
    hooks = [fqs[p].register_forward_pre_hook(
        lambda m, args, p=p: collectors[p].add(args[0])) for p in acts]
    saved = {p: m.enabled for p, m in fqs.items()}
    try:
        for m in fqs.values():
            m.enabled = False  # the float data flow
        with torch.no_grad():
            for b, args in enumerate(tqdm(batches, desc="distribution", unit="batch",
                                          disable=not verbose, leave=False)):
                check_fits(lambda args=args: work(*args), "model_or_file", batch=b)
    finally:
        for h in hooks:
            h.remove()
        for p, m in fqs.items():
            m.enabled = saved[p]
    missing = [p for p in acts if collectors[p].n == 0]
    if missing:
        raise ValueError(f"no value reached {missing[0]} over the data: its op did not run "
                         "(an unused branch?)")


def _summarize(name: str, path: str, c: _Collector, fq: FakeQuantize) -> tuple[dict, Any]:
    values = c.values()
    lo, hi = c.lo, c.hi
    hist = torch.histc(values, bins=_BINS, min=lo, max=hi if hi > lo else lo + 1e-12)
    modes = count_modes(hist)
    mean = c.sum / c.n
    std = math.sqrt(max(c.sumsq / c.n - mean * mean, 0.0))
    is_weight = path.endswith("weight_fake_quant")
    spread = levels = math.nan
    risk = False
    channels = 0 if c.ch_absmax is None else c.ch_absmax.numel()
    if c.ch_absmax is not None and channels > 1:
        live = c.ch_absmax[c.ch_absmax > 0]
        if live.numel():
            median = float(live.median())
            spread = math.log2(float(live.max()) / median)
            levels = fq.quant_max * median / float(live.max())
            risk = not fq.is_per_channel and spread >= SPREAD_RISK_LOG2
    value_levels = _median_value_levels(c, values, fq)
    parts = ["unimodal" if modes <= 1 else f"{modes} modes"]
    if value_levels < RESOLUTION_RISK_LEVELS:
        parts.append(f"an outlier sets the scale: the median value gets {value_levels:.2f} "
                     f"levels of {fq.dtype}" + (" (worst channel)" if fq.is_per_channel else ""))
    if risk:
        parts.append(f"per-tensor at risk: the widest channel is 2^{spread:.1f} x the median "
                     f"channel ({levels:.1f} levels of {fq.dtype} left for it)")
    elif fq.is_per_channel and not math.isnan(spread):
        parts.append(f"per-channel scales absorb a channel spread of 2^{spread:.1f}")
    elif not math.isnan(spread):
        parts.append(f"channel spread 2^{spread:.1f}: per-tensor ok")
    row = {"Module Name": name, "Fake Quant": path,
           "Tensor": "weight" if is_weight else "activation",
           "Shape": str(list(c.shape)), "Min": lo, "Max": hi, "Mean": mean, "Std": std,
           "Modes": modes, "Unimodal": modes <= 1, "Channels": channels,
           "Channel Spread (log2)": spread, "Median Channel Levels": levels,
           "Per-Tensor Risk": risk, "Median Value Levels": value_levels,
           "Resolution Risk": value_levels < RESOLUTION_RISK_LEVELS,
           "Verdict": "; ".join(parts)}
    return row, distribution_figure(name, path, hist, lo, hi, modes, c.channels(),
                                    c.ch_absmax, spread, risk)


def _median_value_levels(c: _Collector, values: Tensor, fq: FakeQuantize) -> float:
    """Levels the median nonzero magnitude gets under the fake quant's scale granularity
    (per channel: the worst channel), if the scale is the range's max."""
    per = c.channels() if fq.is_per_channel else None
    if per is not None and c.ch_absmax is not None:
        worst = math.inf
        for ch, amax in zip(per, c.ch_absmax.tolist(), strict=True):
            mags = ch.abs()
            mags = mags[mags > 0]
            if amax > 0 and mags.numel():
                worst = min(worst, fq.quant_max * float(mags.median()) / amax)
        return worst if worst < math.inf else math.nan
    mags = values.abs()
    mags = mags[mags > 0]
    amax = max(abs(c.lo), abs(c.hi))
    if not mags.numel() or not amax > 0:
        return math.nan
    return fq.quant_max * float(mags.median()) / amax
