"""The pieces of VALIDATION's exact evaluation: grid recovery, input paths, links."""

from __future__ import annotations

import operator

import qatkit
import torch
from qatkit._exact import accumulation_plan, grid_int, split_weight
from qatkit.nn.qat import FunctionalOp, exact_grid, input_paths


def _fq(values: torch.Tensor, ch_axis: int | None = None) -> qatkit.FakeQuantize:
    fq = qatkit.FakeQuantize(observer=qatkit.MinMaxObserver, ch_axis=ch_axis)
    fq(values)
    fq.set_state("validation")
    return fq


def test_grid_int_recovers_q_from_float32_grid_values():
    s = torch.tensor(0.0123)
    q = torch.arange(-(2**19), 2**19, 997, dtype=torch.float32)
    assert torch.equal(grid_int((q * s).float(), s), q)


def test_exact_grid_is_q_times_s_in_float64():
    fq = _fq(torch.tensor([-2.7, 2.7]))  # scale 2.7 / 128: q * s is not a float32
    q = torch.arange(-128, 128, dtype=torch.float32)
    x = q * fq.scale  # float32(q * s): not exactly q * s
    out = exact_grid(x, fq)
    assert out.dtype == torch.float64
    assert torch.equal(out, q.double() * fq.scale.double())
    assert not torch.equal(out, x.double()), "float32 grid values differ from q * s"
    # per channel (weights), and no fake quant: only widened
    w = torch.randn(4, 3)
    wfq = _fq(w, ch_axis=0)
    q_w = torch.round(wfq(w) / wfq.scale.view(-1, 1))
    assert torch.equal(exact_grid(wfq(w), wfq), q_w.double() * wfq.scale.double().view(-1, 1))
    assert torch.equal(exact_grid(x, None), x.double())
    assert exact_grid(3, fq) == 3 and exact_grid(x.double(), fq).dtype == torch.float64


def test_input_paths_follow_nested_arguments():
    a, b, c = object(), object(), object()
    paths = input_paths(((a, [b, c]), {"dim": 1}), ("args",))
    assert paths == [(("args", 0, 0), a), (("args", 0, 1, 0), b), (("args", 0, 1, 1), c),
                     (("args", 1, "dim"), 1)]


def test_linked_inputs_make_an_add_exact():
    """(q_a / 2 + q_b) * s: exact ties, broken by the true value only when the inputs are
    snapped to q * s (float32 q * s carries its own rounding, a different one per element)."""
    fq_a, fq_b = _fq(torch.tensor([-1.35, 1.35])), _fq(torch.tensor([-2.7, 2.7]))
    assert torch.equal(fq_a.scale * 2, fq_b.scale)
    add = FunctionalOp("add", operator.add, _fq(torch.tensor([-2.7, 2.7])))
    q_a = torch.arange(-127, 128, 2, dtype=torch.float32)  # odd: every sum is a tie
    q_b = torch.arange(-63, 65, dtype=torch.float32)
    a, b = fq_a(q_a * fq_a.scale), fq_b(q_b * fq_b.scale)
    s_out = add.activation_post_process.scale
    exact = q_a.double() * fq_a.scale.double() + q_b.double() * fq_b.scale.double()
    q = torch.round(exact * (torch.ones(1) / s_out).double()).clamp(-128, 127)
    expected = (q * s_out.double()).float()
    with torch.no_grad():
        unlinked = add(a, b)
        add.link_exact_inputs({("args", 0): fq_a, ("args", 1): fq_b})
        out = add(a, b)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)
    assert not torch.equal(unlinked, expected), "the float32 grid values break some ties"


def test_accumulation_plan_picks_the_cheapest_exact_kernel():
    small = torch.full((2, 4), 127.0)  # 4 * 127 * 128 < 2**24
    assert accumulation_plan(small, 1, "Linear", 8, 8) == "f32"
    big = torch.full((2, 4096), 127.0)  # 4096 * 127 * 128 > 2**24, halves fit
    assert accumulation_plan(big, 1, "Linear", 8, 8) == "f32x2"
    assert accumulation_plan(big, 1, "Linear", 16, 8) == "f64"
    hi, lo = split_weight(torch.tensor([-128, -9, 0, 7, 8, 127]))
    assert torch.equal(16 * hi + lo, torch.tensor([-128, -9, 0, 7, 8, 127], dtype=torch.int32))
    assert hi.abs().max() <= 8 and lo.abs().max() <= 8


def test_integer_weights_are_cached_only_while_evaluating_exactly(calibrate):
    """The cache (integer weights as float kernels) must not sit in memory during training."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    x = torch.randn(2, 3, 8, 8)
    qm = calibrate(model.eval(), x)
    conv = next(m for m in qm.modules() if hasattr(m, "quantize_weight"))
    with torch.no_grad():
        qm(x)
    plan, weights, _, _ = conv.__dict__["_exact_cache"][2]
    assert plan == "f32" and torch.equal(weights[0], conv.quantize_weight())
    qatkit.set_fake_quantize(qm, "qat")
    qm.train()
    qm(x).sum().backward()
    assert "_exact_cache" not in conv.__dict__
