"""qatkit.quantized.base.requantize against python big-int arithmetic (round half to even)."""

from __future__ import annotations

import random

import torch
from qatkit.quantized.base import quantize_multiplier, requantize, trailing_zeros


def _rhe(num: int, shift: int) -> int:
    """round_half_even(num / 2**shift) with python ints (any shift)."""
    if shift <= 0:
        return num << -shift
    q, r = divmod(num, 1 << shift)  # floor, 0 <= r < 2**shift
    half = 1 << (shift - 1)
    return q + (1 if r > half or (r == half and q & 1) else 0)


def _ref(acc: list[int], m: list[int], shift: list[int], lo: int, hi: int) -> list[int]:
    return [min(max(_rhe(a * mm, s), lo), hi) for a, mm, s in zip(acc, m, shift, strict=True)]


def _check(acc: list[int], m: list[int], shift: list[int], lo: int, hi: int) -> None:
    got = requantize(torch.tensor(acc), torch.tensor(m), torch.tensor(shift), lo, hi).tolist()
    ref = _ref(acc, m, shift, lo, hi)
    bad = [(a, mm, s, g, r) for a, mm, s, g, r in zip(acc, m, shift, got, ref, strict=True)
           if g != r]
    assert not bad, f"{len(bad)} mismatches, e.g. {bad[:5]}"


def test_random_multipliers_and_shifts_match_big_ints():
    rng = random.Random(0)
    n = 20000
    acc, m, shift = [], [], []
    for i in range(n):
        mag = rng.choice((7, 15, 24, 31, 32, 40, 45))
        acc.append(rng.randrange(-(2**mag), 2**mag + 1))
        m.append(rng.randrange(2**30, 2**31) if i % 50 else 0)
        shift.append(rng.choice((rng.randrange(-40, 1), rng.randrange(1, 32),
                                 rng.randrange(32, 63), rng.randrange(63, 130))))
    for lo, hi in ((-128, 127), (-(2**15), 2**15 - 1), (-(2**31), 2**31 - 1)):
        _check(acc, m, shift, lo, hi)


def test_constructed_exact_ties_round_to_even():
    """acc * m = (2k + 1) * 2**(shift-1): both neighbours, both signs, every shift range."""
    rng = random.Random(1)
    acc, m, shift = [], [], []
    for _ in range(20000):
        s = rng.randrange(1, 76)
        tz_m = rng.randrange(0, min(s, 31))  # m = odd * 2**tz_m in [2**30, 2**31)
        mm = ((rng.randrange(2 ** (29 - tz_m), 2 ** (30 - tz_m)) * 2 + 1) << tz_m
              if tz_m < 30 else 2**30)
        tz_a = s - 1 - tz_m
        if tz_a > 44:
            continue
        odd_bits = min(45 - tz_a, 40)
        a = (rng.randrange(0, 2 ** odd_bits) * 2 + 1) << tz_a
        acc.append(a if rng.random() < 0.5 else -a)
        m.append(mm)
        shift.append(s)
    assert len(acc) > 10000
    ref = _ref(acc, m, shift, -(2**31), 2**31 - 1)
    assert all((a * mm) % (1 << s) == 1 << (s - 1) for a, mm, s in zip(acc, m, shift,
                                                                       strict=True))
    assert {r & 1 for r in ref if abs(r) < 2**31 - 1} == {0}  # ties land on even integers
    _check(acc, m, shift, -(2**31), 2**31 - 1)
    _check(acc, m, shift, -128, 127)
    # small exhaustive grid: every acc in [-4096, 4096] at a few multipliers with many ties
    acc = list(range(-4096, 4097))
    for mult in (0.5, 0.25, 0.75, 1.5, 2.0**-10, 3 * 2.0**-7):
        mm, s = quantize_multiplier(torch.tensor([mult], dtype=torch.float64))
        _check(acc, [int(mm)] * len(acc), [int(s)] * len(acc), -(2**15), 2**15 - 1)


def test_edges():
    big = 2**45
    acc = [0, 1, -1, big, -big, 2**61, -(2**61), 2**31 - 1, -(2**31), 2**31, -(2**31) - 1]
    for s in (-31, -1, 0, 1, 2, 30, 31, 32, 33, 61, 62, 63, 64, 92, 93, 94, 200):
        for mm in (0, 2**30, 2**30 + 1, 2**31 - 1):
            _check(acc, [mm] * len(acc), [s] * len(acc), -(2**31), 2**31 - 1)
            _check(acc, [mm] * len(acc), [s] * len(acc), -128, 127)


def test_trailing_zeros():
    xs = [1, -1, 2, -2, 12, -12, 2**40, -(2**40), 3 * 2**61, 2**62 - 1]
    assert trailing_zeros(torch.tensor(xs)).tolist() == [
        (x & -x).bit_length() - 1 for x in xs]


def test_docstring_example():
    m, s = quantize_multiplier(torch.tensor([0.5], dtype=torch.float64))
    assert requantize(torch.tensor([3, -3, 5, 1000]), m, s, -128, 127).tolist() == \
        [2, -2, 2, 127]
