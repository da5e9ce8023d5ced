"""Integer conv / conv-transpose / linear (qatkit.quantized.conv) against the fake-quant model.

Each case builds a calibrated QAT module (BatchNorm with non-trivial statistics, fused add /
ReLU / ReLU6), feeds inputs already on their integer grid, and compares output integers with
the fake-quant module in VALIDATION state: >= 99% exactly equal, none more than 1 LSB apart
(the fake-quant model accumulates in float32, the integer model exactly: that is the 1 LSB).
"""

from __future__ import annotations

import io
import random

import pytest
import qatkit
import torch
import torch.nn.functional as F
from qatkit.annotation import get_annotations
from qatkit.fx.convert import bound_call
from qatkit.nn.qat import from_float
from qatkit.quantized.base import CONVERTERS, TensorArg, TensorQParams, bind_call, spec_qparams
from qatkit.quantized.conv import (
    QuantizedConv,
    _mul_shift_divmod,
    _requantize_add,
    convert_conv,
)
from torch import nn

Q8 = qatkit.default_qat_8bit_fake_quant_qconfig
Q8W16A = qatkit.default_qat_8bit_weight_16bit_act_fake_quant_qconfig
Q16 = qatkit.default_qat_16bit_fake_quant_qconfig
Q32OUT = qatkit.default_qat_8bit_weight_32bit_out_fake_quant_qconfig
QCONFIGS = {"int8": (Q8, 8), "w8a16": (Q8W16A, 16), "int16": (Q16, 16)}

# name -> (float module, BatchNorm class or None, input shape, act, add)
CASES = {
    "conv1d_bn_relu": (lambda: nn.Conv1d(6, 8, 3, padding=1), nn.BatchNorm1d, (4, 6, 20),
                       "relu", False),
    "conv2d_bn_add_relu": (lambda: nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d,
                           (4, 8, 10, 10), "relu", True),
    "conv2d_bn_relu6_stride2": (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                nn.BatchNorm2d, (4, 8, 10, 10), "relu6", False),
    "conv2d_groups_reflect_nobias": (lambda: nn.Conv2d(8, 12, 3, padding=1, groups=4,
                                                       bias=False, padding_mode="reflect"),
                                     nn.BatchNorm2d, (4, 8, 9, 9), None, False),
    "conv3d_bn_add": (lambda: nn.Conv3d(4, 6, 3, padding=1), nn.BatchNorm3d, (2, 4, 4, 6, 6),
                      None, True),
    "convT1d_relu": (lambda: nn.ConvTranspose1d(6, 8, 4, stride=2), None, (4, 6, 12), "relu",
                     False),
    "convT2d_groups_bn_relu": (lambda: nn.ConvTranspose2d(8, 12, 3, stride=2, padding=1,
                                                          output_padding=1, groups=2),
                               nn.BatchNorm2d, (4, 8, 6, 6), "relu", False),
    "linear_bn": (lambda: nn.Linear(48, 24), nn.BatchNorm1d, (64, 48), None, False),
    "linear_3d_add_relu6": (lambda: nn.Linear(32, 16), None, (8, 12, 32), "relu6", True),
}


def _grid(shape, qp: TensorQParams, std: float, gen: torch.Generator) -> torch.Tensor:
    q = torch.round(torch.randn(shape, generator=gen) * std)
    return q.clamp(qp.quant_min, qp.quant_max) * qp.scale


def _build(case: str, qconfig, bits: int, seed: int = 0):
    """A calibrated QAT module in eval mode + VALIDATION, its input qparams and a sampler."""
    make, bn_cls, shape, act, add = CASES[case]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    float_mod = make()
    out_ch = float_mod.out_features if isinstance(float_mod, nn.Linear) else \
        float_mod.out_channels
    bn = None
    if bn_cls is not None:
        bn = bn_cls(out_ch).eval()
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    qat = from_float(float_mod, qconfig, bn=bn, act=act, add=add).eval()
    in_qp = TensorQParams(torch.tensor([3.0 / 2 ** (bits - 1)]), bits)
    add_qp = TensorQParams(torch.tensor([2.0 / 2 ** (bits - 1)]), bits)
    std = 2 ** (bits - 1) / 3
    with torch.no_grad():
        out_shape = F.relu(qat.eval().weighted_op(torch.zeros(shape), qat.weight, None)).shape

    def sample():
        x = _grid(shape, in_qp, std, gen)
        return (x, _grid(out_shape, add_qp, std, gen)) if add else (x,)

    qatkit.set_fake_quant_state(qat, "calibration")
    with torch.no_grad():
        for _ in range(3):
            qat(*sample())
    qatkit.set_fake_quant_state(qat, "validation")
    return qat, [in_qp, add_qp] if add else [in_qp], sample


