"""qatkit.profiler.report.checks: call counts, unfused groups (cross-checked against what prepare
really fuses), per-layer qconfig table and its warnings."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pandas as pd
import pytest
import qatkit
import torch
import torch.nn.functional as F
import torchvision
from qatkit.profiler.report.checks import check_unfused_operations, get_module_called_count
from qatkit.profiler.report.qconfig_check import check_qconfig
from torch import nn

Q8 = qatkit.default_qat_8bit_fake_quant_qconfig
Q16ACT = qatkit.default_qat_8bit_weight_16bit_act_fake_quant_qconfig
Q16 = qatkit.default_qat_16bit_fake_quant_qconfig
Q32 = qatkit.default_qat_8bit_weight_32bit_out_fake_quant_qconfig


def _prepare(model: nn.Module, x, qconfig_dict: dict | None = None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qatkit.prepare_qat_fx(model, qconfig_dict or {"": Q8}, example_inputs=(x,),
                                     **kwargs)


def _calibrate(qm, x):
    qm.eval()
    qatkit.set_fake_quant_state(qm, "calibration")
    with torch.no_grad():
        qm(x)
    qatkit.set_fake_quant_state(qm, "validation")
    return qm


def _state(model: nn.Module) -> dict[str, Any]:
    """Tensors, and the extra state of the fused QAT modules (``freeze_bn``)."""
    return copy.deepcopy(model.state_dict())


def _assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(after[k], v, atol=0, rtol=0, msg=f"{k} changed")
        else:
            assert after[k] == v, f"{k} changed"
    assert all(not m._forward_hooks for m in model.modules()), "a hook was left on the model"


# -- models with known defects ---------------------------------------------------------------
class SharedReLU(nn.Module):
    """One nn.ReLU called twice, and an unused module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.relu(self.bn(self.conv2(self.relu(self.conv1(x)))))


class ViewSplit(nn.Module):
    """conv -> reshape -> bn (split) and a clean conv -> bn -> relu."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x).reshape(-1, 4, 8, 8))
        return F.relu(self.bn2(self.conv2(y)))


class SharedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.conv_b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.conv_c, self.bn_c = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_c(self.conv_c(self.bn(self.conv_b(self.bn(self.conv_a(x))))))


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        return torch.relu(self.conv(x)) + self.conv(x)


class SizeUser(nn.Module):
    """The conv's output is also read by .size(): prepare fuses only single-use results."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        n = y.size(0)
        return self.bn(y).reshape(n, -1)


def relu_unless_empty(x):  # control flow on a tensor: must be wrapped (no leading _: fx)
    return F.relu(x) if x.numel() > 0 else x


class WrappedAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return relu_unless_empty(self.conv(x))


class BNLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(x) * 2


class LeafBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.post = nn.Conv2d(3, 4, 3, padding=1), BNLeaf()

    def forward(self, x):
        return self.post(self.conv(x))


class DropoutSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(12, 12), nn.Dropout(0.1), nn.Linear(12, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.drop(self.fc1(x))))


class FunctionalConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        return F.relu(F.conv2d(x, self.w, padding=1))


X = torch.randn(2, 3, 8, 8)


# -- get_module_called_count -----------------------------------------------------------------
def test_called_count_shared_and_unused_float_model(capsys) -> None:
    model = SharedReLU().train()
    before = _state(model)
    df = get_module_called_count(model, X)
    counts = dict(zip(df["Module Name"], df["Called Count"], strict=True))
    assert counts == {"conv1": 1, "conv2": 1, "bn": 1, "relu": 2, "unused": 0}
    assert list(df.columns) == ["Module Name", "Module Type", "Called Count"]
    assert df.set_index("Module Name").loc["relu", "Module Type"] == "ReLU"
    _assert_unchanged(model, before)  # train mode: BN statistics must not move
    assert model.training
    out = capsys.readouterr().out
    assert "<-- shared" in out and "<-- unused" in out


