"""AdaRound and BRECQ: learned rounding is floor or ceil on the weight fake quant's own grid,
never worse than nearest on the calibration data, deterministic, and recovers low-bit
weights."""

from __future__ import annotations

import pytest
import qatkit
import torch
from qatkit.algorithms._common import prepared_layers, set_integer_weights
from qatkit.algorithms._reconstruction import Rounding, consecutive_blocks

LAYERS = ("conv1", "conv2", "conv3", "conv4", "fc")


def _grid(model: torch.fx.GraphModule, name: str) -> torch.Tensor:
    """w / s of a layer's folded weight (float32, as quantize_weight divides)."""
    mod = model.get_submodule(name)
    w = mod.folded_weight_bias()[0].detach()
    s = mod.weight_fake_quant.scale.view([-1] + [1] * (w.dim() - 1))
    return torch.div(w, s)


def test_rounding_starts_at_nearest(digits_qat):
    for name in LAYERS:
        mod = digits_qat.get_submodule(name)
        assert torch.equal(Rounding(mod).hard_int(), mod.quantize_weight()), name


def test_set_integer_weights_is_exact_and_local(digits_qat):
    import copy

    qm = copy.deepcopy(digits_qat)
    mod = qm.conv2  # a fused conv + BatchNorm
    q0 = mod.quantize_weight()
    gen = torch.Generator().manual_seed(0)
    flip = (torch.rand(q0.shape, generator=gen) < 0.2) & (q0.abs() < 100)
    q = q0 + flip.float() * torch.where(torch.rand(q0.shape, generator=gen) < 0.5, 1.0, -1.0)
    w0 = mod.weight.detach().clone()
    assert set_integer_weights(mod, q) == 0
    assert torch.equal(mod.quantize_weight(), q)
    assert torch.equal(mod.weight[~flip], w0[~flip]), "unchanged integers keep their weight"


@pytest.mark.parametrize("algorithm", ["adaround", "brecq"])
def test_learned_rounding_is_floor_or_ceil_on_the_fake_quant_grid(algorithm, digits_float,
                                                                   make_calibrated, calib):
    qm = make_calibrated(digits_float, weight_bits=3)  # integers in [-4, 3]
    kw = {"finetune_block_size": 2} if algorithm == "brecq" else {}
    out = getattr(qatkit, algorithm)(qm, calib, finetune_epochs=60, finetune_batch_size=16,
                                     finetune_lr=1e-2, progress=False, **kw)
    for name in LAYERS:
        mod, ref = out.get_submodule(name), qm.get_submodule(name)
        q = mod.quantize_weight()
        x = _grid(qm, name)
        assert q.min() >= -4 and q.max() <= 3, "the bit width is the weight fake quant's"
        assert ((q == x.floor().clamp(-4, 3)) | (q == x.ceil().clamp(-4, 3))).all(), name
        assert torch.equal(mod.weight_fake_quant.scale, ref.weight_fake_quant.scale)
        # the elements that set each channel's range keep it: observing again, same scale
        obs = mod.folded_weight_bias()[0].detach().abs().flatten(1).amax(1) / 4
        torch.testing.assert_close(obs, mod.weight_fake_quant.scale, rtol=1e-6, atol=0)
    log = qatkit.algorithms.ptq_log(out)
    assert (log["error_learned"] <= log["error_nearest"]).all()
    assert (log["error_learned"] < 0.9 * log["error_nearest"]).any(), log
    assert log["flipped"].sum() > 0 and (log["unset"] == 0).all()
    with torch.no_grad():
        x = calib[0][:32]
        assert torch.equal(qatkit.convert_fx(out)(x), out(x))


def test_same_seed_same_weights(digits_qat, calib):
    kw = dict(finetune_epochs=10, finetune_batch_size=8, progress=False)
    a = qatkit.adaround(digits_qat, calib, **kw)
    b = qatkit.adaround(digits_qat, calib, **kw)
    assert all(torch.equal(a.get_submodule(n).weight, b.get_submodule(n).weight)
               for n in LAYERS)


def test_brecq_blocks_run_everything_between_their_layers(digits_qat):
    layers = prepared_layers(digits_qat, "brecq")
    blocks = consecutive_blocks(digits_qat, layers, 3)
    assert [b.name for b in blocks] == ["conv1, conv2, conv3", "conv4, fc"]
    first, second = blocks
    assert first.inputs == ["quant"] and first.outputs == ["conv3_1"]
    assert [n.name for n in second.nodes] == ["conv4_1", "pool", "flatten", "fc_1"]
    assert second.inputs == ["conv3_1"] and second.outputs == ["fc_1"]


def test_bad_arguments(digits_qat, calib):
    with pytest.raises(ValueError, match="finetune_block_size"):
        qatkit.brecq(digits_qat, calib, finetune_block_size=0)
    with pytest.raises(ValueError, match="finetune_lr"):
        qatkit.adaround(digits_qat, calib, finetune_lr=0.0)
