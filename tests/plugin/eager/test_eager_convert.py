"""qatkit.convert: an eager-prepared model becomes the integer modules of convert_fx, under
the same names, and equals the fake-quant model in exact evaluation (VALIDATION, no_grad) to
the bit at every quantized tensor."""

from __future__ import annotations

import pytest
import qatkit
import torch
from eager_models import (
    CAT_GROUPS,
    DIGITS_GROUPS,
    CatNet,
    EagerDigitsNet,
    calibrated_eager,
    settle_batchnorm,
)
from qatkit.eager import QATFloatFunctional, eager_graph
from qatkit.quantized import QuantizedModule
from torch import nn


def _outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output of every module that ends in a quantized tensor, by name, for one forward."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, QuantizedModule) or getattr(m, "activation_post_process", None)
             is not None]
    out: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: out.__setitem__(n, o.detach().clone())) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def _lsb(qm: nn.Module, im: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Max |difference| in output steps at every quantized op, both models run end to end."""
    a, b = _outputs(qm, x), _outputs(im, x)
    assert set(a) == set(b), set(a) ^ set(b)
    res = {}
    for name, ta in a.items():
        mod = qm.get_submodule(name)
        scale = mod.activation_post_process.scale
        res[name] = float(((ta - b[name]) / scale).abs().round().max())
    return res


@pytest.mark.parametrize("which", ["digits", "cat"])
def test_integer_model_equals_fake_quant_to_the_bit(which):
    torch.manual_seed(0)
    if which == "digits":
        x = torch.rand(64, 1, 16, 16) * 2 - 1
        model, groups = settle_batchnorm(EagerDigitsNet(), x), DIGITS_GROUPS
    else:
        x = torch.randn(16, 3, 12, 12)
        model, groups = settle_batchnorm(CatNet(), x), CAT_GROUPS
    qm = calibrated_eager(model, groups, x)
    im = qatkit.convert(qm)
    assert type(im) is type(model), "the integer model keeps the model's class and forward"
    for name, mod in qm.named_modules():  # every quantized module converted under its name
        if getattr(mod, "activation_post_process", None) is not None and "." not in name:
            assert isinstance(im.get_submodule(name), QuantizedModule), name
    lsb = _lsb(qm, im, x)
    assert max(lsb.values()) == 0, lsb
    with torch.no_grad():
        torch.testing.assert_close(im(x), qm(x), rtol=0, atol=0)
    # the integer modules of a FloatFunctional answer its methods
    ff = "skip" if which == "digits" else "cat"
    assert hasattr(im.get_submodule(ff), "add") and hasattr(im.get_submodule(ff), "cat")
    assert isinstance(qm.get_submodule(ff), QATFloatFunctional), "convert copies by default"


def test_float_island_converts_with_its_exit_quantized():
    torch.manual_seed(0)
    x = torch.rand(32, 1, 16, 16) * 2 - 1
    fused = qatkit.fuse_modules(settle_batchnorm(EagerDigitsNet(), x), DIGITS_GROUPS)
    fused.qconfig = qatkit.default_qat_8bit_fake_quant_qconfig
    fused.conv2.qconfig = None
    qm = qatkit.prepare_qat(fused, hybrid=True)
    qatkit.calibrate(qm, x, progress=False)
    qm.eval()
    im = qatkit.convert(qm)
    assert not isinstance(im.conv2, QuantizedModule), "the island stays float"
    assert isinstance(im.conv2.output_quant, QuantizedModule), "its exit is an integer Quantize"
    assert max(_lsb(qm, im, x).values()) == 0
    with torch.no_grad():
        torch.testing.assert_close(im(x), qm(x), rtol=0, atol=0)


def test_preserve_qat_mode_through_the_trace_and_provenance_kept():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 12, 12)
    qm = calibrated_eager(settle_batchnorm(CatNet(), x), CAT_GROUPS, x)
    marked = qatkit.set_preserve_qat_mode(eager_graph(qm), prefixes=["conv_c"], types=["mul"])
    assert sorted(marked) == ["conv_c", "mul"]
    im = qatkit.convert(qm)
    assert isinstance(im.conv_c, qatkit.nn.qat.Conv2d) and isinstance(im.mul, QATFloatFunctional)
    assert isinstance(im.fc, QuantizedModule)
    with torch.no_grad():
        torch.testing.assert_close(im(x), qm(x), rtol=0, atol=0)
    assert qatkit.get_provenance(eager_graph(im)) == qatkit.get_provenance(eager_graph(qm))
    with pytest.raises(ValueError, match="already an integer model"):
        qatkit.convert(im)


def test_convert_errors_name_the_fix():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 12, 12)
    fused = qatkit.fuse_modules(CatNet().eval(), CAT_GROUPS)
    with pytest.raises(ValueError, match="convert_fx"):
        qatkit.convert(fused)  # not prepared by prepare_qat
    qm = qatkit.prepare_qat(fused, {"": qatkit.default_qat_8bit_fake_quant_qconfig})
    with pytest.raises(ValueError, match="[Cc]alibrate"):
        qatkit.convert(qm)
    qatkit.calibrate(qm, x, progress=False)
    qatkit.convert(qm)
