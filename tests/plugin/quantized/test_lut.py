"""Lookup tables (qatkit.quantized.lut) against the fake-quant QAT ops they replace.

A table is built from the very floats the fake-quant model computes, so the integer op must
agree with it bit for bit: every comparison here is ``atol=0, rtol=0``.
"""

from __future__ import annotations

import io

import pytest
import qatkit
import torch
import torch.nn.functional as F
from qatkit.fx import op_kind
from qatkit.fx.convert import bound_call
from qatkit.quantized.base import CONVERTERS, TensorArg, TensorQParams, bind_call
from qatkit.quantized.lut import LUT_OPS, QuantizedLookupTable, convert_lut
from torch import fx, nn

Q8 = qatkit.default_qat_8bit_fake_quant_qconfig
Q16 = qatkit.default_qat_16bit_fake_quant_qconfig

#: name -> the op applied to the (quantized) graph input; constants included
OPS = {
    "relu": F.relu,
    "relu_module": nn.ReLU(),
    "relu6": F.relu6,
    "hardtanh": lambda x: F.hardtanh(x, -0.5, 1.5),
    "clamp": lambda x: torch.clamp(x, min=-1.0, max=0.5),
    "clamp_method": lambda x: x.clamp(min=-0.25),
    "sigmoid": torch.sigmoid,
    "sigmoid_module": nn.Sigmoid(),
    "tanh": torch.tanh,
    "exp": lambda x: x.exp(),
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "silu_module": nn.SiLU(),
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "mish": F.mish,
    "elu_module": nn.ELU(alpha=0.7),
    "leaky_relu": lambda x: F.leaky_relu(x, 0.2),
    "leaky_relu_kwarg": lambda x: F.leaky_relu(x, negative_slope=0.05),
}


class _Apply(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _prepared(fn, qconfig=Q8, seed: int = 0) -> fx.GraphModule:
    """``fn(x)`` prepared, calibrated on random data, in VALIDATION state."""
    torch.manual_seed(seed)
    gm = qatkit.prepare_qat_fx(_Apply(fn), {"": qconfig}, example_inputs=(torch.randn(2, 8),))
    gm.eval()
    qatkit.set_fake_quant_state(gm, "calibration")
    with torch.no_grad():
        for _ in range(3):
            gm(torch.randn(16, 32) * 2)
    qatkit.set_fake_quant_state(gm, "validation")
    return gm


def _lut_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, nn.Module, str]]:
    modules = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            kind = op_kind(modules[node.target])
            if kind in LUT_OPS:
                found.append((node, modules[node.target], kind))
    return found


def _qparams(gm: fx.GraphModule, node: fx.Node) -> TensorQParams:
    fq = gm.get_submodule(node.target).activation_post_process
    return TensorQParams(fq.scale, fq.bits)


def _convert_and_compare(gm: fx.GraphModule, x: torch.Tensor) -> list[QuantizedLookupTable]:
    """Convert every LUT op of ``gm``, feed it the inputs its QAT module saw, compare."""
    found = _lut_nodes(gm)
    assert found, "the prepared model has no lookup-table op"
    seen = {}
    hooks = [mod.register_forward_hook(
        lambda m, a, kw, out, name=node.target: seen.__setitem__(name, (a, kw, out)),
        with_kwargs=True) for node, mod, _ in found]
    with torch.no_grad():
        gm(x)
    for h in hooks:
        h.remove()
    converted = []
    for node, mod, kind in found:
        lut = CONVERTERS[kind](mod, bound_call(gm, node), _qparams(gm, node))
        assert isinstance(lut, QuantizedLookupTable)
        args, kwargs, ref = seen[node.target]
        with torch.no_grad():
            out = lut(*args, **kwargs)
        torch.testing.assert_close(out, ref, atol=0, rtol=0,
                                   msg=lambda m, k=kind: f"{k}: {m}")
        converted.append(lut)
    return converted


def test_every_lut_kind_is_registered():
    assert all(CONVERTERS[k] is convert_lut for k in LUT_OPS)


@pytest.mark.parametrize("name", list(OPS))
def test_lut_is_bit_exact_int8(name):
    gm = _prepared(OPS[name])
    x = torch.randn(64, 32) * 2
    (lut,) = _convert_and_compare(gm, x)
    assert lut.table.dtype == torch.int8 and lut.table.numel() == 256


@pytest.mark.parametrize("name", ["sigmoid", "gelu", "leaky_relu", "clamp", "exp"])
def test_lut_is_bit_exact_int16_with_65536_entries(name):
    gm = _prepared(OPS[name], Q16)
    x = torch.randn(64, 64) * 2
    (lut,) = _convert_and_compare(gm, x)
    assert lut.table.dtype == torch.int16 and lut.table.numel() == 65536


