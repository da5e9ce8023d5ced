"""Models and helpers of the eager-mode tests: the digits CNN written for eager mode
(QuantStub / DeQuantStub, a FloatFunctional for the residual add), and a small model with a
FloatFunctional ``cat`` and ``add_relu``."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import qatkit
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
import digits as digits_example  # noqa: E402

QCONFIG = qatkit.default_qat_8bit_fake_quant_qconfig
#: the fuse_modules groups of EagerDigitsNet (the chains prepare_qat_fx fuses in DigitsNet)
DIGITS_GROUPS = [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"], ["conv3", "bn3"],
                 ["conv4", "bn4", "relu4"]]


class EagerDigitsNet(digits_example.DigitsNet):
    """examples/digits.py's DigitsNet written for eager mode: the residual ``out + identity``
    is a ``qatkit.nn.FloatFunctional`` (same parameters, same float outputs)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__(width)
        self.skip = qatkit.nn.FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        x = self.quant(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        identity = out
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.skip.add(out, identity)
        out = self.relu3(out)
        out = self.relu4(self.bn4(self.conv4(out)))
        out = torch.flatten(self.pool(out), 1)
        return self.dequant(self.fc(out))


class CatNet(nn.Module):
    """Two conv-bn-relu branches joined by FloatFunctional ``cat`` and ``add_relu``, a sigmoid,
    a pool and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = qatkit.QuantStub()
        self.conv_a, self.bn_a, self.relu_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), \
            nn.ReLU()
        self.conv_b, self.bn_b = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.cat = qatkit.nn.FloatFunctional()
        self.conv_c = nn.Conv2d(16, 8, 3, padding=1)
        self.add_relu = qatkit.nn.FloatFunctional()
        self.sig = nn.Sigmoid()
        self.mul = qatkit.nn.FloatFunctional()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)
        self.dequant = qatkit.DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        x = self.quant(x)
        a = self.relu_a(self.bn_a(self.conv_a(x)))
        b = self.bn_b(self.conv_b(x))
        y = self.conv_c(self.cat.cat([a, b], dim=1))
        y = self.add_relu.add_relu(y, b)
        y = self.mul.mul(y, self.sig(y))
        return self.dequant(self.fc(torch.flatten(self.pool(y), 1)))


CAT_GROUPS = [["conv_a", "bn_a", "relu_a"], ["conv_b", "bn_b"]]


def settle_batchnorm(model: nn.Module, x: Tensor) -> nn.Module:
    """BatchNorm statistics of ``x`` (so activations are in range), then eval mode."""
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.reset_running_stats()
            bn.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    for bn in model.modules():  # (momentum None reads a tensor as a number: a graph break)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.momentum = 0.1
    return model.eval()


def calibrated_eager(model: nn.Module, groups: list[list[str]], x: Tensor,
                     qconfig: qatkit.QConfig = QCONFIG, **kwargs) -> nn.Module:
    """``model`` fused, prepared by prepare_qat (qconfig on the root), calibrated on ``x``,
    in VALIDATION state and eval mode."""
    fused = qatkit.fuse_modules(model, groups)
    fused.qconfig = qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat(fused, **kwargs)
    qatkit.calibrate(qm, x, progress=False)
    return qm.eval()
