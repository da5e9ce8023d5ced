"""profile_featuremap and outlier_channels: exact numbers, sorting, the defect layer, files."""

from __future__ import annotations

import math
import warnings

import pytest
import qatkit
import torch
from qatkit.profiler import FeatureRecord, get_raw_features, outlier_channels, profile_featuremap
from qatkit.profiler.core.statistics import OUTLIER_COLUMNS, STAT_COLUMNS
from torch import nn


def rec(name: str, data: torch.Tensor, scale: float | None = None, dtype: str = "float32",
        attr: str = "output") -> FeatureRecord:
    return FeatureRecord(name, "T", attr, 0, data, scale, dtype)


def test_statistics_numbers() -> None:
    inf, nan = float("inf"), float("nan")
    records = [
        rec("q", torch.tensor([-1.0, 0.5, 2.0, nan, inf]), 1 / 64, "qint8"),
        rec("f", torch.tensor([1.0, 3.0])),
        rec("i", torch.tensor([-100, 5, 127], dtype=torch.int32), 0.1, "qint8"),
    ]
    table, by_range = profile_featuremap(records)
    assert list(table.columns) == STAT_COLUMNS
    q, f, i = (table.iloc[k] for k in range(3))
    assert (q["Min"], q["Max"], q["Mean"]) == (-1.0, 2.0, 0.5)
    assert q["Var"] == pytest.approx(1.5)             # over the finite values, population
    assert q["Range (steps)"] == pytest.approx(128.0)  # 2.0 / (1/64): int8 cannot hold it
    assert q["Saturation Ratio"] == pytest.approx(2 / 5)  # 2.0 -> 128 and +inf
    assert (q["NaN"], q["Inf"], q["Dtype"], q["Scale"]) == (1, 1, "qint8", 1 / 64)
    assert math.isnan(f["Scale"]) and math.isnan(f["Range (steps)"])
    assert math.isnan(f["Saturation Ratio"]) and f["Var"] == 1.0
    # integer records (preserve_int) are in steps already
    assert i["Range (steps)"] == 127.0 and i["Saturation Ratio"] == pytest.approx(1 / 3)
    assert list(by_range["Module Name"]) == ["q", "i", "f"]


def test_all_nan_tensor_is_reported() -> None:
    table, _ = profile_featuremap([rec("n", torch.full((4,), float("nan")), 0.1, "qint8")])
    row = table.iloc[0]
    assert row["NaN"] == 4 and math.isnan(row["Min"]) and math.isnan(row["Range (steps)"])


