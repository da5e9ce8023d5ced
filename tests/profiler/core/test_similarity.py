"""featuremap_similarity: alignment, PerLayer vs EndToEnd, errors, no mutation.

DefectNet has one layer (conv2) whose output has a few activations ~1000x the rest; with a
99th-percentile calibration its scale clips them.  PerLayer must name conv2 alone, EndToEnd
shows the damage carried on to conv3.
"""

from __future__ import annotations

import copy
import math

import pytest
import qatkit
import torch
from qatkit.profiler import featuremap_similarity
from qatkit.profiler.core.similarity import SIMILARITY_COLUMNS
from torch import nn


class DefectNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(8, 8, 1), nn.ReLU()
        self.conv3, self.relu3 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return self.fc(self.pool(x).flatten(1))


def defect_net(x: torch.Tensor) -> nn.Module:
    """conv2's channel 0 is 1000 * (relu1 channel 0 - its 98th percentile): ~2% of that
    channel's positions become activations ~1000x the rest."""
    torch.manual_seed(0)
    m = DefectNet().eval()
    with torch.no_grad():
        a = m.relu1(m.bn1(m.conv1(x)))[:, 0]
        m.conv2.weight[0].zero_()
        m.conv2.weight[0, 0] = 1000.0
        m.conv2.bias[0] = -1000.0 * torch.quantile(a.flatten(), 0.98)
    return m


class ResNetLike(nn.Module):
    """conv+bn+relu, a residual add, a cat, global pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        z = self.relu2(self.bn2(self.conv2(y)) + y)
        return self.fc(self.pool(torch.cat([z, y], 1)).flatten(1))


class SharedAct(nn.Module):
    """One Sigmoid called twice (not fusable: two calls of one module)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.act = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv1(x))
        return self.act(self.conv2(a))


