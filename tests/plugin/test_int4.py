"""int4 weights (qint4, per channel, [-8, 7]): fake quant, integer model (int8 storage, int32
bias), exact agreement, and INT4 in the exported ONNX."""

from __future__ import annotations

import warnings

import pytest
import qatkit
import torch
from torch import nn


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 36, 5)).eval()


def _calibrated(x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(_model(), {
            "": qatkit.default_calib_4bit_weight_8bit_act_fake_quant_qconfig},
            example_inputs=(x,)).eval()
    qatkit.calibrate(qm, x, progress=False)
    return qm


def test_int4_weights_are_exact_in_the_integer_model():
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    qm = _calibrated(x)
    conv = qm.get_submodule("0")
    q = conv.quantize_weight()
    assert q.min() >= -8 and q.max() <= 7 and conv.weight_fake_quant.dtype == "qint4"
    assert len(torch.unique(q)) <= 16
    assert qatkit.annotation.annotation_by_name(qm)["0"].weight.dtype == "qint4"
    im = qatkit.convert_fx(qm)
    qconv = im.get_submodule("0")
    assert qconv.weight.dtype == torch.int8 and qconv.bias.dtype == torch.int32
    assert torch.equal(qconv.weight.float(), q)
    with torch.no_grad():
        torch.testing.assert_close(im(x), qm(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="'qint4' for weights"):
        qatkit.FakeQuantize(dtype="qint3")


def test_int4_weights_export_as_int4_and_run_in_onnxruntime(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from qatkit.export.check import compare_with_onnxruntime

    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    qm = _calibrated(x)
    path = qatkit.export_onnx(qm, (x,), tmp_path / "w4.onnx")
    inits = {i.name: i.data_type for i in onnx.load(path).graph.initializer}
    assert inits["0.weight"] == onnx.TensorProto.INT4 and inits["4.weight"] == onnx.TensorProto.INT4
    for level in ("disable", "all"):
        for agreement in compare_with_onnxruntime(qm, path, (x,), level):
            assert agreement.max_lsb <= 1 and agreement.exact >= 0.99, (level, agreement)
