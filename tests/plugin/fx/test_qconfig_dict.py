"""qconfig_dict resolution in prepare_qat_fx (qatkit.fx.qconfig_dict): global < module_type
< module_name < a module's own ``.qconfig``; None keeps an op float; bad keys are errors."""

from __future__ import annotations

import operator
import warnings

import pytest
import qatkit
import torch
from qatkit.nn import qat
from torch import fx, nn

Q8 = qatkit.default_qat_8bit_fake_quant_qconfig
Q16 = qatkit.default_qat_8bit_weight_16bit_act_fake_quant_qconfig
Q32 = qatkit.default_qat_8bit_weight_32bit_out_fake_quant_qconfig


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x)) * x  # conv+relu fused; mul is "block.mul"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.b1 = Block()
        self.b2 = Block()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.b2(self.b1(self.stem(x)))
        y = torch.sigmoid(y) + y
        return self.fc(self.pool(y).flatten(1))


def _prepare(model: nn.Module, qconfig_dict: dict) -> fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qatkit.prepare_qat_fx(model, qconfig_dict)


def _qconfig_of(gm: fx.GraphModule, name: str):
    """The qconfig a prepared op was built with; None if the op stayed float."""
    mod = gm.get_submodule(name)
    return getattr(mod, "qconfig", None) if hasattr(mod, "activation_post_process") else None


NAMES = ["stem", "b1.conv", "b1.mul", "b2.conv", "b2.mul", "sigmoid", "add", "pool", "fc"]


def test_global_qconfig_reaches_every_op():
    gm = _prepare(Net(), {"": Q8})
    assert {n: _qconfig_of(gm, n) for n in NAMES} == dict.fromkeys(NAMES, Q8)
    assert gm.b1.conv.fused_name == "ConvReLU2d"
    assert isinstance(gm.b1.mul, qat.FunctionalOp) and gm.b1.mul.op == "mul"


def test_priority_global_type_name_own_attribute():
    model = Net()
    model.b2.qconfig = Q8  # own attribute: beats the module_name entry for b2.conv
    gm = _prepare(model, {
        "": Q8,
        "module_type": [(nn.Conv2d, Q16), (torch.sigmoid, Q16), ("mul", Q16)],
        "module_name": [("b1.conv", Q8), ("b2.conv", Q32), ("fc", Q32)],
    })
    got = {n: _qconfig_of(gm, n) for n in NAMES}
    assert got == {
        "stem": Q16,      # type
        "b1.conv": Q8,    # name beats type
        "b1.mul": Q16,    # op kind as a type key
        "b2.conv": Q8,    # own attribute of the container beats name
        "b2.mul": Q8,     # ... and type
        "sigmoid": Q16,   # function as a type key
        "add": Q8,        # global
        "pool": Q8,
        "fc": Q32,
    }
    assert gm.stem.activation_post_process.dtype == "qint16"
    assert gm.fc.activation_post_process is None, "32-bit out: no output fake quant"
    assert gm.fc.weight_fake_quant is not None


def test_name_prefix_and_longest_match():
    gm = _prepare(Net(), {"": Q8, "module_name": [("b1", Q16), ("b1.mul", Q32)]})
    assert _qconfig_of(gm, "b1.conv") is Q16
    assert gm.b1.mul.qconfig is Q32 and gm.b1.mul.activation_post_process is None
    assert _qconfig_of(gm, "b2.conv") is Q8


def test_operator_function_as_type_key():
    gm = _prepare(Net(), {"": Q8, "module_type": [(operator.add, Q16)]})
    assert gm.add.qconfig is Q16 and gm.add.activation_post_process.dtype == "qint16"
    assert gm.sigmoid.qconfig is Q8


def test_container_type_covers_its_inside_and_direct_type_wins():
    gm = _prepare(Net(), {"": Q8, "module_type": [(Block, Q16), (nn.Conv2d, Q32)]})
    assert _qconfig_of(gm, "b1.mul") is Q16 and _qconfig_of(gm, "b2.mul") is Q16
    assert _qconfig_of(gm, "b1.conv") is Q32, "Conv2d matches the op itself: it wins"
    assert _qconfig_of(gm, "sigmoid") is Q8


def test_none_keeps_ops_float():
    torch.manual_seed(0)
    model = Net()
    model.b2.qconfig = None
    gm = _prepare(model, {"": Q8, "module_name": [("stem", None), ("b2", Q16)],
                          "module_type": [(torch.sigmoid, None)]})
    # float modules keep their float class and gain no fake quant
    assert type(gm.stem) is nn.Conv2d and not hasattr(gm.stem, "weight_fake_quant")
    assert type(gm.b2.conv) is nn.Conv2d and type(gm.b2.relu) is nn.ReLU
    assert not isinstance(gm.get_submodule("b2"), qat.FunctionalOp)
    assert "b2.mul" not in dict(gm.named_modules())
    assert "sigmoid" not in dict(gm.named_modules())
    # a float output feeding a quantized op gets a QuantStub; the graph input feeds only the
    # float stem, so it gets none
    assert "x_quant" not in dict(gm.named_modules())
    assert isinstance(gm.stem_quant, qat.QuantStub)
    assert isinstance(gm.b2.mul_quant, qat.QuantStub)
    x = torch.randn(2, 3, 8, 8)
    qatkit.set_fake_quant_state(gm, "calibration")
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_global_none_quantizes_only_what_is_named():
    gm = _prepare(Net(), {"": None, "module_name": [("b1.conv", Q8)]})
    fqs = [n for n, m in gm.named_modules() if isinstance(m, qatkit.FakeQuantize)]
    assert sorted(fqs) == ["b1.conv.activation_post_process", "b1.conv.weight_fake_quant",
                           "stem_quant.activation_post_process"], fqs


@pytest.mark.parametrize("qconfig_dict, match", [
    ({"module_name": [("b3.conv", Q8)]}, r"'b3\.conv'.*Closest names: \['b2\.conv', 'b1\.conv'\]"),
    ({"module_name": [("b1.cnv", Q8)]}, r"qconfig_dict\['module_name'\].*'b1\.cnv'.*b1\.conv"),
    ({"module_type": [(nn.Conv1d, Q8)]}, r"'Conv1d' occurs nowhere.*Conv2d"),
    ({"module_type": [(torch.cat, Q8)]}, r"qconfig_dict\['module_type'\].*occurs nowhere"),
    ({"module_name": [(nn.Conv2d, Q8)]}, r"must be module names"),
    ({"module_name": [("stem", "int8")]}, r"'stem'.*expected a qatkit.QConfig"),
    ({"module_name": ["stem"]}, r"list of \(key, qconfig\) pairs"),
    ({"modules": []}, r"unknown qconfig_dict keys \['modules'\]"),
])
def test_bad_qconfig_dict_entries(qconfig_dict, match):
    with pytest.raises(ValueError, match=match):
        qatkit.prepare_qat_fx(Net(), {"": Q8, **qconfig_dict})


def test_qconfig_dict_must_be_a_dict():
    with pytest.raises(ValueError, match="qconfig_dict must be a dict"):
        qatkit.prepare_qat_fx(Net(), Q8)
    with pytest.raises(ValueError, match="expected a qatkit.QConfig"):
        qatkit.prepare_qat_fx(Net(), {"": "qint8"})
