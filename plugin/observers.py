"""Observers: record the statistics of the tensors they see and turn them into a symmetric scale.

Every observer here is symmetric (zero point 0) and yields ``scale = amax / 2**(bits - 1)``
where ``amax`` is the clip threshold the observer chose:

==========================  =====================================================================
observer                    clip threshold ``amax``
==========================  =====================================================================
MinMaxObserver              max |x| over everything seen
MovingAverageMinMaxObserver moving average of each batch's min and max (``averaging_constant``)
PercentileObserver          the ``percentile``-th percentile of |x| (from a histogram)
MSEObserver                 the threshold minimizing the quantization MSE (from a histogram)
KLObserver                  the threshold minimizing KL(float || quantized) (entropy calibration)
FixedScaleObserver          given: ``scale`` is fixed, statistics are still recorded
==========================  =====================================================================

Histogram observers (Percentile, MSE, KL) accumulate a histogram of |x| over all calibration
batches; when a batch exceeds the histogram's range, the range doubles (adjacent bins merge,
so no count is ever interpolated).  Their scale is computed once, when calibration ends.

Non-finite values (NaN, +-inf) are ignored and counted (``nonfinite_count``) with a warning.
Every observer accepts ``ch_axis`` for per-channel statistics (weights), except KL.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._modules import ResizeBuffersOnLoad
from ._ranks import group_of, is_distributed, reduce_range

__all__ = [
    "PRIVATE_STATISTICS",
    "ObserverBase",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PercentileObserver",
    "MSEObserver",
    "KLObserver",
    "FixedScaleObserver",
    "OBSERVERS",
    "dtype_to_bits",
    "qrange",
]

#: buffers only some observer kinds keep; load_state_dict tolerates them missing or extra
PRIVATE_STATISTICS = ("histogram", "bin_width")

_DTYPES = {"qint4": 4, "qint8": 8, "qint16": 16, torch.qint8: 8, "int4": 4, "int8": 8,
           "int16": 16}
# Smallest scale ever returned: an all-zero tensor must not divide by zero.
_MIN_SCALE = torch.finfo(torch.float32).eps


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(getattr(compiler, "is_compiling", bool)())


def dtype_to_bits(dtype: Any) -> int:
    """Return 4, 8 or 16 for a quantized dtype given as ``"qint4"``/``"qint8"``/``"qint16"``/
    ``torch.qint8``.  ``qint4`` is meant for weights (per channel, [-8, 7]).

    Example::

        >>> dtype_to_bits("qint16")
        16
    """
    if isinstance(dtype, int) and dtype in (4, 8, 16):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(
        f"unsupported quantized dtype {dtype!r}: choose 'qint8' or 'qint16' (or 'qint4' for "
        "weights): 4, 8 or 16 bits, symmetric"
    )


def qrange(bits: int) -> tuple[int, int]:
    """The signed integer range ``(quant_min, quant_max)`` of ``bits``.

    Example::

        >>> qrange(8), qrange(16)
        ((-128, 127), (-32768, 32767))
    """
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def scale_from_amax(amax: Tensor, bits: int) -> Tensor:
    """``amax / 2**(bits-1)`` as float32, never below ``float32.eps`` (no division by zero).

    Example::

        >>> scale_from_amax(torch.tensor([1.0, 0.0]), 8)
        tensor([7.8125e-03, 1.1921e-07])
    """
    return (amax.to(torch.float32) / float(2 ** (bits - 1))).clamp_min(_MIN_SCALE)


class ObserverBase(ResizeBuffersOnLoad):
    """Base of all observers: bookkeeping of min/max, non-finite values and state_dict.

    Subclasses implement ``_observe(data, bmin, bmax, valid)`` (``data`` detached; per-channel:
    reshaped to ``[C, N]``; per-tensor: as given, or ``[1, N]`` for histogram observers) and
    ``_amax()``.

    Args:
        dtype: ``"qint8"`` or ``"qint16"``.
        ch_axis: channel axis for per-channel statistics, ``None`` for per-tensor.

    Example::

        >>> class AbsMeanObserver(ObserverBase):   # amax = 4 * mean |x| of the last batch
        ...     def _observe(self, data, bmin, bmax, valid=None):
        ...         self.last = data.abs().mean().reshape(1)
        ...     def _amax(self):
        ...         return 4 * self.last
        >>> obs = AbsMeanObserver()
        >>> _ = obs(torch.tensor([-1.0, 1.0]))
        >>> obs.calculate_scale()
        tensor([0.0312])
    """

    #: histogram observers compute their scale once, when calibration ends
    is_histogram: bool = False
    #: reduce statistics across ranks under torch.distributed (qatkit.distributed); weight
    #: observers set it False (DDP keeps weights identical)
    distributed_sync: bool = True

    @property
    def keeps_scale_in_qat(self) -> bool:
        """True when QAT keeps the calibrated scale instead of following each batch
        (histogram observers; a moving average with ``averaging_constant=0``)."""
        return self.is_histogram

    def __init__(self, dtype: Any = "qint8", ch_axis: int | None = None) -> None:
        super().__init__()
        self.bits = dtype_to_bits(dtype)
        self.quant_min, self.quant_max = qrange(self.bits)
        if ch_axis is not None and not isinstance(ch_axis, int):
            raise ValueError(f"ch_axis must be an int or None, got {ch_axis!r}")
        self.ch_axis = ch_axis
        self.register_buffer("min_val", torch.tensor([]))
        self.register_buffer("max_val", torch.tensor([]))
        self.register_buffer("num_batches", torch.tensor(0, dtype=torch.long))
        self.register_buffer("nonfinite_count", torch.tensor(0, dtype=torch.long))

    # -- recording ---------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Record the statistics of ``x`` and return ``x`` unchanged.

        Under a multi-rank torch.distributed process group the batch's min / max are reduced
        across ranks first (:mod:`qatkit.distributed`), so every rank records the global
        batch's statistics.
        """
        data, bmin, bmax, valid = self._local_stats(x)
        group = group_of(self)
        if self.distributed_sync and is_distributed(group):
            if bmin is None:  # nothing finite here: neutral elements for the reduction
                channels = self._channels(x)
                bmin = torch.full((channels,), float("inf"), device=x.device)
                bmax = torch.full((channels,), float("-inf"), device=x.device)
            bmin, bmax = reduce_range(bmin.to(torch.float32), bmax.to(torch.float32), group)
            if not bool(torch.isfinite(bmin).all()):
                return x  # no rank saw a finite value (per channel: every channel must)
            if data is None:  # the others did: keep this rank's histogram range in step
                data = torch.zeros(bmin.numel(), 0, device=x.device)
        elif bmin is None:
            return x
        # statistics are float32 whatever the input dtype (half, bfloat16, float64)
        self._update_min_max(bmin.to(torch.float32), bmax.to(torch.float32))
        self._observe(data, bmin, bmax, valid)
        self.num_batches += 1
        return x

    def _channels(self, x: Tensor) -> int:
        if self.min_val.numel():
            return self.min_val.numel()
        if self.ch_axis is not None and x.dim() > 0 and -x.dim() <= self.ch_axis < x.dim():
            return x.shape[self.ch_axis]
        return 1

    def _local_stats(self, x: Tensor) -> tuple:
        """``(data, bmin, bmax, valid)`` of this batch (see ``_observe``); all None when it
        holds no finite value."""
        if x.numel() == 0:
            return None, None, None, None
        data = x.detach()
        if not data.is_floating_point():
            data = data.float()
        if self.ch_axis is not None:
            if data.dim() == 0 or not -data.dim() <= self.ch_axis < data.dim():
                raise ValueError(
                    f"per-channel observer has ch_axis={self.ch_axis} but got a tensor of "
                    f"shape {tuple(data.shape)}; set ch_axis to a valid axis or None"
                )
            data = data.transpose(0, self.ch_axis).reshape(data.shape[self.ch_axis], -1)
            # amin + amax: on CPU ~15x faster than torch.aminmax(dim=1) (torch 2.x)
            bmin, bmax = data.amin(dim=1), data.amax(dim=1)
        else:
            # a full reduction: much faster than aminmax(dim=1) of a [1, N] view on CPU
            bmin, bmax = torch.aminmax(data)
            bmin, bmax = bmin.reshape(1), bmax.reshape(1)
        if _compiling():  # torch.compile: no data-dependent branch (no graph break)
            return self._compiled_stats(data, bmin, bmax)
        finite = bool(torch.isfinite(torch.cat([bmin, bmax])).all())
        if self.ch_axis is None and (self.is_histogram or not finite):
            data = data.reshape(1, -1)  # [1, N]: only the histogram (or the NaN path) needs it
        valid = None
        if not finite:
            data, bmin, bmax, valid = self._drop_nonfinite(data)
        return data, bmin, bmax, valid

    def _compiled_stats(self, data: Tensor, bmin: Tensor, bmax: Tensor) -> tuple:
        """The statistics in branch-free tensor ops (under torch.compile): non-finite values
        are ignored and counted without a warning."""
        finite = torch.isfinite(data)
        big = torch.finfo(data.dtype).max
        if self.ch_axis is None:
            data = data.reshape(1, -1)
            finite = finite.reshape(1, -1)
        bmin = torch.where(finite, data, torch.full_like(data, big)).amin(dim=1)
        bmax = torch.where(finite, data, torch.full_like(data, -big)).amax(dim=1)
        self.nonfinite_count += (~finite).sum()
        return data, bmin, bmax, None

    def _drop_nonfinite(self, data: Tensor):
        finite = torch.isfinite(data)
        n_bad = int((~finite).sum())
        self.nonfinite_count += n_bad
        warnings.warn(
            f"{type(self).__name__}: ignored {n_bad} non-finite value(s) (NaN/inf) in a batch of "
            f"{data.numel()}; total ignored so far: {int(self.nonfinite_count)}. Check the model "
            "and the data (NaN during QAT: lower the learning rate, clip gradients)",
            RuntimeWarning,
            stacklevel=3,
        )
        if not finite.any(dim=1).all():
            return None, None, None, None
        big = torch.finfo(data.dtype).max
        bmin = torch.where(finite, data, torch.full_like(data, big)).amin(dim=1)
        bmax = torch.where(finite, data, torch.full_like(data, -big)).amax(dim=1)
        # Replace non-finite entries by a finite in-range value (the channel's min); `finite`
        # tells the histogram observers not to count them.
        data = torch.where(finite, data, bmin[:, None].expand_as(data))
        return data, bmin, bmax, finite

    def _update_min_max(self, bmin: Tensor, bmax: Tensor) -> None:
        if self.min_val.numel() == 0:
            self.min_val = bmin.clone()
            self.max_val = bmax.clone()
        else:
            self._check_channels(bmin)
            torch.minimum(self.min_val, bmin, out=self.min_val)
            torch.maximum(self.max_val, bmax, out=self.max_val)

    def _check_channels(self, bmin: Tensor) -> None:
        if bmin.shape != self.min_val.shape:
            raise ValueError(
                f"{type(self).__name__} saw {bmin.numel()} channel(s) after "
                f"{self.min_val.numel()}: one per-channel observer cannot watch tensors with "
                "different channel counts; use one observer per tensor"
            )

    def _observe(self, data: Tensor, bmin: Tensor, bmax: Tensor,
                 valid: Tensor | None = None) -> None:
        """Hook for subclasses; ``min_val``/``max_val`` are already updated.

        ``valid`` (same shape as ``data``) is ``None`` when every value is finite, otherwise
        it is False where ``data`` held a non-finite value (replaced by a finite one).
        """

    # -- results ----------------------------------------------------------------------------
    @property
    def has_data(self) -> bool:
        """True once the observer has recorded at least one finite value."""
        return self.min_val.numel() > 0

    def _amax(self) -> Tensor:
        return torch.maximum(self.min_val.abs(), self.max_val.abs())

    def calculate_scale(self) -> Tensor:
        """Return the symmetric scale, shape ``[1]`` per-tensor or ``[C]`` per-channel.

        Raises:
            RuntimeError: the observer has not seen any finite value yet.
        """
        if not self.has_data:
            raise RuntimeError(
                f"{type(self).__name__} never saw data, so it has no scale: run calibration "
                "(FakeQuantState.CALIBRATION) or QAT forwards through this layer first, or "
                "use a FixedScaleObserver / QuantStub(scale=...) for it"
            )
        return scale_from_amax(self._amax(), self.bits)

    def reset(self) -> None:
        """Forget everything seen so far."""
        for name, buf in list(self.named_buffers(recurse=False)):
            if name in ("num_batches", "nonfinite_count"):
                buf.zero_()
            else:
                setattr(self, name, buf.new_empty((0,)))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, ch_axis={self.ch_axis}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing,
                              unexpected, error_msgs):
        """Observer-private statistics (a histogram, its bin width) of another observer kind
        are neither missing nor unexpected: a state dict calibrated with one observer loads
        strictly into a model prepared with another (the scale lives in the fake quant)."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing,
                                      unexpected, error_msgs)
        private = {prefix + name for name in PRIVATE_STATISTICS}
        missing[:] = [k for k in missing if k not in private]
        unexpected[:] = [k for k in unexpected if k not in private]


class MinMaxObserver(ObserverBase):
    """amax = max |x| over every tensor seen (per tensor, or per channel with ``ch_axis``).

    Example::

        >>> obs = MinMaxObserver()
        >>> _ = obs(torch.tensor([-0.5, 2.0]))
        >>> obs.calculate_scale()
        tensor([0.0156])
    """


class MovingAverageMinMaxObserver(ObserverBase):
    """Moving average of each batch's min and max: ``m += c * (batch_m - m)``.

    The first batch initializes the averages.  ``averaging_constant=0`` therefore freezes the
    range after the first batch (handy to keep calibrated scales during QAT);
    ``averaging_constant=1`` uses the last batch only.

    Example::

        >>> obs = MovingAverageMinMaxObserver(averaging_constant=0.5)
        >>> _ = obs(torch.tensor([1.0])); _ = obs(torch.tensor([3.0]))
        >>> obs.max_val
        tensor([2.])
    """

    def __init__(self, averaging_constant: float = 0.01, dtype: Any = "qint8",
                 ch_axis: int | None = None) -> None:
        super().__init__(dtype=dtype, ch_axis=ch_axis)
        if not 0.0 <= averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in [0, 1], got {averaging_constant}")
        self.averaging_constant = float(averaging_constant)

    def _update_min_max(self, bmin: Tensor, bmax: Tensor) -> None:
        if self.min_val.numel() == 0:
            self.min_val = bmin.clone()
            self.max_val = bmax.clone()
            return
        self._check_channels(bmin)
        c = self.averaging_constant
        if c == 1.0:  # exactly the last batch (m + 1 * (b - m) can round away from b)
            self.min_val.copy_(bmin)
            self.max_val.copy_(bmax)
        elif c != 0.0:
            self.min_val.add_(bmin - self.min_val, alpha=c)
            self.max_val.add_(bmax - self.max_val, alpha=c)

    @property
    def keeps_scale_in_qat(self) -> bool:
        """``averaging_constant=0``: the range never moves, so QAT keeps the calibrated scale
        (the guides' "fixed activation scale", also when another observer calibrated it)."""
        return self.averaging_constant == 0.0

    def extra_repr(self) -> str:
        return super().extra_repr() + f", averaging_constant={self.averaging_constant}"


class FixedScaleObserver(ObserverBase):
    """A fixed scale (e.g. 1/128 for inputs normalized to [-1, 1]); statistics are still kept.

    Example::

        >>> FixedScaleObserver(scale=1 / 128).calculate_scale()
        tensor([0.0078])
    """

    def __init__(self, scale: float, dtype: Any = "qint8", ch_axis: int | None = None) -> None:
        super().__init__(dtype=dtype, ch_axis=ch_axis)
        if not (isinstance(scale, numbers.Real) and not isinstance(scale, bool)
                and math.isfinite(scale) and scale > 0):
            raise ValueError(f"FixedScaleObserver needs a positive finite scale, got {scale!r}")
        self.scale = float(scale)

    def calculate_scale(self) -> Tensor:
        return torch.tensor([self.scale], dtype=torch.float32, device=self.min_val.device)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale}"


