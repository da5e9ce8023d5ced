"""QuantStub / DeQuantStub: identities in float models, validated arguments."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import qatkit.nn.stubs as stubs_module
import torch
from qatkit import DeQuantStub, QuantStub
from torch import nn


@pytest.mark.parametrize("stub", [QuantStub(), QuantStub(scale=1 / 128, dtype="qint16"),
                                  DeQuantStub()])
def test_stubs_are_identities_for_values_and_gradients(stub):
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = stub(x)
    assert out is x
    grad = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    (out * 1.0).backward(grad)
    torch.testing.assert_close(x.grad, grad, atol=0, rtol=0)


def test_quant_stub_keeps_its_settings():
    stub = QuantStub(scale=1 / 128, dtype="qint8")
    assert stub.scale == 1 / 128 and isinstance(stub.scale, float) and stub.dtype == "qint8"
    assert "scale=0.0078125" in repr(stub)
    assert QuantStub().scale is None and QuantStub().dtype is None
    assert QuantStub(scale=2).scale == 2.0 and QuantStub(scale=np.float32(0.5)).scale == 0.5


@pytest.mark.parametrize("scale", [0, 0.0, -1 / 128, float("inf"), float("nan"), "0.1", True,
                                   [0.1]])
def test_quant_stub_rejects_a_bad_scale(scale):
    with pytest.raises(ValueError, match="QuantStub scale must be a positive finite number"):
        QuantStub(scale=scale)


def test_quant_stub_rejects_a_bad_dtype():
    with pytest.raises(ValueError, match="choose 'qint8' or 'qint16'"):
        QuantStub(dtype="qint3")


def test_stubs_leave_a_float_model_unchanged():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    model = nn.Sequential(QuantStub(scale=1 / 128), conv, DeQuantStub())
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(model(x), conv(x), atol=0, rtol=0)


def test_docstring_examples_are_true():
    globs = dict(vars(stubs_module), torch=torch, nn=nn)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(verbose=False)
    tests = [t for t in finder.find(stubs_module, globs=globs) if t.examples]
    assert {t.name.rsplit(".", 1)[-1] for t in tests} >= {"QuantStub", "DeQuantStub"}
    for t in tests:
        runner.run(t, clear_globs=False)
    assert runner.summarize(verbose=False).failed == 0
    names = {**tests[0].globs, **tests[1].globs}
    net = names["Net"]()  # the QuantStub example defines a working model
    assert net.quant.scale == 1 / 128
    assert net(torch.rand(1, 3, 5, 5)).shape == (1, 8, 3, 3)
    torch.testing.assert_close(names["y"], torch.ones(2), atol=0, rtol=0)


def test_a_fixed_scale_quant_stub_follows_its_16_bit_qconfig():
    """The guide's grid-sample input: QuantStub(scale) with a 16-bit qconfig must be qint16
    (it was silently qint8, clipping the input at +-1)."""
    import warnings

    import qatkit

    class Grid(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.quant_stub = QuantStub(scale=1 / 128)
            self.quant_stub.qconfig = qatkit.default_calib_16bit_fake_quant_qconfig

        def forward(self, x):
            return self.quant_stub(x) * 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(Grid(), {"": qatkit.default_qat_8bit_fake_quant_qconfig})
    fq = qm.quant_stub.activation_post_process
    assert fq.dtype == "qint16" and float(fq.scale) == 1 / 128
    qatkit.set_fake_quant_state(qm, "validation")
    x = torch.tensor([3.0, -100.0])
    assert torch.equal(qm.quant_stub(x), x), "int16 at 1/128 holds +-256"
    ann = qatkit.annotation.annotation_by_name(qm)["quant_stub"]
    assert ann.output.dtype == "qint16" and ann.output.fixed_scale == 1 / 128
    # an explicit dtype on the stub still wins
    g = Grid()
    g.quant_stub.dtype = "qint8"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm8 = qatkit.prepare_qat_fx(g, {"": qatkit.default_qat_8bit_fake_quant_qconfig})
    assert qm8.quant_stub.activation_post_process.dtype == "qint8"
