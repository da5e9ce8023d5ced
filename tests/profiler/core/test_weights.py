"""compare_weights: BN folded like the QAT module, fake-quant and integer weights agree."""

from __future__ import annotations

import pytest
import qatkit
import torch
from qatkit.profiler import compare_weights
from qatkit.profiler.core.weights import WEIGHT_COLUMNS
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.up, self.bn2 = nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.bn2(self.up(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def models(calibrate):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    m = Net()
    for bn in (m.bn1, m.bn2):   # BatchNorms far from identity: folding matters
        bn.running_var.uniform_(0.2, 4.0)
        bn.running_mean.uniform_(-1, 1)
        bn.weight.data.uniform_(0.5, 2.0)
    m.eval()
    qm = calibrate(m, x)
    return m, qm, qatkit.convert_fx(qm)


def test_calibrated_weights_differ_by_quantization_only(models, tmp_path) -> None:
    m, qm, _ = models
    t = compare_weights(m, qm, out_dir=tmp_path)
    assert list(t.columns) == WEIGHT_COLUMNS
    t = t.set_index("Module Name")
    assert list(t.index) == ["conv1", "up", "fc"]
    assert t.loc["conv1", "Module Type"] == "ConvBnReLU2d"
    assert t.loc["up", "Module Type"] == "ConvTransposeBn2d"
    # per-channel min/max: at most half a step, one step where a channel's max clamps to 127
    assert (t["Error (N weight scale)"] <= 1.0 + 1e-4).all(), t
    assert (t["Similarity"] > 0.9999).all(), t
    assert (t["Max Abs Error"] <= t["Weight Scale"] * (1 + 1e-4)).all()
    # the reference is the folded weight: the unfolded one is off by far more than a step
    sf = (m.bn1.weight / torch.sqrt(m.bn1.running_var + m.bn1.eps)).detach()
    assert float((m.conv1.weight.detach() * (sf.view(-1, 1, 1, 1) - 1)).abs().max()) > 10 * t.loc[
        "conv1", "Weight Scale"]
    assert (tmp_path / "weight_comparison.csv").exists()
    assert "conv1" in (tmp_path / "weight_comparison.txt").read_text()


def test_integer_model_gives_the_same_numbers(models) -> None:
    m, qm, im = models
    a = compare_weights(m, qm)
    b = compare_weights(m, im)
    assert list(b["Module Type"]) == ["Quantized[conv2d]", "Quantized[conv_transpose2d]",
                                      "Quantized[linear]"]
    for col in ("Similarity", "Max Abs Error", "Weight Scale", "Error (N weight scale)"):
        assert b[col].tolist() == pytest.approx(a[col].tolist(), rel=1e-5, abs=1e-9), col


def test_metric_choice_and_mismatch(models) -> None:
    m, qm, _ = models
    sq = compare_weights(m, qm, similarity_func="SQNR")
    assert (sq["Similarity"] > 30).all()
    other = Net()
    other.conv1 = nn.Identity()
    with pytest.raises(ValueError, match=r"layer 'conv1' \(ConvBnReLU2d\) has no float conv"):
        compare_weights(other, qm)


def test_weight_correspondence(models) -> None:
    from qatkit.profiler.core.weights import check_weight_correspondence

    m, qm, im = models
    assert check_weight_correspondence(m, qm) == [] and check_weight_correspondence(m, im) == []
    other = Net().eval()
    other.load_state_dict(m.state_dict())
    with torch.no_grad():
        other.up.weight[0, 0, 0, 0] += 1e-3 * other.up.weight.abs().max()  # 1e-3 relative
    with pytest.raises(ValueError, match=r"layer 'up' has other weights \(max \|w2 - w1\| / "
                                         r"max \|w1\| = 0\.001 > 1e-05\)"):
        check_weight_correspondence(other, qm)
    assert check_weight_correspondence(other, qm, rtol=1e-2) == []
    assert check_weight_correspondence(other, qm, rtol=None) == []
