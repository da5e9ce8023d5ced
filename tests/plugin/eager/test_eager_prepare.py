"""prepare_qat / fuse_modules: eager-mode preparation swaps in the QAT modules prepare_qat_fx
uses, honours ``.qconfig`` attributes (None = float island), and shares the fake-quant
states."""

from __future__ import annotations

import warnings

import pytest
import qatkit
import torch
from eager_models import (
    CAT_GROUPS,
    DIGITS_GROUPS,
    QCONFIG,
    CatNet,
    EagerDigitsNet,
    settle_batchnorm,
)
from qatkit.eager import QATFloatFunctional, eager_graph
from qatkit.eager.boundaries import unmixed_class
from qatkit.eager.fuse import FusedFloat, FusedIdentity
from qatkit.fx.naming import float_node_names
from torch import nn


def _x(n: int = 32) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(n, 1, 16, 16) * 2 - 1


def _digits(x: torch.Tensor) -> nn.Module:
    torch.manual_seed(1)
    return settle_batchnorm(EagerDigitsNet(), x)


def test_fuse_modules_keeps_the_float_outputs_and_the_qat_state_dict_keys():
    x = _x()
    model = _digits(x)
    fused = qatkit.fuse_modules(model, DIGITS_GROUPS)
    assert isinstance(fused.conv1, FusedFloat) and isinstance(fused.conv1, nn.Conv2d)
    assert isinstance(fused.bn1, FusedIdentity) and isinstance(fused.relu1, FusedIdentity)
    assert not isinstance(model.conv1, FusedFloat), "fuse_modules copies by default"
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    assert "conv1.bn.running_mean" in fused.state_dict()
    fused.qconfig = QCONFIG
    qm = qatkit.prepare_qat(fused)
    assert set(fused.state_dict()) <= set(qm.state_dict())


def test_prepare_swaps_in_the_qat_modules_of_prepare_qat_fx():
    x = _x()
    model = _digits(x)
    fused = qatkit.fuse_modules(model, DIGITS_GROUPS)
    fused.qconfig = QCONFIG
    qm = qatkit.prepare_qat(fused)
    fx_qm = qatkit.prepare_qat_fx(model, {"": QCONFIG}, example_inputs=(x,))
    for name in ("quant", "conv1", "conv2", "conv4", "pool", "fc"):
        assert unmixed_class(type(qm.get_submodule(name))) is type(fx_qm.get_submodule(name)), name
    assert isinstance(qm.skip, QATFloatFunctional) and qm.skip.qatkit_op_kind == "add"
    assert isinstance(qm.skip, qatkit.nn.qat.FunctionalOp)
    assert isinstance(qm.dequant, qatkit.DeQuantStub)
    assert type(model) is type(qm), "the model keeps its class and forward"
    prov = qatkit.get_provenance(eager_graph(qm))
    fx_prov = qatkit.get_provenance(fx_qm)
    for name in ("conv1", "conv2", "conv4", "fc"):  # a fused chain reproduces its last op
        assert prov[name] == fx_prov[name], name
    assert prov["skip"] == "skip.add"
    assert set(qatkit.get_fake_quant_state(qm)) == {qatkit.FakeQuantState.QAT}


