"""Numerics of the fused QAT convolutions (qatkit.nn.qat.conv) against float torch modules."""

from __future__ import annotations

import copy
import math

import pytest
import qatkit
import torch
import torch.nn.functional as F
from qatkit.nn.qat import freeze_bn_stats, unfreeze_bn_stats
from qatkit.nn.qat.conv import FLOAT_TO_QAT, ConvTranspose2d, from_float
from torch import nn

QC = qatkit.default_qat_8bit_fake_quant_qconfig
CAL, VAL, QAT = (qatkit.FakeQuantState.CALIBRATION, qatkit.FakeQuantState.VALIDATION,
                 qatkit.FakeQuantState.QAT)

# name -> (float conv, its BatchNorm, input shape)
CASES = {
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d, (2, 3, 9)),
    "conv2d_nobias": (lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d,
                      (2, 3, 6, 6)),
    "conv2d_g2_reflect": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2,
                                            padding_mode="reflect"), nn.BatchNorm2d,
                          (2, 4, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d, (2, 2, 3, 4, 4)),
    "convT1d": (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), nn.BatchNorm1d, (2, 3, 5)),
    "convT2d": (lambda: nn.ConvTranspose2d(3, 5, 3, stride=2, padding=1, output_padding=1,
                                           bias=False), nn.BatchNorm2d, (2, 3, 4, 4)),
    "convT2d_g2_bias": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
                        nn.BatchNorm2d, (2, 4, 4, 4)),
}
ACTS = {None: lambda y: y, "relu": F.relu, "relu6": F.relu6}