class DefectNet(nn.Module):
    """conv2 makes a few activations ~1000x the rest (see test_similarity.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(8, 8, 1), nn.ReLU()
        self.conv3, self.relu3 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.relu3(self.conv3(self.relu2(self.conv2(x))))


def test_defect_layer_has_the_largest_range_in_steps(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    m = DefectNet().eval()
    with torch.no_grad():
        a = m.relu1(m.bn1(m.conv1(x)))[:, 0]
        m.conv2.weight[0].zero_()
        m.conv2.weight[0, 0] = 1000.0
        m.conv2.bias[0] = -1000.0 * torch.quantile(a.flatten(), 0.98)
    qc = qatkit.get_default_qconfig(activation_observer="percentile",
                                    activation_qkwargs={"percentile": 99.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(m, {"": qc}, example_inputs=(x,)).eval()
    qatkit.set_fake_quant_state(qm, "calibration")
    with torch.no_grad():
        qm(x)
    qatkit.set_fake_quant_state(qm, "validation")
    # VALIDATION: a fake-quant op's output is described before its fake quant clamps it
    records = get_raw_features(qm, x)
    out = next(r for r in records if r.name == "conv2" and r.attr == "output")
    assert out.unquantized is not None and out.data.abs().max() <= 128 * out.scale
    table, by_range = profile_featuremap(records, out_dir=tmp_path, file_name="stats")
    top = by_range.iloc[0]
    assert (top["Module Name"], top["Attr"]) == ("conv2", "output")
    assert top["Range (steps)"] > 5000  # int8 holds 127
    q = torch.round(out.unquantized / out.scale)
    assert top["Saturation Ratio"] == pytest.approx(float((q > 127).float().mean()))
    assert top["Saturation Ratio"] > 0
    rest = table[~table["Module Name"].isin(["conv2", "conv3"])]
    assert rest["Range (steps)"].max() < 1000
    assert (tmp_path / "stats.csv").read_text().splitlines()[0].startswith("Module Name,")
    txt = (tmp_path / "stats.txt").read_text()
    assert "Sorted by range (steps)" in txt and "conv2" in txt


def test_outlier_channel_levels(tmp_path) -> None:
    maxima = torch.tensor([64.0, 1.0, 1.0, 8.0, 16.0, 32.0, 0.0, 64.0])
    t = torch.zeros(1, 8, 2, 2)
    t[0, :, 0, 0] = -maxima                      # |x| counts
    t3 = t.flatten(2).transpose(1, 2)            # [B, T=4, C=8]: channels last
    table = outlier_channels([rec("nchw", t), rec("btc", t3), rec("vec", torch.ones(3))],
                             out_dir=tmp_path)
    assert list(table.columns) == OUTLIER_COLUMNS
    assert list(table["Module Name"]) == ["nchw", "btc"]   # 1-D skipped
    for _, row in table.iterrows():
        # levels log2(64 / m): 0, 6, 6, 3, 2, 1, (zero channel skipped), 0
        assert row["Channels"] == 8
        assert [row[f"Level>={k}"] for k in (3, 4, 5, 6)] == [3, 2, 2, 2]
        assert row["Max Level"] == pytest.approx(6.0)
    forced = outlier_channels([rec("btc", t3)], channel_axis=1)
    assert forced.iloc[0]["Channels"] == 4
    assert (tmp_path / "outlier_channels.csv").exists()
    assert (tmp_path / "outlier_channels.txt").exists()


def test_saturation_counts_what_the_fake_quant_rounds_beyond_the_grid() -> None:
    """The count by thresholds equals rounding every value as the fake quant does,
    round(x * float32(1 / s)), values exactly at half steps included."""
    torch.manual_seed(0)
    for scale in (1 / 128, 0.0173, 3.7, 1e-4):
        inv = 1.0 / torch.tensor(scale, dtype=torch.float32)
        half = (torch.tensor([127.5, -128.5, 126.5, -127.5]) / inv).float()
        up, down = torch.full_like(half, math.inf), torch.full_like(half, -math.inf)
        x = torch.cat([torch.randn(5000) * 60 * scale, half, torch.nextafter(half, up),
                       torch.nextafter(half, down)])
        q = torch.round(x * inv)
        for unq, expected in ((x, (q < -128) | (q > 127)), (None, (q <= -128) | (q >= 127))):
            r = FeatureRecord("t", "T", "output", 0, x, scale, "qint8", unq)
            got = profile_featuremap([r]).table.iloc[0]["Saturation Ratio"]
            assert got == int(expected.sum()) / x.numel(), scale


def test_kind_and_source_columns_and_one_measure_per_tensor() -> None:
    data = torch.randn(2, 4, 3, 3)
    recs = [FeatureRecord("conv", "Conv2d", "output", 0, data, None, "float32", kind="conv",
                          role="float"),
            FeatureRecord("relu", "ReLU", "input", 0, data, None, "float32", kind="relu",
                          role="float", source="conv", source_kind="conv")]
    table = profile_featuremap(recs).table
    assert table["Op Kind"].tolist() == ["conv", "relu"]
    assert table["Source"].isna().tolist() == [True, False]   # an output has no source
    assert table.iloc[1][["Source", "Source Kind"]].tolist() == ["conv", "conv"]
    numbers = ["Min", "Max", "Mean", "Var"]
    assert table.iloc[0][numbers].tolist() == table.iloc[1][numbers].tolist()
    assert table.iloc[0]["Var"] == pytest.approx(float(data.double().var(unbiased=False)))
    assert outlier_channels(recs)["Op Kind"].tolist() == ["conv", "relu"]
