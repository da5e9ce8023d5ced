"""Partial tracing: small hand-written models that torch.fx cannot trace whole."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from qatkit import (
    FakeQuantState,
    convert_fx,
    default_qat_8bit_fake_quant_qconfig,
    get_provenance,
    prepare_qat_fx,
    set_fake_quant_state,
    set_preserve_qat_mode,
)
from qatkit.fx import TraceFailure
from qatkit.fx.partial import is_partially_traced, partial_trace_of, regions, trace_report
from qatkit.nn import QuantStub
from torch import nn

QCONFIG = {"": default_qat_8bit_fake_quant_qconfig}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 1))


class Branch(nn.Module):
    """The root branches on a tensor value."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _block(3, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if y.mean() > -100:  # data-dependent branch
            y = y * 2
        return self.head(y)


class RowLoop(nn.Module):
    """A submodule iterates over a tensor; its conv is called by that float glue."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = [self.conv(r.unsqueeze(0)) for r in x]  # loop over a tensor
        return torch.cat(rows)


class LoopModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _block(3, 8)
        self.neck = RowLoop()
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.neck(self.stem(x))
        return self.fc(y.mean((2, 3)))


class Layer(nn.Module):
    """Called with kwargs plumbing: a constant and a tensor in **kwargs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, **kwargs):
        if kwargs.get("scale") is not None:  # a Proxy would take this branch for any call
            x = x * kwargs["scale"]
        if kwargs.get("bias") is not None:
            x = x + kwargs["bias"]
        if mask is not None:
            x = x * mask
        return self.fc2(F.relu(self.fc1(x)))


class KwargsModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(), Layer()])
        self.bias = nn.Parameter(torch.randn(16) * 0.1)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        options = {"scale": 0.5, "bias": self.bias, **kwargs}
        for layer in self.layers:
            x = layer(x, **options)
        if x.abs().sum() > 1e9:  # untraceable root
            x = x.clamp(-1, 1)
        return x


def _prepare(model: nn.Module, inputs: tuple, qconfig_dict: dict | None = None, **kw):
    with pytest.warns(UserWarning, match="does not trace whole"):
        return prepare_qat_fx(model, qconfig_dict or QCONFIG, example_inputs=inputs, **kw)


