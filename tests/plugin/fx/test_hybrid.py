"""Hybrid (step) quantization in prepare_qat_fx (qatkit.fx.qconfig_dict): float islands with a
QuantStub where their float output feeds quantized ops, and errors for bad arguments."""

from __future__ import annotations

import warnings

import pytest
import qatkit
import torch
import torch.nn.functional as F
from qatkit.nn import qat
from torch import fx, nn

Q8 = qatkit.default_qat_8bit_fake_quant_qconfig


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.b1 = Block()
        self.b2 = Block()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.b2(self.b1(self.stem(x))) + x.mean(1, keepdim=True))


def _net() -> Net:
    torch.manual_seed(0)
    model = Net()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _prepare(model: nn.Module, hybrid_dict: dict, qconfig_dict: dict | None = None,
             ) -> fx.GraphModule:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = qatkit.prepare_qat_fx(model, qconfig_dict or {"": Q8}, hybrid=True,
                                   hybrid_dict=hybrid_dict)
    assert not [w for w in caught if "no quantized implementation" in str(w.message)], \
        "float islands are chosen, not reported as unsupported"
    return gm


def _calibrated(gm: fx.GraphModule, x: torch.Tensor) -> fx.GraphModule:
    gm.eval()
    qatkit.set_fake_quant_state(gm, "calibration")
    gm(x)
    qatkit.set_fake_quant_state(gm, "validation")
    return gm


def test_module_name_island_stays_float_with_quant_stub_at_its_exit():
    model = _net()
    gm = _prepare(model, {"module_name": ["b1"]})
    # the island: float classes, BatchNorm not folded, no fake quant inside
    assert type(gm.b1.conv) is nn.Conv2d and type(gm.b1.bn) is nn.BatchNorm2d
    assert type(gm.b1.relu) is nn.ReLU
    assert not any(isinstance(m, qatkit.FakeQuantize) for n, m in gm.named_modules()
                   if n.startswith("b1.") and not n.startswith("b1.relu_quant"))
    # around it: quantized
    assert gm.stem.fused_name == "Conv2d" and gm.b2.conv.fused_name == "ConvBnReLU2d"
    # float feeds quantized: one QuantStub at the island's exit, named after its last op
    assert isinstance(gm.b1.relu_quant, qat.QuantStub)
    users = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "b1.relu_quant"]
    assert [str(u.target) for u in users[0].users] == ["b2.conv"]
    # numbers: in calibration the whole model is the float model ...
    x = torch.randn(2, 3, 8, 8)
    qatkit.set_fake_quant_state(gm, "calibration")
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    # ... and in validation the island computes in float on its quantized input
    _calibrated(gm, x)
    seen = {}
    gm.stem.register_forward_hook(lambda m, i, o: seen.setdefault("stem", o))
    gm.b1.relu.register_forward_hook(lambda m, i, o: seen.setdefault("b1", o))
    gm(x)
    torch.testing.assert_close(seen["b1"], model.b1(seen["stem"]), rtol=0, atol=0)
    fq = gm.b1.relu_quant.activation_post_process
    assert fq.has_scale


def test_module_type_island_covers_every_instance():
    gm = _prepare(_net(), {"module_type": [Block]})
    for name in ("b1", "b2"):
        assert type(gm.get_submodule(f"{name}.conv")) is nn.Conv2d, name
    assert not isinstance(gm.get_submodule("b1.relu"), qat.QuantStub)
    stubs = sorted(n for n, m in gm.named_modules() if isinstance(m, qat.QuantStub))
    # b1 -> b2 is float -> float: only b2's exit into the quantized add needs a stub
    assert stubs == ["b2.relu_quant", "x_quant"], stubs
    assert isinstance(gm.add, qat.FunctionalOp) and gm.add.activation_post_process is not None


def test_activation_island_is_not_fused_into_a_quantized_conv():
    model = _net()
    gm = _prepare(model, {"module_name": ["stem"], "module_type": [nn.ReLU]})
    assert type(gm.stem) is nn.Conv2d
    assert isinstance(gm.stem_quant, qat.QuantStub), "float stem feeds quantized b1.conv"
    for name in ("b1", "b2"):
        conv = gm.get_submodule(f"{name}.conv")
        assert conv.fused_name == "ConvBn2d", "the float ReLU must not be fused"
        assert type(gm.get_submodule(f"{name}.relu")) is nn.ReLU
        assert isinstance(gm.get_submodule(f"{name}.relu_quant"), qat.QuantStub)
    x = torch.randn(2, 3, 8, 8)
    qatkit.set_fake_quant_state(gm, "calibration")
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_island_beats_qconfig_dict_and_module_attribute():
    model = _net()
    model.b1.qconfig = Q8
    gm = _prepare(model, {"module_name": ["b1.conv"]},
                  {"": Q8, "module_name": [("b1", Q8)], "module_type": [(nn.Conv2d, Q8)]})
    # "b1.conv" names the fused conv+bn+relu layer (its name in the QAT model): all float
    assert type(gm.b1.conv) is nn.Conv2d
    assert type(gm.b1.bn) is nn.BatchNorm2d and type(gm.b1.relu) is nn.ReLU
    assert isinstance(gm.b1.relu_quant, qat.QuantStub)
    assert gm.b2.conv.fused_name == "ConvBnReLU2d"


def test_qat_step_trains_through_an_island():
    torch.manual_seed(0)
    gm = _prepare(_net(), {"module_name": ["b1"]})
    x = torch.randn(4, 3, 8, 8)
    gm.train()
    qatkit.set_fake_quant_state(gm, "qat")
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    before = {k: v.detach().clone() for k, v in gm.named_parameters()}
    F.mse_loss(gm(x), torch.randn(4, 2, 8, 8)).backward()
    for name, p in gm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reached {name}"
    opt.step()
    assert not torch.equal(before["b1.conv.weight"], gm.b1.conv.weight), "island trains"
    assert not torch.equal(before["stem.weight"], gm.stem.weight)


@pytest.mark.parametrize("kwargs, match", [
    (dict(hybrid=False, hybrid_dict={"module_name": ["b1"]}), "hybrid_dict is given but hybrid"),
    (dict(hybrid=True), "hybrid=True needs hybrid_dict"),
    (dict(hybrid=True, hybrid_dict={}), "hybrid=True needs hybrid_dict"),
    (dict(hybrid=True, hybrid_dict=["b1"]), "hybrid_dict must be a dict"),
    (dict(hybrid=True, hybrid_dict={"names": ["b1"]}), r"unknown hybrid_dict keys \['names'\]"),
    (dict(hybrid=True, hybrid_dict={"module_name": ["b9"]}),
     r"hybrid_dict\['module_name'\]: no module or op is named 'b9'.*'b1'"),
    (dict(hybrid=True, hybrid_dict={"module_type": [nn.Linear]}),
     r"hybrid_dict\['module_type'\]: 'Linear' occurs nowhere"),
])
def test_bad_hybrid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qatkit.prepare_qat_fx(_net(), {"": Q8}, **kwargs)


def test_single_name_string_is_accepted():
    gm = _prepare(_net(), {"module_name": "head"})
    assert type(gm.head) is nn.Conv2d
