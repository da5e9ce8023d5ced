"""Weight range refinement: the floor on weight scales un-saturates a pruned channel's bias."""

from __future__ import annotations

import copy

import ptq  # examples/ptq.py: conftest.py puts examples/ on sys.path
import pytest
import qatkit
import torch


def test_pruned_channel_bias_no_longer_saturates(digits_float, make_calibrated, calib,
                                                 accuracy):
    """A pruned channel (zero weights, BatchNorm beta 30: a constant output) gets the smallest
    weight scale, float32 eps, and its folded bias saturates int32: accuracy collapses.
    refine_weight_range floors that scale, the bias takes its true value, and the accuracy is
    that of the model with conv4's weights left float.  (What remains to float accuracy is the
    constant 30 stretching conv4's output range, an activation matter: 96 - 99% of float
    depending on the float training.)"""
    dead = ptq.with_dead_channel(digits_float, channel=0, beta=30.0)
    qm = make_calibrated(dead)
    assert float(qm.conv4.weight_fake_quant.scale[0]) == torch.finfo(torch.float32).eps
    out = qatkit.refine_weight_range(qm, calib, progress=False)
    s_old, s_new = qm.conv4.weight_fake_quant.scale, out.conv4.weight_fake_quant.scale
    assert float(s_new[0]) == pytest.approx(1e-6)
    assert torch.equal(s_new[1:], s_old[1:]), "only the floored channel changes"
    for name in ("conv1", "conv2", "conv3", "fc"):
        assert torch.equal(out.get_submodule(name).weight_fake_quant.scale,
                           qm.get_submodule(name).weight_fake_quant.scale)
    log = qatkit.algorithms.ptq_log(out).set_index("layer")
    assert log.loc["conv4", "floored"] == 1 and log["floored"].sum() == 1
    # the integer bias of channel 0: saturated at int32 before, its true value after
    limit = 2**31 - 1
    b_old = qatkit.convert_fx(qm).conv4.bias[0]
    b_new = qatkit.convert_fx(out).conv4.bias[0]
    assert int(b_old) == limit and int(b_new) < limit // 2
    weights_float = copy.deepcopy(qm)
    qatkit.set_fake_quant_enabled(weights_float, False, ["conv4.weight_fake_quant"])
    f, c, r, w = accuracy(dead), accuracy(qm), accuracy(out), accuracy(weights_float)
    assert c < 0.6 * f and r >= w - 0.01, (f, c, r, w)  # 0.01: conv4's int8 weight rounding


def test_threshold_must_be_positive(digits_qat):
    with pytest.raises(ValueError, match="refine_weight_threshold"):
        qatkit.refine_weight_range(digits_qat, refine_weight_threshold=0.0)
