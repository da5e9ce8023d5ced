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
        x = torch.rand(32, 1, 16, 16) * 2 - 1
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


class EveryOp(nn.Module):
    """Each FloatFunctional op of the methods table not used by the other models."""

    OPS = ("add_scalar", "mul_scalar", "sub", "stack", "matmul")

    def __init__(self) -> None:
        super().__init__()
        self.quant_x, self.quant_y = qatkit.QuantStub(), qatkit.QuantStub()
        for op in self.OPS:
            setattr(self, op, qatkit.nn.FloatFunctional())
        self.dequant = qatkit.DeQuantStub()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = self.quant_x(x), self.quant_y(y)
        a = self.mul_scalar.mul_scalar(self.add_scalar.add_scalar(x, 0.5), 3.0)
        d = self.stack.stack([self.sub.sub(a, y), y], dim=0)
        return self.dequant(self.matmul.matmul(d, d.transpose(-1, -2)))


def test_every_float_functional_op_converts_exactly():
    torch.manual_seed(0)
    x, y = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    qm = qatkit.prepare_qat(EveryOp(), {"": qatkit.default_qat_8bit_fake_quant_qconfig})
    qatkit.calibrate(qm, [(x, y)], progress=False)
    im = qatkit.convert(qm)
    for op in EveryOp.OPS:
        assert im.get_submodule(op).qatkit_op_kind == op.replace("_scalar", ""), op
    with torch.no_grad():
        torch.testing.assert_close(im(x, y), qm(x, y), rtol=0, atol=0)


class SharedReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = qatkit.QuantStub()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU()
        self.dequant = qatkit.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv1(self.quant(x)))
        return self.dequant(self.relu(self.conv2(y)))  # relu's 2nd call: another scale


def test_module_called_at_two_places_with_different_scales_names_the_fix():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    with pytest.warns(UserWarning, match=r"\['relu'\] are called at several places"):
        qm = qatkit.prepare_qat(SharedReLU(), {"": qatkit.default_qat_8bit_fake_quant_qconfig})
    qatkit.calibrate(qm, x, progress=False)
    with pytest.raises(ValueError, match=r"'relu' is called at 2 places.*own module"):
        qatkit.convert(qm)


def test_models_pickle_and_integer_state_dict_round_trips(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    fused = qatkit.fuse_modules(settle_batchnorm(EagerDigitsNet(), x), DIGITS_GROUPS)
    fused.qconfig = qatkit.default_qat_8bit_fake_quant_qconfig
    fused.conv2.qconfig = None  # a mixed class (the island's output_quant)
    qm = qatkit.prepare_qat(fused, hybrid=True)
    qatkit.calibrate(qm, x, progress=False)
    qm.eval()
    im = qatkit.convert(qm)
    for model in (qm, im):
        path = tmp_path / "model.pt"
        torch.save(model, path)
        again = torch.load(path, weights_only=False)
        assert type(again.conv2) is type(model.conv2)
        with torch.no_grad():
            torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    # an integer model from a differently calibrated copy takes the first one's state_dict
    qm2 = qatkit.prepare_qat(fused, hybrid=True)
    qatkit.calibrate(qm2, x * 0.5, progress=False)
    im2 = qatkit.convert(qm2.eval())
    im2.load_state_dict(im.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(im2(x), im(x), rtol=0, atol=0)


class WithMode(nn.Module):
    """A forward that branches on a keyword: traceable once the keyword is fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = qatkit.QuantStub()
        self.conv = nn.Conv2d(3, 4, 1)
        self.dequant = qatkit.DeQuantStub()

    def forward(self, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
        y = self.conv(self.quant(x))
        if flip:
            y = -y
        return self.dequant(y)


def test_untraceable_model_trains_with_a_warning_and_concrete_args_fix_it():
    qc = {"": qatkit.default_qat_8bit_fake_quant_qconfig}
    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(UserWarning, match=r"cannot be traced.*prepare_custom_config_dict"):
        qm = qatkit.prepare_qat(WithMode(), qc)
    qatkit.calibrate(qm, x, progress=False)  # it still calibrates and trains
    with pytest.raises(qatkit.fx.TraceFailure):
        qatkit.convert(qm)
    qm = qatkit.prepare_qat(WithMode(), qc,
                            prepare_custom_config_dict={"concrete_args": {"flip": False}})
    qatkit.calibrate(qm, x, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(qatkit.convert(qm)(x), qm(x), rtol=0, atol=0)
