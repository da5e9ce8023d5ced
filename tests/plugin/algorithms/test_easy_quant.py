"""EasyQuant: the searched scales never lower a layer's output cosine on the calibration data,
raise it at low bit widths, and a fixed input scale is never searched."""

from __future__ import annotations

import qatkit
import torch


def test_cosines_improve_at_low_bits(digits_float, make_calibrated, calib, accuracy):
    qm = make_calibrated(digits_float, weight_bits=3)
    out = qatkit.easy_quant(qm, calib, search_steps=10, iterations=2, progress=False)
    log = qatkit.algorithms.ptq_log(out).set_index("layer")
    assert (log["cosine_after"] >= log["cosine_before"] - 1e-9).all(), log
    gain = log["cosine_after"] - log["cosine_before"]
    assert gain.max() > 1e-3, log
    # conv1 reads the QuantStub's fixed 1/128: never searched
    assert log.loc["conv1", "input"] == ""
    assert torch.equal(out.quant.activation_post_process.scale,
                       qm.quant.activation_post_process.scale)
    # conv1's output is also conv3's residual input: its scale is not searched
    assert log.loc["conv2", "input"] == ""
    assert torch.equal(out.conv1.activation_post_process.scale,
                       qm.conv1.activation_post_process.scale)
    assert log.loc["conv3", "input"] == "conv2.activation_post_process"
    assert log.loc["fc", "input"] == "pool.activation_post_process"
    changed = [n for n in ("conv1", "conv2", "conv3", "conv4", "fc")
               if not torch.equal(out.get_submodule(n).weight_fake_quant.scale,
                                  qm.get_submodule(n).weight_fake_quant.scale)]
    assert changed
    f, c, e = accuracy(digits_float), accuracy(qm), accuracy(out)
    assert c < 0.9 * f and e >= 0.97 * f, (f, c, e)


def test_weights_only(digits_qat, calib):
    out = qatkit.easy_quant(digits_qat, calib, search_steps=4, iterations=1, activations=False,
                            progress=False)
    for name in ("conv1", "conv2", "conv3", "conv4", "pool"):
        fq = out.get_submodule(name).activation_post_process
        assert torch.equal(fq.scale, digits_qat.get_submodule(name).activation_post_process.scale)
    assert (qatkit.algorithms.ptq_log(out)["input"] == "").all()