def test_called_count_prepared_and_converted_models() -> None:
    qm = _calibrate(_prepare(SharedReLU(), X), X)
    before = _state(qm)
    df = get_module_called_count(qm, X, print_tabulate=False)
    counts = dict(zip(df["Module Name"], df["Called Count"], strict=True))
    # both relu calls are fused into the convs; fake quants are not counted on their own
    assert counts == {"conv1": 1, "conv2": 1, "x_quant": 1}
    assert dict(zip(df["Module Name"], df["Module Type"], strict=True))["conv2"] == "ConvBnReLU2d"
    _assert_unchanged(qm, before)
    im = qatkit.convert_fx(qm)
    df = get_module_called_count(im, X, print_tabulate=False)
    assert set(df["Module Name"]) == {"conv1", "conv2", "x_quant"}
    assert (df["Called Count"] == 1).all()


def test_called_count_custom_leaf_and_shared_conv() -> None:
    df = get_module_called_count(SharedConv(), X, print_tabulate=False)
    assert dict(zip(df["Module Name"], df["Called Count"], strict=True)) == {"stem": 1, "conv": 2}
    model = nn.Sequential(SharedReLU(), nn.Sequential(nn.Identity()))
    df = get_module_called_count(model, X, print_tabulate=False,
                                 check_leaf_module=lambda m: isinstance(m, (SharedReLU,
                                                                             nn.Sequential)))
    assert dict(zip(df["Module Name"], df["Called Count"], strict=True)) == {"0": 1, "1": 1}


def test_called_count_error_names_model_and_leaves_no_hook() -> None:
    model = SharedReLU()
    with pytest.raises(RuntimeError, match="SharedReLU"):
        get_module_called_count(model, torch.randn(2, 5, 8, 8), print_tabulate=False)
    assert all(not m._forward_hooks for m in model.modules())


class Scale(nn.Module):
    """No children, traced through (its mul is in the graph, the module is never called)."""

    def forward(self, x):
        return x * 2