def test_same_model_eager_and_fx_agree_to_the_bit_in_validation():
    """Without an add to fuse, both paths make the same QAT modules: same scales, same outputs."""
    x = _x(64)
    torch.manual_seed(2)
    model = settle_batchnorm(nn.Sequential(
        qatkit.QuantStub(), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU6(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(16, 10), qatkit.DeQuantStub()), x)
    fused = qatkit.fuse_modules(model, [["1", "2", "3"], ["4", "5", "6"]])
    qm = qatkit.prepare_qat(fused, {"": QCONFIG})
    fx_qm = qatkit.prepare_qat_fx(model, {"": QCONFIG}, example_inputs=(x,))
    for m in (qm, fx_qm):
        qatkit.calibrate(m, x, progress=False)
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(qm(x), fx_qm(x), rtol=0, atol=0)
        qatkit.set_fake_quant_state(qm, "calibration")  # data flows in float
        torch.testing.assert_close(qm(x), model(x), rtol=1e-5, atol=1e-6)


def test_qconfig_none_is_a_float_island_quantized_again_at_its_exit():
    x = _x()
    fused = qatkit.fuse_modules(_digits(x), DIGITS_GROUPS)
    fused.qconfig = QCONFIG
    fused.conv2.qconfig = None  # the QAT guide's spelling
    qm = qatkit.prepare_qat(fused, hybrid=True)
    assert not any(isinstance(m, qatkit.FakeQuantize) for m in qm.conv2.parameters())
    assert isinstance(qm.conv2, nn.Conv2d) and not isinstance(qm.conv2, qatkit.nn.qat.Conv2d)
    assert "weight_fake_quant" not in dict(qm.conv2.named_children())
    assert isinstance(qm.conv2.output_quant, qatkit.nn.qat.QuantStub), "quantized at its exit"
    assert qm.conv2._get_name() == "ConvBnReLU2d(float)"
    assert qm.conv3._get_name() == "ConvBn2d"
    qatkit.calibrate(qm, x, progress=False)
    anns = {a.name: a for a in qatkit.get_annotations(eager_graph(qm)).values()}
    assert anns["conv2"].role == "float" and "qconfig None" in anns["conv2"].note
    entry = anns["conv3"].input_spec("input").module_path
    assert entry == "conv2.output_quant.activation_post_process"
    with torch.no_grad():
        out = qm(x)
    assert torch.isfinite(out).all()


def test_qconfig_dict_and_module_attributes_resolve_like_prepare_qat_fx():
    x = _x()
    fused = qatkit.fuse_modules(_digits(x), DIGITS_GROUPS)
    fused.conv4.qconfig = qatkit.default_qat_8bit_weight_16bit_act_fake_quant_qconfig
    qm = qatkit.prepare_qat(fused, {"": QCONFIG, "module_name": [("fc", None)]})
    assert qm.conv4.activation_post_process.dtype == "qint16"
    assert qm.conv1.activation_post_process.dtype == "qint8"
    assert type(qm.fc) is nn.Linear or unmixed_class(type(qm.fc)) is nn.Linear
    with pytest.raises(ValueError, match="conv9"):
        qatkit.prepare_qat(fused, {"": QCONFIG, "module_name": [("conv9", None)]})
    island = qatkit.prepare_qat(fused, {"": QCONFIG}, hybrid=True,
                                hybrid_dict={"module_name": ["conv2"]})
    assert isinstance(island.conv2, FusedFloat)


def test_states_calibrate_and_fake_quant_switches_are_the_shared_ones():
    x = _x()
    model = _digits(x)
    qm = qatkit.prepare_qat(qatkit.fuse_modules(model, DIGITS_GROUPS), {"": QCONFIG})
    summary = qatkit.calibrate(qm, x, progress=False)
    assert summary is not None
    assert set(qatkit.get_fake_quant_state(qm)) == {qatkit.FakeQuantState.VALIDATION}
    qm.eval()
    with torch.no_grad():
        quantized = qm(x)
        names = qatkit.set_fake_quant_enabled(qm, False)
        assert "skip.activation_post_process" in names
        torch.testing.assert_close(qm(x), model(x), rtol=1e-4, atol=1e-5)
        qatkit.set_fake_quant_enabled(qm, True)
        torch.testing.assert_close(qm(x), quantized, rtol=0, atol=0)
    qm.train()  # train()/eval() never change the fake-quant state
    assert set(qatkit.get_fake_quant_state(qm)) == {qatkit.FakeQuantState.VALIDATION}


def test_cat_add_relu_mul_are_quantized_ops_with_their_own_scales():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 12, 12)
    model = settle_batchnorm(CatNet(), x)
    fused = qatkit.fuse_modules(model, CAT_GROUPS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing stays float unannounced
        qm = qatkit.prepare_qat(fused, {"": QCONFIG})
    kinds = {n: m.qatkit_op_kind for n, m in qm.named_modules()
             if isinstance(m, QATFloatFunctional)}
    assert kinds == {"cat": "cat", "add_relu": "add_relu", "mul": "mul"}
    qatkit.calibrate(qm, x, progress=False)
    with torch.no_grad():
        out = qm(x)
        ref = model(x)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), 0) > 0.99
    anns = {a.name: a for a in qatkit.get_annotations(eager_graph(qm)).values()}
    assert anns["add_relu"].float_name == "add_relu.relu"
    assert anns["cat"].output.dtype == "qint8"


