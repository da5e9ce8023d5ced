"""Numerics of the fused QAT Linear (qatkit.nn.qat.linear) against float torch modules."""

from __future__ import annotations

import copy
import math

import pytest
import qatkit
import torch
import torch.nn.functional as F
from qatkit.nn.qat import freeze_bn_stats
from qatkit.nn.qat.conv import from_float
from qatkit.nn.qat.linear import Linear
from torch import nn

QC = qatkit.default_qat_8bit_fake_quant_qconfig
CAL, VAL = qatkit.FakeQuantState.CALIBRATION, qatkit.FakeQuantState.VALIDATION
ACTS = {None: lambda y: y, "relu": F.relu, "relu6": F.relu6}


def _build(bn=True, act=None, add=False, qconfig=QC, bias=True, seed=0):
    """(float linear, float bn or None, qat module built from copies, input, other)."""
    torch.manual_seed(seed)
    lin = nn.Linear(12, 6, bias=bias)
    norm = nn.BatchNorm1d(6) if bn else None
    if norm is not None:
        with torch.no_grad():
            norm.running_mean.copy_(torch.randn(6) * 0.3)
            norm.running_var.copy_(torch.rand(6) + 0.5)
            norm.weight.copy_(torch.randn(6))
            norm.bias.copy_(torch.randn(6) * 0.2)
    x = torch.randn(8, 12) * 2
    other = torch.randn(8, 6) if add else None
    qat = from_float(copy.deepcopy(lin), qconfig, bn=copy.deepcopy(norm), act=act, add=add)
    return lin, norm, qat, x, other


def _float_forward(lin, bn, x, other, act):
    y = lin(x) if bn is None else bn(lin(x))
    if other is not None:
        y = y + other
    return ACTS[act](y)


def _fq_ref(x, scale, qmin, qmax, per_row=False):
    scale = scale.reshape(-1, 1) if per_row else scale
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


@pytest.mark.parametrize("bn,act,add", [(True, "relu", False), (True, "relu6", True),
                                        (False, "relu", False), (True, None, False)])
@pytest.mark.parametrize("training", [False, True])
def test_calibration_matches_float(bn, act, add, training):
    lin, norm, qat, x, other = _build(bn=bn, act=act, add=add)
    lin.train(training), qat.train(training)
    if norm is not None:
        norm.train(training)
    qatkit.set_fake_quant_state(qat, CAL)
    xf, xq = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf = _float_forward(lin, norm, xf, other, act)
    yq = qat(xq, other) if add else qat(xq)
    torch.testing.assert_close(yq, yf, rtol=1e-5, atol=1e-5)
    if norm is not None:
        torch.testing.assert_close(qat.bn.running_mean, norm.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(qat.bn.running_var, norm.running_var, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(yf)
    (yf * g).sum().backward()
    (yq * g).sum().backward()
    torch.testing.assert_close(xq.grad, xf.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(qat.weight.grad, lin.weight.grad, rtol=1e-4, atol=1e-5)


def test_zero_gamma_no_nan_in_training():
    _, _, qat, x, _ = _build(act="relu")
    with torch.no_grad():
        qat.bn.weight[2] = 0.0
    qat.train()
    x.requires_grad_()
    y = qat(x)  # QAT state: fake quant on
    y.sum().backward()
    assert torch.isfinite(y).all(), "output has NaN/inf with gamma == 0"
    assert torch.isfinite(x.grad).all() and torch.isfinite(qat.weight.grad).all()
    assert torch.isfinite(qat.bn.weight.grad).all()


@pytest.mark.parametrize("bias", [True, False])
def test_validation_is_bit_exact_with_reference(bias):
    lin, norm, qat, x, other = _build(act="relu", add=True, bias=bias)
    lin.eval(), norm.eval(), qat.eval()
    qatkit.set_fake_quant_state(qat, CAL)
    with torch.no_grad():
        qat(x, other)
        qatkit.set_fake_quant_state(qat, VAL)
        out = qat(x, other)
        # the correctly rounded square root (math.sqrt in double, rounded once), as qatkit folds
        std = torch.tensor([math.sqrt(v) for v in (norm.running_var + norm.eps).tolist()])
        sf = norm.weight / std
        w = lin.weight * sf[:, None]
        b = ((lin.bias if bias else torch.zeros(6)) - norm.running_mean) * sf + norm.bias
        wq = _fq_ref(w, qat.weight_fake_quant.scale, -128, 127, per_row=True)
        ref = _fq_ref(F.relu(F.linear(x, wq, b) + other), qat.activation_post_process.scale,
                      -128, 127)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert out.unique().numel() > 10, "the reference check is vacuous"
    w_fold, b_fold = qat.folded_weight_bias()
    torch.testing.assert_close(w_fold, w, rtol=0, atol=0)
    torch.testing.assert_close(b_fold, b, rtol=0, atol=0)


def test_freeze_bn_and_32bit_out():
    lin, norm, qat, x, _ = _build(
        qconfig=qatkit.default_qat_8bit_weight_32bit_out_fake_quant_qconfig)
    assert qat.activation_post_process is None
    qat.train()
    qatkit.set_fake_quant_state(qat, CAL)
    assert freeze_bn_stats(qat) == 1
    mean = qat.bn.running_mean.clone()
    y = qat(x)
    torch.testing.assert_close(qat.bn.running_mean, mean, rtol=0, atol=0)
    # frozen: the folded path, i.e. the float modules in eval mode
    torch.testing.assert_close(y, norm.eval()(lin(x)), rtol=1e-5, atol=1e-5)
    qatkit.set_fake_quant_state(qat, VAL)
    y = qat(x)
    assert y.dtype == torch.float32 and y.unique().numel() == y.numel(), "output was quantized"


def test_names_state_dict_and_errors():
    assert Linear.from_float(nn.Linear(3, 2), QC, act="relu").fused_name == "LinearReLU"
    assert repr(Linear.from_float(nn.Linear(3, 2), QC, bn=nn.BatchNorm1d(2))).startswith(
        "LinearBn1d(")
    assert from_float(nn.Linear(3, 2), QC).fused_name == "Linear"
    assert from_float(nn.Linear(3, 2), QC, bn=nn.BatchNorm1d(2), act="relu6",
                      add=True).fused_name == "LinearBnAddReLU61d"
    _, _, qat, x, _ = _build(act="relu")
    qat.eval()
    qatkit.set_fake_quant_state(qat, CAL)
    qat(x)
    qatkit.set_fake_quant_state(qat, VAL)
    out = qat(x)
    _, _, fresh, _, _ = _build(act="relu", seed=3)
    fresh.load_state_dict(qat.state_dict())
    torch.testing.assert_close(fresh.eval()(x), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_features=3.*2 output channels"):
        from_float(nn.Linear(3, 2), QC, bn=nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="BatchNorm1d, got BatchNorm2d"):
        from_float(nn.Linear(3, 2), QC, bn=nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="QConfig"):
        from_float(nn.Linear(3, 2), None)
