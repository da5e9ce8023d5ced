"""Cross-layer equalization: equal ranges, the same float function, and the depthwise model
with very unequal channel ranges recovers at int8."""

from __future__ import annotations

import copy

import ptq  # examples/ptq.py: conftest.py puts examples/ on sys.path
import qatkit
import torch
from qatkit.algorithms._channel_scaling import input_channel_max, output_channel_max


def _float_out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), qatkit.fake_quant_enabled(model, False):
        return model(x)


def test_unequal_depthwise_ranges_recover(separable_float, make_calibrated, calib, data,
                                          accuracy):
    unequal = ptq.with_unequal_ranges(separable_float)
    qm = make_calibrated(unequal)
    out = qatkit.cross_layer_equalization(qm, calib, progress=False)
    f, c, e = accuracy(unequal), accuracy(qm), accuracy(out)
    assert c < 0.6 * f, f"ranges 2^-5..2^5 should break plain calibration: {c} vs {f}"
    assert e >= 0.99 * f, f"equalized: {e} vs float {f}"
    x = data.test_x[:32]
    ref = _float_out(qm, x)
    torch.testing.assert_close(_float_out(out, x), ref, rtol=0,
                               atol=1e-5 * float(ref.abs().max()))
    # every equalized pair -- conv -> depthwise (pw1 -> dw2) and pointwise -> pool -> fc
    # included -- ends with equal ranges: r1 = r2 = sqrt(r1 * r2) per channel
    log = qatkit.algorithms.ptq_log(out).set_index("producer")
    assert log.loc[["dw1.0", "pw1.0", "dw2.0"], "applied"].all()
    layers = {lay.path: lay for lay in qatkit.algorithms._common.prepared_layers(out, "t")}
    for producer, row in log[log.applied].iterrows():
        r1 = output_channel_max(out.get_submodule(producer))
        torch.testing.assert_close(r1, input_channel_max(layers[row["layer"]]), rtol=2e-2,
                                   atol=0)
    assert log.loc["dw1.0", "imbalance_before"] > 4 and log.loc["dw1.0", "imbalance_after"] < 0.03
    assert "quant_stub" in log.loc["quant", "reason"]


def test_threshold_leaves_balanced_pairs_alone(digits_qat, calib):
    """The trained digits CNN's pairs are below the default threshold (2.0; the imbalance of
    conv2 -> conv3 depends on the float training, 0.x or 1.x), so nothing changes and the log
    says why, with the measured imbalance."""
    out = qatkit.cross_layer_equalization(digits_qat, calib, progress=False)
    log = qatkit.algorithms.ptq_log(out).set_index("layer")
    assert not log["applied"].any()
    before = log.loc["conv3", "imbalance_before"]
    assert 0 < before < 2 and log["imbalance_after"].isna().all()
    assert log.loc["conv3", "reason"] == f"range imbalance {before:.2f} < threshold 2.0"
    assert all(torch.equal(a, b) for a, b in zip(out.state_dict().values(),
                                                 digits_qat.state_dict().values(), strict=True)
               if torch.is_tensor(a))


def test_matches_torch_ao_on_one_pair():
    """One depthwise -> pointwise pair, symmetric weight ranges (max = -min), no BatchNorm:
    torch.ao's ``equalize`` (range max - min) computes the same factors."""
    from torch.ao.quantization._equalize import equalize

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 6, 1)).eval()
    with torch.no_grad():
        w1 = model[0].weight.view(4, 9)  # depthwise: one row per channel
        w1[:, 1] = -w1.abs().amax(1)
        w1[:, 0] = w1.abs().amax(1)
        w1.mul_(torch.tensor([1.0, 8.0, 0.1, 3.0]).view(4, 1))
        w2 = model[2].weight.view(6, 4)  # pointwise: one column per input channel
        w2[:, 0].mul_(0.25)
        w2[1] = -w2.abs().amax(0)
        w2[0] = w2.abs().amax(0)
    x = torch.randn(2, 4, 8, 8)
    ref = equalize(copy.deepcopy(model), [["0", "2"]], 1e-6, inplace=False)
    qm = qatkit.prepare_qat_fx(model, {"": qatkit.default_qat_8bit_fake_quant_qconfig},
                               example_inputs=(x,)).eval()
    qatkit.calibrate(qm, x, progress=False)
    out = qatkit.cross_layer_equalization(qm, x, threshold=0.0, progress=False)
    torch.testing.assert_close(out.get_submodule("0").weight, ref[0].weight, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.get_submodule("2").weight, ref[2].weight, rtol=1e-5, atol=0)
