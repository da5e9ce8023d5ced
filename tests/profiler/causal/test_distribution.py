"""plot_distribution: per-node histograms with a unimodality verdict and per-channel box plots
with the channel range spread (per-tensor risk), as PNG + SVG + table."""

from __future__ import annotations

import debug_walkthrough as dw  # noqa: E402  (tests/profiler/conftest.py: examples/)
import digits  # noqa: E402
import pytest
import qatkit.profiler as qp
import torch
from qatkit.profiler.causal.distribution import count_modes


@pytest.fixture(scope="module")
def setup(fault_models):
    return fault_models("outlier_channel")[1], dw.trained()[0].train_x[:64]


def test_outlier_channel_is_a_per_tensor_risk(setup, tmp_path):
    calib, x = setup
    with digits.torch_threads(1):
        res = qp.plot_distribution(save_dir=tmp_path, model_or_file=calib, calibrated_data=x,
                                   nodes_list=["mid", "conv_a.activation_post_process"],
                                   verbose=False)
    t = res.table.set_index("Fake Quant")
    assert list(t.index) == ["mid.weight_fake_quant", "mid.activation_post_process",
                             "conv_a.activation_post_process"]
    mid = t.loc["mid.activation_post_process"]
    assert mid["Tensor"] == "activation" and mid["Channels"] == 16
    # channel 3 is 512x the others: a spread of about 2^9
    assert 8.0 < mid["Channel Spread (log2)"] < 10.5, mid["Channel Spread (log2)"]
    assert bool(mid["Per-Tensor Risk"]) and "per-tensor at risk" in mid["Verdict"]
    assert mid["Median Channel Levels"] < 1.0, "the median channel gets under one int8 level"
    assert mid["Max"] == pytest.approx(float(_mid_output(calib, x).max()), rel=1e-6)
    ok = t.loc["conv_a.activation_post_process"]
    assert not ok["Per-Tensor Risk"] and ok["Channel Spread (log2)"] < 3
    assert bool(mid["Resolution Risk"]) and mid["Median Value Levels"] < 0.1
    assert not ok["Resolution Risk"] and ok["Median Value Levels"] > 8
    w = t.loc["mid.weight_fake_quant"]
    assert w["Tensor"] == "weight" and not w["Per-Tensor Risk"], "per-channel weights absorb it"
    assert "per-channel scales absorb" in w["Verdict"]
    for path in ("mid.activation_post_process", "mid.weight_fake_quant"):
        png, svg = res.figures[path]
        assert png.exists() and svg.exists() and png.suffix == ".png" and svg.suffix == ".svg"
    assert (tmp_path / "distribution.csv").exists() and (tmp_path / "distribution.txt").exists()


def _mid_output(calib, x):
    """mid's float output (fake quants off), as the tool collects it."""
    import qatkit
    seen = []
    h = calib.mid.activation_post_process.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].detach()))
    try:
        with torch.no_grad(), qatkit.fake_quant_enabled(calib, False):
            calib(x)
    finally:
        h.remove()
    return seen[0]


def test_modes_verdict():
    g = torch.Generator().manual_seed(0)
    one = torch.randn(20000, generator=g)
    two = torch.cat([torch.randn(10000, generator=g) - 6, torch.randn(10000, generator=g) + 6])
    assert count_modes(torch.histc(one, 128)) == 1
    assert count_modes(torch.histc(two, 128)) == 2
    assert count_modes(torch.zeros(128)) == 0


def test_bad_names_and_unchanged_model(setup, tmp_path):
    calib, x = setup
    before = [m.enabled for m in calib.modules() if isinstance(m, qp.causal.switches.FakeQuantize)]
    with pytest.raises(ValueError, match=r"unknown nodes_list entry 'mdi'.*mid"):
        qp.plot_distribution(tmp_path, calib, x, nodes_list=["mdi"], verbose=False)
    with pytest.raises(ValueError, match="does not fit"):
        qp.plot_distribution(tmp_path, calib, torch.randn(2, 2, 4, 4), nodes_list=["mid"],
                             verbose=False)
    after = [m.enabled for m in calib.modules() if isinstance(m, qp.causal.switches.FakeQuantize)]
    assert before == after and all(after)


def test_a_weight_outlier_inside_channels_is_a_resolution_risk(tmp_path):
    data, float_model = dw.trained()
    with digits.torch_threads(1):
        calib = dw.calibrated(dw.with_fault(float_model, "weight_outlier"), data)
        res = qp.plot_distribution(tmp_path, calib, data.train_x[:8],
                                   nodes_list=["conv2.weight_fake_quant",
                                               "conv_h.weight_fake_quant"],
                                   verbose=False)
    t = res.table.set_index("Fake Quant")
    bad = t.loc["conv2.weight_fake_quant"]
    assert bool(bad["Resolution Risk"]) and not bad["Per-Tensor Risk"]
    assert bad["Median Value Levels"] < 0.5 and "an outlier sets the scale" in bad["Verdict"]
    assert not t.loc["conv_h.weight_fake_quant"]["Resolution Risk"]