class Inlined(nn.Module):
    """Modules the tracer inlines, one of them called twice, next to called leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.scale, self.conv = Scale(), nn.Conv2d(3, 4, 1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())

    def forward(self, x):
        return self.block(self.scale(self.conv(self.scale(x))))


@pytest.mark.parametrize("make, leaf", [
    (SharedReLU, None), (SharedConv, None), (Inlined, None),
    (Inlined, lambda m: isinstance(m, (Scale, nn.Sequential))),
    (lambda: nn.Sequential(SharedReLU(), nn.Sequential(nn.Identity())),
     lambda m: isinstance(m, (SharedReLU, nn.Sequential))),
    (lambda: torchvision.models.resnet18(), None),
    (lambda: _calibrate(_prepare(SharedReLU(), X), X), None),
    (lambda: qatkit.convert_fx(_calibrate(_prepare(SharedReLU(), X), X)), None),
])
def test_called_count_from_a_capture_equals_running_the_model(make, leaf) -> None:
    from qatkit.profiler.core.capture import capture_model

    model = make().eval()
    x = torch.randn(2, 3, 32, 32) if isinstance(model, torchvision.models.ResNet) else X
    direct = get_module_called_count(model, x, leaf, print_tabulate=False)
    cap = capture_model(model, x)
    from_capture = get_module_called_count(model, None, leaf, print_tabulate=False, capture=cap)
    pd.testing.assert_frame_equal(direct, from_capture)
    assert direct["Called Count"].sum() > 0
    if make is Inlined:  # inlined by the tracer, counted from the graph's module stacks
        counts = dict(zip(from_capture["Module Name"], from_capture["Called Count"], strict=True))
        assert counts["scale"] == 2 and counts.get("block", 1) == 1, counts
    with pytest.raises(ValueError, match="capture= was recorded from"):
        get_module_called_count(SharedReLU(), None, capture=cap, print_tabulate=False)


# -- check_unfused_operations ----------------------------------------------------------------
def _fused_names(qm) -> dict[str, str]:
    return {n: m.fused_name for n, m in qm.named_modules() if hasattr(m, "fused_name")}


def test_unfused_clean_resnet18_reports_nothing() -> None:
    model = torchvision.models.resnet18()
    before = _state(model)
    df = check_unfused_operations(model, torch.randn(1, 3, 32, 32), print_tabulate=False)
    assert df.empty, df.to_string()
    assert list(df.columns) == ["Module Name", "Pattern", "Reason", "Fix"]
    _assert_unchanged(model, before)


def test_unfused_reshape_split_matches_prepare(capsys) -> None:
    df = check_unfused_operations(ViewSplit(), X)
    assert df["Module Name"].tolist() == ["conv, reshape, bn"]
    assert df["Pattern"].tolist() == ["Conv2d + reshape + BatchNorm2d"]
    assert "'reshape'" in df["Reason"][0] and "splits the pattern" in df["Reason"][0]
    assert "apply 'bn' before" in df["Fix"][0]
    assert "conv, reshape, bn" in capsys.readouterr().out
    fused = _fused_names(_prepare(ViewSplit(), X))
    assert fused == {"conv": "Conv2d", "conv2": "ConvBnReLU2d"}  # reported: not fused; clean: fused


def test_unfused_shared_batchnorm_matches_prepare() -> None:
    df = check_unfused_operations(SharedBN(), X, print_tabulate=False)
    assert df["Module Name"].tolist() == ["conv_a, bn(0)", "conv_b, bn(1)"]
    assert all("'bn' is called 2 times" in r for r in df["Reason"])
    assert _fused_names(_prepare(SharedBN(), X)) == {"conv_a": "Conv2d", "conv_b": "Conv2d",
                                                     "conv_c": "ConvBn2d"}


def test_unfused_shared_conv_matches_prepare() -> None:
    df = check_unfused_operations(SharedConv(), X, print_tabulate=False)
    assert df["Module Name"].tolist() == ["conv(0), relu", "conv(1), add"]
    assert all("called 2 times" in r for r in df["Reason"])
    assert "copy.deepcopy(self.conv)" in df["Fix"][0]
    assert _fused_names(_prepare(SharedConv(), X))["conv"] == "Conv2d"


def test_unfused_second_user_size_matches_prepare() -> None:
    df = check_unfused_operations(SizeUser(), X, print_tabulate=False)
    assert df["Module Name"].tolist() == ["conv, bn"]
    assert "also used by ['size']" in df["Reason"][0]
    assert _fused_names(_prepare(SizeUser(), X)) == {"conv": "Conv2d"}


def test_unfused_hidden_in_wrapped_function_and_leaf_module() -> None:
    custom = {"wrapped_functions": [relu_unless_empty]}
    df = check_unfused_operations(WrappedAct(), X, print_tabulate=False,
                                  prepare_custom_config_dict=custom)
    assert df["Module Name"].tolist() == ["conv, relu_unless_empty"]
    assert "wrapped function relu_unless_empty()" in df["Reason"][0]
    assert "ReLU" in df["Reason"][0]
    qm = _prepare(WrappedAct(), X, prepare_custom_config_dict=custom)
    assert _fused_names(qm) == {"conv": "Conv2d"}
    # without example inputs the wrapped function cannot be looked into: nothing claimed
    assert check_unfused_operations(WrappedAct(), None, print_tabulate=False,
                                    prepare_custom_config_dict=custom).empty

    custom = {"leaf_module_types": [BNLeaf]}
    df = check_unfused_operations(LeafBN(), X, print_tabulate=False,
                                  prepare_custom_config_dict=custom)
    assert df["Module Name"].tolist() == ["conv, post"]
    assert "leaf module 'post' (BNLeaf)" in df["Reason"][0] and "BatchNorm" in df["Reason"][0]
    assert _fused_names(_prepare(LeafBN(), X, prepare_custom_config_dict=custom)) == {
        "conv": "Conv2d"}


def test_unfused_dropout_split_and_functional_conv() -> None:
    x = torch.randn(2, 12)
    df = check_unfused_operations(DropoutSplit(), x, print_tabulate=False)
    assert df["Module Name"].tolist() == ["fc1, drop, relu"]
    assert df["Pattern"][0] == "Linear + Dropout + relu"
    assert _fused_names(_prepare(DropoutSplit(), x)) == {"fc1": "Linear", "fc2": "Linear"}
    df = check_unfused_operations(FunctionalConv(), X, print_tabulate=False)
    assert df["Module Name"].tolist() == ["conv2d, relu"]
    assert "functional conv2d() call" in df["Reason"][0]


_STAGE_IN_FUSED_NAME = {"BatchNorm": "Bn", "add": "Add", "relu": "ReLU", "ReLU": "ReLU"}


@pytest.mark.parametrize("name", [pytest.param("mobilenet_v2", marks=pytest.mark.slow),
                                  "efficientnet_b0"])
def test_unfused_report_matches_prepare_on_torchvision(name: str) -> None:
    """Every reported group is one prepare leaves unfused (efficientnet: its stochastic depth
    sits between each block's last conv+bn and the residual add; mobilenet_v2: none)."""
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    df = check_unfused_operations(model, x, print_tabulate=False)
    assert len(df) == {"mobilenet_v2": 0, "efficientnet_b0": 9}[name], df.to_string()
    fused = _fused_names(_prepare(model, x))
    for mods, pattern in zip(df["Module Name"], df["Pattern"], strict=True):
        stage = next(v for k, v in _STAGE_IN_FUSED_NAME.items()
                     if pattern.split(" + ")[-1].startswith(k))
        assert stage not in fused[mods.split(", ")[0]], (mods, fused[mods.split(", ")[0]])
    if name == "efficientnet_b0":
        assert set(df["Pattern"]) == {"Conv2d + BatchNorm2d + stochastic_depth + add"}
        assert not any("Add" in v for v in fused.values())
    else:  # its 10 residual adds are all fused
        assert sum("Add" in v for v in fused.values()) == 10


# -- check_qconfig ---------------------------------------------------------------------------
class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = qatkit.QuantStub(scale=1 / 128)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)  # int16 activation
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)  # int8 after int16: dtype change
        self.conv4 = nn.Conv2d(8, 8, 1)  # int16 weights
        self.fc = nn.Linear(8, 4)  # 32-bit out, but a sigmoid follows
        self.head = nn.Linear(4, 2)  # 32-bit out, last: fine

    def forward(self, x):
        y = self.conv2(F.relu(self.conv1(self.quant(x))))
        y = torch.abs(self.conv3(y))  # abs has no quantized implementation: float
        y = self.conv4(y).mean((2, 3))
        return self.head(torch.sigmoid(self.fc(y)))


