"""torchvision's quantizable models (written for torch.ao's eager mode: QuantStub, torch.ao
fused modules, FloatFunctional) prepare with qatkit.prepare_qat unchanged, calibrate without
idle fake quants, and convert to integer models equal to the fake-quant model to the bit."""

from __future__ import annotations

import warnings

import pytest
import qatkit
import torch

torchvision = pytest.importorskip("torchvision")

#: model -> (input size, functional ops the model computes in float: how many, one of them)
MODELS = {
    "resnet18": (32, 0, ""),
    "mobilenet_v2": (32, 1, "adaptive_avg_pool2d"),
    "mobilenet_v3_large": (32, 0, ""),
    "shufflenet_v2_x0_5": (32, 1, "mean"),
    "googlenet": (32, 0, ""),
    "inception_v3": (75, 9, "Mixed_5b.avg_pool2d"),  # F.avg_pool2d in each InceptionA/C/E
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_quantizable_torchvision_model(name):
    size, n_float, float_op = MODELS[name]
    torch.manual_seed(0)
    kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet",
                                                                 "inception_v3") else {}
    model = getattr(torchvision.models.quantization, name)(weights=None, quantize=False,
                                                           **kw).eval()
    model.fuse_model(is_qat=True)
    model.qconfig = qatkit.default_qat_8bit_fake_quant_qconfig
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qm = qatkit.prepare_qat(model)
        x = torch.randn(2, 3, size, size)
        qatkit.calibrate(qm, x, progress=False)
        im = qatkit.convert(qm)
    messages = [str(w.message) for w in caught]
    listed = [m for m in messages if "functional op(s) compute in float" in m]
    if n_float:
        assert len(listed) == 1 and f"{n_float} functional op(s)" in listed[0], messages
        assert float_op in listed[0], listed
    else:
        assert not listed, listed
    assert not [m for m in messages if "saw no data" in m or "never run" in m], messages
    with torch.no_grad():
        torch.testing.assert_close(im(x), qm(x), rtol=0, atol=0)
