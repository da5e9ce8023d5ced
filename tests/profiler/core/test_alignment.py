"""align_names / trace_model / check_inputs: provenance-based alignment, clear errors."""

from __future__ import annotations

import warnings

import pytest
import qatkit
import torch
from qatkit.profiler import align_names
from qatkit.profiler.core.alignment import check_inputs, reference_names, trace_model
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()
        self.act = nn.Sigmoid()

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        z = self.relu(self.bn(self.conv(x)))
        return self.act(z) * self.act(z + 1)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    m = Net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(m, {"": qatkit.default_qat_8bit_fake_quant_qconfig},
                                   example_inputs=(x,))
    return m, qm, x


def test_float_vs_prepared_alignment(models) -> None:
    m, qm, _ = models
    t = align_names(m, qm).set_index("Model2 Name")
    assert list(t.columns) == ["Model1 Name", "Float Name"]
    assert t.loc["conv", "Float Name"] == "relu"          # conv+bn+relu -> the float relu
    assert t.loc["conv", "Model1 Name"] == "relu"
    assert t.loc["x_quant", "Model1 Name"] == "x"         # the input stub -> the input
    assert t.loc["act(0)", "Model1 Name"] == "act(0)"     # a shared module, per call
    assert t.loc["act(1)", "Model1 Name"] == "act(1)"
    assert t.loc["mul", "Model1 Name"] == "mul"


def test_prepared_vs_prepared_is_identity(models) -> None:
    _, qm, _ = models
    t = align_names(qm, qm)
    assert (t["Model1 Name"] == t["Model2 Name"]).all()


def test_reference_names_of_a_float_model_are_its_op_names(models) -> None:
    m, _, _ = models
    names = {n.name: v for n, v in reference_names(trace_model(m)).items()}
    assert names["conv"] == "conv" and names["act"] == "act(0)" and names["act_1"] == "act(1)"


def test_check_inputs_counts_required_and_optional(models) -> None:
    m, _, x = models
    gm = trace_model(m)
    check_inputs(gm, (x,), "model1")
    check_inputs(gm, (x, None), "model1")
    with pytest.raises(ValueError, match=r"model1 \(Net\) takes 1 to 2 input\(s\) \['x', 'y'\] "
                                         r"but 3 were given"):
        check_inputs(gm, (x, x, x), "model1")


def test_untraceable_model_says_how_to_pass_a_traced_one() -> None:
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ValueError, match=r"(?s)model1 \(Branchy\) cannot be traced.*"
                                         r"qatkit.fx.symbolic_trace"):
        trace_model(Branchy(), "model1")
