"""Observers: known answers for every observer, accumulation, non-finite data, bad arguments."""

from __future__ import annotations

import copy
import doctest

import numpy as np
import pytest
import qatkit.observers as observers_module
import torch
from qatkit.observers import (
    OBSERVERS,
    FixedScaleObserver,
    KLObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    dtype_to_bits,
    qrange,
    scale_from_amax,
)

HISTOGRAM_OBSERVERS = [PercentileObserver, MSEObserver, KLObserver]
ALL_OBSERVERS = [MinMaxObserver, MovingAverageMinMaxObserver, *HISTOGRAM_OBSERVERS]
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu,
                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _make(cls, **kwargs):
    if cls is FixedScaleObserver:
        kwargs.setdefault("scale", 0.05)
    return cls(**kwargs)


def _quant_mse(x: torch.Tensor, amax: float, bits: int = 8) -> float:
    """Mean squared error of symmetric fake quantization of ``x`` with clip threshold ``amax``
    (float64, independent of qatkit)."""
    x64 = x.double()
    scale = amax / 2 ** (bits - 1)
    q = torch.clamp(torch.round(x64 / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return float(((q * scale - x64) ** 2).mean())


# -- helpers and arguments ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype, bits", [("qint8", 8), ("qint16", 16), ("int8", 8), ("int16", 16),
                                         (torch.qint8, 8), (8, 8), (16, 16), ("qint4", 4),
                                         (4, 4)])
def test_dtype_to_bits(dtype, bits):
    assert dtype_to_bits(dtype) == bits


@pytest.mark.parametrize("dtype", ["qint3", "qint32", 3, 32, torch.quint8, None, True])
def test_dtype_to_bits_rejects_other_widths_naming_the_choices(dtype):
    with pytest.raises(ValueError, match="choose 'qint8' or 'qint16'"):
        dtype_to_bits(dtype)


def test_qrange_and_scale_from_amax():
    assert qrange(8) == (-128, 127)
    assert qrange(16) == (-32768, 32767)
    assert qrange(4) == (-8, 7)
    amax = torch.tensor([1.0, 3.0, 0.0, 1e-30])
    scale = scale_from_amax(amax, 8)
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(scale, torch.tensor([1 / 128, 3 / 128, eps, eps]), atol=0, rtol=0)
    torch.testing.assert_close(scale_from_amax(torch.tensor([2.0]), 16),
                               torch.tensor([2.0 / 32768]), atol=0, rtol=0)


@pytest.mark.parametrize("make, match", [
    (lambda: MinMaxObserver(dtype="qint3"), "qint8"),
    (lambda: MinMaxObserver(ch_axis="0"), "ch_axis"),
    (lambda: MovingAverageMinMaxObserver(averaging_constant=1.5), r"\[0, 1\]"),
    (lambda: MovingAverageMinMaxObserver(averaging_constant=-0.1), r"\[0, 1\]"),
    (lambda: PercentileObserver(percentile=-1.0), r"\(0, 100\]"),
    (lambda: PercentileObserver(percentile=0.0), r"\(0, 100\]"),
    (lambda: PercentileObserver(percentile=100.5), r"\(0, 100\]"),
    (lambda: PercentileObserver(bins=1000), "power of two"),
    (lambda: PercentileObserver(bins=8), "power of two"),
    (lambda: MSEObserver(num_candidates=1), ">= 2"),
    (lambda: KLObserver(stride=0), ">= 1"),
    (lambda: KLObserver(ch_axis=0), "per-tensor only"),
    (lambda: FixedScaleObserver(scale=0.0), "positive finite"),
    (lambda: FixedScaleObserver(scale=-0.1), "positive finite"),
    (lambda: FixedScaleObserver(scale=float("inf")), "positive finite"),
    (lambda: FixedScaleObserver(scale=float("nan")), "positive finite"),
    (lambda: FixedScaleObserver(scale=True), "positive finite"),
    (lambda: FixedScaleObserver(scale="0.1"), "positive finite"),
])
def test_bad_arguments_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_fixed_scale_accepts_numpy_and_int_scales():
    assert float(FixedScaleObserver(scale=np.float32(0.25)).calculate_scale()) == 0.25
    assert float(FixedScaleObserver(scale=2).calculate_scale()) == 2.0