def _calibrate(qat: nn.Module, inputs: tuple) -> torch.Tensor:
    set_fake_quant_state(qat, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        out = qat(*inputs)
    set_fake_quant_state(qat, FakeQuantState.VALIDATION)
    return out


def _check_whole_life(model: nn.Module, inputs: tuple, qat: nn.Module) -> None:
    """CALIBRATION equals float, convert_fx equals VALIDATION, QAT gives finite grads."""
    with torch.no_grad():
        ref = model(*inputs)
    calib = _calibrate(qat, inputs)
    torch.testing.assert_close(calib, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        val = qat(*inputs)
    int_model = convert_fx(qat)
    assert is_partially_traced(int_model)
    with torch.no_grad():
        torch.testing.assert_close(int_model(*inputs), val, rtol=1e-5, atol=1e-5)
    set_fake_quant_state(qat, FakeQuantState.QAT)
    qat.train()
    qat(*inputs).square().sum().backward()
    grads = [p.grad for p in qat.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), \
        "QAT backward gave missing or non-finite gradients"


def test_branch_on_tensor_keeps_root_float_and_quantizes_children() -> None:
    torch.manual_seed(0)
    model, x = Branch().eval(), (torch.randn(2, 3, 8, 8),)
    qat = _prepare(model, x)
    table = trace_report(qat)
    root = table[table["Module"] == "(root)"].iloc[0]
    assert root["Status"] == "float"
    assert "if y.mean() > -100" in root["Reason"] and "test_partial.py" in root["Reason"]
    assert set(table.loc[table["Status"] == "quantized", "Module"]) == {"body", "head"}
    assert partial_trace_of(qat).quantized_share == 1.0
    # names are the float model's, from the root
    # (a conv called by float glue is held by a region of its own name: head.head)
    prov = get_provenance(qat)
    assert prov["body.0"] == "body.2" and prov["head.head"] == "head", prov
    assert "head.head" in set_preserve_qat_mode(qat, prefixes=["head"])
    set_preserve_qat_mode(qat, prefixes=["head"], value=False)
    _check_whole_life(model, x, qat)


def test_qconfig_dict_names_reach_regions_and_share_drops() -> None:
    torch.manual_seed(0)
    model, x = Branch().eval(), (torch.randn(2, 3, 8, 8),)
    qat = _prepare(model, x, {**QCONFIG, "module_name": [("head", None)]})
    plan = partial_trace_of(qat)
    assert 0 < plan.quantized_share < 1
    head = table_row(trace_report(qat), "head")
    assert head["Quantized MACs"] == 0 and head["MACs"] > 0
    with pytest.raises(ValueError, match="no module or op is named 'hed'"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepare_qat_fx(model, {**QCONFIG, "module_name": [("hed", None)]},
                           example_inputs=x)


def table_row(table, module: str):
    return table[table["Module"] == module].iloc[0]


def test_loop_over_tensor_quantizes_the_conv_called_by_glue() -> None:
    torch.manual_seed(0)
    model, x = LoopModel().eval(), (torch.randn(3, 3, 8, 8),)
    qat = _prepare(model, x)
    table = trace_report(qat)
    neck = table_row(table, "neck")
    assert neck["Status"] == "float" and "for r in x" in neck["Reason"]
    conv = table_row(table, "neck.conv")
    assert conv["Status"] == "quantized" and conv["Quantized MACs"] == conv["MACs"] > 0
    assert partial_trace_of(qat).quantized_share == 1.0
    assert "neck.conv" in regions(qat)
    # the conv region's op is named like the float conv
    assert get_provenance(qat)["neck.conv.conv"] == "neck.conv"
    _check_whole_life(model, x, qat)


def test_kwargs_plumbing_is_fixed_from_the_example_call() -> None:
    torch.manual_seed(0)
    model, x = KwargsModel().eval(), (torch.randn(4, 16),)
    qat = _prepare(model, x)
    table = trace_report(qat)
    assert set(table.loc[table["Status"] == "quantized", "Module"]) == {"layers.0",
                                                                          "layers.1"}
    _check_whole_life(model, x, qat)


def test_partial_tracing_off_is_an_error() -> None:
    model, x = Branch().eval(), (torch.randn(2, 3, 8, 8),)
    with pytest.raises(TraceFailure, match=r"partial tracing is off[\s\S]*") as err:
        prepare_qat_fx(model, QCONFIG, example_inputs=x,
                       prepare_custom_config_dict={"partial_tracing": False})
    assert "if y.mean() > -100" in str(err.value)
    with pytest.raises(ValueError, match="must be True or False"):
        prepare_qat_fx(model, QCONFIG, example_inputs=x,
                       prepare_custom_config_dict={"partial_tracing": "yes"})


def test_without_example_inputs_the_error_says_how_to_get_partial_tracing() -> None:
    with pytest.raises(TraceFailure, match="pass example_inputs"):
        prepare_qat_fx(Branch().eval(), QCONFIG)


class Opaque(nn.Module):
    """Nothing with a conv / linear module traces: the weight is used functionally."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # untraceable
            x = -x
        return F.conv2d(x, self.weight)


def test_nothing_traceable_names_module_and_line() -> None:
    with pytest.raises(TraceFailure) as err:
        prepare_qat_fx(Opaque().eval(), QCONFIG, example_inputs=(torch.randn(1, 3, 8, 8),))
    msg = str(err.value)
    assert "nothing in Opaque with a conv or linear can be traced" in msg
    assert "if x.sum() > 0" in msg and "test_partial.py" in msg


class StubInGlue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub(scale=1 / 128)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        if x.mean() > -100:
            x = x + 1
        return self.conv(x)


def test_quant_stub_in_float_glue_warns_with_the_line() -> None:
    with pytest.warns(UserWarning, match=r"QuantStub 'quant' is in float glue[\s\S]*"
                                         r"if x.mean\(\) > -100"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "prepare_qat_fx: StubInGlue does not trace")
            prepare_qat_fx(StubInGlue().eval(), QCONFIG,
                           example_inputs=(torch.randn(1, 3, 8, 8),))


def test_traceable_model_is_not_partial() -> None:
    model = _block(3, 8).eval()
    qat = prepare_qat_fx(model, QCONFIG, example_inputs=(torch.randn(1, 3, 8, 8),))
    assert not is_partially_traced(qat)
    with pytest.raises(ValueError, match="traced whole"):
        trace_report(qat)
