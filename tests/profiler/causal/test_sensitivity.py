"""get_sensitivity_of_nodes: the faulty quantizer comes first, the caller's model is never
changed, every data / model form and metric spelling of the NPU debug guides is accepted, and
bad input is a clear error.

The models are examples/debug_walkthrough.py's FaultNet, trained on the digits, with one
fault injected (same float function, one quantizer at fault).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import debug_walkthrough as dw  # noqa: E402  (tests/profiler/conftest.py: examples/)
import digits  # noqa: E402
import numpy as np
import pytest
import qatkit
import qatkit.profiler as qp
import torch
from qatkit.fake_quantize import FakeQuantize


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def trained():
    return dw.trained()


@pytest.fixture(scope="module")
def calibrated(fault_models):
    """fault -> calibrated model (one copy per module)."""
    cache: dict[str, torch.nn.Module] = {}

    def get(fault: str) -> torch.nn.Module:
        if fault not in cache:
            cache[fault] = fault_models(fault)[1]
        return cache[fault]
    return get


@pytest.fixture(scope="module")
def x(trained):
    return trained[0].train_x[:64]


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a tool could change: parameters, buffers, fake quant flags / states /
    scales / dtypes / observers, train flag."""
    state = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
             for k, v in model.state_dict().items()}
    fqs = {n: (m.enabled, m.state, m.dtype, m.bits, m.quant_min, m.quant_max,
               m.scale.clone() if m.has_scale else None, m.observer.bits)
           for n, m in model.named_modules() if isinstance(m, FakeQuantize)}
    return {"state": state, "fqs": fqs, "training": model.training,
            "modules": [n for n, _ in model.named_modules()]}


def assert_same(before: dict, after: dict) -> None:
    assert before["modules"] == after["modules"], "modules added or removed"
    assert before["training"] == after["training"], "train/eval flag changed"
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(after["state"][k], v, atol=0, rtol=0, msg=k)
        else:
            assert repr(after["state"][k]) == repr(v), k
    for n, b in before["fqs"].items():
        a = after["fqs"][n]
        assert a[:6] == b[:6] and a[7] == b[7], f"fake quant {n} changed: {b} -> {a}"
        if b[6] is not None:
            torch.testing.assert_close(a[6], b[6], atol=0, rtol=0, msg=n)


# -- efficacy ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", list(dw.FAULTS))
@pytest.mark.parametrize("mode", ["only_this_quantized",
                                  pytest.param("only_this_float", marks=pytest.mark.slow)])
def test_faulty_quantizer_is_in_the_top_3(calibrated, x, fault, mode):
    spec = dw.FAULTS[fault]
    calib = calibrated(fault)
    for node_type in (spec.node_type, "node"):
        res = qp.get_sensitivity_of_nodes(model_or_file=calib, metrics="cosine-similarity",
                                          calibrated_data=x, node_type=node_type,
                                          verbose=False, mode=mode)
        nodes = list(res.keys())
        assert spec.culprit in nodes[:3], f"{fault} ({node_type}, {mode}): top 3 {nodes[:3]}"
    # the fault is real: everything quantized, the output is far from float
    assert res.quantized_scores["Cosine"] < 0.9, res.quantized_scores


def test_ranking_order_table_and_scores(calibrated, x):
    calib = calibrated("outlier_channel")
    res = qp.get_sensitivity_of_nodes(calib, ["cosine-similarity", "mse"], x,
                                      node_type="activation", verbose=False)
    cos = [v["Cosine"] for v in res.values()]
    assert cos == sorted(cos), "most sensitive (lowest cosine) first"
    assert list(res.table["Module Name"]) == list(res.keys())
    assert list(res.table["Rank"]) == list(range(len(res)))
    assert res.key == "Cosine" and res.node_type == "activation"
    assert res.float_scores["Cosine"] == pytest.approx(1.0) and res.float_scores["MSE"] == 0
    # a quantizer alone on: the same number as the model with only it enabled, run in full
    work = copy.deepcopy(calib)
    with qatkit.fake_quant_enabled(work, False):
        ref = work(x)
        work.mid.activation_post_process.enabled = True
        out = work(x)
    assert res["mid"]["Cosine"] == qp.core.metrics.cosine(ref, out)
    assert res["mid"]["MSE"] == qp.core.metrics.mse(ref, out)
    assert res.quantizers[0].fake_quants == ("mid.activation_post_process",)