def test_observer_registry_names():
    assert OBSERVERS == {
        "min_max": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver,
        "percentile": PercentileObserver, "mse": MSEObserver, "kl": KLObserver,
        "fixed_scale": FixedScaleObserver,
    }


# -- min/max ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, bits", [("qint8", 8), ("qint16", 16)])
def test_min_max_per_tensor_is_exact_over_all_batches(dtype, bits):
    batches = [torch.randn(4, 5, generator=_gen(i)) * (i + 1) for i in range(3)]
    obs = MinMaxObserver(dtype=dtype)
    for b in batches:
        out = obs(b)
        assert out is b, "an observer must return its input unchanged"
    every = torch.cat([b.flatten() for b in batches])
    assert obs.min_val.tolist() == [float(every.min())]
    assert obs.max_val.tolist() == [float(every.max())]
    assert int(obs.num_batches) == 3
    expected = torch.tensor([float(every.abs().max()) / 2 ** (bits - 1)])
    torch.testing.assert_close(obs.calculate_scale(), expected, atol=0, rtol=0)


def test_min_max_scale_uses_the_larger_of_min_and_max():
    obs = MinMaxObserver()
    obs(torch.tensor([-3.0, 1.0]))
    torch.testing.assert_close(obs.calculate_scale(), torch.tensor([3 / 128]), atol=0, rtol=0)
    obs = MinMaxObserver()
    obs(torch.tensor([0.5, 2.0]))  # all positive: amax is the max
    torch.testing.assert_close(obs.calculate_scale(), torch.tensor([2 / 128]), atol=0, rtol=0)


@pytest.mark.parametrize("ch_axis", [0, 1, -1])
def test_min_max_per_channel_is_exact(ch_axis):
    w = torch.randn(3, 4, 5, generator=_gen(1))
    w.select(ch_axis, 1).mul_(10.0)  # one channel with a much larger range
    obs = MinMaxObserver(ch_axis=ch_axis)
    obs(w)
    obs(w * 0.5)  # a smaller second batch changes nothing
    dims = [d for d in range(3) if d != ch_axis % 3]
    torch.testing.assert_close(obs.min_val, w.amin(dim=dims), atol=0, rtol=0)
    torch.testing.assert_close(obs.max_val, w.amax(dim=dims), atol=0, rtol=0)
    torch.testing.assert_close(obs.calculate_scale(), w.abs().amax(dim=dims) / 128,
                               atol=0, rtol=0)
    assert obs.calculate_scale().shape == (w.shape[ch_axis],)


def test_per_channel_observer_rejects_a_changed_channel_count_and_a_bad_axis():
    obs = MinMaxObserver(ch_axis=0)
    obs(torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"saw 5 channel\(s\) after 4"):
        obs(torch.ones(5, 3))
    with pytest.raises(ValueError, match="ch_axis=2"):
        MinMaxObserver(ch_axis=2)(torch.ones(4, 3))
    with pytest.raises(ValueError, match="ch_axis=0"):
        MinMaxObserver(ch_axis=0)(torch.tensor(1.0))


def test_low_precision_and_integer_inputs_give_float32_statistics():
    obs = MinMaxObserver()
    obs(torch.tensor([1.0, -2.0], dtype=torch.float16))
    obs(torch.tensor([1.0e5]))  # beyond float16's range: must not become inf
    assert obs.min_val.dtype == torch.float32
    assert obs.max_val.tolist() == [1.0e5] and obs.min_val.tolist() == [-2.0]
    obs = MinMaxObserver()
    obs(torch.tensor([3, -7], dtype=torch.int32))
    assert obs.min_val.tolist() == [-7.0] and obs.max_val.tolist() == [3.0]