def settled(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm statistics from x, then eval."""
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.fixture(scope="module")
def defect(calibrate):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    m = defect_net(x)
    qc = qatkit.get_default_qconfig(activation_observer="percentile",
                                    activation_qkwargs={"percentile": 99.0})
    return m, calibrate(m, x, qc), x


@pytest.fixture(scope="module")
def resnet_like(calibrate):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    m = settled(ResNetLike(), x)
    qm = calibrate(m, x)
    return m, qm, qatkit.convert_fx(qm), x


def test_perlayer_names_the_defect_endtoend_carries_it(defect) -> None:
    m, qm, x = defect
    per = featuremap_similarity(m, qm, x, method="PerLayer")
    e2e = featuremap_similarity(m, qm, x)
    assert list(per.columns) == SIMILARITY_COLUMNS
    assert list(per["Module Name"]) == ["x_quant", "conv1", "conv2", "conv3", "pool", "flatten",
                                        "fc"]
    worst = per.loc[per["Similarity"].idxmin()]
    assert worst["Module Name"] == "conv2" and worst["Similarity"] < 0.5
    others = per[per["Module Name"] != "conv2"]
    assert others["Similarity"].min() > 0.95, per
    # end to end, conv3 inherits conv2's clipped input; per layer it is fine
    e2e_conv3 = e2e.set_index("Module Name").loc["conv3"]
    assert e2e_conv3["Similarity"] < 0.5
    # the same-input column is the per-layer error in both methods
    assert e2e["Op Error with Same Input (N out_qscale)"].tolist() == pytest.approx(
        per["Op Error with Same Input (N out_qscale)"].tolist())
    assert e2e_conv3["Acc Error (N out_qscale)"] > 2 * e2e_conv3[
        "Op Error with Same Input (N out_qscale)"]
    # the clipped activations: ~1000 / scale steps of error on conv2
    conv2 = per.set_index("Module Name").loc["conv2"]
    assert conv2["Acc Error (N out_qscale)"] > 1000
    assert conv2["Acc Error (N out_qscale)"] == pytest.approx(
        conv2["Acc Error (float atol)"] / conv2["qscale"])


def test_float_vs_calibrated_fused_conv_is_compared_with_float_relu(resnet_like) -> None:
    m, qm, _, x = resnet_like
    table = featuremap_similarity(m, qm, x, method="PerLayer").set_index("Module Name")
    assert table.loc["conv1", "Module Type"] == "ConvBnReLU2d"
    assert qatkit.get_provenance(qm)["conv1"] == "relu1"
    with torch.no_grad():
        ref = m.relu1(m.bn1(m.conv1(x)))                       # the float relu's output
        out = qm.conv1(x)  # PerLayer: model1's input x replaces x_quant's output
        scale = float(qm.conv1.activation_post_process.scale)
    atol = float((out - ref).abs().max())
    assert table.loc["conv1", "Acc Error (float atol)"] == pytest.approx(atol, rel=1e-6)
    assert table.loc["conv1", "qscale"] == pytest.approx(scale)
    cos = float(torch.nn.functional.cosine_similarity(ref.flatten().double(),
                                                      out.flatten().double(), dim=0))
    assert table.loc["conv1", "Similarity"] == pytest.approx(cos, abs=1e-9)
    # conv+bn+add+relu fused: compared with the float relu2; cat: a FunctionalOp
    assert table.loc["conv2", "Module Type"] == "ConvBnAddReLU2d"
    assert qatkit.get_provenance(qm)["conv2"] == "relu2"
    assert table.loc["cat", "Module Type"] == "FunctionalOp[cat]"
    assert (table["Similarity"] > 0.99).all(), table


def test_calibrated_vs_integer_agrees_within_one_step(resnet_like) -> None:
    _, qm, im, x = resnet_like
    for method in ("EndToEnd", "PerLayer"):
        t = featuremap_similarity(qm, im, x, method=method)
        assert t["Module Type"].str.startswith("Quantized[").sum() >= 6
        assert (t["Similarity"] > 0.9999).all(), t
        quantized = t[t["qscale"].notna()]
        assert (quantized["Op Error with Same Input (N out_qscale)"] <= 1.0 + 1e-5).all(), t


def test_shared_module_calls_are_named_per_call(calibrate) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    m = SharedAct().eval()
    qm = calibrate(m, x)
    t = featuremap_similarity(m, qm, x, method="PerLayer")
    assert list(t["Module Name"]) == ["x_quant", "conv1", "act(0)", "conv2", "act(1)"]
    # both calls share one output scale in the prepared model
    assert t["qscale"].iloc[2] == t["qscale"].iloc[4]
    assert (t["Similarity"] > 0.99).all()


def test_wrong_number_of_inputs(resnet_like) -> None:
    m, qm, _, x = resnet_like
    with pytest.raises(ValueError, match=r"model1 \(ResNetLike\) takes 1 input\(s\) \['x'\] "
                                         r"but 2 were given"):
        featuremap_similarity(m, qm, (x, x))


def test_models_that_do_not_correspond_name_the_layer(resnet_like) -> None:
    _, qm, _, x = resnet_like
    other = settled(ResNetLike(), x)
    other.conv1 = nn.Conv2d(3, 8, 3, padding=0)   # no padding: shapes disagree from conv1 on
    with pytest.raises(ValueError, match=r"model1's op 'relu1' .* shape \[2, 8, 10, 10\] but "
                                         r"model2's op 'conv1' outputs \[2, 8, 12, 12\]"):
        featuremap_similarity(other, qm, x)
    shared = SharedAct().eval()                   # a different model altogether
    with pytest.raises(ValueError, match=r"no counterpart in model1 \(SharedAct\): .*relu1"):
        featuremap_similarity(shared, qm, x)


def test_calibration_state_raises_with_the_fix(resnet_like) -> None:
    m, qm, _, x = resnet_like
    calib = copy.deepcopy(qm)
    qatkit.set_fake_quant_state(calib, "calibration")
    with pytest.raises(ValueError, match=r"model2 .* CALIBRATION state.*set_fake_quant_state\("
                                         r"model2, qatkit.FakeQuantState.VALIDATION\)"):
        featuremap_similarity(m, calib, x)


def _snapshot(model: nn.Module) -> tuple:
    return (copy.deepcopy(model.state_dict()),  # tensors and the fused modules' extra state
            [mod.training for mod in model.modules()],
            qatkit.get_fake_quant_state(model) if any(
                isinstance(mod, qatkit.FakeQuantize) for mod in model.modules()) else None)


def _assert_same(before: tuple, after: tuple) -> None:
    sd0, tr0, st0 = before
    sd1, tr1, st1 = after
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        same = torch.equal(sd0[k], sd1[k]) if isinstance(sd0[k], torch.Tensor) else \
            sd0[k] == sd1[k]
        assert same, f"{k} changed"
    assert tr0 == tr1 and st0 == st1


def test_models_are_not_mutated(resnet_like) -> None:
    m, qm, im, x = resnet_like
    float_train = copy.deepcopy(m).train()            # train mode: BN would update
    qat = copy.deepcopy(qm).train()
    qatkit.set_fake_quant_state(qat, "qat")              # observers would update
    snaps = [_snapshot(mod) for mod in (float_train, qat, im)]
    with pytest.warns(RuntimeWarning, match="QAT state"):
        featuremap_similarity(float_train, qat, x, method="PerLayer")
    featuremap_similarity(qm, im, x)
    for mod, snap in zip((float_train, qat, im), snaps, strict=True):
        _assert_same(snap, _snapshot(mod))
    assert float_train.training and qat.training


def test_threshold_returns_worse_rows_and_out_dir_writes_full_table(defect, tmp_path) -> None:
    m, qm, x = defect
    full = featuremap_similarity(m, qm, x, method="PerLayer")
    flagged = featuremap_similarity(m, qm, x, method="PerLayer", threshold=0.95,
                                    out_dir=tmp_path)
    assert list(flagged["Module Name"]) == ["conv2"]
    assert int(flagged["Index"].iloc[0]) == 2
    csv = (tmp_path / "featuremap_similarity.csv").read_text()
    txt = (tmp_path / "featuremap_similarity.txt").read_text()
    assert csv.splitlines()[0].split(",")[:4] == ["Index", "Module Name", "Module Type",
                                                  "Similarity"]
    assert len(csv.strip().splitlines()) == len(full) + 1
    assert "worse than 0.95" in txt and "conv3" in txt
    # MSE: higher is worse
    mse = featuremap_similarity(m, qm, x, similarity_func="MSE", method="PerLayer",
                                threshold=1.0)
    assert list(mse["Module Name"]) == ["conv2"]


def test_similarity_funcs_and_bad_arguments(resnet_like) -> None:
    m, qm, _, x = resnet_like
    sq = featuremap_similarity(m, qm, x, similarity_func="SQNR", method="PerLayer")
    assert (sq["Similarity"] > 20).all()
    flat = featuremap_similarity(m, qm, x, similarity_func=lambda a, b: float(a.numel()),
                                 method="PerLayer").set_index("Module Name")
    assert flat.loc["fc", "Similarity"] == 2 * 4
    cos = featuremap_similarity(m, qm, x, similarity_func="cos", method="PerLayer")  # alias
    default = featuremap_similarity(m, qm, x, method="PerLayer")
    assert cos["Similarity"].equals(default["Similarity"])
    with pytest.raises(ValueError, match="unknown similarity_func 'cosinus'.*Cosine"):
        featuremap_similarity(m, qm, x, similarity_func="cosinus")
    with pytest.raises(ValueError, match="unknown method 'layer'.*PerLayer"):
        featuremap_similarity(m, qm, x, method="layer")
    with pytest.raises(ValueError, match="devices takes one device or a pair"):
        featuremap_similarity(m, qm, x, devices=("cpu", "cpu", "cpu"))
    t = featuremap_similarity(m, qm, x, devices=("cpu", "cpu"))
    assert math.isnan(t["qscale"].iloc[-1]) is False