def test_weight_node_and_shared_quantizers(calibrated, x):
    calib = calibrated("shared_ranges")
    weights = qp.get_sensitivity_of_nodes(calib, "mse", x, node_type="weight", verbose=False)
    assert all(q.fake_quants[0].endswith("weight_fake_quant") for q in weights.quantizers)
    nodes = qp.get_sensitivity_of_nodes(calib, "mse", x, node_type="node", verbose=False)
    shared = next(q for q in nodes.quantizers if q.name == "shared")
    assert shared.shared and len(shared.nodes) == 2, shared
    assert set(shared.fake_quants) == {"shared.weight_fake_quant",
                                       "shared.activation_post_process"}


def test_incremental_runs_give_the_numbers_of_full_runs(calibrated, x):
    calib = calibrated("cat_ranges")
    for mode in ("only_this_quantized", "only_this_float"):
        inc = qp.get_sensitivity_of_nodes(calib, ["cosine", "mse"], x, node_type="node",
                                          verbose=False, mode=mode, data_num=16)
        full = qp.get_sensitivity_of_nodes(calib, ["cosine", "mse"], x, node_type="node",
                                           verbose=False, mode=mode, incremental=False,
                                           data_num=16)
        assert inc.incremental and not full.incremental
        assert dict(inc) == dict(full), mode


@pytest.mark.parametrize("spelling,name", [
    ("cosine-similarity", "Cosine"), ("mse", "MSE"), ("mre", "MRE"), ("sqnr", "SQNR"),
    ("chebyshev", "Chebyshev"), ("L1", "L1")])
def test_metric_spellings_of_the_guides(calibrated, x, spelling, name):
    res = qp.get_sensitivity_of_nodes(calibrated("outlier_channel"), metrics=spelling,
                                      calibrated_data=x, node_type="activation",
                                      verbose=False)
    assert res.key == name and list(res)[0] == "mid", (name, list(res)[:3])


def test_callable_metric_and_eval_fn(calibrated, trained, x):
    data, _ = trained
    calib = calibrated("outlier_channel")

    def max_logit_gap(ref, out):
        return float((ref - out).abs().max())
    max_logit_gap.higher_is_better = False

    def accuracy(model):
        return digits.evaluate(model, (data.test_x[:120], data.test_y[:120]))

    res = qp.get_sensitivity_of_nodes(calib, max_logit_gap, x, node_type="activation",
                                      verbose=False, eval_fn=accuracy)
    assert res.key == "accuracy", "the eval_fn ranks"
    assert list(res)[0] == "mid" and res["mid"]["accuracy"] < 0.5
    assert set(res["mid"]) == {"max_logit_gap", "accuracy"}
    assert res.float_scores["accuracy"] > 0.95
    # eval_fn alone, without data
    alone = qp.get_sensitivity_of_nodes(calib, calibrated_data=None, node_type="activation",
                                        verbose=False, eval_fn=accuracy,
                                        interested_nodes=["mid", "conv_a"])
    assert list(alone) == ["mid", "conv_a"] and set(alone["mid"]) == {"accuracy"}


def test_output_node_and_data_num(calibrated, x):
    calib = calibrated("cat_ranges")
    at_cat = qp.get_sensitivity_of_nodes(calib, "cosine", x, output_node="cat",
                                         node_type="activation", verbose=False)
    assert list(at_cat)[0] == "cat"
    # ops after cat do not reach the scored value: switching them changes nothing
    assert at_cat["fc_a"]["Cosine"] == pytest.approx(1.0)
    by_index = qp.get_sensitivity_of_nodes(calib, "cosine", x, output_node=0,
                                           node_type="activation", verbose=False)
    whole = qp.get_sensitivity_of_nodes(calib, "cosine", x, node_type="activation",
                                        verbose=False)
    assert dict(by_index) == dict(whole)
    cut = qp.get_sensitivity_of_nodes(calib, "cosine", x, node_type="activation",
                                      verbose=False, data_num=10)
    first10 = qp.get_sensitivity_of_nodes(calib, "cosine", x[:10], node_type="activation",
                                          verbose=False)
    assert dict(cut) == dict(first10)