def test_empty_tensor_is_ignored():
    obs = MinMaxObserver()
    obs(torch.empty(0, 3))
    assert not obs.has_data and int(obs.num_batches) == 0


# -- moving average -----------------------------------------------------------------------------
def test_moving_average_exact_arithmetic():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.25)
    obs(torch.tensor([-1.0, 2.0]))   # initializes: min -1, max 2
    obs(torch.tensor([-5.0, 6.0]))   # min -1 + (-5 + 1)/4 = -2, max 2 + (6 - 2)/4 = 3
    assert obs.min_val.tolist() == [-2.0] and obs.max_val.tolist() == [3.0]
    obs(torch.tensor([2.0, 7.0]))    # min -2 + (2 + 2)/4 = -1, max 3 + (7 - 3)/4 = 4
    assert obs.min_val.tolist() == [-1.0] and obs.max_val.tolist() == [4.0]
    torch.testing.assert_close(obs.calculate_scale(), torch.tensor([4 / 128]), atol=0, rtol=0)


def test_moving_average_matches_the_formula_on_random_batches():
    c = 0.01
    obs = MovingAverageMinMaxObserver(averaging_constant=c)
    batches = [torch.randn(64, generator=_gen(i)) * (1 + i % 3) for i in range(20)]
    lo, hi = float(batches[0].min()), float(batches[0].max())
    for b in batches[1:]:
        lo += c * (float(b.min()) - lo)
        hi += c * (float(b.max()) - hi)
    for b in batches:
        obs(b)
    # float32 running values vs a float64 recurrence: 20 roundings of ~1 ulp each
    torch.testing.assert_close(obs.min_val, torch.tensor([lo]), atol=0, rtol=1e-6)
    torch.testing.assert_close(obs.max_val, torch.tensor([hi]), atol=0, rtol=1e-6)


def test_moving_average_constant_zero_freezes_after_the_first_batch():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.0)
    obs(torch.tensor([-0.5, 1.5]))
    for k in range(1, 4):
        obs(torch.tensor([-10.0 * k, 10.0 * k]))
    assert obs.min_val.tolist() == [-0.5] and obs.max_val.tolist() == [1.5]
    assert int(obs.num_batches) == 4


def test_moving_average_constant_one_is_exactly_the_last_batch():
    obs = MovingAverageMinMaxObserver(averaging_constant=1.0, ch_axis=0)
    obs(torch.tensor([[1e10, -1e10], [3.0, 4.0]]))
    last = torch.tensor([[1e-10, 2e-10], [-7.0, 5.0]])
    obs(last)  # m + 1 * (b - m) would round 1e-10 to 0 after 1e10
    torch.testing.assert_close(obs.min_val, last.amin(dim=1), atol=0, rtol=0)
    torch.testing.assert_close(obs.max_val, last.amax(dim=1), atol=0, rtol=0)


def test_moving_average_per_channel():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.5, ch_axis=1)
    obs(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))     # channel 0: [1, 3], channel 1: [-2, 4]
    obs(torch.tensor([[-1.0, 0.0], [5.0, 8.0]]))     # channel 0: [-1, 5], channel 1: [0, 8]
    assert obs.min_val.tolist() == [0.0, -1.0] and obs.max_val.tolist() == [4.0, 6.0]
    torch.testing.assert_close(obs.calculate_scale(), torch.tensor([4 / 128, 6 / 128]),
                               atol=0, rtol=0)


