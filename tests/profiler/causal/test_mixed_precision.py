"""suggest_mixed_precision: the configuration it returns, passed to prepare_qat_fx and
calibrated, reaches the target with at most 3 layers changed (each injected fault of
examples/debug_walkthrough.py); float islands through hybrid_dict; an unreachable target is
said so; the model passed in is never changed."""

from __future__ import annotations

import copy

import debug_walkthrough as dw  # noqa: E402  (tests/profiler/conftest.py: examples/)
import digits  # noqa: E402
import pytest
import qatkit
import qatkit.profiler as qp
import torch
from qatkit.profiler.core.metrics import cosine


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def faulty(fault_models):
    cache: dict = {}

    def get(fault: str):  # one copy per module, as before
        if fault not in cache:
            cache[fault] = fault_models(fault)
        return cache[fault]
    return get


@pytest.fixture(scope="module")
def data():
    return dw.trained()[0]


def _cosine(float_model, qmodel, x):
    with torch.no_grad():
        return cosine(float_model(x), qmodel(x))


def test_cosine_target_and_the_qconfig_it_returns(faulty, data):
    float_model, calib = faulty("weight_outlier")
    x = data.train_x[:128]
    before = {k: v.clone() for k, v in calib.state_dict().items() if isinstance(v, torch.Tensor)}
    res = qp.suggest_mixed_precision(calib, x, target=0.999, metric="cosine", verbose=False)
    assert res.reached and res.final_score >= 0.999 > res.initial_score, res
    assert res.layers_changed[0] == "conv2" and len(res.layers_changed) <= 3, res
    assert res.steps[0].change == "int16 weight", res.steps
    assert res.hybrid_dict is None and res.prepare_kwargs["hybrid"] is False
    assert res.key == "Cosine" and res.float_score == pytest.approx(1.0)
    assert list(res.table.columns) == ["Step", "Module Name", "Change", "Cosine", "Candidates"]
    # the qconfig_dict, given to prepare_qat_fx and calibrated, gives what was emulated
    fixed = dw.calibrated(float_model, data, **res.prepare_kwargs)
    assert fixed.conv2.weight_fake_quant.dtype == "qint16"
    assert calib.conv2.weight_fake_quant.dtype == "qint8"
    got = _cosine(float_model, fixed, x)
    assert got >= 0.999
    assert got == pytest.approx(res.final_score, abs=2e-4)
    # the caller's model is unchanged
    for k, v in calib.state_dict().items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, before[k], atol=0, rtol=0, msg=k)
    assert all(m.dtype == "qint8" and m.enabled for m in calib.modules()
               if isinstance(m, qatkit.FakeQuantize))


@pytest.mark.parametrize("fault", [
    "shared_ranges",
    pytest.param("cat_ranges", marks=pytest.mark.slow),
    pytest.param("outlier_channel", marks=pytest.mark.slow),
    pytest.param("weight_outlier", marks=pytest.mark.slow)])
def test_accuracy_target_with_at_most_3_layers(faulty, data, fault):
    float_model, calib = faulty(fault)

    def accuracy(model):
        return digits.evaluate(model, (data.test_x, data.test_y))
    float_acc = accuracy(float_model)
    assert accuracy(calib) < 0.95 * float_acc, "the fault costs accuracy"
    res = qp.suggest_mixed_precision(calib, data.train_x[:128], target=0.99 * float_acc,
                                     eval_fn=accuracy, max_layers=3, verbose=False)
    assert res.reached and res.key == "accuracy" and len(res.layers_changed) <= 3, res
    assert dw.FAULTS[fault].culprit in res.layers_changed, res
    fixed = dw.calibrated(float_model, data, **res.prepare_kwargs)
    assert accuracy(fixed) >= 0.99 * float_acc, (res, accuracy(fixed))
    share_before, share_after = res.int16_activation_share
    assert share_before == 0.0 and 0.0 <= share_after < 0.5


def test_float_islands_through_hybrid_dict(faulty, data):
    float_model, calib = faulty("shared_ranges")
    x = data.train_x[:128]
    res = qp.suggest_mixed_precision(calib, x, target=0.999, options=("float",),
                                     verbose=False)
    assert res.reached and res.layers_changed == ("shared",), res
    assert res.hybrid_dict == {"module_name": ["shared"]}
    assert res.steps[0].change == "float"
    fixed = dw.calibrated(float_model, data, **res.prepare_kwargs)
    assert not any(isinstance(m, qatkit.FakeQuantize) for m in fixed.shared.modules())
    assert _cosine(float_model, fixed, x) == pytest.approx(res.final_score, abs=2e-4)


def test_unreachable_target_says_so(faulty, data):
    _, calib = faulty("outlier_channel")
    x = data.train_x[:64]
    res = qp.suggest_mixed_precision(calib, x, target=2.0, verbose=False)
    assert not res.reached and res.steps == ()
    assert "does not meet the target" in res.message and "best any configuration" in res.message
    limited = qp.suggest_mixed_precision(calib, x, target=0.99999999, max_layers=1,
                                         options="int16_activation", verbose=False)
    assert len(limited.layers_changed) == 1 and not limited.reached
    assert "max_layers" in limited.message, limited.message
    assert limited.final_score > limited.initial_score


def test_bad_arguments(faulty, data):
    _, calib = faulty("outlier_channel")
    x = data.train_x[:16]
    with pytest.raises(ValueError, match="options entry 'int8'"):
        qp.suggest_mixed_precision(calib, x, target=0.99, options=("int8",), verbose=False)
    with pytest.raises(ValueError, match="max_layers"):
        qp.suggest_mixed_precision(calib, x, target=0.99, max_layers=0, verbose=False)
    with pytest.raises(TypeError, match="eval_fn must return a number"):
        qp.suggest_mixed_precision(calib, x, target=0.99, eval_fn=lambda m: "good",
                                   verbose=False)
    with pytest.raises(ValueError, match="does not fit model"):
        qp.suggest_mixed_precision(calib, torch.randn(2, 3, 8, 8), target=0.99,
                                   verbose=False)
    before = copy.deepcopy(calib.state_dict())

    def boom(model):
        raise RuntimeError("evaluation failed")
    with pytest.raises(RuntimeError, match="evaluation failed"):
        qp.suggest_mixed_precision(calib, x, target=0.99, eval_fn=boom, verbose=False)
    for k, v in calib.state_dict().items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, before[k], atol=0, rtol=0, msg=k)


def test_a_hybrid_model_keeps_its_float_islands(data):
    _, float_model = dw.trained()
    faulty = dw.with_fault(float_model, "outlier_channel")
    with digits.torch_threads(1):
        hybrid = dw.calibrated(faulty, data, hybrid=True,
                               hybrid_dict={"module_name": ["conv_p"]})
        x = data.train_x[:64]
        res = qp.suggest_mixed_precision(hybrid, x, target=0.999, options="int16",
                                         verbose=False)
        assert res.reached and res.layers_changed[0] == "mid", res
        fixed = dw.calibrated(faulty, data, **res.prepare_kwargs)
    assert not any(isinstance(m, qatkit.FakeQuantize) for m in fixed.conv_p.modules()), \
        "conv_p stays a float island"
    assert fixed.mid.activation_post_process.dtype == "qint16"
    assert _cosine(faulty, fixed, x) == pytest.approx(res.final_score, abs=2e-4)
