"""Bias correction: after it, every layer's mean output in the quantized model equals the
float model's; a layer without bias gets one; low-bit depthwise weights recover."""

from __future__ import annotations

import warnings

import qatkit
import torch
from qatkit.algorithms._common import algorithm_session, prepared_layers
from qatkit.algorithms.bias_correction import _mean_outputs
from torch import nn


def _mean_errors(before: torch.fx.GraphModule, after: torch.fx.GraphModule,
                 batches: list) -> dict[str, float]:
    """Per layer: max |E[y_quantized(after)] - E[y_float(before)]| over output channels."""
    from qatkit.algorithms._common import collect_batches

    out = {}
    bs, _ = collect_batches(after, batches, None, None, "test")
    with algorithm_session(before), algorithm_session(after):
        for layer in prepared_layers(after, "test"):
            target = _mean_outputs(before, layer, bs, quantized=False)
            got = _mean_outputs(after, layer, bs, quantized=True)
            out[layer.path] = float((target - got).abs().max())
    return out


def test_mean_shift_removed_and_accuracy_recovers(separable_float, make_calibrated, calib,
                                                  accuracy):
    qm = make_calibrated(separable_float, weight_bits=4)
    out = qatkit.bias_correction(qm, calib, progress=False)
    before = _mean_errors(qm, qm, calib)
    after = _mean_errors(qm, out, calib)
    assert max(before.values()) > 0.05, before
    assert max(after.values()) < 1e-4, after
    log = qatkit.algorithms.ptq_log(out).set_index("layer")
    assert (log["max_shift"] > 0).all() and list(log.index) == list(after)
    f, c, b = accuracy(separable_float), accuracy(qm), accuracy(out)
    assert c < 0.95 * f and b >= 0.97 * f, (f, c, b)


def test_layer_without_bias_gets_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(),
                          nn.Linear(32, 4, bias=False)).eval()
    x = torch.randn(64, 16) + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(model, {"": qatkit.default_qat_8bit_fake_quant_qconfig},
                                   example_inputs=(x,)).eval()
    qatkit.calibrate(qm, x, progress=False)
    out = qatkit.bias_correction(qm, x, progress=False)
    assert qm.get_submodule("0").bias is None
    assert isinstance(out.get_submodule("0").bias, nn.Parameter)
    assert max(_mean_errors(qm, out, [x]).values()) < 1e-5
    with torch.no_grad():
        assert torch.equal(qatkit.convert_fx(out)(x), out(x))