def _float_pair(case: str, seed: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A float conv and a BatchNorm with non-trivial statistics, and an input."""
    make_conv, bn_cls, shape = CASES[case]
    torch.manual_seed(seed)
    conv = make_conv()
    bn = bn_cls(conv.out_channels)
    with torch.no_grad():
        c = conv.out_channels
        bn.running_mean.copy_(torch.randn(c) * 0.3)
        bn.running_var.copy_(torch.rand(c) + 0.5)
        bn.weight.copy_(torch.randn(c))
        bn.bias.copy_(torch.randn(c) * 0.2)
    return conv, bn, torch.randn(shape)


def _float_forward(conv, bn, x, other, act):
    y = bn(conv(x))
    if other is not None:
        y = y + other
    return ACTS[act](y)


def _build(case, act=None, add=False, qconfig=QC, seed=0):
    """(float conv, float bn, qat module built from copies of them, input, other)."""
    conv, bn, x = _float_pair(case, seed)
    qat = from_float(copy.deepcopy(conv), qconfig, bn=copy.deepcopy(bn), act=act, add=add)
    other = torch.randn_like(conv(x)) if add else None
    return conv, bn, qat, x, other


def _fq_ref(x, scale, qmin, qmax, axis=None):
    """clamp(round(x / scale), qmin, qmax) * scale, by hand (float32 division)."""
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


def _fold_ref(conv, bn):
    """Folded weight / bias by hand, one output channel at a time (no shared code path), with
    the correctly rounded square root (math.sqrt in double, rounded once)."""
    std = torch.tensor([math.sqrt(v) for v in (bn.running_var + bn.eps).tolist()])
    sf = bn.weight / std
    w = conv.weight.detach().clone()
    transposed = isinstance(conv, nn.ConvTranspose1d | nn.ConvTranspose2d)
    opg = conv.out_channels // conv.groups
    ipg = conv.in_channels // conv.groups
    for o in range(conv.out_channels):
        if transposed:
            g, j = divmod(o, opg)
            w[g * ipg:(g + 1) * ipg, j] = w[g * ipg:(g + 1) * ipg, j] * sf[o]
        else:
            w[o] = w[o] * sf[o]
    b = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
    return w, (b - bn.running_mean) * sf + bn.bias


def _op_ref(conv, x, w, b):
    if isinstance(conv, nn.ConvTranspose1d | nn.ConvTranspose2d):
        fn = F.conv_transpose1d if isinstance(conv, nn.ConvTranspose1d) else F.conv_transpose2d
        return fn(x, w, b, conv.stride, conv.padding, conv.output_padding, conv.groups,
                  conv.dilation)
    return conv._conv_forward(x, w, b)


@pytest.mark.parametrize("act,add", [(None, False), ("relu", True), ("relu6", False)])
@pytest.mark.parametrize("case", list(CASES))
def test_eval_calibration_matches_float(case, act, add):
    conv, bn, qat, x, other = _build(case, act, add)
    conv.eval(), bn.eval(), qat.eval()
    qatkit.set_fake_quant_state(qat, CAL)
    args = (x, other) if add else (x,)
    with torch.no_grad():
        torch.testing.assert_close(qat(*args), _float_forward(conv, bn, x, other, act),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_train_calibration_matches_float_outputs_stats_grads(case):
    conv, bn, qat, x, other = _build(case, act="relu", add=True)
    conv.train(), bn.train(), qat.train()
    qatkit.set_fake_quant_state(qat, CAL)
    xf, xq = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf = _float_forward(conv, bn, xf, other, "relu")
    yq = qat(xq, other)
    torch.testing.assert_close(yq, yf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qat.bn.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(qat.bn.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(qat.bn.num_batches_tracked) == 1
    g = torch.randn_like(yf)
    (yf * g).sum().backward()
    (yq * g).sum().backward()
    # a gradient is a sum of many products: a few float32 ulps of the largest term
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xq.grad, xf.grad, **tol)
    torch.testing.assert_close(qat.weight.grad, conv.weight.grad, **tol)
    torch.testing.assert_close(qat.bn.weight.grad, bn.weight.grad, **tol)
    torch.testing.assert_close(qat.bn.bias.grad, bn.bias.grad, **tol)
    if conv.bias is not None:
        # the conv bias cancels in training-mode BN: both gradients are sums of ~100 O(1)
        # terms that cancel to ~0, so only an absolute tolerance makes sense
        torch.testing.assert_close(qat.bias.grad, conv.bias.grad, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", ["conv2d_nobias", "convT2d_g2_bias"])
@pytest.mark.parametrize("state", [CAL, QAT])
def test_zero_gamma_no_nan(case, state):
    conv, bn, qat, x, _ = _build(case)
    with torch.no_grad():
        qat.bn.weight[1] = 0.0
    qat.train()
    qatkit.set_fake_quant_state(qat, state)
    x.requires_grad_()
    y = qat(x)
    assert torch.isfinite(y).all(), "output has NaN/inf with gamma == 0"
    y.square().sum().backward()
    for name, grad in [("x", x.grad), ("weight", qat.weight.grad),
                       ("bn.weight", qat.bn.weight.grad)]:
        assert torch.isfinite(grad).all(), f"grad of {name} has NaN/inf with gamma == 0"
    if state is CAL:  # channel 1 of a BN with gamma 0 is beta
        torch.testing.assert_close(y[:, 1], qat.bn.bias[1].expand_as(y[:, 1]), rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_validation_is_bit_exact_with_reference(case):
    conv, bn, qat, x, other = _build(case, act="relu", add=True)
    conv.eval(), bn.eval(), qat.eval()
    qatkit.set_fake_quant_state(qat, CAL)
    with torch.no_grad():
        qat(x, other)
        qat(x * 1.5, other)
        qatkit.set_fake_quant_state(qat, VAL)
        out = qat(x, other)
        w, b = _fold_ref(conv, bn)
        wfq, afq = qat.weight_fake_quant, qat.activation_post_process
        axis = 1 if isinstance(conv, nn.ConvTranspose1d | nn.ConvTranspose2d) else 0
        wq = _fq_ref(w, wfq.scale, -128, 127, axis=axis)
        ref = _fq_ref(F.relu(_op_ref(conv, x, wq, b) + other), afq.scale, -128, 127)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert out.unique().numel() > 10, "the reference check is vacuous"


def test_freeze_bn_stats_uses_folded_path_and_stops_stats():
    _, _, qat, x, _ = _build("conv2d_g2_reflect", act="relu")
    model = nn.Sequential(qat, nn.Sequential(from_float(nn.Conv2d(6, 6, 1), QC)))
    qatkit.set_fake_quant_state(model, CAL)
    model.train()
    assert freeze_bn_stats(model) == 1
    assert qat.freeze_bn and "freeze_bn=True" in repr(qat)
    mean, var = qat.bn.running_mean.clone(), qat.bn.running_var.clone()
    y_train = qat(x)
    torch.testing.assert_close(qat.bn.running_mean, mean, rtol=0, atol=0)
    torch.testing.assert_close(qat.bn.running_var, var, rtol=0, atol=0)
    torch.testing.assert_close(y_train, qat.eval()(x), rtol=0, atol=0)
    assert unfreeze_bn_stats(model) == 1 and not qat.freeze_bn
    qat.train()(x)
    assert not torch.equal(qat.bn.running_mean, mean), "unfrozen BN must update its stats"


def test_32bit_out_has_no_output_fake_quant():
    conv, bn, qat, x, _ = _build(
        "conv2d_nobias", qconfig=qatkit.default_qat_8bit_weight_32bit_out_fake_quant_qconfig)
    assert qat.activation_post_process is None
    qat.eval()
    qatkit.set_fake_quant_state(qat, CAL)
    qat(x)
    qatkit.set_fake_quant_state(qat, VAL)
    with torch.no_grad():
        out = qat(x)
        w, b = _fold_ref(conv.eval(), bn.eval())
        ref = conv._conv_forward(x, _fq_ref(w, qat.weight_fake_quant.scale, -128, 127, 0), b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_conv_transpose_weight_fake_quant_is_per_channel_on_axis_1():
    conv, bn, qat, x, _ = _build("convT2d")
    qat.eval()
    qat(x)  # QAT state: observe the folded weight
    wfq = qat.weight_fake_quant
    assert wfq.ch_axis == 1 and wfq.observer.ch_axis == 1
    assert wfq.scale.shape == (conv.out_channels,)
    w, _ = _fold_ref(conv, bn)
    torch.testing.assert_close(wfq.scale, w.abs().amax(dim=(0, 2, 3)) / 128, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["conv2d_g2_reflect", "convT2d_g2_bias"])
def test_state_dict_round_trip_and_deepcopy(case):
    _, _, qat, x, other = _build(case, act="relu6", add=True)
    qat.eval()
    qatkit.set_fake_quant_state(qat, CAL)
    qat(x, other)
    qatkit.set_fake_quant_state(qat, VAL)
    out = qat(x, other)
    conv2, bn2, _ = _float_pair(case, seed=1)
    fresh = from_float(conv2, QC, bn=bn2, act="relu6", add=True)
    fresh.load_state_dict(qat.state_dict())
    fresh.eval()
    assert fresh.weight_fake_quant.state is VAL
    torch.testing.assert_close(fresh(x, other), out, rtol=0, atol=0)
    torch.testing.assert_close(copy.deepcopy(qat)(x, other), out, rtol=0, atol=0)


def test_from_float_shares_parameters_and_names():
    conv, bn, _ = _float_pair("convT2d_g2_bias")
    qat = from_float(conv, QC, bn=bn, act="relu")
    assert isinstance(qat, ConvTranspose2d) and isinstance(qat, nn.ConvTranspose2d)
    assert qat.weight is conv.weight and qat.bias is conv.bias and qat.bn is bn
    assert qat.fused_name == "ConvTransposeBnReLU2d"
    assert repr(qat).startswith("ConvTransposeBnReLU2d(")
    cases = [(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), "relu", True, "ConvBnAddReLU2d"),
             (nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), None, False, "ConvBn2d"),
             (nn.Conv1d(2, 3, 1), None, "relu6", False, "ConvReLU61d"),
             (nn.Conv3d(2, 3, 1), None, None, True, "ConvAdd3d"),
             (nn.ConvTranspose1d(2, 3, 1), None, None, False, "ConvTranspose1d")]
    for conv, bn, act, add, name in cases:
        assert from_float(conv, QC, bn=bn, act=act, add=add).fused_name == name
    assert set(FLOAT_TO_QAT) >= {nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                 nn.ConvTranspose2d, nn.Linear}


def test_bad_input_raises():
    with pytest.raises(ValueError, match="LSTM.*Conv2d"):
        from_float(nn.LSTM(2, 3), QC)
    with pytest.raises(ValueError, match="num_features=5.*4 output channels"):
        from_float(nn.Conv2d(3, 4, 1), QC, bn=nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="BatchNorm2d, got BatchNorm1d"):
        from_float(nn.Conv2d(3, 4, 1), QC, bn=nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="'gelu'"):
        from_float(nn.Conv2d(3, 4, 1), QC, act="gelu")
    with pytest.raises(ValueError, match="track_running_stats"):
        from_float(nn.Conv2d(3, 4, 1), QC, bn=nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="expects a Conv1d, got Conv2d"):
        FLOAT_TO_QAT[nn.Conv1d].from_float(nn.Conv2d(3, 4, 1), QC)
    qat = from_float(nn.Conv2d(3, 4, 1), QC, add=True)
    with pytest.raises(ValueError, match="forward\\(x, other\\)"):
        qat(torch.randn(1, 3, 2, 2))


def test_lsq_weight_scale_learns_through_folding():
    _, _, qat, x, _ = _build("convT2d_g2_bias", qconfig=qatkit.default_qat_8bit_lsq_quant_qconfig)
    qat.train()
    qat(x).sum().backward()
    grad = qat.weight_fake_quant.scale.grad
    assert grad is not None and grad.shape == (3,) and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    _, _, qat, x, other = _build("conv2d_g2_reflect", act="relu", add=True)
    qat_gpu = copy.deepcopy(qat).cuda()
    for m in (qat, qat_gpu):
        m.train()
        qatkit.set_fake_quant_state(m, CAL)
    y_cpu, y_gpu = qat(x, other), qat_gpu(x.cuda(), other.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(qat_gpu.bn.running_var.cpu(), qat.bn.running_var,
                               rtol=1e-4, atol=1e-6)
    for m in (qat, qat_gpu):
        m.eval()
        qatkit.set_fake_quant_state(m, VAL)
    y_cpu, y_gpu = qat(x, other), qat_gpu(x.cuda(), other.cuda())
    assert y_gpu.is_cuda
    scale = float(qat.activation_post_process.scale)
    # one output step at most: the conv sums in a different order on the GPU
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=0, atol=scale * 1.001)


def test_bias_is_fake_quantized_on_the_accumulator_grid_when_the_input_is_linked():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4)
    bn.eval()
    qconv = qatkit.nn.qat.from_float(conv.eval(), qatkit.default_qat_8bit_fake_quant_qconfig,
                                     bn=bn).eval()
    in_fq = qatkit.FakeQuantize()
    qconv.link_input_fake_quant(in_fq)
    x = in_fq(torch.randn(2, 3, 8, 8))  # QAT state: observe, quantize the input
    qconv(x)
    qatkit.set_fake_quant_state(qconv, "validation")
    in_fq.set_state("validation")
    w, b = qconv.folded_weight_bias()
    s_acc = in_fq.scale.double() * qconv.weight_fake_quant.scale.double()
    b_grid = qconv._fake_quant_bias(b)
    # on the grid up to float32 representation of the (large) integer multiple
    torch.testing.assert_close(b_grid.double() / s_acc, torch.round(b.double() / s_acc),
                               rtol=1e-6, atol=0)
    assert not torch.equal(b_grid, b)
    # straight-through: the bias still gets the float gradient
    b_leaf = b.detach().requires_grad_()
    qconv._fake_quant_bias(b_leaf).sum().backward()
    torch.testing.assert_close(b_leaf.grad, torch.ones_like(b_leaf.grad))
    # no link, or a calibrating input: the bias stays float
    in_fq.set_state("calibration")
    assert torch.equal(qconv._fake_quant_bias(b), b)
    qconv.link_input_fake_quant(None)
    in_fq.set_state("validation")
    assert torch.equal(qconv._fake_quant_bias(b), b)


def test_accumulator_scale_and_quantize_bias_follow_the_documented_rule():
    torch.manual_seed(0)
    deconv = nn.ConvTranspose2d(4, 6, 2, groups=2, bias=True)  # 3 weight scales, 6 channels
    qconv = qatkit.nn.qat.from_float(deconv, qatkit.default_qat_8bit_fake_quant_qconfig)
    qconv(torch.randn(1, 4, 3, 3))  # QAT forward: weight scales
    s_w = qconv.weight_fake_quant.scale.double()
    assert s_w.numel() == 3
    s_in = torch.tensor([1 / 64])
    acc = qconv.accumulator_scale(s_in)
    torch.testing.assert_close(acc, s_in.double() * s_w.repeat(2), rtol=0, atol=0)
    q, acc2 = qconv.quantize_bias(qconv.bias, s_in, 8)
    torch.testing.assert_close(q, torch.round(qconv.bias.double() / acc), rtol=0, atol=0)
    assert torch.equal(acc2, acc)
    # saturation: int32 for 8-bit operands, 48 bits with a 16-bit input
    big = torch.full((6,), 1e12)
    assert float(qconv.quantize_bias(big, s_in, 8)[0].max()) == 2**31 - 1
    assert float(qconv.quantize_bias(big, s_in, 16)[0].max()) == min(
        2**47 - 1, float(torch.round(big.double() / acc).max()))
    assert torch.equal(qconv.quantize_bias(None, s_in, 8)[0], torch.zeros(6, dtype=torch.float64))


def test_quantize_weight_gives_the_weight_fake_quants_integers():
    """One rule for exact evaluation and convert_fx: the integers the weight fake quant uses."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
    bn.running_var.uniform_(0.5, 2.0)
    qconv = qatkit.nn.qat.from_float(conv.eval(), qatkit.default_qat_8bit_fake_quant_qconfig,
                                     bn=bn.eval()).eval()
    with torch.no_grad():
        w_fq = qconv.weight_fake_quant(qconv.folded_weight_bias()[0])  # QAT state: observes
    q_w = qconv.quantize_weight()
    s_w = qconv.weight_fake_quant.scale.view(-1, 1, 1, 1)
    assert q_w.dtype == torch.float32 and torch.equal(q_w, q_w.round())
    assert q_w.min() >= -128 and q_w.max() <= 127 and q_w.abs().amax(dim=(1, 2, 3)).min() >= 127
    torch.testing.assert_close(q_w * s_w, w_fq, rtol=0, atol=0)