def test_every_data_form_and_a_saved_model(calibrated, x, tmp_path):
    calib = calibrated("shared_ranges")
    ref = dict(qp.get_sensitivity_of_nodes(calib, "mse", [x[:32], x[32:]],
                                           node_type="activation", verbose=False))
    labels = torch.zeros(len(x), dtype=torch.long)
    folder_pt, folder_npy = tmp_path / "pt", tmp_path / "npy"
    folder_pt.mkdir()
    folder_npy.mkdir()
    for i, chunk in enumerate((x[:32], x[32:])):
        torch.save(chunk, folder_pt / f"{i}.pt")
        np.save(folder_npy / f"{i}.npy", chunk.numpy())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels),
                                         batch_size=32)
    path = tmp_path / "calib.pt"
    torch.save(calib, path)
    for model, data in ((calib, (x,)), (calib, x), (calib, loader), (calib, str(folder_pt)),
                        (calib, folder_npy), (path, [x[:32], x[32:]]),
                        (str(path), x)):
        got = qp.get_sensitivity_of_nodes(model_or_file=model, metrics="mse",
                                          calibrated_data=data, node_type="activation",
                                          verbose=False)
        assert list(got) == list(ref), type(data)
        for k in ref:
            assert got[k]["MSE"] == pytest.approx(ref[k]["MSE"], rel=1e-5), (type(data), k)


def test_save_dir_and_progress_bar(calibrated, x, tmp_path, capsys):
    res = qp.get_sensitivity_of_nodes(calibrated("cat_ranges"), "cosine", x,
                                      node_type="weight", verbose=True, save_dir=tmp_path)
    err = capsys.readouterr().err
    assert "sensitivity (weight)" in err, "a tqdm bar over the nodes"
    assert {p.name for p in map(Path, res.paths)} == {"sensitivity_weight.csv",
                                                      "sensitivity_weight.txt"}
    assert "conv_h" in (tmp_path / "sensitivity_weight.txt").read_text()
    qp.get_sensitivity_of_nodes(calibrated("cat_ranges"), "cosine", x, node_type="weight",
                                verbose=False)
    assert capsys.readouterr().err == "", "verbose=False is silent"


# -- the caller's model ------------------------------------------------------------------------
def test_the_model_passed_in_is_never_changed(calibrated, x):
    calib = calibrated("cat_ranges")
    with torch.no_grad():
        out_before = calib(x)
    calib.train()  # a flag the tools must not flip
    before = snapshot(calib)
    try:
        for mode in ("only_this_quantized", "only_this_float"):
            qp.get_sensitivity_of_nodes(calib, "cosine", x, node_type="node", mode=mode,
                                        verbose=False)

        def boom(model):
            raise RuntimeError("eval_fn failed")
        with pytest.raises(RuntimeError, match="eval_fn failed"):
            qp.get_sensitivity_of_nodes(calib, "cosine", x, node_type="node", verbose=False,
                                        eval_fn=boom)
        calls = []

        def fails_later(model):
            calls.append(1)
            if len(calls) > 3:
                raise ValueError("late failure")
            return 0.5
        with pytest.raises(ValueError, match="late failure"):
            qp.get_sensitivity_of_nodes(calib, None, None, node_type="node", verbose=False,
                                        eval_fn=fails_later)
        assert_same(before, snapshot(calib))
    finally:
        calib.eval()
    with torch.no_grad():
        torch.testing.assert_close(calib(x), out_before, atol=0, rtol=0)


def test_qat_state_model_is_analysed_in_validation_on_a_copy(trained, x):
    data, float_model = trained
    calib = dw.calibrated(dw.with_fault(float_model, "outlier_channel"), data)
    qatkit.set_fake_quant_state(calib, "qat")
    before = snapshot(calib)
    res = qp.get_sensitivity_of_nodes(calib, "cosine", x, node_type="activation",
                                      verbose=False)
    assert list(res)[0] == "mid"
    assert_same(before, snapshot(calib))


