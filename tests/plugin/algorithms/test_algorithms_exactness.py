"""Every algorithm: the caller's model is untouched, the result is ordinary weights and scales
-- the integer model equals the fake-quant model bit for bit and the exported ONNX agrees --
and a model that is not prepared or not calibrated gets a clear error."""

from __future__ import annotations

import copy
import warnings

import pytest
import qatkit
import torch
from qatkit.algorithms import ALGORITHMS
from qatkit.export.check import compare_with_onnxruntime

#: small settings (the defaults run 500 steps per layer)
FAST = {
    "smooth_quant": {"threshold": 0.0},  # smooth every tensor that can be
    "cross_layer_equalization": {"threshold": 0.0},
    "refine_weight_range": {"refine_weight_threshold": 5e-3},  # floors some channels
    "easy_quant": {"search_steps": 5, "iterations": 1},
    "adaround": {"finetune_epochs": 20, "finetune_batch_size": 16},
    "brecq": {"finetune_epochs": 20, "finetune_batch_size": 16, "finetune_block_size": 2},
}


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_result_is_exact_and_exports(name, digits_qat, calib, data, tmp_path):
    before = _snapshot(digits_qat)
    out = ALGORITHMS[name](digits_qat, calib, progress=False, **FAST.get(name, {}))
    after = _snapshot(digits_qat)
    assert all(torch.equal(before[k], after[k]) for k in before), "the caller's model changed"
    assert qatkit.algorithms.ptq_log(digits_qat).empty and not qatkit.algorithms.ptq_log(out).empty
    changed = [k for k, v in _snapshot(out).items() if not torch.equal(v, before[k])]
    assert changed, f"{name} changed nothing"
    assert qatkit.get_fake_quant_state(out) == {qatkit.FakeQuantState.VALIDATION: 12}
    assert not out.training

    x = data.test_x[:64]
    with torch.no_grad():
        y_fq = out(x)
        y_int = qatkit.convert_fx(out)(x)
    assert torch.equal(y_int, y_fq), f"{name}: integer model != fake-quant model"

    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qatkit.export_onnx(out, (x[:8],), path, dynamic_axes={"x": {0: "batch"}})
    [res] = compare_with_onnxruntime(out, str(path), (x,), "disable")
    assert res.exact >= 0.99 and res.max_lsb <= 1, res


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_inplace_changes_and_returns_the_model(name, digits_qat, calib):
    model = copy.deepcopy(digits_qat)
    out = ALGORITHMS[name](model, calib, progress=False, inplace=True, **FAST.get(name, {}))
    assert out is model
    assert len(qatkit.algorithms.ptq_log(model)) > 0


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_errors_name_the_fix(name, digits_float, digits_qat, calib, data):
    fn = ALGORITHMS[name]
    with pytest.raises(ValueError, match="prepare_qat_fx"):
        fn(digits_float, calib, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = qatkit.prepare_qat_fx(digits_float, {"": qatkit.default_qat_8bit_fake_quant_qconfig},
                                    example_inputs=(data.train_x[:8],)).eval()
    qatkit.set_fake_quant_state(raw, "validation")
    with pytest.raises(ValueError, match="not calibrated"):
        fn(raw, calib, progress=False)
    calibrating = copy.deepcopy(digits_qat)
    qatkit.set_fake_quant_state(calibrating, "calibration")
    with pytest.raises(ValueError, match="CALIBRATION"):
        fn(calibrating, calib, progress=False)


def test_ptq_log_keeps_every_run_in_order(digits_qat, calib):
    qm = qatkit.cross_layer_equalization(digits_qat, calib, threshold=0.0, progress=False)
    qm = qatkit.bias_correction(qm, calib, progress=False)
    log = qatkit.algorithms.ptq_log(qm)
    assert list(log.drop_duplicates("step")["algorithm"]) == ["cross_layer_equalization",
                                                             "bias_correction"]
    assert list(log[log.algorithm == "bias_correction"]["layer"]) == [
        "conv1", "conv2", "conv3", "conv4", "fc"]
    # a deep copy keeps the log, and the copy's further runs do not reach the original
    again = qatkit.refine_weight_range(qm, progress=False)
    assert len(qatkit.algorithms.ptq_log(again)) == len(log) + 5
    assert len(qatkit.algorithms.ptq_log(qm)) == len(log)


def test_progress_bar_is_shown_and_silenced(digits_qat, capsys):
    qatkit.refine_weight_range(digits_qat, progress=True)
    assert "refine_weight_range" in capsys.readouterr().err
    qatkit.refine_weight_range(digits_qat, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_runs_on_cuda(name, digits_qat, calib):
    model = copy.deepcopy(digits_qat).cuda()
    out = ALGORITHMS[name](model, calib, progress=False, **FAST.get(name, {}))
    assert all(p.device.type == "cuda" for p in out.parameters())
    with torch.no_grad():
        x = calib[0][:16].cuda()
        assert torch.equal(qatkit.convert_fx(out)(x), out(x))
