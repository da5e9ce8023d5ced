"""SmoothQuant: the float function is kept, outliers move into the weights, the outlier model
recovers its accuracy at int8, and layers that cannot be smoothed say why."""

from __future__ import annotations

import warnings

import ptq  # examples/ptq.py: conftest.py puts examples/ on sys.path
import pytest
import qatkit
import torch
from torch import nn


def _float_out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), qatkit.fake_quant_enabled(model, False):
        return model(x)


def _prepared(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(model.eval(), {"": qatkit.default_qat_8bit_fake_quant_qconfig},
                                   example_inputs=(x,)).eval()
    qatkit.calibrate(qm, x, progress=False)
    return qm


def test_outlier_model_recovers_at_int8(token_float, make_calibrated, calib, data, accuracy):
    outlier = ptq.with_outlier_channels(token_float)
    qm = make_calibrated(outlier)
    smoothed = qatkit.smooth_quant(qm, calib, progress=False)
    f, c, s = accuracy(outlier), accuracy(qm), accuracy(smoothed)
    assert c < 0.9 * f, f"the 256x outlier channel should hurt plain calibration: {c} vs {f}"
    assert s >= 0.99 * f, f"SmoothQuant should reach 99% of float at int8: {s} vs {f}"
    # the float model's math is kept
    x = data.test_x[:32]
    ref = _float_out(qm, x)
    torch.testing.assert_close(_float_out(smoothed, x), ref, rtol=0,
                               atol=1e-5 * float(ref.abs().max()))
    log = qatkit.algorithms.ptq_log(smoothed).set_index("layer")
    assert log.loc["fc1", "applied"] and log.loc["fc1", "producer"] == "norm"
    assert log.loc["fc1", "level_before"] > 7 and log.loc["fc1", "level_after"] < 1
    # the LayerNorm output's scale shrank with its range: 256x outlier, alpha 0.5 -> ~16x
    ratio = float(qm.norm.activation_post_process.scale
                  / smoothed.norm.activation_post_process.scale)
    assert ratio > 8, ratio
    assert "quant_stub" in log.loc["embed", "reason"]
    assert "do not map one to one" in log.loc["head", "reason"]


def test_threshold_and_alpha(token_float, make_calibrated, calib):
    qm = make_calibrated(ptq.with_outlier_channels(token_float))
    untouched = qatkit.smooth_quant(qm, calib, threshold=20.0, progress=False)
    assert torch.equal(untouched.norm.weight, qm.norm.weight)
    assert torch.equal(untouched.norm.activation_post_process.scale,
                       qm.norm.activation_post_process.scale)
    reason = qatkit.algorithms.ptq_log(untouched).set_index("layer").loc["fc1", "reason"]
    assert "< threshold 20.0" in reason
    # alpha 1: every channel's activation max becomes its weight column's max (times 1)
    full = qatkit.smooth_quant(qm, calib, alpha=1.0, progress=False)
    assert qatkit.algorithms.ptq_log(full).set_index("layer").loc["fc1", "level_after"] < 0.8
    with pytest.raises(ValueError, match="alpha"):
        qatkit.smooth_quant(qm, calib, alpha=1.5)
    with pytest.raises(ValueError, match="threshold"):
        qatkit.smooth_quant(qm, calib, threshold=-1)


class _QKV(nn.Module):
    """LayerNorm read by three linears (q, k, v), and a conv-bn-relu read by a conv through
    max pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 1, groups=2)
        self.norm = nn.LayerNorm(16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.pool(torch.relu(self.bn(self.conv(x)))))
        t = self.norm(y.flatten(2).transpose(1, 2))
        return self.q(t) + self.k(t) * self.v(t)


def test_shared_producer_and_grouped_consumer_keep_the_float_function():
    torch.manual_seed(0)
    model = _QKV().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight[2] = 40.0  # an outlier channel of the conv's output
        model.norm.weight[5] = 30.0  # and of the LayerNorm's
    x = torch.randn(4, 3, 8, 8)
    qm = _prepared(model, x)
    out = qatkit.smooth_quant(qm, x, threshold=0.0, progress=False)
    log = qatkit.algorithms.ptq_log(out).set_index("producer")
    assert sorted(log.loc["norm", "layer"].split(", ")) == ["k", "q", "v"]
    assert log.loc["norm", "applied"]
    assert log.loc["conv", "layer"] == "conv2" and log.loc["conv", "applied"]
    ref = _float_out(qm, x)
    torch.testing.assert_close(_float_out(out, x), ref, rtol=0,
                               atol=2e-5 * float(ref.abs().max()))
    # q, k and v got the same input-channel factors
    fq = (out.q.weight / qm.q.weight).detach()
    torch.testing.assert_close(out.k.weight / qm.k.weight, fq)
    torch.testing.assert_close(out.v.weight / qm.v.weight, fq)
    assert float(fq.max() / fq.min()) > 2


def test_layers_that_cannot_be_smoothed_say_why(digits_qat, calib):
    log = qatkit.algorithms.ptq_log(qatkit.smooth_quant(digits_qat, calib, threshold=0.0,
                                             progress=False)).set_index("layer")
    assert "also feeds conv 'conv3' (as 'other')" in log.loc["conv2", "reason"]
    assert "includes a residual add" in log.loc["conv4", "reason"]
    assert log.loc["conv3", "applied"] and log.loc["fc", "applied"]  # fc: through pool, flatten


def test_relu6_producer_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    log = qatkit.algorithms.ptq_log(qatkit.smooth_quant(_prepared(model, x), x, threshold=0.0,
                                             progress=False)).set_index("layer")
    assert "relu6" in log.loc["2", "reason"] and not log.loc["2", "applied"]


def test_outlier_level():
    assert qatkit.algorithms.outlier_level(torch.tensor([1.0, 1.0, 1.0, 64.0])) == 6.0
    assert qatkit.algorithms.outlier_level(torch.tensor([0.0, 2.0, 2.0])) == 0.0
    assert qatkit.algorithms.outlier_level(torch.zeros(3)) == 0.0