# -- hybrid, preserve_qat_mode, integer -------------------------------------------------------
def test_hybrid_model(trained, x):
    data, float_model = trained
    hybrid = dw.calibrated(dw.with_fault(float_model, "outlier_channel"), data, hybrid=True,
                           hybrid_dict={"module_name": ["conv_p"]})
    res = qp.get_sensitivity_of_nodes(hybrid, "cosine", x, node_type="node", verbose=False)
    assert "conv_p" not in res, "a float island has no quantizer"
    assert list(res)[0] == "mid"


def test_preserve_qat_mode_model(calibrated, x):
    calib = copy.deepcopy(calibrated("cat_ranges"))
    qatkit.set_preserve_qat_mode(calib, ["cat", "conv_h"])
    converted = qatkit.convert_fx(calib)
    res = qp.get_sensitivity_of_nodes(converted, "cosine", x, node_type="node", verbose=False)
    assert set(res) == {"cat", "conv_h"}, "the ops kept in fake-quant form are the quantizers"
    assert list(res)[0] == "cat"
    assert res.quantized_scores["Cosine"] < 0.9


def test_integer_model_is_refused_with_the_fix(calibrated, x):
    integer = qatkit.convert_fx(copy.deepcopy(calibrated("cat_ranges")))
    with pytest.raises(ValueError, match="set_preserve_qat_mode"):
        qp.get_sensitivity_of_nodes(integer, "cosine", x, verbose=False)


# -- bad input -------------------------------------------------------------------------------
def test_unknown_node_names_suggest_the_closest(calibrated, x):
    with pytest.raises(ValueError, match=r"unknown interested_nodes entry 'conv_hh'.*conv_h"):
        qp.get_sensitivity_of_nodes(calibrated("cat_ranges"), "cosine", x,
                                    interested_nodes=["conv1", "conv_hh"], verbose=False)
    with pytest.raises(ValueError, match=r"output_node='fc_aa'.*fc_a"):
        qp.get_sensitivity_of_nodes(calibrated("cat_ranges"), "cosine", x,
                                    output_node="fc_aa", verbose=False)


def test_a_model_never_calibrated(trained, x):
    data, float_model = trained
    prepared = qatkit.prepare_qat_fx(copy.deepcopy(float_model),
                                     {"": qatkit.default_calib_8bit_fake_quant_qconfig},
                                     example_inputs=(x[:2],)).eval()
    qatkit.set_fake_quant_state(prepared, "validation")
    with pytest.raises(ValueError, match=r"never calibrated.*qatkit.calibrate"):
        qp.get_sensitivity_of_nodes(prepared, "cosine", x, verbose=False)
    qatkit.set_fake_quant_state(prepared, "calibration")
    with pytest.raises(ValueError, match="CALIBRATION state"):
        qp.get_sensitivity_of_nodes(prepared, "cosine", x, verbose=False)
    with pytest.raises(ValueError, match="not made by qatkit.prepare_qat_fx"):
        qp.get_sensitivity_of_nodes(float_model, "cosine", x, verbose=False)


def test_data_that_does_not_fit(calibrated, x, tmp_path):
    calib = calibrated("cat_ranges")
    with pytest.raises(ValueError, match=r"calibrated_data does not fit model_or_file"):
        qp.get_sensitivity_of_nodes(calib, "cosine", torch.randn(4, 3, 16, 16), verbose=False)
    with pytest.raises(ValueError, match=r"cannot use a int as data"):
        qp.get_sensitivity_of_nodes(calib, "cosine", 5, verbose=False)
    with pytest.raises(ValueError, match="holds no .pt / .npy"):
        qp.get_sensitivity_of_nodes(calib, "cosine", str(tmp_path), verbose=False)
    with pytest.raises(ValueError, match="pass calibrated_data"):
        qp.get_sensitivity_of_nodes(calib, "cosine", None, verbose=False)
    with pytest.raises(ValueError, match="no file at"):
        qp.get_sensitivity_of_nodes(str(tmp_path / "missing.pt"), "cosine", x, verbose=False)