def _mixed():
    qd = {"": Q8, "module_name": [("conv2", Q16ACT), ("conv4", Q16), ("fc", Q32),
                                  ("head", Q32)]}
    return _calibrate(_prepare(Mixed(), X, qd), X)


def test_check_qconfig_layer_table() -> None:
    qm = _mixed()
    before = _state(qm)
    layers, _ = check_qconfig(qm, (X,), print_tabulate=False)
    _assert_unchanged(qm, before)
    assert list(layers.columns) == ["Module Name", "Module Type", "Input Dtype", "Output Dtype",
                                    "Weight Dtype", "Weight ch_axis", "Fixed Scale"]
    t = layers.set_index("Module Name")
    assert t.loc["quant", "Fixed Scale"] == 1 / 128
    assert t.loc["quant", ["Input Dtype", "Output Dtype"]].tolist() == ["float32", "qint8"]
    assert t.loc["conv1", ["Module Type", "Output Dtype", "Weight Dtype"]].tolist() == [
        "ConvReLU2d", "qint8", "qint8"]
    assert t.loc["conv2", "Output Dtype"] == "qint16"
    assert t.loc["conv3", ["Input Dtype", "Output Dtype"]].tolist() == ["qint16", "qint8"]
    assert t.loc["abs", ["Input Dtype", "Output Dtype"]].tolist() == ["qint8", "float32"]
    assert t.loc["conv4", ["Input Dtype", "Weight Dtype", "Weight ch_axis"]].tolist() == [
        "qint16", "qint16", 0]  # abs's output is re-quantized by a stub with conv4's qconfig
    assert t.loc["fc", "Output Dtype"] == "float32" and t.loc["head", "Output Dtype"] == "float32"
    assert pd.isna(t.loc["conv1", "Fixed Scale"])