# -- fixed scale --------------------------------------------------------------------------------
def test_fixed_scale_ignores_the_data_but_records_it():
    obs = FixedScaleObserver(scale=1 / 128, dtype="qint16")
    assert obs.calculate_scale().tolist() == [1 / 128]  # no data needed
    obs(torch.tensor([-50.0, 3.0]))
    assert obs.calculate_scale().tolist() == [1 / 128]
    assert obs.min_val.tolist() == [-50.0] and obs.max_val.tolist() == [3.0]
    assert obs.bits == 16


# -- histogram observers ------------------------------------------------------------------------
@pytest.mark.parametrize("pct", [10.0, 50.0, 90.0, 99.0, 99.99, 100.0])
def test_percentile_of_linspace_matches_numpy_within_one_bin(pct):
    x = torch.linspace(-3.0, 3.0, 100_001)
    obs = PercentileObserver(percentile=pct)
    obs(x)
    expected = np.percentile(np.abs(x.numpy()).astype(np.float64), pct)
    width = float(obs.bin_width)
    assert width == pytest.approx(3.0 / 2047.5)
    assert abs(float(obs.calculate_scale()) * 128 - expected) <= width


def test_percentile_per_channel_matches_numpy_per_channel():
    w = torch.randn(4, 5000, generator=_gen(2)) * torch.tensor([[0.1], [1.0], [10.0], [3.0]])
    obs = PercentileObserver(percentile=99.0, ch_axis=0)
    obs(w)
    amax = obs.calculate_scale() * 128
    for c in range(4):
        expected = np.percentile(np.abs(w[c].numpy()).astype(np.float64), 99.0)
        assert abs(float(amax[c]) - expected) <= float(obs.bin_width[c]), f"channel {c}"


def test_histogram_accumulates_all_batches_with_range_growth():
    small = torch.randn(20_000, generator=_gen(3)) * 0.1
    large = torch.randn(20_000, generator=_gen(4)) * 1.0  # ~10x the range of the first batch
    obs = PercentileObserver(percentile=99.0)
    obs(small)
    first_width = float(obs.bin_width)
    obs(large)
    both = np.abs(torch.cat([small, large]).numpy()).astype(np.float64)
    # every value was counted once; the range grew by a power of two covering the new max
    assert float(obs.histogram.sum()) == both.size
    growth = float(obs.bin_width) / first_width
    assert growth == 2 ** round(np.log2(growth)) and growth >= 8
    assert float(obs.bin_width) * obs.bins > both.max() >= float(obs.bin_width) * obs.bins / 2
    for pct in (50.0, 99.0, 99.9):
        obs.percentile = pct
        expected = np.percentile(both, pct)
        assert abs(float(obs.calculate_scale()) * 128 - expected) <= float(obs.bin_width), pct


def test_histogram_after_growth_equals_rebinning_from_scratch():
    """Merged bins must hold exactly the counts a histogram at the final width would hold,
    including the first batch's maximum (the value on the edge of its range)."""
    bins = 64
    rng = np.random.default_rng(0)
    first = rng.uniform(-1.0, 1.0, 500).astype(np.float32)
    first[0] = 1.0
    second = rng.uniform(-7.5, 7.5, 500).astype(np.float32)
    obs = PercentileObserver(bins=bins)
    obs(torch.from_numpy(first))
    assert float(obs.bin_width) == 1.0 / 63.5
    obs(torch.from_numpy(second))
    width = float(obs.bin_width)
    assert width == 8.0 / 63.5, "range must grow x8 to cover max 7.5"
    both = np.abs(np.concatenate([first, second]).astype(np.float64))
    expected = np.bincount(np.floor(both / width).astype(int), minlength=bins)
    assert expected.size == bins
    np.testing.assert_array_equal(obs.histogram[0].numpy(), expected.astype(np.float64))


def test_histogram_grows_from_an_all_zero_first_batch():
    obs = PercentileObserver(percentile=100.0)
    obs(torch.zeros(100))
    obs(torch.linspace(-2.0, 2.0, 401))
    assert float(obs.histogram.sum()) == 501
    torch.testing.assert_close(obs.calculate_scale(), torch.tensor([2.0 / 128]), atol=0, rtol=0)