@pytest.mark.parametrize("value", [None, "0.9", {"acc": 0.9}, True, torch.ones(3)])
def test_eval_fn_that_returns_a_non_number(calibrated, x, value):
    with pytest.raises(TypeError, match="eval_fn must return a number"):
        qp.get_sensitivity_of_nodes(calibrated("cat_ranges"), "cosine", x, verbose=False,
                                    eval_fn=lambda m: value)


def test_bad_arguments(calibrated, x):
    calib = calibrated("cat_ranges")
    with pytest.raises(ValueError, match="node_type='layer'"):
        qp.get_sensitivity_of_nodes(calib, "cosine", x, node_type="layer", verbose=False)
    with pytest.raises(ValueError, match="mode="):
        qp.get_sensitivity_of_nodes(calib, "cosine", x, mode="both", verbose=False)
    with pytest.raises(ValueError, match="unknown similarity_func 'cosinus'"):
        qp.get_sensitivity_of_nodes(calib, "cosinus", x, verbose=False)
    with pytest.raises(ValueError, match="data_num"):
        qp.get_sensitivity_of_nodes(calib, "cosine", x, data_num=0, verbose=False)


def test_nan_scores_rank_first():
    from qatkit.profiler.causal.sensitivity import _rank
    assert _rank([0.9, math.nan, 0.5], higher_is_better=True, best_first=False) == [1, 2, 0]
    assert _rank([0.9, math.nan, 0.5], higher_is_better=True, best_first=True) == [0, 2, 1]
    assert _rank([0.1, 0.3], higher_is_better=False, best_first=False) == [1, 0]


@pytest.mark.parametrize("fault", list(dw.FAULTS))
def test_leaving_the_top_nodes_float_recovers(calibrated, x, fault, tmp_path):
    calib = calibrated(fault)
    nodes = list(qp.get_sensitivity_of_nodes(calib, "cosine-similarity", x, node_type="node",
                                             verbose=False))
    sweep = qp.plot_acc_error(save_dir=tmp_path, calibrated_data=x, model_or_file=calib,
                              non_quantize_node=[nodes[:1], nodes[:2], nodes[:3]],
                              metric="cosine-similarity", verbose=False)
    cos = list(sweep.tables["non_quantize"]["Cosine"])
    assert cos[0] < 0.9 and max(cos[1:3]) > 0.99, (fault, nodes[:3], cos)


def test_a_fake_quant_switched_off_stays_off(calibrated, x):
    """cat's fake quant switched off by the user: not ranked, and the model's score is the
    output with cat float: far better than with cat quantized (the fault's main damage), yet
    not healthy (conv_h's weights still hurt)."""
    with torch.no_grad(), qatkit.fake_quant_enabled(copy.deepcopy(calibrated("cat_ranges")),
                                                    False) as ref_model:
        ref = ref_model(x)
    with torch.no_grad():
        cat_on = qp.core.metrics.cosine(ref, calibrated("cat_ranges")(x))
    calib = copy.deepcopy(calibrated("cat_ranges"))
    qatkit.set_fake_quant_enabled(calib, False, ["cat.activation_post_process"])
    res = qp.get_sensitivity_of_nodes(calib, "cosine", x, node_type="activation",
                                      verbose=False)
    assert "cat" not in res, "not a quantizer of the model as given"
    with torch.no_grad():
        out = calib(x)
    assert res.quantized_scores["Cosine"] == pytest.approx(
        qp.core.metrics.cosine(ref, out), abs=1e-9)
    # measured on an AVX2 CPU: cat quantized -0.05, cat float 0.29
    assert cat_on + 0.2 < res.quantized_scores["Cosine"] < 0.9, (cat_on, res.quantized_scores)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda(calibrated, x):
    calib = calibrated("outlier_channel")
    res = qp.get_sensitivity_of_nodes(calib, "cosine", x, node_type="activation",
                                      verbose=False, device="cuda")
    cpu = qp.get_sensitivity_of_nodes(calib, "cosine", x, node_type="activation",
                                      verbose=False)
    assert list(res)[0] == "mid" == list(cpu)[0]
    assert next(calib.parameters()).device.type == "cpu", "the model passed in stays put"
