"""qatkit.profiler.core.metrics: values, edge cases (zeros, identical, NaN), the registry."""

from __future__ import annotations

import math

import pytest
import torch
from qatkit.profiler.core import metrics as M


def test_values_on_known_tensors() -> None:
    a = torch.tensor([1.0, 0.0, 2.0, -1.0])
    b = torch.tensor([1.0, 1.0, 2.0, -3.0])
    d = b - a  # [0, 1, 0, -2]
    assert M.mse(a, b) == pytest.approx(5 / 4)
    assert M.l1(a, b) == pytest.approx(3 / 4)
    assert M.max_abs(a, b) == 2.0
    cos = 8 / math.sqrt(6 * 15)
    assert M.cosine(a, b) == pytest.approx(cos, abs=1e-12)
    assert M.sqnr(a, b) == pytest.approx(10 * math.log10(6 / 5))
    p, q = torch.softmax(a.double(), 0), torch.softmax(b.double(), 0)
    assert M.kl(a, b) == pytest.approx(float((p * (p / q).log()).sum()))
    assert M.error_in_scale(a, b, 0.5) == pytest.approx(4.0)
    assert float(d.abs().max()) == 2.0


def test_identical_tensors() -> None:
    a = torch.randn(3, 5)
    assert M.cosine(a, a.clone()) == pytest.approx(1.0, abs=1e-12)
    assert M.mse(a, a) == 0.0 and M.l1(a, a) == 0.0 and M.max_abs(a, a) == 0.0
    assert M.sqnr(a, a) == math.inf
    assert M.kl(a, a) == 0.0
    assert M.error_in_scale(a, a, 0.1) == 0.0


def test_zero_tensors() -> None:
    z, x = torch.zeros(4), torch.tensor([1.0, -2.0, 0.0, 2.0])
    assert M.cosine(z, z) == 1.0
    assert M.cosine(z, x) == 0.0 and M.cosine(x, z) == 0.0
    assert M.sqnr(z, z) == math.inf
    assert M.sqnr(z, x) == -math.inf      # no signal, some noise
    assert M.sqnr(x, z) == pytest.approx(0.0)  # noise == signal
    assert M.mse(z, x) == pytest.approx(9 / 4)
    assert M.error_in_scale(z, x, 0.0) == math.inf
    assert M.error_in_scale(z, z, 0.0) == 0.0


def test_nan_inputs_are_reported_not_raised() -> None:
    a = torch.tensor([1.0, float("nan"), 2.0])
    b = torch.tensor([1.0, 1.0, 2.0])
    for fn in (M.cosine, M.mse, M.l1, M.max_abs, M.sqnr, M.kl):
        assert math.isnan(fn(a, b)), fn.__name__
        assert math.isnan(fn(b, a)), fn.__name__
    assert math.isnan(M.error_in_scale(a, b, 1.0))
    assert math.isnan(M.error_in_scale(b, b, None))
    assert math.isnan(M.error_in_scale(b, b, float("nan")))


def test_large_values_do_not_overflow_cosine() -> None:
    a = torch.full((10,), 1e30, dtype=torch.float32)
    assert M.cosine(a, a) == pytest.approx(1.0)
    assert M.cosine(a, -a) == pytest.approx(-1.0)


def test_integer_and_shape_handling() -> None:
    q = torch.tensor([1, 2, 3], dtype=torch.int32)
    assert M.max_abs(q, q + 1) == 1.0
    with pytest.raises(ValueError, match=r"shapes \[3\] and \[4\]"):
        M.mse(q, torch.zeros(4))


def test_registry_lookup_is_case_insensitive_and_lists_names() -> None:
    assert set(["Cosine", "MSE", "L1", "KL", "SQNR", "MaxAbs"]) <= set(M.list_metrics())
    assert M.get_metric("cosine") is M.METRICS["Cosine"]
    assert M.get_metric("sqnr").higher_is_better and not M.get_metric("MSE").higher_is_better
    with pytest.raises(ValueError, match="Cosine.*MSE"):
        M.get_metric("cosin")


def test_callable_and_threshold_direction() -> None:
    def rel(a, b):
        return float((a - b).abs().max() / a.abs().max())

    m = M.get_metric(rel)
    assert m.name == "rel" and m.higher_is_better
    rel.higher_is_better = False
    assert not M.get_metric(rel).higher_is_better
    cos, err = M.get_metric("Cosine"), M.get_metric("MSE")
    assert cos.is_worse(0.9, 0.95) and not cos.is_worse(0.99, 0.95)
    assert err.is_worse(0.2, 0.1) and not err.is_worse(0.05, 0.1)
    assert cos.is_worse(math.nan, 0.0) and err.is_worse(math.nan, 1e9)
    assert cos.worst_first([0.9, math.nan, 0.5]) == [1, 2, 0]
    assert err.worst_first([0.9, 0.1, 0.5]) == [0, 2, 1]


def test_register_metric() -> None:
    @M.register_metric("TestOnlyMaxRel", higher_is_better=False)
    def max_rel(a, b):
        return float((a - b).abs().max() / a.abs().max())

    try:
        m = M.get_metric("testonlymaxrel")
        assert m(torch.tensor([2.0]), torch.tensor([1.0])) == 0.5
    finally:
        del M.METRICS["TestOnlyMaxRel"]


@pytest.mark.parametrize("n", [7, 70_000, 1_500_000])
def test_cosine_and_max_abs_is_both_metrics_in_one_pass(n: int) -> None:
    torch.manual_seed(0)
    a = torch.randn(n) * 3
    b = a + 0.01 * torch.randn(n)
    cos, worst = M.cosine_and_max_abs(a, b)
    assert cos == M.cosine(a, b)
    assert worst == float((b - a).abs().max())
    exact = float(torch.dot(a.double(), b.double()) / (a.double().norm() * b.double().norm()))
    assert cos == pytest.approx(exact, abs=1e-9)  # float32 products for large tensors
    nan = a.clone()
    nan[-1] = math.nan
    assert all(math.isnan(v) for v in M.cosine_and_max_abs(nan, b))


@pytest.mark.parametrize("noise", [1e-5, 1e-2, 0.3, 30.0])
def test_cosine_of_large_tensors_is_within_1e9_of_float64(noise: float) -> None:
    torch.manual_seed(1)
    a = torch.randn(300_000) * 2 + 0.5
    b = a + noise * torch.randn(300_000)
    exact = float(torch.dot(a.double(), b.double()) / (a.double().norm() * b.double().norm()))
    assert M.cosine(a, b) == pytest.approx(exact, abs=1e-9)
    assert M.cosine(b, b) == 1.0
