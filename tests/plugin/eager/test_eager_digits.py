"""The digits CNN trained for real: eager mode and FX mode reach the same accuracy (calibrated,
after a QAT epoch, as integer models), and the profiler reads an eager model."""

from __future__ import annotations

import copy
import warnings

import pandas as pd
import qatkit
import qatkit.profiler
import torch
import torch.nn.functional as F
from eager_models import DIGITS_GROUPS, QCONFIG, EagerDigitsNet
from qatkit.eager import eager_graph
from torch import nn

#: measured on the test split (360 images): one image is 0.0028
MAX_ACCURACY_GAP = 0.0112  # four images: eager rounds conv3's output before the add, FX fuses it


def _qat_epoch(model: nn.Module, d, data) -> None:
    qatkit.set_fake_quant_state(model, "qat")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for x, y in d.batches(data.train_x, data.train_y, 64, shuffle=True, seed=d.SEED):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    qatkit.set_fake_quant_state(model, "validation")
    model.eval()


def test_eager_and_fx_reach_the_same_digits_accuracy(digits_trained, tmp_path):
    d, data, float_model = digits_trained
    eager_float = EagerDigitsNet()
    eager_float.load_state_dict(float_model.state_dict())
    eager_float.eval()
    calib_x, test = data.train_x[:256], (data.test_x, data.test_y)
    fused = qatkit.fuse_modules(eager_float, DIGITS_GROUPS)
    fused.qconfig = QCONFIG
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {"eager": qatkit.prepare_qat(fused),
                  "fx": qatkit.prepare_qat_fx(float_model, {"": QCONFIG},
                                              example_inputs=(calib_x,))}
    acc: dict[str, dict[str, float]] = {}
    with d.torch_threads(1):
        for name, qm in models.items():
            qatkit.calibrate(qm, calib_x, progress=False)
            qm.eval()
            acc[name] = {"float": d.evaluate(float_model, test),
                         "calibrated": d.evaluate(qm, test)}
            if name == "eager":
                calibrated = copy.deepcopy(qm)
            torch.manual_seed(d.SEED)
            _qat_epoch(qm, d, data)
            acc[name]["qat"] = d.evaluate(qm, test)
            convert = qatkit.convert if name == "eager" else qatkit.convert_fx
            acc[name]["integer"] = d.evaluate(convert(qm), test)
    print(acc)
    for stage in ("calibrated", "qat", "integer"):
        gap = abs(acc["eager"][stage] - acc["fx"][stage])
        assert gap <= MAX_ACCURACY_GAP, (stage, acc)
        assert acc["eager"][stage] >= acc["eager"]["float"] - 0.02, (stage, acc)
    assert acc["eager"]["integer"] == acc["eager"]["qat"], "exact evaluation = integer model"

    # the profiler reads the calibrated eager model itself through its annotated trace: the
    # same per-layer table as with eager_graph (it once compared QAT conv1, which reproduces
    # relu1, with the float conv1)
    report = qatkit.profiler.model_profiler(eager_float, calibrated, data.test_x[:32],
                                            out_dir=tmp_path / "report")
    by_graph = qatkit.profiler.model_profiler(eager_float, eager_graph(calibrated),
                                              data.test_x[:32], out_dir=tmp_path / "graph")
    per_layer = report.tables["similarity_per_layer"].set_index("Module Name")
    pd.testing.assert_frame_equal(
        per_layer, by_graph.tables["similarity_per_layer"].set_index("Module Name"))
    assert {"conv1", "conv3", "skip", "relu3", "fc"} <= set(per_layer.index)
    assert per_layer.loc["skip", "Module Type"] == "FloatFunctional[add]"
    assert (per_layer["Similarity"].dropna() > 0.99).all(), per_layer["Similarity"]
    assert report.html.exists()
