"""Bad input to eager mode: each error (or warning) names the module at fault and the fix."""

from __future__ import annotations

import pytest
import qatkit
import torch
from eager_models import QCONFIG, CatNet
from torch import Tensor, nn


class NoStub(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Unwrapped(nn.Module):
    """A residual ``+`` written as a plain functional op."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = qatkit.QuantStub()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.dequant = qatkit.DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        x = self.quant(x)
        y = self.conv1(x) + x
        return self.dequant(self.conv2(y))


class WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = qatkit.QuantStub()
        self.lstm = nn.LSTM(4, 4, batch_first=True)
        self.fc = nn.Linear(4, 4)
        self.dequant = qatkit.DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(self.fc(self.lstm(self.quant(x))[0]))


class SharedFunctional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = qatkit.QuantStub()
        self.ff = qatkit.nn.FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        x = self.quant(x)
        return self.ff.mul(self.ff.add(x, x), x)


def test_model_input_without_quant_stub_names_the_input_module_and_fix():
    with pytest.raises(ValueError, match=r"input 'x' .* 'conv' without a QuantStub.*"
                                         r"self\.quant = qatkit\.QuantStub\(\)"):
        qatkit.prepare_qat(NoStub(), {"": QCONFIG})


def test_functional_op_not_wrapped_is_listed_with_the_fix():
    with pytest.warns(UserWarning, match=r"1 functional op\(s\) compute in float.*: add\. "
                                         r"Fix: .*qatkit\.nn\.FloatFunctional"):
        qm = qatkit.prepare_qat(Unwrapped(), {"": QCONFIG})
    # the float sum is quantized again where it enters conv2, so the model still calibrates
    assert "input" in qm.conv2.input_quant
    qatkit.calibrate(qm, torch.randn(2, 4, 6, 6), progress=False)
    qatkit.convert(qm)


def test_qconfig_on_a_module_without_quantized_implementation():
    model = WithLSTM()
    model.qconfig = QCONFIG
    with pytest.warns(UserWarning, match=r"no quantized implementation.*LSTM: lstm"):
        qm = qatkit.prepare_qat(model)  # inherited: the LSTM stays float, said so
    assert isinstance(qm.lstm.output_quant, qatkit.nn.qat.QuantStub)
    model.lstm.qconfig = QCONFIG  # given to the LSTM itself: a mistake
    with pytest.raises(ValueError, match=r"module 'lstm' \(LSTM\) has a qconfig.*"
                                         r"model\.lstm\.qconfig = None"):
        qatkit.prepare_qat(model)
    with pytest.raises(ValueError, match=r"'lstm' \(LSTM\)"):
        qatkit.prepare_qat(WithLSTM(), {"": QCONFIG, "module_type": [(nn.LSTM, QCONFIG)]})


def test_one_float_functional_for_two_ops_is_an_error():
    with pytest.raises(ValueError, match=r"'ff' is used for 'add' and 'mul'.*one "
                                         r"qatkit\.nn\.FloatFunctional\(\) per op"):
        qatkit.prepare_qat(SharedFunctional(), {"": QCONFIG})


def test_bad_qconfigs_and_repeated_prepare():
    model = CatNet()
    with pytest.raises(ValueError, match=r"no module of CatNet has a qconfig.*model\.qconfig"):
        qatkit.prepare_qat(model)
    model.conv_c.qconfig = "int8"
    with pytest.raises(ValueError, match=r"'conv_c' \(Conv2d\) has qconfig 'int8', not a "
                                         r"qatkit\.QConfig"):
        qatkit.prepare_qat(model, {"": QCONFIG})
    del model.conv_c.qconfig
    qm = qatkit.prepare_qat(model, {"": QCONFIG})
    with pytest.raises(ValueError, match="already prepared"):
        qatkit.prepare_qat(qm, {"": QCONFIG})
    with pytest.raises(ValueError, match="hybrid"):
        qatkit.prepare_qat(model, {"": QCONFIG}, hybrid_dict={"module_name": ["conv_c"]})


@pytest.mark.parametrize("groups, match", [
    ([["bn_a", "relu_a"]], r"must start with a conv"),
    ([["conv_a", "relu_a", "bn_a"]], r"'bn_a' \(BatchNorm2d\) cannot follow"),
    ([["conv_a", "bn_b"]], r"'bn_b' has num_features=5 but 'conv_a' has 8"),
    ([["conv_a", "nothere"]], r"no module 'nothere'"),
    ([["conv_a", "bn_a"], ["conv_a", "relu_a"]], r"'conv_a' is in two groups"),
    ([["conv_a"]], r"nothing to fuse"),
    ("conv_a", r"list of groups"),
])
def test_fuse_modules_refuses_bad_groups(groups, match):
    model = CatNet()
    model.bn_b = nn.BatchNorm2d(5)
    with pytest.raises(ValueError, match=match):
        qatkit.fuse_modules(model, groups)
