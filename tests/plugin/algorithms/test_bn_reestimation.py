"""BN re-estimation: the new running statistics are those of the quantized conv outputs; the
model's momentum, flags and fake-quant states are restored."""

from __future__ import annotations

import warnings

import pytest
import qatkit
import torch
import torch.nn.functional as F
from torch import nn


class _ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8, momentum=0.3)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn(self.conv(x))))


def _prepared(x: torch.Tensor) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = _ConvBn().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)  # stale statistics
        model.bn.running_var.uniform_(0.5, 3)
        model.bn.weight.uniform_(0.5, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(model, {"": qatkit.default_qat_8bit_fake_quant_qconfig},
                                   example_inputs=(x,)).eval()
    qatkit.calibrate(qm, x, progress=False)
    return qm


def test_statistics_are_the_quantized_outputs():
    x = torch.randn(16, 3, 10, 10)
    qm = _prepared(x)
    out = qatkit.bn_reestimation(qm, x, progress=False)
    # by hand: the QAT module's simulated fold with the old statistics (one batch)
    conv = qm.conv
    sf = conv.bn.weight / torch.sqrt(conv.bn.running_var + conv.bn.eps)
    w_fold = conv.weight * sf.view(-1, 1, 1, 1)
    s_w = w_fold.abs().flatten(1).amax(1) / 128
    w_q = torch.div(w_fold, s_w.view(-1, 1, 1, 1)).round().clamp(-128, 127) * s_w.view(-1, 1, 1, 1)
    s_x = qatkit.annotation.annotation_by_name(qm)["conv"].input_spec("input").scale(qm)
    x_q = torch.div(x, s_x).round().clamp(-128, 127) * s_x
    with torch.no_grad():
        y = F.conv2d(x_q, w_q) / sf.view(1, -1, 1, 1)
    mean, var = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(out.conv.bn.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.conv.bn.running_var, var, rtol=1e-4, atol=1e-5)
    assert out.conv.bn.momentum == 0.3 and not out.conv.bn.training and not out.training
    # the weight scale follows the new fold
    new_fold = out.conv.folded_weight_bias()[0]
    torch.testing.assert_close(out.conv.weight_fake_quant.scale,
                               new_fold.abs().flatten(1).amax(1) / 128)
    log = qatkit.algorithms.ptq_log(out)
    assert log.loc[0, "layer"] == "conv" and log.loc[0, "max_mean_change"] > 0.1
    with torch.no_grad():
        assert torch.equal(qatkit.convert_fx(out)(x), out(x))


def test_qat_state_and_freeze_bn_are_restored():
    x = torch.randn(8, 3, 10, 10)
    qm = _prepared(x)
    qatkit.set_fake_quant_state(qm, "qat")
    qatkit.freeze_bn_stats(qm)
    qm.train()
    out = qatkit.bn_reestimation(qm, x, progress=False, recalibrate_activations=False)
    assert qatkit.get_fake_quant_state(out) == {qatkit.FakeQuantState.QAT: 5}
    assert out.conv.freeze_bn and out.training and out.conv.bn.training
    assert torch.equal(out.conv.activation_post_process.scale,
                       qm.conv.activation_post_process.scale)


def test_model_without_batchnorm_is_refused():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    x = torch.randn(8, 4)
    qm = qatkit.prepare_qat_fx(model, {"": qatkit.default_qat_8bit_fake_quant_qconfig},
                               example_inputs=(x,)).eval()
    qatkit.calibrate(qm, x, progress=False)
    with pytest.raises(ValueError, match="no BatchNorm"):
        qatkit.bn_reestimation(qm, x)


def test_low_bit_depthwise_model_improves(separable_float, make_calibrated, calib, accuracy):
    qm = make_calibrated(separable_float, weight_bits=4)
    out = qatkit.bn_reestimation(qm, calib, progress=False)
    f, c, b = accuracy(separable_float), accuracy(qm), accuracy(out)
    assert c < 0.95 * f and b >= 0.96 * f, (f, c, b)