@pytest.mark.parametrize("check_convert", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_torch_ao_eager_models_prepare_unchanged(check_convert):
    """torchvision's quantizable models (torch.ao QuantStub, fused modules, FloatFunctional)."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.quantization.resnet18(weights=None, quantize=False).eval()
    model.fuse_model(is_qat=True)
    model.qconfig = QCONFIG
    qm = qatkit.prepare_qat(model)
    assert isinstance(qm.conv1, qatkit.nn.qat.Conv2d) and qm.conv1._get_name() == "ConvBnReLU2d"
    assert isinstance(qm.layer1[0].add_relu, QATFloatFunctional)
    assert isinstance(qm.quant, qatkit.nn.qat.QuantStub)
    x = torch.randn(2, 3, 32, 32)
    qatkit.calibrate(qm, x, progress=False, state="qat")
    assert qm.layer1[0].add_relu.qatkit_op_kind == "add_relu"
    if check_convert:
        qatkit.set_fake_quant_state(qm, "validation")
        im = qatkit.convert(qm)
        with torch.no_grad():
            torch.testing.assert_close(im(x), qm(x), rtol=0, atol=0)


def test_float_functional_is_the_torch_op_in_a_float_model():
    ff = qatkit.nn.FloatFunctional()
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(ff.add(a, b), a + b, rtol=0, atol=0)
    torch.testing.assert_close(ff.cat([a, b], dim=1), torch.cat([a, b], 1), rtol=0, atol=0)
    torch.testing.assert_close(ff.mul(a, b), a * b, rtol=0, atol=0)
    torch.testing.assert_close(ff.matmul(a, b.T), a @ b.T, rtol=0, atol=0)
    torch.testing.assert_close(ff.add_relu(a, b), torch.relu(a + b), rtol=0, atol=0)
    torch.testing.assert_close(ff.add_scalar(a, 2.0), a + 2, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="through its methods"):
        ff(a, b)
    # prepare_qat_fx traces through it: the op is named inside the FloatFunctional
    names = float_node_names(qatkit.fx.symbolic_trace(CatNet())).values()
    assert {"cat.cat", "add_relu.add", "add_relu.relu", "mul.mul"} <= set(names)
    # so a model written for eager mode also prepares with prepare_qat_fx, and the names agree
    torch.manual_seed(0)
    x = torch.randn(4, 3, 12, 12)
    model = settle_batchnorm(CatNet(), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fx_qm = qatkit.prepare_qat_fx(model, {"": QCONFIG}, example_inputs=(x,))
    eager_qm = qatkit.prepare_qat(qatkit.fuse_modules(model, CAT_GROUPS), {"": QCONFIG})
    fx_prov = qatkit.get_provenance(fx_qm)
    eager_prov = qatkit.get_provenance(eager_graph(eager_qm))
    assert fx_prov["cat.cat"] == eager_prov["cat"] == "cat.cat"
    assert fx_prov["mul.mul"] == eager_prov["mul"] == "mul.mul"


class Optional(nn.Module):
    """torchvision's pattern: a FloatFunctional and an empty Sequential a block may not use."""

    def __init__(self, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.quant = qatkit.QuantStub()
        self.conv = nn.Conv2d(3, 3, 1)
        self.skip_add = qatkit.nn.FloatFunctional()
        self.branch = nn.Sequential()
        self.dequant = qatkit.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        y = self.conv(self.branch(x))
        return self.dequant(self.skip_add.add(x, y) if self.residual else y)


@pytest.mark.parametrize("residual", [True, False])
def test_unused_float_functional_and_empty_sequential_stay_plain(residual):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing listed as float, nothing idle at calibration
        qm = qatkit.prepare_qat(Optional(residual), {"": QCONFIG})
        qatkit.calibrate(qm, torch.randn(2, 3, 4, 4), progress=False)
        qatkit.convert(qm)
    assert isinstance(qm.skip_add, QATFloatFunctional) == residual
    assert type(qm.branch) is nn.Sequential


def test_inplace_prepare_that_fails_leaves_the_model_as_it_was():
    """A prepare_qat(inplace=True) that raises half way does not leave a half-prepared model."""
    torch.manual_seed(0)

    class Net(nn.Module):  # no QuantStub: prepare swaps modules, then refuses the model input
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.relu = nn.ReLU()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.relu(self.conv(x)).mean((2, 3)))

    model = Net().eval()
    model.qconfig = qatkit.default_qat_8bit_fake_quant_qconfig
    before = {n: type(m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="QuantStub"):
        qatkit.prepare_qat(model, inplace=True)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert model.state_dict().keys() == state.keys()
    assert not qatkit.eager.is_eager_model(model)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 2)
