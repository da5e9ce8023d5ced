"""Division and the steep lookup-table functions (sqrt, rsqrt, reciprocal, log, exp), int8 and
int16: prepared, calibrated, converted; the integer model equals the fake-quant model."""

from __future__ import annotations

import warnings

import pytest
import qatkit
import torch
from qatkit.quantized.base import TensorQParams
from qatkit.quantized.lut import lookup_table
from torch import nn

Q8 = qatkit.default_qat_8bit_fake_quant_qconfig
Q16 = qatkit.default_qat_16bit_fake_quant_qconfig


class Steep(nn.Module):
    def forward(self, x):
        pos = x * x + 0.5
        return (torch.sqrt(pos), torch.rsqrt(pos), torch.reciprocal(pos), torch.log(pos),
                (x * 0.5).exp(), pos.sqrt().log())


class Divisions(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("norm", torch.tensor([2.0, 3.0, 4.0, 5.0]))

    def forward(self, x, y):
        return (x / (y * y + 1.0),     # an activation divisor: reciprocal table, then multiply
                x / 3.0,               # a constant
                x / self.norm,         # a buffer (per element)
                1.0 / (x * x + 1.0),   # a constant dividend
                x.div(y.abs() + 0.5))  # the method spelling


def _run(model: nn.Module, qconfig, *inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(model, {"": qconfig}, example_inputs=inputs).eval()
    qatkit.calibrate(qm, [inputs], progress=False)
    im = qatkit.convert_fx(qm)
    with torch.no_grad():
        return qm, im, model(*inputs), qm(*inputs), im(*inputs)


@pytest.mark.parametrize("qconfig", [Q8, Q16], ids=["int8", "int16"])
def test_steep_functions_are_lookup_tables_equal_to_the_fake_quant_model(qconfig):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 2
    qm, im, ref, fake, integer = _run(Steep(), qconfig, x)
    kinds = {a.kind for a in qatkit.get_annotations(qm).values() if a.is_quantized}
    assert {"sqrt", "rsqrt", "reciprocal", "log", "exp"} <= kinds
    luts = [m for m in im.modules() if type(m).__name__ == "QuantizedLookupTable"]
    assert len(luts) == 7 and all(t.table.numel() == 2 ** (16 if qconfig is Q16 else 8)
                                  for t in luts)
    for f, i, r in zip(fake, integer, ref, strict=True):
        torch.testing.assert_close(i, f, atol=0, rtol=0)
        assert torch.nn.functional.cosine_similarity(f.flatten(), r.flatten(), 0) > 0.98


@pytest.mark.parametrize("qconfig", [Q8, Q16], ids=["int8", "int16"])
def test_division_is_exact_against_the_fake_quant_model(qconfig):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen)
    qm, im, ref, fake, integer = _run(Divisions(), qconfig, x, y)
    divs = [m for m in qm.modules() if isinstance(m, qatkit.nn.qat.Divide)]
    assert [m.reciprocal_post_process is not None for m in divs] == [True, False, False, True,
                                                                      True]
    for k, (f, i, r) in enumerate(zip(fake, integer, ref, strict=True)):
        torch.testing.assert_close(i, f, atol=0, rtol=0, msg=f"output {k}")
        assert torch.nn.functional.cosine_similarity(f.flatten(), r.flatten(), 0) > 0.98, k
    kinds = [type(im.get_submodule(m)).__name__ for m in ("div", "div_1", "div_2", "div_3",
                                                           "div_4")]
    assert kinds == ["QuantizedDivide", "QuantizedMul", "QuantizedMul", "QuantizedDivide",
                     "QuantizedDivide"]


def test_out_of_domain_inputs_take_the_nearest_entry_inside_the_domain():
    qp = TensorQParams(torch.tensor([0.25]), 8)
    out = TensorQParams(torch.tensor([0.05]), 8)
    table = lookup_table(torch.sqrt, qp, out)
    assert table.dtype == torch.int8 and int(table[:128].abs().max()) == 0  # q < 0: sqrt(0)
    logs = lookup_table(torch.log, qp, out)
    assert int(logs[:129].max()) == -128  # q <= 0: log(0) = -inf, saturated
    with pytest.raises(ValueError, match="NaN on the whole input grid"):
        lookup_table(lambda t: t * float("nan"), qp, out)


def test_floor_division_stays_float_and_is_reported():
    class Floor(nn.Module):
        def forward(self, x):
            return torch.div(x * 2, 3, rounding_mode="floor")

    with pytest.warns(UserWarning, match="div\\(rounding_mode\\)"):
        qm = qatkit.prepare_qat_fx(Floor(), {"": Q8})
    note = qatkit.annotation.annotation_by_name(qm)["div"].note
    assert note == "no quantized implementation"