def _lsb_diff(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> tuple[float, int]:
    """(fraction of output integers exactly equal, largest difference in LSB)."""
    diff = (torch.round(out / scale) - torch.round(ref / scale)).abs()
    return float((diff == 0).double().mean()), int(diff.max())


def _convert(qat, in_qps):
    fq = qat.activation_post_process
    out_qp = None if fq is None else TensorQParams(fq.scale, fq.bits)
    return convert_conv(qat, bind_call(qat, *in_qps), out_qp)


@pytest.mark.parametrize("qname", list(QCONFIGS))
@pytest.mark.parametrize("case", list(CASES))
def test_integer_module_matches_fake_quant_within_one_lsb(case, qname):
    qconfig, bits = QCONFIGS[qname]
    qat, in_qps, sample = _build(case, qconfig, bits)
    qconv = _convert(qat, in_qps)
    args = sample()
    with torch.no_grad():
        ref, out = qat(*args), qconv(*args)
    scale = qat.activation_post_process.scale
    exact, worst = _lsb_diff(out, ref, scale)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.equal(out, torch.round(out / scale) * scale), "output is not on its grid"
    assert exact >= 0.99, f"{case}/{qname}: only {exact:.2%} of the integers are equal"
    assert worst <= 1, f"{case}/{qname}: {worst} LSB apart"


def test_weights_are_exactly_the_fake_quantized_weights():
    for case in ("convT2d_groups_bn_relu", "conv2d_bn_add_relu", "linear_bn"):
        qat, in_qps, _ = _build(case, Q8, 8)
        qconv = _convert(qat, in_qps)
        wfq = qat.weight_fake_quant
        with torch.no_grad():
            w_fq = wfq(qat.folded_weight_bias()[0])
        shape = [1] * w_fq.dim()
        shape[wfq.ch_axis] = -1
        assert qconv.weight.dtype == torch.int8 and qconv.bias.dtype == torch.int32
        assert torch.equal(qconv.weight.float() * wfq.scale.view(shape), w_fq), case


def test_int16_weights_and_48_bit_bias():
    qat, in_qps, _ = _build("conv2d_bn_add_relu", Q16, 16)
    qconv = _convert(qat, in_qps)
    assert qconv.weight.dtype == torch.int16 and qconv.bias.dtype == torch.int64


def test_relu6_clamps_at_the_quantized_six():
    qat, in_qps, sample = _build("conv2d_bn_relu6_stride2", Q8, 8)
    qat.activation_post_process.scale.fill_(6.0 / 100.3)  # 6.0 -> round(100.3) = 100
    qconv = _convert(qat, in_qps)
    assert int(qconv.out_min) == 0 and int(qconv.out_max) == 100
    x = sample()[0] * 50  # drive most outputs into the clamp
    with torch.no_grad():
        ref, out = qat(x), qconv(x)
    assert float((ref == ref.max()).double().mean()) > 0.1
    assert _lsb_diff(out, ref, qat.activation_post_process.scale)[1] <= 1


@pytest.mark.parametrize("case", ["conv2d_bn_add_relu", "linear_bn", "convT1d_relu"])
def test_32bit_output_is_the_dequantized_accumulator(case):
    qat, in_qps, sample = _build(case, Q32OUT, 8)
    assert qat.activation_post_process is None
    qconv = _convert(qat, in_qps)
    args = sample()
    with torch.no_grad():
        ref, out = qat(*args), qconv(*args)
    assert out.dtype == torch.float32
    err = float((out - ref).abs().max() / ref.abs().max())
    assert err < 1e-4, f"32-bit output off by {err:.2e} (relative)"


def test_accumulation_plans_agree_bit_for_bit_at_their_bounds():
    """float32 (one conv / a nibble-split pair) and float64 accumulation give the exact ints
    on worst-case inputs: every input at +-127 with the sign of the weight it meets."""
    torch.manual_seed(0)
    for in_ch, plan in ((64, "f32"), (512, "f32x2")):
        conv = nn.Conv2d(in_ch, 8, 3, padding=1)
        qat = from_float(conv, Q8).eval()
        in_qp = TensorQParams(torch.tensor([0.02]), 8)
        qatkit.set_fake_quant_state(qat, "calibration")
        with torch.no_grad():
            qat(torch.randn(2, in_ch, 6, 6))
        qatkit.set_fake_quant_state(qat, "validation")
        with torch.no_grad():
            qat.weight.copy_(torch.randint(-127, 128, qat.weight.shape) * qat.weight_fake_quant
                             .scale.view(-1, 1, 1, 1))
        qconv = _convert(qat, [in_qp])
        assert qconv._plan == plan
        # a 3x3 input under a 3x3 kernel: the centre output meets every weight once
        q_x = torch.stack([torch.sign(qconv.weight[0].float()) * 127,
                           torch.randint(-128, 128, (in_ch, 3, 3)).float()])
        ref = F.conv2d(q_x.double(), qconv.weight.double(), qconv.bias.double(), padding=1)
        assert ref.abs().max() > (2**24 if plan == "f32x2" else 2**21), "not near the bound"
        with torch.no_grad():
            fast = qconv._accumulate(q_x, None, (-1, 1, 1))
            qconv._plan = "f64"
            exact = qconv._accumulate(q_x, None, (-1, 1, 1))
        assert fast.dtype == torch.int64
        torch.testing.assert_close(fast, ref.to(torch.int64), atol=0, rtol=0)
        torch.testing.assert_close(exact, ref.to(torch.int64), atol=0, rtol=0)


def _rhe_fraction(num: int, den_shift: int) -> int:
    """round_half_even(num / 2**den_shift) with python ints."""
    q, r = divmod(num, 1 << den_shift)
    half = 1 << (den_shift - 1)
    return q + (1 if r > half or (r == half and q & 1) else 0)


def _add_ref(acc, m1, sh1, q_o, m2, sh2):
    """round_half_even(acc * m1 / 2**sh1 + q_o * m2 / 2**sh2) exactly, python ints."""
    top = max(sh1, sh2)
    return _rhe_fraction(acc * m1 * 2 ** (top - sh1) + q_o * m2 * 2 ** (top - sh2), top)


def test_fixed_point_helpers_match_big_integer_arithmetic():
    rng = random.Random(0)
    xs = [rng.randrange(-(2**61), 2**61) for _ in range(300)] + [-(2**61), 2**61 - 1, -1, 0]
    ms = [rng.randrange(2**30, 2**31) for _ in xs]
    for s in (1, 7, 30, 31, 32, 45, 62):
        ref = [divmod(x * m, 1 << s) for x, m in zip(xs, ms, strict=True)]
        ok = [abs(r[0]) < 2**61 for r in ref]
        q, r = _mul_shift_divmod(torch.tensor(xs), torch.tensor(ms), torch.full((len(xs),), s))
        got = list(zip(q.tolist(), r.tolist(), strict=True))
        assert [g for g, o in zip(got, ok, strict=True) if o] == \
            [r for r, o in zip(ref, ok, strict=True) if o], f"shift {s}"


@pytest.mark.parametrize("small", [False, True])
def test_fused_add_requantization_is_exact_round_half_even(small):
    """_requantize_add == round_half_even of the exact sum (python big ints), ties included."""
    rng = random.Random(3)
    n = 4000
    # random per-channel multipliers / shifts: shape [n] (one "channel" per element)
    m1 = [rng.randrange(2**30, 2**31) for _ in range(n)]
    # |T1| = |acc * m1| / 2**(sh1 - F) < 2**61 and sh1 - F <= 62, as _add_frac_bits ensures
    sh1 = [rng.randrange(32, 60) if small else rng.randrange(40, 87) for _ in range(n)]
    amax = 2**31 - 1 if small else 2**45
    acc = [rng.randrange(-amax, amax + 1) for _ in range(n)]
    q_o = [rng.randrange(-(2**15), 2**15) for _ in range(n)]
    m2, sh2 = 1234567891, 31
    # constructed exact ties: every 4th element, acc * m1 / 2**sh1 + q_o * m2 / 2**sh2 is k + 1/2
    for i in range(0, n, 4):
        m1[i] = 2**30 + 2**29  # 3 * 2**29
        sh1[i] = 31  # acc * 0.75
        q_o[i] = 0
        acc[i] = rng.randrange(-(2**20), 2**20) * 4 + 2  # acc * 3 / 4 = odd / 2
    for i in range(1, n, 4):  # ties across the two terms: 0.25 + 0.25 style
        m1[i], sh1[i] = 2**30, 32  # acc / 4
        acc[i] = rng.randrange(-(2**20), 2**20) * 4 + 1  # ... + 1/4
        q_o[i] = 1  # m2 / 2**31 below: 1/4 exactly
    m2_list = [m2] * n
    for i in range(1, n, 4):
        m2_list[i] = 2**29  # 2**29 / 2**31 = 1/4
    frac = 24
    # a single add multiplier per call: run the two groups separately
    for idx in (list(range(1, n, 4)), [i for i in range(n) if i % 4 != 1]):
        a = torch.tensor([acc[i] for i in idx])
        mm1 = torch.tensor([m1[i] for i in idx])
        ss1 = torch.tensor([sh1[i] for i in idx])
        qo = torch.tensor([q_o[i] for i in idx])
        mm2 = torch.tensor(m2_list[idx[0]])
        got = _requantize_add(a, mm1, ss1, qo, mm2, torch.tensor(sh2), frac, small=small)
        ref = [_add_ref(acc[i], m1[i], sh1[i], q_o[i], m2_list[idx[0]], sh2) for i in idx]
        assert got.tolist() == ref
    ties = [_add_ref(acc[i], m1[i], sh1[i], q_o[i], m2_list[i], sh2) for i in range(0, n, 4)]
    assert all(t % 2 == 0 for t in ties)  # ties went to even


def test_general_requantization_path_equals_the_fast_one():
    qat, in_qps, sample = _build("conv2d_bn_add_relu", Q8, 8)
    qconv = _convert(qat, in_qps)
    args = sample()
    with torch.no_grad():
        fast = qconv(*args)
        qconv._small_acc = False
        general = qconv(*args)
        qat2, in_qps2, sample2 = _build("conv2d_bn_relu6_stride2", Q8, 8)
        qconv2 = _convert(qat2, in_qps2)
        x = sample2()
        fast2 = qconv2(*x)
        qconv2._small_acc = False
        general2 = qconv2(*x)
    torch.testing.assert_close(general, fast, atol=0, rtol=0)
    torch.testing.assert_close(general2, fast2, atol=0, rtol=0)


def test_state_dict_round_trip_with_weights_only_load():
    qat, in_qps, sample = _build("conv2d_bn_add_relu", Q8, 8)
    qconv = _convert(qat, in_qps)
    qat2, _, _ = _build("conv2d_bn_add_relu", Q8, 8, seed=1)  # other weights and scales
    fresh = _convert(qat2, in_qps)
    args = sample()
    with torch.no_grad():
        assert not torch.equal(fresh(*args), qconv(*args))
        buf = io.BytesIO()
        torch.save(qconv.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        assert {t.dtype for t in state.values()} <= {torch.int8, torch.int16, torch.int32,
                                                     torch.int64, torch.float32, torch.float64}
        fresh.load_state_dict(state)
        torch.testing.assert_close(fresh(*args), qconv(*args), atol=0, rtol=0)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = F.relu(self.bn2(self.conv2(y)) + y)
        y = self.up(y, output_size=[16, 16])
        return self.fc(y.mean((2, 3)))


def test_converter_finds_input_and_other_from_the_prepared_node():
    torch.manual_seed(0)
    model = _Block().eval()
    for bn in (model.bn, model.bn2):
        bn.running_var.uniform_(0.5, 2.0)
    gm = qatkit.prepare_qat_fx(model, {"": Q8}, example_inputs=(torch.randn(1, 3, 8, 8),))
    gm.eval()
    qatkit.set_fake_quant_state(gm, "calibration")
    with torch.no_grad():
        for _ in range(3):
            gm(torch.randn(4, 3, 8, 8))
    qatkit.set_fake_quant_state(gm, "validation")
    modules = dict(gm.named_modules())
    seen = {}
    for name in ("conv", "conv2", "up", "fc"):
        modules[name].register_forward_hook(
            lambda m, a, kw, out, name=name: seen.__setitem__(name, (a, kw, out)),
            with_kwargs=True)
    with torch.no_grad():
        gm(torch.randn(4, 3, 8, 8))

    annotations = get_annotations(gm)
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in seen:
            continue
        mod, ann = modules[node.target], annotations[node]
        call = bound_call(gm, node)
        assert [name for name, _ in call.tensors()] == (
            ["input", "other"] if mod.with_add else ["input"]), call
        qconv = CONVERTERS[ann.kind](mod, call, spec_qparams(ann.output, gm))
        args, kwargs, ref = seen[node.target]
        with torch.no_grad():
            out = qconv(*args, **kwargs)
        exact, worst = _lsb_diff(out, ref, mod.activation_post_process.scale)
        assert exact >= 0.99 and worst <= 1, f"{node.target}: {exact:.2%}, {worst} LSB"
    assert modules["conv2"].with_add and seen["up"][1] == {"output_size": [16, 16]}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["conv2d_bn_add_relu", "convT2d_groups_bn_relu", "linear_bn"])
def test_cuda_gives_the_cpu_integers(case):
    qat, in_qps, sample = _build(case, Q8, 8)
    qconv = _convert(qat, in_qps)
    args = sample()
    with torch.no_grad():
        cpu = qconv(*args)
        gpu = qconv.cuda()(*(a.cuda() for a in args))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=0, rtol=0)


