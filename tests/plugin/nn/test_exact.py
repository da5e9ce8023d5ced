"""The pieces of VALIDATION's exact evaluation: grid recovery, argument names, links, the mode
switch and the cache's explicit lifetime."""

from __future__ import annotations

import operator

import pytest
import qatkit
import torch
from qatkit._exact import accumulation_plan, exact_cache_size, grid_int, split_weight
from qatkit.annotation import bind_arguments, flat_tensor_args, map_arguments
from qatkit.nn.qat import FunctionalOp, exact_grid


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


def test_arguments_are_named_the_same_way_when_bound_and_when_mapped():
    a, b, c = object(), object(), object()
    leaf = lambda v: v in (a, b, c)  # noqa: E731
    bound = bind_arguments(("tensors", "dim"), ([a, [b, c]],), {"dim": 1})
    assert list(flat_tensor_args(bound, leaf)) == [("tensors.0", a), ("tensors.1.0", b),
                                                   ("tensors.1.1", c)]
    args, kwargs = map_arguments(("tensors", "dim"), ([a, [b, c]],), {"dim": 1},
                                 lambda name, _: name, leaf)
    assert args == (["tensors.0", ["tensors.1.0", "tensors.1.1"]],) and kwargs == {"dim": 1}
    # keyword spellings and variadic operands
    assert bind_arguments(("input", "other"), (), {"self": a, "mat2": b}) == {"input": a,
                                                                              "other": b}
    bound = bind_arguments(("equation", "*operands"), ("ij,jk", a, b))
    assert bound == {"equation": "ij,jk", "operands": [a, b]}
    assert map_arguments(("equation", "*operands"), ("ij,jk", a, b), {},
                         lambda name, _: name, leaf)[0] == ("ij,jk", "operands.0", "operands.1")


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
    q = torch.round(exact / s_out.double()).clamp(-128, 127)
    expected = (q * s_out.double()).float()
    with torch.no_grad():
        unlinked = add(a, b)
        add.link_exact_inputs({"input": fq_a, "other": fq_b})
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


def test_integer_weights_cache_has_an_explicit_lifetime(calibrate):
    """The cache (integer weights as float kernels) is built by the first exact evaluation,
    never freed by a forward, and released by set_fake_quant_state, set_exact_evaluation, the
    exact_evaluation context and release_exact_caches; copies never carry it."""
    import copy

    from qatkit._exact import _CACHE

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    x = torch.randn(2, 3, 8, 8)
    qm = calibrate(model.eval(), x)
    conv = next(m for m in qm.modules() if hasattr(m, "quantize_weight"))
    with torch.no_grad():
        ref = qm(x)
    plan, weights, _, _ = _CACHE[conv][None][2]
    assert plan == "f32" and torch.equal(weights[0], conv.quantize_weight())
    assert not hasattr(conv, "_exact_cache"), "the cache is not module state"
    assert exact_cache_size(copy.deepcopy(qm)) == 0, "a copy does not carry the cache"
    qm(x)  # a forward with gradients enabled (float32) does not free it
    assert exact_cache_size(qm) == 1
    qatkit.set_fake_quant_state(qm, "qat")
    assert exact_cache_size(qm) == 0
    qm.train()
    qm(x).sum().backward()
    qatkit.set_fake_quant_state(qm, "validation")
    qm.eval()
    with qatkit.exact_evaluation(qm):
        ref = qm(x)
        assert exact_cache_size(qm) == 1
    assert exact_cache_size(qm) == 0 and torch.is_grad_enabled()
    with torch.no_grad():
        assert torch.equal(qm(x), ref), "no_grad VALIDATION is exact by default"
    assert qatkit.fake_quantize.release_exact_caches(qm) == 1 and exact_cache_size(qm) == 0


def test_exact_evaluation_is_a_switch(calibrate):
    """set_exact_evaluation(model, False): VALIDATION under no_grad runs float32; the
    exact_evaluation context turns it on for one block and refuses a model not in
    VALIDATION."""
    from qatkit.fake_quantize import evaluates_exactly

    torch.manual_seed(0)
    qm = calibrate(torch.nn.Sequential(torch.nn.Linear(8, 8)).eval(), torch.randn(4, 8))
    fqs = [m for m in qm.modules() if isinstance(m, qatkit.FakeQuantize)]
    assert qatkit.set_exact_evaluation(qm, False) == len(fqs)
    with torch.no_grad():
        assert not any(evaluates_exactly(fq) for fq in fqs)
    assert "exact_evaluation=False" in repr(fqs[0])
    with qatkit.exact_evaluation(qm):
        assert all(evaluates_exactly(fq) for fq in fqs)
    with torch.no_grad():
        assert not any(evaluates_exactly(fq) for fq in fqs), "the context restores the flags"
    qatkit.set_fake_quant_state(qm, "qat")
    with pytest.raises(ValueError, match="VALIDATION"):
        with qatkit.exact_evaluation(qm):
            pass


class _TwoScaleCat(torch.nn.Module):
    """``cat`` of two inputs at scales whose ratio (~23/22, from MSE-calibrated scales of
    examples/debug_walkthrough.py's FaultNet) puts ``11 * s_a / s_c`` 4.5e-7 below a .5: a
    distance float32's ``q * s_a`` cannot resolve."""

    S_A, S_B, S_C = 0.0387975312769413, 0.03199348598718643, 0.03711068257689476

    def __init__(self) -> None:
        super().__init__()
        self.quant_a = qatkit.QuantStub(scale=self.S_A)
        self.quant_b = qatkit.QuantStub(scale=self.S_B)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.quant_a(a), self.quant_b(b)], dim=1)


@pytest.mark.parametrize("exact", [True, False])
def test_cat_of_unequal_scales_agrees_with_convert_fx(exact):
    """cat rescales each input to its output scale; exact evaluation computes ``q * s_a /
    s_c`` from the exact grid values, as the integer model's fixed-point rescaling does, where
    the float32 fake-quant model rounds 11 * s_a / s_c = 11.4999995 up."""
    fixed = qatkit.QConfig(activation=qatkit.FakeQuantize.with_args(
        observer=qatkit.FixedScaleObserver, scale=_TwoScaleCat.S_C), weight=None)
    q = torch.arange(-128, 128, dtype=torch.float32).reshape(1, 256)
    a, b = q * _TwoScaleCat.S_A, q * _TwoScaleCat.S_B
    qm = qatkit.prepare_qat_fx(_TwoScaleCat(), {"": qatkit.default_qat_8bit_fake_quant_qconfig,
                                                "module_name": [("cat", fixed)]},
                               example_inputs=(a, b))
    qatkit.calibrate(qm, [(a, b)], progress=False)
    qatkit.set_exact_evaluation(qm, exact)
    with torch.no_grad():
        out, ref = qm(a, b), qatkit.convert_fx(qm)(a, b)
    at_11 = q[0].tolist().index(11.0)
    assert float(ref[0, at_11] / _TwoScaleCat.S_C) == pytest.approx(11, abs=1e-5)
    if exact:
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
    else:
        assert float(out[0, at_11] / _TwoScaleCat.S_C) == pytest.approx(12, abs=1e-5)