def _heavy_tailed(n: int = 50_000) -> torch.Tensor:
    x = torch.distributions.Laplace(0.0, 1.0).sample((n,))
    x[:5] = torch.linspace(20.0, 40.0, 5)  # a few outliers far beyond the bulk
    return x


def test_mse_clips_heavy_tails_at_the_brute_force_optimum():
    torch.manual_seed(0)
    x = _heavy_tailed()
    obs = MSEObserver()
    obs(x)
    amax = float(obs.calculate_scale()) * 128
    xmax = float(x.abs().max())
    assert amax < 0.9 * xmax, "MSE must clip the outliers"
    grid = np.linspace(xmax / 300, xmax, 300)
    best = min(_quant_mse(x, t) for t in grid)
    assert _quant_mse(x, amax) <= 1.01 * best
    assert _quant_mse(x, amax) < 0.9 * _quant_mse(x, xmax)


@pytest.mark.parametrize("cls", [MSEObserver, KLObserver, PercentileObserver])
def test_uniform_data_is_not_clipped(cls):
    x = torch.rand(200_000, generator=_gen(5)) * 2 - 1
    obs = cls(percentile=100.0) if cls is PercentileObserver else cls()
    obs(x)
    assert abs(float(obs.calculate_scale()) * 128 - float(x.abs().max())) <= float(obs.bin_width)


def test_kl_clips_heavy_tails():
    torch.manual_seed(0)
    x = _heavy_tailed()
    obs = KLObserver()
    obs(x)
    amax = float(obs.calculate_scale()) * 128
    assert 5.0 < amax < 0.5 * float(x.abs().max())


def test_kl_returns_the_max_when_the_histogram_is_already_coarse():
    x = torch.tensor([0.0, 0.25, 0.5, 1.0])  # at most 2048 bins but only 4 values
    obs = KLObserver(bins=64)
    obs(x)
    torch.testing.assert_close(obs.calculate_scale(), torch.tensor([1.0 / 128]), atol=0, rtol=0)


def test_mse_per_channel():
    w = torch.rand(3, 20_000, generator=_gen(7)) * 2 - 1
    w[1] *= 4.0
    obs = MSEObserver(ch_axis=0)
    obs(w)
    amax = obs.calculate_scale() * 128
    for c in range(3):
        assert abs(float(amax[c]) - float(w[c].abs().max())) <= float(obs.bin_width[c])