def test_repr_and_registry():
    qat, in_qps, _ = _build("convT2d_groups_bn_relu", Q8, 8)
    qconv = _convert(qat, in_qps)
    assert CONVERTERS["conv"] is convert_conv and CONVERTERS["linear"] is convert_conv
    assert isinstance(qconv, QuantizedConv)
    assert repr(qconv).startswith("Quantized[conv_transpose2d](in=int8, weight=int8, out=int8")


# -- errors --------------------------------------------------------------------------------
def test_errors_name_the_problem():
    qat, in_qps, sample = _build("conv2d_bn_add_relu", Q8, 8)
    with pytest.raises(ValueError, match="input of .* is not quantized"):
        convert_conv(qat, bind_call(qat, TensorArg(None), in_qps[1]), in_qps[0])
    with pytest.raises(ValueError, match="second input is not quantized"):
        convert_conv(qat, bind_call(qat, in_qps[0], TensorArg(None)), in_qps[0])
    qconv = _convert(qat, in_qps)
    x, other = sample()
    with pytest.raises(ValueError, match="fused add needs forward"):
        qconv(x)
    with pytest.raises(ValueError, match="output_size is for conv-transpose only"):
        qconv(x, other, output_size=[4, 4])

    no_weight_fq = qatkit.QConfig(activation=Q8.activation, weight=None)
    lin = from_float(nn.Linear(4, 2), no_weight_fq).eval()
    with pytest.raises(ValueError, match="no weight fake quant.*qconfig.weight is None"):
        convert_conv(lin, bind_call(lin, in_qps[0]), in_qps[0])

    fresh = from_float(nn.Linear(4, 2), Q8).eval()  # never calibrated
    with pytest.raises(ValueError, match="weight fake quant has no scale. Calibrate"):
        convert_conv(fresh, bind_call(fresh, in_qps[0]), in_qps[0])