class _HistogramObserver(ObserverBase):
    """Histogram of |x| with ``bins`` bins over ``[0, bin_width * bins)``, per channel.

    The first batch sets the range (``bin_width = max|x| / (bins - 0.5)``).  When data reach
    beyond the range, the range of that channel doubles as often as needed and adjacent bins
    merge pairwise, so counts stay exact: the histogram equals one built at the final width.
    """

    is_histogram = True

    def __init__(self, bins: int = 2048, dtype: Any = "qint8", ch_axis: int | None = None) -> None:
        super().__init__(dtype=dtype, ch_axis=ch_axis)
        if bins < 16 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 16, got {bins}")
        self.bins = bins
        self.register_buffer("histogram", torch.tensor([], dtype=torch.float64))
        self.register_buffer("bin_width", torch.tensor([], dtype=torch.float64))

    def _observe(self, data: Tensor, bmin: Tensor, bmax: Tensor,
                 valid: Tensor | None = None) -> None:
        absmax = torch.maximum(bmin.abs(), bmax.abs()).to(torch.float64)
        channels = data.shape[0]
        if self.histogram.numel() == 0:
            self.histogram = torch.zeros(channels, self.bins, dtype=torch.float64,
                                         device=data.device)
            # max|x| falls in the middle of the last bin, strictly inside the range, so that
            # no value ever sits on the top edge (it would land in the wrong bin after the
            # range grows); a channel of zeros gets a tiny positive width
            self.bin_width = (absmax / (self.bins - 0.5)).clamp_min(1e-30)
        self._grow(absmax)
        width = self.bin_width[:, None]
        idx = (data.abs().to(torch.float64) / width).floor().clamp_(0, self.bins - 1).long()
        idx += torch.arange(channels, device=data.device)[:, None] * self.bins
        idx = idx.reshape(-1) if valid is None else idx[valid]  # non-finite values: not counted
        counts = torch.bincount(idx, minlength=channels * self.bins)
        self.histogram += counts.view(channels, self.bins).to(torch.float64)

    def _grow(self, absmax: Tensor) -> None:
        limit = self.bin_width * self.bins
        ratio = absmax / limit
        need = ratio >= 1.0  # the range [0, limit) must hold absmax strictly
        if not bool(need.any()):
            return
        steps = torch.zeros_like(absmax, dtype=torch.long)
        steps[need] = torch.ceil(torch.log2(ratio[need])).long()
        # floating point: make sure the grown range really covers absmax
        while True:
            under = (self.bin_width * torch.pow(2.0, steps.double()) * self.bins) <= absmax
            if not bool(under.any()):
                break
            steps[under] += 1
        for k in torch.unique(steps[need]).tolist():
            rows = (steps == k).nonzero().flatten()
            factor = 2.0 ** int(k)  # a float: k can exceed 63 after an all-zero batch
            hist = self.histogram[rows]
            if factor >= self.bins:
                merged = torch.zeros_like(hist)
                merged[:, 0] = hist.sum(dim=1)
            else:
                merged = torch.zeros_like(hist)
                f = int(factor)
                merged[:, : self.bins // f] = hist.view(len(rows), -1, f).sum(dim=2)
            self.histogram[rows] = merged
            self.bin_width[rows] = self.bin_width[rows] * factor

    def _amax(self) -> Tensor:
        if self.histogram.numel() == 0:  # statistics loaded from another observer kind
            return super()._amax()
        hist = self.histogram.cpu().numpy()
        width = self.bin_width.cpu().numpy()
        absmax = self._max_abs().cpu().numpy().astype(np.float64)
        amax = [self._threshold(h, w, m) for h, w, m in zip(hist, width, absmax, strict=True)]
        return torch.tensor(amax, dtype=torch.float32, device=self.min_val.device)

    def _max_abs(self) -> Tensor:
        return torch.maximum(self.min_val.abs(), self.max_val.abs())

    def _threshold(self, hist: np.ndarray, width: float, absmax: float) -> float:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bins={self.bins}"


class PercentileObserver(_HistogramObserver):
    """amax = the ``percentile``-th percentile of |x| over all calibration data.

    The percentile is read from the histogram with linear interpolation inside the bin, so it
    is exact to within one bin width (``bin_width``: about ``max|x| / bins`` when one batch set
    the range, up to twice that after the range grew).

    Example::

        >>> obs = PercentileObserver(percentile=50.0)
        >>> _ = obs(torch.linspace(-1, 1, 10001))
        >>> round(float(obs.calculate_scale()) * 128, 2)
        0.5
    """

    def __init__(self, percentile: float = 99.99, bins: int = 2048, dtype: Any = "qint8",
                 ch_axis: int | None = None) -> None:
        super().__init__(bins=bins, dtype=dtype, ch_axis=ch_axis)
        if not (0.0 < percentile <= 100.0):
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = float(percentile)

    def _threshold(self, hist: np.ndarray, width: float, absmax: float) -> float:
        total = hist.sum()
        if total == 0:
            return absmax
        target = total * self.percentile / 100.0
        cdf = np.cumsum(hist)
        i = int(np.searchsorted(cdf, target, side="left"))
        i = min(i, len(hist) - 1)
        below = cdf[i - 1] if i > 0 else 0.0
        frac = (target - below) / hist[i] if hist[i] > 0 else 1.0
        return float(min((i + frac) * width, absmax))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", percentile={self.percentile}"


class MSEObserver(_HistogramObserver):
    """amax = the clip threshold that minimizes the expected squared quantization error.

    For each candidate threshold ``t`` (``num_candidates`` evenly spaced up to max|x|), the
    error of the histogram is the clipping error ``(|x| - clip)^2`` for values above
    ``clip = t * (2**(b-1) - 1) / 2**(b-1)`` plus the rounding error ``scale^2 / 12`` for
    the values inside.  On uniform data this picks max|x|; on heavy-tailed data it clips.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> obs = MSEObserver()
        >>> x = torch.distributions.StudentT(2.0).sample((100000,))  # heavy tails
        >>> _ = obs(x)
        >>> bool(obs.calculate_scale() * 128 < x.abs().max())  # clips the outliers
        True
    """

    def __init__(self, num_candidates: int = 200, bins: int = 2048, dtype: Any = "qint8",
                 ch_axis: int | None = None) -> None:
        super().__init__(bins=bins, dtype=dtype, ch_axis=ch_axis)
        if num_candidates < 2:
            raise ValueError(f"num_candidates must be >= 2, got {num_candidates}")
        self.num_candidates = int(num_candidates)

    def _threshold(self, hist: np.ndarray, width: float, absmax: float) -> float:
        if hist.sum() == 0 or absmax == 0:
            return absmax
        centers = (np.arange(len(hist)) + 0.5) * width
        centers = np.minimum(centers, absmax)
        cands = np.linspace(absmax / self.num_candidates, absmax, self.num_candidates)
        half = 2.0 ** (self.bits - 1)
        scale = cands / half  # [K]
        clip = scale * (half - 1)
        over = np.maximum(centers[None, :] - clip[:, None], 0.0)
        inside = centers[None, :] <= clip[:, None]
        err = (hist[None, :] * np.where(inside, scale[:, None] ** 2 / 12.0, over**2)).sum(1)
        return float(cands[int(np.argmin(err))])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_candidates={self.num_candidates}"


class KLObserver(_HistogramObserver):
    """Entropy calibration: amax minimizes KL(P || Q) between the |x| histogram clipped at a
    threshold (outliers folded into the last bin) and its quantized version (TensorRT's method).

    Candidates are bin edges from ``2**(bits-1)`` bins up to all bins (every ``stride`` bins).
    Per-tensor only (activations); use MSE or Percentile for per-channel data.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> obs = KLObserver()
        >>> x = torch.randn(100000)
        >>> _ = obs(x)
        >>> 2.5 < float(obs.calculate_scale()) * 128 < float(x.abs().max())
        True
    """

    def __init__(self, bins: int = 2048, stride: int = 8, dtype: Any = "qint8",
                 ch_axis: int | None = None) -> None:
        if ch_axis is not None:
            raise ValueError("KLObserver is per-tensor only (ch_axis=None); for per-channel "
                             "statistics use MSEObserver or PercentileObserver")
        super().__init__(bins=bins, dtype=dtype, ch_axis=None)
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.stride = int(stride)

    def _threshold(self, hist: np.ndarray, width: float, absmax: float) -> float:
        levels = 2 ** (self.bits - 1)
        nbins = len(hist)
        used = int(np.nonzero(hist)[0].max()) + 1 if hist.any() else 0
        if nbins > 1:
            # The spike of exact zeros (half of a ReLU's output) would dominate the KL and
            # pull the threshold far down; like NVIDIA's entropy calibrator, flatten it.
            hist = hist.copy()
            hist[0] = hist[1]
        if used <= levels:  # the quantized histogram is lossless: no reason to clip
            return absmax
        best_i, best_kl = used, math.inf
        for i in list(range(levels, used, self.stride)) + [used]:
            kl = _kl_of_clip(hist[:i], hist[i:].sum(), levels)
            if kl < best_kl:
                best_i, best_kl = i, kl
        return float(min(best_i * width, absmax)) if best_i < nbins else absmax

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stride={self.stride}"


def _kl_of_clip(ref: np.ndarray, outliers: float, levels: int) -> float:
    """KL divergence between ``ref`` (outliers folded in its last bin) and ``ref`` quantized
    to ``levels`` levels and expanded back over its non-empty bins."""
    p = ref.astype(np.float64).copy()
    p[-1] += outliers
    n = len(p)
    # split the bins into `levels` contiguous groups
    edges = np.linspace(0, n, levels + 1).astype(np.int64)
    group = np.repeat(np.arange(levels), np.diff(edges))
    nonzero = p > 0
    qsum = np.bincount(group, weights=ref, minlength=levels)
    qcnt = np.bincount(group, weights=nonzero.astype(np.float64), minlength=levels)
    q = np.where(nonzero, qsum[group] / np.maximum(qcnt[group], 1), 0.0)
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum == 0 or q_sum == 0:
        return math.inf
    p /= p_sum
    q /= q_sum
    mask = p > 0
    if np.any(q[mask] == 0):
        return math.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


#: observer names accepted by :func:`qatkit.get_default_qconfig`
OBSERVERS: dict[str, type[ObserverBase]] = {
    "min_max": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": KLObserver,
    "fixed_scale": FixedScaleObserver,
}
