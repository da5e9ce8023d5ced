"""The annotation helpers other modules read: module constants by op kind, the op a
data-moving node passes on, the fake quants making an op's inputs, set_module(create=True)."""

from __future__ import annotations

import warnings

import pytest
import qatkit
import torch
from qatkit._modules import set_module
from qatkit.annotation import (
    MODULE_CONSTANTS,
    annotation_by_name,
    get_annotations,
    module_constants,
    source_annotation,
)
from qatkit.fx.prepare_graph import input_fake_quants
from torch import nn


def test_module_constants_reads_the_op_arguments_a_module_holds():
    assert module_constants(nn.LeakyReLU(0.2), "leaky_relu") == {"negative_slope": 0.2}
    assert module_constants(nn.Hardtanh(-2.0, 3.0), "hardtanh") == {"min_val": -2.0,
                                                                    "max_val": 3.0}
    pool1d = module_constants(nn.AvgPool1d(3, 2), "avg_pool")  # no divisor_override
    assert pool1d == {"kernel_size": (3,), "stride": (2,), "padding": (0,),
                      "ceil_mode": False, "count_include_pad": True}
    assert module_constants(nn.AvgPool2d(2, divisor_override=3), "avg_pool")[
        "divisor_override"] == 3
    ln = module_constants(nn.LayerNorm(4, eps=1e-3), "layer_norm")
    assert ln["normalized_shape"] == (4,) and ln["eps"] == 1e-3 and ln["weight"].shape == (4,)
    assert module_constants(nn.ReLU(), "relu") == {}  # no constants: nothing
    assert set(MODULE_CONSTANTS["maxpool2d"]) == set(MODULE_CONSTANTS["maxpool1d"])


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = qatkit.QuantStub(scale=1 / 128)
        self.conv, self.relu = nn.Conv2d(1, 4, 3), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2)
        self.dequant = qatkit.DeQuantStub()

    def forward(self, x):
        y = self.pool(self.relu(self.conv(self.quant(x))))
        return self.dequant(self.fc(torch.flatten(y, 1)))


@pytest.fixture
def calibrated():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(_Net().eval(), {"": qatkit.default_qat_8bit_fake_quant_qconfig},
                                   example_inputs=(x,))
    qatkit.calibrate(qm, x, progress=False)
    return qm


def test_source_annotation_follows_data_moving_ops_back(calibrated):
    by_node = {a.node: a for a in get_annotations(calibrated).values()}
    flatten = next(a for a in by_node.values() if a.kind == "flatten")
    assert flatten.role == "passthrough"
    src = source_annotation(flatten, by_node)
    assert src.role == "quantized" and src.name == "pool"
    assert source_annotation(src, by_node) is src  # an op passes on its own output


def test_input_fake_quants_are_the_producers_output_fake_quants(calibrated):
    fc = annotation_by_name(calibrated)["fc"]
    found = input_fake_quants(calibrated, fc)
    assert list(found) == ["input"]
    # fc's input is pool's output (through flatten): the same fake quant, the same scale
    assert found["input"] is calibrated.get_submodule(
        annotation_by_name(calibrated)["pool"].output.module_path)
    assert torch.equal(found["input"].scale, fc.inputs[0].spec.scale(calibrated))


def test_set_module_creates_parents_only_when_asked():
    root, conv = nn.Module(), nn.Conv2d(1, 1, 1)
    with pytest.raises(AttributeError):
        set_module(root, "a.b.conv", conv)
    set_module(root, "a.b.conv", conv, create=True)
    assert root.get_submodule("a.b.conv") is conv
    seq = nn.Sequential(nn.Identity(), nn.ReLU())
    set_module(seq, "1", conv)
    assert seq[1] is conv