def test_check_qconfig_warnings_exactly_the_defects(tmp_path) -> None:
    qm = _mixed()
    _, warns = check_qconfig(qm, (X,), out_dir=tmp_path, print_tabulate=False,
                             custom_check_func=lambda n, m: "too wide" if getattr(
                                 m, "out_features", 0) == 4 else None)
    got = {(n, w.split(" ")[0]) for n, w in zip(warns["Module Name"], warns["Warning"],
                                                strict=True)}
    assert got == {("quant", "fixed"), ("conv2", "dtype"), ("conv3", "dtype"), ("abs", "output"),
                   ("conv4", "int16"), ("mean", "dtype"), ("fc", "32-bit"), ("fc", "too")}, \
        warns.to_string()
    text = dict(zip(warns["Module Name"] + warns["Warning"].str[:5], warns["Warning"],
                    strict=True))
    assert "'conv2' (qint16), output qint8" in text["conv3dtype"]
    assert "'conv1' (qint8), output qint16" in text["conv2dtype"]
    assert "feeds ['conv4']" in text["absoutpu"] and "feeds ['sigmoid']" in text["fc32-bi"]
    assert "observed data" in text["quantfixed"] and "saturates" in text["quantfixed"]  # randn
    assert all("Fix:" in w for w in warns["Warning"] if w != "too wide")
    for name in ("qconfig_info.csv", "qconfig_warnings.csv", "qconfig_info.txt"):
        assert (tmp_path / name).is_file()
    assert pd.read_csv(tmp_path / "qconfig_warnings.csv")["Module Name"].tolist() == \
        warns["Module Name"].tolist()


def test_check_qconfig_clean_model_and_filters() -> None:
    x = torch.randn(1, 3, 32, 32)
    qm = _prepare(torchvision.models.resnet18(), x, {"": Q8, "module_name": [("fc", Q32)]})
    layers, warns = check_qconfig(qm, x, print_tabulate=False)
    assert warns.empty, warns.to_string()
    assert (layers["Output Dtype"] == "qint8").sum() == len(layers) - 1  # all but the fc head
    sub, _ = check_qconfig(qm, None, prefixes=["layer1.0"], print_tabulate=False)
    assert sub["Module Name"].tolist() == ["layer1.0.conv1", "layer1.0.conv2"]
    sub, _ = check_qconfig(qm, None, types=["ConvBnAddReLU2d"], print_tabulate=False)
    assert len(sub) == 8
    sub, _ = check_qconfig(qm, None, types=[nn.Linear], print_tabulate=False)
    assert sub["Module Name"].tolist() == ["fc"]
    with pytest.raises(ValueError, match="match no op"):
        check_qconfig(qm, None, prefixes=["nope"], print_tabulate=False)
    with pytest.raises(ValueError, match="prepare_qat_fx"):
        check_qconfig(torchvision.models.resnet18(), x, print_tabulate=False)


def test_check_qconfig_without_example_inputs_matches() -> None:
    qm = _mixed()
    a, wa = check_qconfig(qm, (X,), print_tabulate=False)
    b, wb = check_qconfig(copy.deepcopy(qm), None, print_tabulate=False)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(wa, wb)


def test_check_qconfig_reads_a_capture_and_the_annotation() -> None:
    from qatkit.annotation import annotation_by_name
    from qatkit.profiler.core.capture import capture_model

    qm = _mixed()
    a, wa = check_qconfig(qm, (X,), print_tabulate=False)
    b, wb = check_qconfig(qm, None, print_tabulate=False, capture=capture_model(qm, X))
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(wa, wb)
    # every dtype of the table is the annotation's
    anns = annotation_by_name(qm)
    for _, row in a.iterrows():
        ann = anns[row["Module Name"]]
        assert row["Output Dtype"] == (ann.output.dtype if ann.output else "float32")
        if ann.weight is not None:
            assert (row["Weight Dtype"], row["Weight ch_axis"]) == (ann.weight.dtype,
                                                                    ann.weight.ch_axis)
        ins = {i.spec.dtype if i.spec else "float32" for i in ann.inputs if i.node != "scale"}
        assert set(row["Input Dtype"].split(", ")) == ins, row["Module Name"]
    with pytest.raises(ValueError, match="capture= was recorded from"):
        check_qconfig(qm, None, print_tabulate=False, capture=capture_model(_mixed(), X))
