"""Weight range refinement: the floor on weight scales un-saturates a pruned channel's bias."""

from __future__ import annotations

import ptq  # examples/ptq.py: conftest.py puts examples/ on sys.path
import pytest
import qatkit
import torch


def test_pruned_channel_bias_no_longer_saturates(digits_float, make_calibrated, calib,
                                                 accuracy):
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
    f, c, r = accuracy(dead), accuracy(qm), accuracy(out)
    assert c < 0.6 * f and r >= 0.97 * f, (f, c, r)


def test_threshold_must_be_positive(digits_qat):
    with pytest.raises(ValueError, match="refine_weight_threshold"):
        qatkit.refine_weight_range(digits_qat, refine_weight_threshold=0.0)