def test_table_entries_cover_the_whole_input_range_in_order():
    """Every input integer q maps to table[q - qmin]: compare on all 256 grid values."""
    gm = _prepared(torch.sigmoid)
    node, mod, kind = _lut_nodes(gm)[0]
    in_qp = _qparams(gm, node.all_input_nodes[0])
    lut = convert_lut(mod, bound_call(gm, node), _qparams(gm, node))
    grid = torch.arange(-128, 128, dtype=torch.float32) * in_qp.scale
    with torch.no_grad():
        torch.testing.assert_close(lut(grid), mod(grid), atol=0, rtol=0)
        # inputs beyond the range saturate to its ends
        far = torch.tensor([-1000.0, 1000.0]) * in_qp.scale
        torch.testing.assert_close(lut(far), mod(grid[[0, -1]]), atol=0, rtol=0)


def test_float_output_table_holds_the_float_function():
    qp = TensorQParams(torch.tensor([0.05]), 8)
    mod = qatkit.nn.qat.FunctionalOp("tanh", torch.tanh, None)
    lut = convert_lut(mod, bind_call(mod, qp), None)
    assert lut.table.dtype == torch.float32
    x = torch.arange(-128, 128, dtype=torch.float32) * qp.scale
    torch.testing.assert_close(lut(x), torch.tanh(x), atol=0, rtol=0)


def test_state_dict_round_trip_with_weights_only_load():
    gm = _prepared(F.silu, Q16)
    node, mod, kind = _lut_nodes(gm)[0]
    in_qps = [_qparams(gm, node.all_input_nodes[0])]
    lut = convert_lut(mod, bound_call(gm, node), _qparams(gm, node))
    other = _prepared(F.silu, Q16, seed=1)  # other scales: a different table
    node2, mod2, _ = _lut_nodes(other)[0]
    fresh = convert_lut(mod2, bound_call(other, node2), _qparams(other, node2))
    x = torch.arange(-32768, 32768, 7, dtype=torch.float32) * in_qps[0].scale
    assert not torch.equal(fresh(x), lut(x))
    buf = io.BytesIO()
    torch.save(lut.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(fresh(x), lut(x), atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_outputs():
    gm = _prepared(F.gelu, Q16)
    node, mod, _ = _lut_nodes(gm)[0]
    in_qp = _qparams(gm, node.all_input_nodes[0])
    lut = convert_lut(mod, bound_call(gm, node), _qparams(gm, node))
    x = torch.arange(-32768, 32768, dtype=torch.float32) * in_qp.scale
    torch.testing.assert_close(lut.cuda()(x.cuda()).cpu(), lut.cpu()(x), atol=0, rtol=0)


def test_docstring_example():
    qp = TensorQParams(torch.tensor([1 / 16]), 8)
    table = torch.arange(-128, 128).clamp(min=0).to(torch.int8)
    relu = QuantizedLookupTable(table, qp, qp, op="relu")
    torch.testing.assert_close(relu(torch.tensor([-0.5, 0.25])), torch.tensor([0.0, 0.25]))
    assert "entries=256" in repr(relu)


# -- errors --------------------------------------------------------------------------------
def test_two_tensor_arguments_are_rejected():
    qp = TensorQParams(torch.tensor([0.1]), 8)
    mod = qatkit.nn.qat.FunctionalOp("clamp", torch.clamp, None)
    with pytest.raises(ValueError, match="exactly one tensor input, the call has 2"):
        convert_lut(mod, bind_call(mod, qp, min=qp), qp)


def test_float_input_is_rejected():
    mod = qatkit.nn.qat.FunctionalOp("sigmoid", torch.sigmoid, None)
    with pytest.raises(ValueError, match="not quantized"):
        convert_lut(mod, bind_call(mod, TensorArg(None)), TensorQParams(torch.tensor([0.01]), 8))


def test_non_elementwise_function_is_rejected():
    mod = qatkit.nn.qat.FunctionalOp("relu", lambda x: x.sum(), None)
    qp = TensorQParams(torch.tensor([0.1]), 8)
    with pytest.raises(ValueError, match="not a float elementwise op"):
        convert_lut(mod, bind_call(mod, qp), qp)


def test_table_size_must_match_the_input_bits():
    qp = TensorQParams(torch.tensor([0.1]), 16)
    with pytest.raises(ValueError, match="65536 entries, got 256"):
        QuantizedLookupTable(torch.zeros(256, dtype=torch.int8), qp, None)
