"""plot_acc_error: the cumulative error curves (which kind of quantizer dominates) and the
partial un-quantization sweep (leaving the culprit float brings the output back), written as
PNG + SVG + table; the model passed in is never changed."""

from __future__ import annotations

import debug_walkthrough as dw  # noqa: E402  (tests/profiler/conftest.py: examples/)
import pytest
import qatkit.profiler as qp
import torch
from qatkit.profiler.core.metrics import cosine


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def setup(fault_models):
    data, _ = dw.trained()
    models = {f: fault_models(f)[1] for f in ("weight_outlier", "outlier_channel")}
    return data.train_x[:64], models


def _files(res, key):
    png, svg = res.figures[key]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()
    return png, svg


def test_weight_vs_activation_curves_show_which_kind_dominates(setup, tmp_path):
    x, models = setup
    res = qp.plot_acc_error(save_dir=tmp_path, calibrated_data=x,
                            model_or_file=models["weight_outlier"],
                            quantize_node=["weight", "activation"], metric="cosine-similarity",
                            average_mode=False, verbose=False)
    table = res.tables["quantize"]
    w, a = "only weights quantized", "only activations quantized"
    assert list(table.columns) == ["Index", "Module Name", "Op Kind", w, a]
    assert table["Module Name"].iloc[-1] == "output"
    out = table.iloc[-1]
    assert out[w] < 0.5 < 0.95 < out[a], "the weight outlier: weights dominate"
    conv2 = table[table["Module Name"] == "conv2"].iloc[0]
    assert conv2[w] < 0.5, "the error appears at conv2's output"
    before = table[table["Index"] < conv2["Index"]]
    assert (before[w] > 0.99).all(), "and not before it"
    _files(res, "quantize")
    assert {p.name for p in res.paths} >= {"acc_error_quantize.csv", "acc_error_quantize.txt",
                                           "acc_error_quantize.png", "acc_error_quantize.svg"}
    # the activation-dominated fault shows the other way round
    res2 = qp.plot_acc_error(tmp_path / "b", x, models["outlier_channel"], verbose=False)
    out2 = res2.tables["quantize"].iloc[-1]
    assert out2[a] < 0.5 < 0.9 < out2[w]


def test_curve_value_is_the_metric_of_that_op_output(setup, tmp_path):
    x, models = setup
    model = models["outlier_channel"]
    res = qp.plot_acc_error(tmp_path, x, model, quantize_node=["node"], verbose=False)
    table = res.tables["quantize"]
    with torch.no_grad(), qatkit_enabled(model, False):
        ref = model(x)
    with torch.no_grad():
        out = model(x)
    got = table.iloc[-1]["everything quantized"]
    assert got == pytest.approx(cosine(ref, out), abs=1e-6)


def qatkit_enabled(model, value):
    import qatkit
    return qatkit.fake_quant_enabled(model, value)


def test_partial_unquantization_recovers(setup, tmp_path):
    x, models = setup
    model = models["weight_outlier"]
    nodes = list(qp.get_sensitivity_of_nodes(model_or_file=model, metrics="cosine-similarity",
                                             calibrated_data=x, node_type="weight",
                                             verbose=False))
    res = qp.plot_acc_error(save_dir=tmp_path, calibrated_data=x, model_or_file=model,
                            non_quantize_node=[nodes[:1], nodes[:2], nodes[:3]],
                            metric="cosine-similarity", verbose=False, node_type="weight")
    table = res.tables["non_quantize"]
    assert list(table["Count"]) == [0, 1, 2, 3]
    assert table["Left Float"].iloc[1] == "conv2"
    cos = list(table["Cosine"])
    # conv2's weights are the culprit: float, they remove most of the output error (1 - cos
    # measured 0.96 -> 0.027 on an AVX2 CPU); the rest is conv1's activation (the outlier's
    # channel is 1000x smaller there and rounds to zero), which a weight sweep leaves
    # quantized, and what it costs depends on the float training (so on the CPU)
    assert cos[0] < 0.5 and 1 - cos[1] < 0.05 * (1 - cos[0]), cos
    assert "quantize" not in res.tables, "only the sweep was asked for"
    _files(res, "non_quantize")
    # average_mode: the mean of per-batch metrics (batches of 32)
    avg = qp.plot_acc_error(tmp_path / "avg", [x[:32], x[32:]], model,
                            non_quantize_node=[["conv2"]], average_mode=True, verbose=False,
                            node_type="weight")
    avg_cos = list(avg.tables["non_quantize"]["Cosine"])
    assert 1 - avg_cos[1] < 0.05 * (1 - avg_cos[0]), avg_cos
    # a fake quant path leaves only that fake quant float
    one = qp.plot_acc_error(tmp_path / "one", x, model,
                            non_quantize_node=[["conv2.weight_fake_quant"]], verbose=False)
    assert one.tables["non_quantize"]["Cosine"].iloc[1] == cos[1]
    # an op name with node_type "node": its weight and its activation left float
    both = qp.plot_acc_error(tmp_path / "both", x, model, non_quantize_node=[["conv2"]],
                             verbose=False)
    assert both.tables["non_quantize"]["Cosine"].iloc[1] != cos[1]
    with pytest.raises(ValueError, match="node_type="):
        qp.plot_acc_error(tmp_path, x, model, non_quantize_node=[["conv2"]], node_type="w")


def test_unknown_names_and_model_unchanged(setup, tmp_path):
    x, models = setup
    model = models["outlier_channel"]
    before = {k: v.clone() for k, v in model.state_dict().items()
              if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"unknown non_quantize_node entry 'midd'.*mid"):
        qp.plot_acc_error(tmp_path, x, model, non_quantize_node=[["midd"]], verbose=False)
    with pytest.raises(ValueError, match=r"unknown quantize_node entry 'conv_x'"):
        qp.plot_acc_error(tmp_path, x, model, quantize_node=[["conv_x"]], verbose=False)
    qp.plot_acc_error(tmp_path, x, model, quantize_node=["weight", ["mid"]],
                      non_quantize_node=[["mid"]], verbose=False)
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, before[k], atol=0, rtol=0, msg=k)
    assert all(m.enabled for m in model.modules() if isinstance(m, qp.causal.switches.FakeQuantize))