# -- non-finite values --------------------------------------------------------------------------
def _with_nonfinite(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` (1-d) with 4 non-finite values inserted among its values."""
    nan, inf = torch.tensor([float("nan")]), torch.tensor([float("inf")])
    return torch.cat([x[:3], nan, x[3:10], inf, x[10:17], -inf, x[17:], nan]), 4


@pytest.mark.parametrize("cls", ALL_OBSERVERS + [FixedScaleObserver])
def test_nonfinite_values_are_ignored_counted_and_warned(cls):
    x = torch.randn(1000, generator=_gen(8))
    dirty, n_bad = _with_nonfinite(x)
    clean = _make(cls)
    clean(x)
    obs = _make(cls)
    with pytest.warns(RuntimeWarning, match="ignored 4 non-finite"):
        obs(dirty)
    assert int(obs.nonfinite_count) == n_bad
    assert int(obs.num_batches) == 1
    for name, buf in clean.named_buffers():
        if name != "nonfinite_count":
            torch.testing.assert_close(dict(obs.named_buffers())[name], buf, atol=0, rtol=0,
                                       msg=name)
    torch.testing.assert_close(obs.calculate_scale(), clean.calculate_scale(), atol=0, rtol=0)


@pytest.mark.parametrize("cls", [MinMaxObserver, PercentileObserver, MSEObserver])
def test_nonfinite_values_per_channel(cls):
    w = torch.randn(3, 200, generator=_gen(9))
    dirty = w.clone()
    dirty[0, 5] = float("nan")
    dirty[2, 7] = float("inf")
    obs = cls(ch_axis=0)
    # the reference: the same rows without the two non-finite entries
    rows = [torch.cat([w[0, :5], w[0, 6:]]), w[1], torch.cat([w[2, :7], w[2, 8:]])]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        obs(dirty)
    assert int(obs.nonfinite_count) == 2
    assert obs.min_val.tolist() == [float(r.min()) for r in rows]
    assert obs.max_val.tolist() == [float(r.max()) for r in rows]
    if cls is not MinMaxObserver:
        assert obs.histogram.sum(dim=1).tolist() == [199.0, 200.0, 199.0]


def test_all_nonfinite_batch_leaves_no_data():
    obs = PercentileObserver()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        obs(torch.full((10,), float("nan")))
    assert not obs.has_data and int(obs.nonfinite_count) == 10 and int(obs.num_batches) == 0
    with pytest.raises(RuntimeError, match="never saw data"):
        obs.calculate_scale()


@pytest.mark.parametrize("cls", ALL_OBSERVERS)
def test_observer_without_data_raises_a_clear_error(cls):
    with pytest.raises(RuntimeError, match=f"{cls.__name__} never saw data.*calibration"):
        cls().calculate_scale()


@pytest.mark.parametrize("cls", ALL_OBSERVERS)
def test_reset_forgets_everything(cls):
    obs = cls()
    obs(torch.randn(100, generator=_gen(10)))
    obs.reset()
    assert not obs.has_data and int(obs.num_batches) == 0
    obs(torch.tensor([-0.5, 2.0]))
    assert obs.min_val.tolist() == [-0.5] and obs.max_val.tolist() == [2.0]


# -- state_dict and deepcopy --------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("cls, kwargs", [
    (MinMaxObserver, {}), (MovingAverageMinMaxObserver, {"averaging_constant": 0.3}),
    (PercentileObserver, {"percentile": 99.0}), (MSEObserver, {}), (KLObserver, {}),
    (PercentileObserver, {"ch_axis": 1, "bins": 256}), (MSEObserver, {"ch_axis": 0}),
    (FixedScaleObserver, {"scale": 0.125}),
])
def test_statistics_survive_state_dict_and_deepcopy(cls, kwargs, device):
    batches = [torch.randn(4, 300, generator=_gen(i)).mul(1 + 4 * i).to(device) for i in range(3)]
    obs = cls(**kwargs).to(device)
    for b in batches[:2]:
        obs(b)
    for other in (copy.deepcopy(obs), _fresh_loaded(cls, kwargs, obs, device)):
        assert {k for k, _ in other.named_buffers()} == {k for k, _ in obs.named_buffers()}
        for name, buf in obs.named_buffers():
            got = dict(other.named_buffers())[name]
            assert got.device == buf.device, name
            torch.testing.assert_close(got, buf, atol=0, rtol=0, msg=name)
        torch.testing.assert_close(other.calculate_scale(), obs.calculate_scale(), atol=0, rtol=0)
        # both continue identically (the histogram range grows on the third batch)
        copy_of_obs = copy.deepcopy(obs)
        copy_of_obs(batches[2])
        other(batches[2])
        torch.testing.assert_close(other.calculate_scale(), copy_of_obs.calculate_scale(),
                                   atol=0, rtol=0)


def _fresh_loaded(cls, kwargs, obs, device):
    fresh = cls(**kwargs).to(device)
    fresh.load_state_dict(obs.state_dict())
    return fresh


# -- docstring examples -------------------------------------------------------------------------
def test_docstring_examples_are_true():
    globs = dict(vars(observers_module))
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(verbose=False)
    tests = [t for t in finder.find(observers_module, globs=globs) if t.examples]
    assert len(tests) >= 8
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0
