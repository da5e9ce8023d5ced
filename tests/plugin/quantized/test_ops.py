"""Integer weightless ops (qatkit.quantized.ops / norm) against their fake-quant QAT modules.

Each case builds the QAT module the way prepare does, calibrates it, feeds inputs already on
their integer grid, converts it with ``CONVERTERS[kind]`` (the call bound by name with
``bind_call``, no graph needed) and compares output integers: at least 99% exactly equal and
none more than 1 LSB apart (docs/npu_numerics_ops.md).
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import pytest
import qatkit
import qatkit.quantized.norm  # noqa: F401  (registers the norm converters)
import qatkit.quantized.ops  # noqa: F401  (registers the op converters)
import torch
import torch.nn.functional as F
from qatkit.nn import qat
from qatkit.quantized.base import CONVERTERS, TensorArg, TensorQParams, bind_call
from qatkit.quantized.ops import _einsum_terms
from torch import Tensor, fx, nn

CAL, VAL = qatkit.FakeQuantState.CALIBRATION, qatkit.FakeQuantState.VALIDATION
SPREAD = {8: 40.0, 16: 9000.0}  # std of the random input integers


def _fq(bits: int, scale: float | None = None) -> qatkit.FakeQuantize:
    if scale is None:
        return qatkit.FakeQuantize(dtype=f"qint{bits}")
    return qatkit.FakeQuantize(observer=qatkit.FixedScaleObserver, scale=scale,
                               dtype=f"qint{bits}")


class _Inputs:
    """Random grid tensors ``q * s`` and their qparams (by identity)."""

    def __init__(self, bits: int, seed: int = 0) -> None:
        self.bits = bits
        self.gen = torch.Generator().manual_seed(seed)
        self.qparams: dict[int, TensorQParams] = {}

    def __call__(self, *shape: int, scale: float = 0.0213, spread: float | None = None) -> Tensor:
        qp = TensorQParams(torch.tensor([scale]), self.bits)
        std = SPREAD[self.bits] if spread is None else spread
        q = torch.round(torch.randn(shape, generator=self.gen) * std)
        x = q.clamp(qp.quant_min, qp.quant_max) * qp.scale
        self.qparams[id(x)] = qp
        return x

    def float(self, *shape: int) -> Tensor:
        return torch.randn(shape, generator=self.gen)


def _tensors(args: Any) -> list[Tensor]:
    """The tensors of nested ``args`` in order."""
    found: list[Tensor] = []
    fx.node.map_aggregate(args, lambda a: found.append(a) if isinstance(a, Tensor) else a)
    return found


def _convert(mod: nn.Module, inputs: _Inputs, args: tuple, kwargs: dict,
             out_bits: int | None) -> nn.Module:
    """``CONVERTERS[kind]`` with the call bound by hand: grid tensors -> their qparams, other
    tensors -> float (``TensorArg(None)``)."""
    def wrap(a: Any) -> Any:
        if isinstance(a, Tensor):
            qp = inputs.qparams.get(id(a))
            return qp if qp is not None else TensorArg(None)
        return a

    call = bind_call(mod, *fx.node.map_aggregate(args, wrap),
                     **fx.node.map_aggregate(kwargs, wrap))
    fq = mod.activation_post_process
    out_qp = TensorQParams(fq.scale, out_bits) if out_bits is not None else None
    return CONVERTERS[mod.qatkit_op_kind](mod, call, out_qp)


def _run(mod: nn.Module, inputs: _Inputs, args: tuple, kwargs: dict | None = None,
         ) -> tuple[Tensor, Tensor, Tensor, nn.Module]:
    """Calibrate ``mod`` on the inputs; (fake-quant out, integer out, out scale, int module)."""
    kwargs = kwargs or {}
    qatkit.set_fake_quant_state(mod, CAL)
    mod(*args, **kwargs)
    qatkit.set_fake_quant_state(mod, VAL)
    ref = mod(*args, **kwargs)
    qmod = _convert(mod, inputs, args, kwargs, inputs.bits)
    return ref, qmod(*args, **kwargs), mod.activation_post_process.scale, qmod


def _lsb(ref: Tensor, out: Tensor, scale: Tensor) -> tuple[float, int]:
    """(percent of output integers exactly equal, max difference in LSBs)."""
    s = scale.double().to(ref.device)
    diff = (torch.round(out.double() / s) - torch.round(ref.double() / s)).abs()
    return 100.0 * float((diff == 0).double().mean()), int(diff.max())


def _fn(kind: str, fn: Callable, bits: int) -> qat.FunctionalOp:
    return qat.FunctionalOp(kind, fn, _fq(bits))


def _mod(float_mod: nn.Module, bits: int) -> nn.Module:
    return qat.output_quantized(float_mod, _fq(bits))


def _layer_norm(bits: int) -> nn.Module:
    ln = nn.LayerNorm(32)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(32) * 0.5 + 1)
        ln.bias.copy_(torch.randn(32) * 0.3)
    return _mod(ln, bits)


def _group_norm(bits: int) -> nn.Module:
    gn = nn.GroupNorm(4, 16)
    with torch.no_grad():
        gn.weight.copy_(torch.randn(16) * 0.5 + 1)
        gn.bias.copy_(torch.randn(16) * 0.3)
    return _mod(gn, bits)


def _batch_norm(bits: int) -> nn.Module:
    bn = nn.BatchNorm2d(16).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(16) * 0.3)
        bn.running_var.copy_(torch.rand(16) + 0.5)
        bn.weight.copy_(torch.randn(16))
        bn.bias.copy_(torch.randn(16) * 0.2)
    return _mod(bn, bits)


# name -> (bits -> (qat module, inputs, args, kwargs))
def _cases() -> dict[str, Callable[[int], tuple[nn.Module, _Inputs, tuple, dict]]]:
    def case(make_mod: Callable[[int], nn.Module], make_args: Callable[[_Inputs], tuple],
             kwargs: dict | None = None) -> Callable:
        def build(bits: int) -> tuple[nn.Module, _Inputs, tuple, dict]:
            torch.manual_seed(1)
            inputs = _Inputs(bits)
            return make_mod(bits), inputs, make_args(inputs), dict(kwargs or {})
        return build

    fn = lambda kind, f: (lambda bits: _fn(kind, f, bits))  # noqa: E731
    mod = lambda make: (lambda bits: _mod(make(), bits))  # noqa: E731
    img = lambda i: (i(2, 16, 9, 9),)  # noqa: E731
    return {
        "add_broadcast": case(fn("add", operator.add),
                              lambda i: (i(4, 6, 8), i(4, 1, 8, scale=0.0371))),
        "add_alpha": case(fn("add", torch.add), lambda i: (i(4, 8), i(4, 8, scale=0.011)),
                          {"alpha": 2}),
        "add_scalar": case(fn("add", operator.add), lambda i: (i(4, 8), 1.5)),
        "rsub_scalar": case(fn("sub", operator.sub), lambda i: (2, i(4, 8))),
        "add_float_tensor": case(fn("add", operator.add), lambda i: (i(4, 8), i.float(8))),
        "sub": case(fn("sub", torch.sub), lambda i: (i(4, 8), i(4, 8, scale=0.0171))),
        "mul": case(fn("mul", operator.mul), lambda i: (i(4, 8), i(4, 8, scale=0.0171))),
        "mul_scalar": case(fn("mul", operator.mul), lambda i: (i(4, 8), -0.37)),
        "mul_float_tensor": case(fn("mul", torch.mul), lambda i: (i(4, 8), i.float(8))),
        "cat": case(fn("cat", torch.cat),
                    lambda i: ([i(2, 3, 4), i(2, 5, 4, scale=0.05), i(2, 1, 4, scale=0.007)], 1)),
        "cat_float": case(fn("cat", torch.cat), lambda i: ([i(2, 4), i.float(3, 4)],)),
        "stack": case(fn("stack", torch.stack), lambda i: ([i(3, 4), i(3, 4, scale=0.03)], 0)),
        "matmul": case(fn("matmul", torch.matmul),
                       lambda i: (i(2, 3, 5, 16), i(2, 3, 16, 7, scale=0.031))),
        "bmm": case(fn("matmul", torch.bmm), lambda i: (i(3, 5, 16), i(3, 16, 7, scale=0.031))),
        "matmul_operator": case(fn("matmul", operator.matmul), lambda i: (i(5, 16), i(16, 3))),
        "einsum": case(fn("einsum", torch.einsum),
                       lambda i: ("bhqd,bhkd->bhqk", i(2, 2, 5, 8), i(2, 2, 6, 8, scale=0.04))),
        "einsum_list": case(fn("einsum", torch.einsum), lambda i: ("ij,jk", [i(5, 8), i(8, 4)])),
        "mean_keepdim": case(fn("mean", torch.Tensor.mean), lambda i: (*img(i), (2, 3), True)),
        "mean_all": case(fn("mean", torch.mean), lambda i: img(i)),
        "mean_dim": case(fn("mean", torch.mean), lambda i: img(i), {"dim": -1}),
        "avg_pool2d": case(fn("avg_pool", F.avg_pool2d), lambda i: (*img(i), 3, 2, 1, True, False)),
        "avg_pool1d": case(fn("avg_pool", F.avg_pool1d), lambda i: (i(2, 4, 11), 3, 2, 1)),
        "avg_pool_module": case(mod(lambda: nn.AvgPool2d(2)), img),
        "adaptive_avg_pool": case(fn("adaptive_avg_pool", F.adaptive_avg_pool2d),
                                  lambda i: (i(2, 4, 7, 7), (3, 3))),
        "adaptive_avg_pool_module": case(mod(lambda: nn.AdaptiveAvgPool2d(1)), img),
        "interpolate_nearest": case(fn("interpolate", F.interpolate), img,
                                    {"scale_factor": 2, "mode": "nearest"}),
        "interpolate_bilinear": case(fn("interpolate", F.interpolate), img,
                                     {"size": (11, 13), "mode": "bilinear",
                                      "align_corners": False}),
        "upsample_bilinear_module": case(
            mod(lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)), img),
        "upsample_nearest_module": case(mod(lambda: nn.UpsamplingNearest2d(scale_factor=2)),
                                        img),
        "softmax": case(fn("softmax", F.softmax), lambda i: (i(4, 6, 64, scale=0.05),),
                        {"dim": -1}),
        "torch_softmax": case(fn("softmax", torch.softmax), lambda i: (i(4, 64, scale=0.03), -1)),
        "softmax_module": case(mod(lambda: nn.Softmax(dim=1)), lambda i: (i(4, 16, 8),)),
        "log_softmax_module": case(mod(lambda: nn.LogSoftmax(dim=-1)),
                                   lambda i: (i(4, 32, scale=0.05),)),
        "layer_norm_module": case(_layer_norm, lambda i: (i(4, 7, 32),)),
        "layer_norm_functional": case(
            fn("layer_norm", F.layer_norm),
            lambda i: (i(4, 7, 32), (32,), i.float(32) * 0.5 + 1, i.float(32) * 0.3, 1e-5)),
        "group_norm_module": case(_group_norm, lambda i: (i(2, 16, 5, 5),)),
        "group_norm_functional": case(fn("group_norm", F.group_norm),
                                      lambda i: (i(2, 16, 5, 5), 4, i.float(16), i.float(16))),
        "batch_norm_module": case(_batch_norm, lambda i: (i(2, 16, 5, 5),)),
        "batch_norm_functional": case(
            fn("batch_norm", F.batch_norm),
            lambda i: (i(2, 16, 5, 5), i.float(16) * 0.3, i.float(16).abs() + 0.5, i.float(16),
                       i.float(16), False, 0.1, 1e-5)),
    }


CASES = _cases()


def _cat_kwargs(bits: int) -> tuple[nn.Module, _Inputs, tuple, dict]:
    inputs = _Inputs(bits)
    return (_fn("cat", torch.cat, bits), inputs, (),
            {"tensors": (inputs(2, 4), inputs(2, 3, scale=0.09)), "dim": -1})


CASES["cat_kwargs"] = _cat_kwargs  # its tensors are keyword arguments


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_fake_quant(name: str, bits: int) -> None:
    mod, inputs, args, kwargs = CASES[name](bits)
    ref, out, scale, _ = _run(mod, inputs, args, kwargs)
    assert out.dtype == torch.float32 and out.shape == ref.shape, f"{name}: {out.shape}"
    exact, max_lsb = _lsb(ref, out, scale)
    print(f"{name} int{bits}: {exact:.2f}% exact, max {max_lsb} LSB, {ref.numel()} elements")
    assert max_lsb <= 1, f"{name} int{bits}: {max_lsb} LSB apart"
    assert exact >= 99.0, f"{name} int{bits}: only {exact:.2f}% exact"


def test_exact_ties_round_half_to_even() -> None:
    """Power-of-two scales make exact ties; the integer ops round them as the fake quant does."""
    inputs = _Inputs(8)
    a, b = inputs(4, 64, 64, scale=2**-6), inputs(4, 64, 64, scale=2**-6)
    cases = [(qat.FunctionalOp("add", operator.add, _fq(8, 2**-5)), (a, b)),
             (qat.FunctionalOp("avg_pool", F.avg_pool2d, _fq(8, 2**-6)), (a, 2)),
             (qat.FunctionalOp("cat", torch.cat, _fq(8, 2**-4)), ([a, b],)),
             # squeeze-excitation: x * sigmoid(...), the sigmoid saturated (scale exactly 1/128)
             # and the output scale that of x
             (qat.FunctionalOp("mul", operator.mul, _fq(8, 2**-6)),
              (a, inputs(4, 64, 1, scale=2**-7, spread=60)))]
    for mod, args in cases:
        ref, out, scale, _ = _run(mod, inputs, args)
        torch.testing.assert_close(out, ref, atol=0, rtol=0, msg=mod.op)


def test_float_output_runs_the_float_op() -> None:
    inputs = _Inputs(8)
    a, b = inputs(4, 8), inputs(4, 8, scale=0.05)
    for mod, args in [(qat.FunctionalOp("mul", operator.mul, None), (a, b)),
                      (qat.output_quantized(nn.Softmax(dim=-1), None), (a,)),
                      (qat.output_quantized(nn.LayerNorm(8), None), (a,))]:
        qmod = _convert(mod, inputs, args, {}, None)
        torch.testing.assert_close(qmod(*args), mod(*args), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["add_broadcast", "cat", "softmax_module", "layer_norm_module",
                                  "batch_norm_module", "interpolate_nearest", "matmul"])
def test_state_dict_round_trip(name: str, tmp_path) -> None:
    mod, inputs, args, kwargs = CASES[name](8)
    _, out, _, qmod = _run(mod, inputs, args, kwargs)
    path = tmp_path / "int.pt"
    torch.save(qmod.state_dict(), path)
    # a module converted with other scales (other multipliers, other LUT size) takes the state
    other_mod, _, _, _ = CASES[name](8)
    scaled = fx.node.map_aggregate(args, lambda a: a * 3 if isinstance(a, Tensor) else a)
    scaled_kw = fx.node.map_aggregate(kwargs, lambda a: a * 3 if isinstance(a, Tensor) else a)
    qatkit.set_fake_quant_state(other_mod, CAL)
    other_mod(*scaled, **scaled_kw)
    qatkit.set_fake_quant_state(other_mod, VAL)
    other_inputs = _Inputs(8)
    other_inputs.qparams = {k: TensorQParams(qp.scale * 3, 8) for k, qp in inputs.qparams.items()}
    fresh = _convert(other_mod, other_inputs, args, kwargs, 8)
    assert not torch.equal(fresh(*args, **kwargs), out), "the test needs different scales"
    fresh.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(fresh(*args, **kwargs), out, atol=0, rtol=0)


def _expect_error(mod: nn.Module, inputs: _Inputs, args: tuple, kwargs: dict,
                  match: str) -> None:
    qatkit.set_fake_quant_state(mod, CAL)
    mod(*args, **kwargs)
    qatkit.set_fake_quant_state(mod, VAL)
    with pytest.raises(NotImplementedError, match=match) as info:
        _convert(mod, inputs, args, kwargs, 8)
    assert f"({mod.qatkit_op_kind})" in str(info.value), f"name the op: {info.value}"


def test_unsupported_arguments_name_the_op_and_argument() -> None:
    inputs = _Inputs(8)
    x = inputs(4, 8)
    _expect_error(qat.FunctionalOp("matmul", torch.matmul, _fq(8)), inputs,
                  (x, inputs.float(8, 3)), {}, "operand 1 is not a quantized tensor")
    _expect_error(qat.FunctionalOp("softmax", F.softmax, _fq(8)), inputs, (x, -1),
                  {"dtype": torch.float64}, "dtype=torch.float64")
    _expect_error(qat.FunctionalOp("batch_norm", F.batch_norm, _fq(8)), inputs,
                  (inputs(4, 8), None, None), {"training": True}, "running statistics")
    _expect_error(qat.FunctionalOp("add", operator.add, _fq(8)), inputs,
                  (inputs.float(8), 1.0), {}, "no operand is a quantized tensor")


def test_einsum_terms_counts_the_summed_products() -> None:
    assert _einsum_terms("bhqd,bhkd->bhqk", [(2, 3, 5, 8), (2, 3, 6, 8)]) == 8
    assert _einsum_terms("ij,jk", [(5, 8), (8, 4)]) == 8
    assert _einsum_terms("...ij,...jk->...ik", [(7, 5, 8), (7, 8, 4)]) == 8
    assert _einsum_terms("...i->", [(3, 4, 5)]) == 60
    assert _einsum_terms("i,j->ij", [(3,), (4,)]) == 1


def test_transformer_block() -> None:
    """layer_norm -> q k^T * scale -> softmax -> @ v -> + residual, each op converted.

    Every op agrees with its fake-quant module on the same input; chained end to end, a 1-LSB
    difference may move a later op's output by 1 LSB more at most.
    """
    torch.manual_seed(0)
    inputs = _Inputs(8)
    x = inputs(2, 10, 32, scale=0.03)
    mods = {"ln": _layer_norm(8), "qk": _fn("matmul", torch.matmul, 8),
            "scale": _fn("mul", operator.mul, 8), "sm": _mod(nn.Softmax(dim=-1), 8),
            "av": _fn("matmul", torch.matmul, 8), "res": _fn("add", operator.add, 8)}

    def block(m: dict[str, Callable], x: Tensor) -> dict[str, Tensor]:
        t = {"ln": m["ln"](x)}
        t["qk"] = m["qk"](t["ln"], t["ln"].transpose(-1, -2))
        t["scale"] = m["scale"](t["qk"], 32**-0.5)
        t["sm"] = m["sm"](t["scale"])
        t["av"] = m["av"](t["sm"], t["ln"])
        t["res"] = m["res"](t["av"], x)
        return t

    qatkit.set_fake_quant_state(nn.ModuleDict(mods), CAL)
    block(mods, x)
    qatkit.set_fake_quant_state(nn.ModuleDict(mods), VAL)
    ref = block(mods, x)
    for name, t in ref.items():  # the qparams of every fake-quant tensor
        inputs.qparams[id(t)] = TensorQParams(mods[name].activation_post_process.scale, 8)
    feeds = {"ln": ((x,), {}), "qk": ((ref["ln"], ref["ln"].transpose(-1, -2)), {}),
             "scale": ((ref["qk"], 32**-0.5), {}), "sm": ((ref["scale"],), {}),
             "av": ((ref["sm"], ref["ln"]), {}), "res": ((ref["av"], x), {})}
    qmods = {}
    for name, (args, kwargs) in feeds.items():
        for t in _tensors((args, kwargs)):
            inputs.qparams.setdefault(id(t), inputs.qparams[id(ref["ln"])])
        qmods[name] = _convert(mods[name], inputs, args, kwargs, 8)
        exact, max_lsb = _lsb(mods[name](*args), qmods[name](*args), mods[name]
                              .activation_post_process.scale)
        assert max_lsb <= 1 and exact >= 99.0, f"{name}: {exact:.2f}% exact, {max_lsb} LSB"
    out = block(qmods, x)
    exact, max_lsb = _lsb(ref["res"], out["res"], mods["res"].activation_post_process.scale)
    print(f"transformer block end to end: {exact:.2f}% exact, max {max_lsb} LSB")
    assert exact >= 95.0 and max_lsb <= 2, f"end to end: {exact:.2f}% exact, {max_lsb} LSB"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["add_broadcast", "mul", "cat", "matmul", "einsum",
                                  "avg_pool2d", "interpolate_bilinear", "softmax",
                                  "layer_norm_module", "group_norm_module", "batch_norm_module"])
def test_cuda_matches_cpu(name: str) -> None:
    mod, inputs, args, kwargs = CASES[name](16)
    _, out, _, qmod = _run(mod, inputs, args, kwargs)
    to_cuda = lambda a: a.cuda() if isinstance(a, Tensor) else a  # noqa: E731
    qmod = qmod.cuda()
    out_cuda = qmod(*fx.node.map_aggregate(args, to_cuda),
                    **fx.node.map_aggregate(kwargs, to_cuda))
    torch.testing.assert_close(out_cuda.cpu(), out, atol=0, rtol=0)


def test_matmul_refuses_sums_float64_cannot_hold(monkeypatch) -> None:
    import qatkit.quantized.ops as ops

    mod, inputs, args, kwargs = CASES["matmul"](16)
    _, _, _, qmod = _run(mod, inputs, args, kwargs)
    monkeypatch.setattr(ops, "_EXACT", 2**30 * 8)  # pretend float64 had 33 bits: 16 terms fail
    qmod.qatkit_name = "blocks.0.matmul"  # convert_fx names every integer module
    with pytest.raises(RuntimeError, match="blocks.0.matmul.*exceed"):
        qmod(*args)
