"""FakeQuantize / LSQFakeQuantize numerics, FakeQuantState semantics, set_fake_quant_state,
state_dict and deepcopy.

The numerics are checked bit-exactly against a reference written here in numpy:
``clip(rint(x / scale), qmin, qmax) * scale`` in float32 (one float32 division, as ONNX
QuantizeLinear; ``np.rint`` rounds half to even).
"""

from __future__ import annotations

import copy
import doctest
import itertools
import math
import warnings

import numpy as np
import pytest
import qatkit.fake_quantize as fake_quantize_module
import torch
from qatkit import (
    FakeQuantize,
    FakeQuantState,
    LSQFakeQuantize,
    get_fake_quant_state,
    set_fake_quant_state,
)
from qatkit.observers import (
    FixedScaleObserver,
    KLObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
)
from torch import nn

QAT, CAL, VAL = FakeQuantState.QAT, FakeQuantState.CALIBRATION, FakeQuantState.VALIDATION
BITS = {"qint8": 8, "qint16": 16}
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu,
                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ref(x: torch.Tensor, scale: torch.Tensor, bits: int, ch_axis: int | None = None):
    """Reference fake quant and straight-through mask (numpy, float32, half to even)."""
    xn = x.detach().cpu().float().numpy()
    s = scale.detach().cpu().numpy().astype(np.float32)
    if ch_axis is not None:
        shape = [1] * xn.ndim
        shape[ch_axis] = -1
        s = s.reshape(shape)
    ratio = xn / s
    assert ratio.dtype == np.float32
    q = np.rint(ratio)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    inside = (q >= qmin) & (q <= qmax)
    out = (np.clip(q, qmin, qmax) * s).astype(np.float32)
    return torch.from_numpy(out), torch.from_numpy(inside)


def _exact(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), atol=0, rtol=0,
                               msg=msg or None)


# -- numerics: known answers --------------------------------------------------------------------
def test_ties_round_half_to_even_and_clamp_int8_known_answers():
    fq = FakeQuantize(observer=MinMaxObserver, dtype="qint8")
    fq(torch.tensor([-1.0, 1.0]))  # scale = 1 / 128
    _exact(fq.scale, torch.tensor([1 / 128]))
    fq.set_state(VAL)
    k = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.0, 126.5, 127.5, -127.5, -128.5, -129.0,
                      200.0, -1000.0])
    expected = [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 3.0, 126.0, 127.0, -128.0, -128.0, -128.0, 127.0,
                -128.0]
    out = fq(k / 128)
    assert (out * 128).tolist() == expected


def test_ties_round_half_to_even_and_clamp_int16_known_answers():
    fq = FakeQuantize(observer=MinMaxObserver, dtype="qint16")
    fq(torch.tensor([1.0]))  # scale = 1 / 32768
    _exact(fq.scale, torch.tensor([1 / 32768]))
    fq.set_state(VAL)
    k = torch.tensor([0.5, 1.5, 2.5, -2.5, 32766.5, 32767.5, -32767.5, -32768.5, 1e6])
    out = fq(k.double().div(32768).float())
    assert (out * 32768).tolist() == [0.0, 2.0, 2.0, -2.0, 32766.0, 32767.0, -32768.0, -32768.0,
                                      32767.0]


# -- numerics: exact against the reference ------------------------------------------------------
def _tensor_with_ties(amax: float, bits: int, n: int = 2000, seed: int = 0) -> torch.Tensor:
    """Random values in [-amax, amax], exact .5 ties of a power-of-two scale, and values far
    beyond the clamp range."""
    half = 2 ** (bits - 1)
    scale = amax / half
    rand = (torch.rand(n, generator=_gen(seed)) * 2 - 1) * amax
    ks = torch.randint(-half - 3, half + 3, (200,), generator=_gen(seed + 1)).double() + 0.5
    ties = (ks * scale).float()
    far = torch.tensor([amax * 1.5, -amax * 1.5, amax * 100, -amax * 100, amax, -amax])
    return torch.cat([rand, ties, far])


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
@pytest.mark.parametrize("amax", [1.0, 3.0, 0.7])
def test_per_tensor_matches_reference_exactly(dtype, amax):
    bits = BITS[dtype]
    fq = FakeQuantize(observer=MinMaxObserver, dtype=dtype)
    calib = torch.tensor([-amax, amax * 0.5])
    out = fq(calib)  # QAT: observe, then fake-quantize
    expected_scale = torch.tensor([amax], dtype=torch.float32) / 2 ** (bits - 1)
    _exact(fq.scale, expected_scale)
    _exact(out, _ref(calib, expected_scale, bits)[0])
    fq.set_state(VAL)
    x = _tensor_with_ties(amax, bits)
    ref, _ = _ref(x, fq.scale, bits)
    _exact(fq(x), ref)
    if amax == 1.0:  # power-of-two scale: the ties really are ties
        v = x.double() * 2 ** (bits - 1)
        assert int((v - v.floor() == 0.5).sum()) >= 150


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
@pytest.mark.parametrize("ch_axis", [0, 1, -1])
def test_per_channel_matches_reference_exactly(dtype, ch_axis):
    bits = BITS[dtype]
    amaxes = torch.tensor([1.0, 3.0, 0.7, 2.0 ** -5])
    shape = [5, 6, 7]
    shape[ch_axis] = 4
    x = torch.rand(shape, generator=_gen(2)) * 2 - 1
    bshape = [1, 1, 1]
    bshape[ch_axis] = 4
    x = x * amaxes.view(bshape)
    fq = FakeQuantize(observer=MinMaxObserver, dtype=dtype, ch_axis=ch_axis)
    out = fq(x)
    expected_scale = x.abs().amax(dim=[d for d in range(3) if d != ch_axis % 3]) / 2 ** (bits - 1)
    _exact(fq.scale, expected_scale)
    _exact(out, _ref(x, expected_scale, bits, ch_axis % 3)[0])
    # frozen scale, new data with ties and values beyond the range
    fq.set_state(VAL)
    half = 2 ** (bits - 1)
    k = torch.randint(-half - 4, half + 4, shape, generator=_gen(3)).double() + 0.5
    ties = (k * expected_scale.double().view(bshape)).float()
    y = torch.cat([ties, x * 5], dim=(ch_axis + 1) % 3)  # more values, same channels
    _exact(fq(y), _ref(y, fq.scale, bits, ch_axis % 3)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_float_dtypes_are_quantized_in_float32_and_keep_their_dtype(dtype):
    fq = FakeQuantize(observer=MinMaxObserver)
    x = (torch.randn(500, generator=_gen(4)) * 2).to(dtype)
    out = fq(x)
    assert out.dtype == dtype
    scale = x.float().abs().max().reshape(1) / 128
    _exact(fq.scale, scale)
    _exact(out, _ref(x.float(), scale, 8)[0].to(dtype))


def test_float64_is_quantized_with_a_float64_division():
    """Exact evaluation's path: round(x / s) divided in float64, q * s returned in float64 (so
    casting to float32 gives what the float32 path gives on the grid)."""
    fq = FakeQuantize(observer=MinMaxObserver)
    fq(torch.tensor([-1.0, 1.0]))
    fq.set_state("validation")
    x = (torch.arange(-200, 201, dtype=torch.float64) + 0.5) * fq.scale.double() / 1.0
    x = x + torch.linspace(-1e-9, 1e-9, x.numel(), dtype=torch.float64)  # near-ties
    out = fq(x)
    assert out.dtype == torch.float64
    q = torch.round(x / fq.scale.double()).clamp(-128, 127)
    _exact(out, q * fq.scale.double())
    # the float32 path would round x to float32 first and move some near-ties
    assert not torch.equal(fq(x.float()).double(), out.float().double()), "no near-tie tested"


def test_output_has_the_shape_of_the_input():
    fq = FakeQuantize(observer=MinMaxObserver)
    x = torch.tensor(0.3)
    out = fq(x)  # scale 0.3 / 128: 0.3 -> 128, clamped to 127
    assert out.shape == ()
    _exact(out, _ref(x, fq.scale, 8)[0].reshape(()))
    _exact(out, (127 * fq.scale).reshape(()))
    assert fq(torch.ones(2, 0, 3)).shape == (2, 0, 3)


# -- gradient -----------------------------------------------------------------------------------
@pytest.mark.parametrize("ch_axis", [None, 1])
@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
def test_straight_through_gradient_is_zero_outside_the_clamp_range(ch_axis, dtype):
    bits = BITS[dtype]
    fq = FakeQuantize(observer=MinMaxObserver, dtype=dtype, ch_axis=ch_axis)
    calib = torch.rand(2, 3, 8, generator=_gen(5)) * 0.2
    calib[0, :, 0] = torch.tensor([1.0, 2.0, 0.25])  # power-of-two scales: exact ties
    fq(calib)
    fq.set_state(VAL)
    half = 2 ** (bits - 1)
    # values on both sides of the range ends, incl. the ties 127.5 (-> 128, outside) and
    # -128.5 (-> -128, inside)
    k = torch.tensor([-half - 2.0, -half - 0.5, -half + 0.5, 0.0, half - 1.5, half - 0.5,
                      half + 3.0, 1.0])
    s = fq.scale.view(1, -1, 1) if ch_axis == 1 else fq.scale
    x = (k.double().view(1, 1, 8).expand(2, 3, 8) * s.double()).float().requires_grad_(True)
    grad = torch.randn(2, 3, 8, generator=_gen(6))
    fq(x).backward(grad)
    _, inside = _ref(x, fq.scale, bits, ch_axis)
    _exact(x.grad, torch.where(inside, grad, torch.zeros(())))
    assert inside[..., 0].logical_not().all() and inside[..., 1].all()  # -half-2 out, -half-.5 in
    assert inside[..., 5].logical_not().all() and inside[..., 4].all()  # half-.5 -> half: out


@pytest.mark.parametrize("ch_axis", [None, 0])
def test_division_path_equals_the_aten_kernels_away_from_near_ties(monkeypatch, ch_axis):
    """The division path (VALIDATION, CPU training) and the ATen fake-quant kernels (training on
    CUDA, tracing) give the same outputs and gradients except where ``x / s`` lies within a
    float32 rounding of a half-integer (the ATen kernels multiply by a float32 ``1 / s``)."""
    x = (torch.randn(4, 16, 9, generator=_gen(7)) * 3).requires_grad_(True)
    grad = torch.randn(4, 16, 9, generator=_gen(8))
    fq = FakeQuantize(observer=MinMaxObserver, ch_axis=ch_axis)
    fq(x[:, :8].detach() * 0.5)  # scale from a smaller batch: plenty of clamped values
    fq.set_state(VAL)
    outs, grads = [], []
    for tracing in (False, True):
        monkeypatch.setattr(fake_quantize_module, "_is_tracing", lambda t=tracing: t)
        out = fq(x)
        out.backward(grad)
        outs.append(out.detach())
        grads.append(x.grad.clone())
        x.grad = None
    _exact(outs[0], outs[1])
    _exact(grads[0], grads[1])
    assert bool((grads[0] == 0).any()) and bool((grads[0] != 0).any())


def test_division_rounds_like_onnx_quantize_linear_at_a_near_tie():
    """x / s rounded once (ONNX QuantizeLinear, onnxruntime): at a value where x * fl32(1/s)
    lands on the other side of a half-integer, the fake quant follows the division."""
    fq = FakeQuantize(observer=FixedScaleObserver, scale=0.1)
    fq.set_state(VAL)
    s = fq.scale
    half = (torch.arange(-128, 128, dtype=torch.float64) + 0.5) * s.double()
    x = half.float()  # float32 values within an ulp of k + 0.5 steps, and their neighbours
    x = torch.cat([x, torch.nextafter(x, x + 1), torch.nextafter(x, x - 1)])
    inv = torch.ones(1) / s
    by_division, by_reciprocal = torch.round(x / s), torch.round(x * inv)
    assert not torch.equal(by_division, by_reciprocal), "no near-tie in the sample"
    _exact(fq(x), by_division.clamp(-128, 127) * s)


def test_jit_trace_records_the_aten_fake_quant_op():
    fq = FakeQuantize(observer=MinMaxObserver)
    x = torch.randn(3, 4, generator=_gen(9))
    fq(x)
    fq.set_state(VAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(fq, x)
    assert "fake_quantize_per_tensor_affine" in str(traced.graph)
    _exact(traced(x * 2), fq(x * 2))


def test_torch_export_records_the_aten_fake_quant_op():
    fq = FakeQuantize(observer=MinMaxObserver, ch_axis=1)
    x = torch.randn(3, 4, generator=_gen(9))
    fq(x)
    fq.set_state(VAL)
    exported = torch.export.export(fq, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert any("fake_quantize_per_channel_affine" in t for t in targets), targets
    _exact(exported.module()(x * 2), fq(x * 2))


# -- LSQ ----------------------------------------------------------------------------------------
def _lsq_reference_grad(x, scale, grad, bits, ch_axis=None):
    """Scale gradient of LSQ (Esser et al. 2020, eq. 3) with the gradient scale
    g = 1 / sqrt(N * Qp), N = elements per scale; float64."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    xd, gd = x.detach().double().numpy(), grad.double().numpy()
    s = scale.detach().double().numpy()
    if ch_axis is not None:
        shape = [1] * xd.ndim
        shape[ch_axis] = -1
        s = s.reshape(shape)
    v = xd / s
    q = np.rint(v)
    ds = np.where(q < qmin, qmin, np.where(q > qmax, qmax, q - v))  # -v + round(v) inside
    if ch_axis is None:
        n = xd.size
        return np.array([(gd * ds).sum()]) / math.sqrt(n * qmax)
    dims = tuple(d for d in range(xd.ndim) if d != ch_axis)
    n = xd.size // xd.shape[ch_axis]
    return (gd * ds).sum(axis=dims) / math.sqrt(n * qmax)


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
@pytest.mark.parametrize("ch_axis", [None, 1])
def test_lsq_scale_gradient_matches_the_paper(dtype, ch_axis):
    bits = BITS[dtype]
    fq = LSQFakeQuantize(dtype=dtype, ch_axis=ch_axis)
    assert isinstance(fq.scale, nn.Parameter)
    x = torch.randn(4, 6, 50, generator=_gen(10)).requires_grad_(True)
    fq(x.detach())  # initializes the scale from the first batch
    with torch.no_grad():  # a scale that clamps some values on both sides
        amax = torch.tensor([1.5, 2.0, 2.5, 1.0, 3.0, 1.2]) if ch_axis else torch.tensor([1.5])
        fq.scale.copy_(amax / 2 ** (bits - 1))
    grad = torch.randn(4, 6, 50, generator=_gen(11))
    out = fq(x)
    _exact(out, _ref(x, fq.scale, bits, ch_axis)[0])
    out.backward(grad)
    _, inside = _ref(x, fq.scale, bits, ch_axis)
    assert 0 < int((~inside).sum()) < x.numel() // 2, "the test needs clamped values"
    _exact(x.grad, torch.where(inside, grad, torch.zeros(())))
    expected = torch.from_numpy(_lsq_reference_grad(x, fq.scale, grad, bits, ch_axis)).float()
    # float32 terms summed in a different order than the float64 reference
    torch.testing.assert_close(fq.scale.grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ch_axis", [None, 0])
def test_lsq_initial_scale_from_the_first_qat_batch(ch_axis):
    x = torch.randn(3, 400, generator=_gen(12)) * torch.tensor([[0.5], [1.0], [4.0]])
    fq = LSQFakeQuantize(ch_axis=ch_axis)
    fq(x)
    if ch_axis is None:
        expected = 2 * np.abs(x.double().numpy()).mean(keepdims=True).ravel() / math.sqrt(127)
    else:
        expected = 2 * np.abs(x.double().numpy()).mean(axis=1) / math.sqrt(127)
    torch.testing.assert_close(fq.scale.detach(), torch.from_numpy(expected).float(),
                               rtol=1e-6, atol=0)  # float32 mean vs float64


def test_lsq_scale_is_learned_kept_positive_and_taken_from_calibration():
    fq = LSQFakeQuantize(observer=MinMaxObserver)
    param = fq.scale
    fq.set_state(CAL)
    fq(torch.tensor([-2.0, 1.0]))
    fq.set_state(QAT)
    assert fq.scale is param, "the Parameter object must survive (optimizers hold it)"
    _exact(fq.scale, torch.tensor([2 / 128]))
    opt = torch.optim.SGD(fq.parameters(), lr=1.0)
    x = torch.linspace(-4, 4, 101)
    loss = (fq(x) - x).pow(2).sum()  # scale far too small: LSQ must grow it
    loss.backward()
    assert float(fq.scale.grad) < 0
    opt.step()
    assert float(fq.scale.detach()) > 2 / 128
    with torch.no_grad():
        fq.scale.fill_(-1.0)
    fq(x)
    _exact(fq.scale, torch.tensor([torch.finfo(torch.float32).eps]))


# -- FakeQuantState -----------------------------------------------------------------------------
def _batch(amax: float, seed: int) -> torch.Tensor:
    """Random data whose max |x| is exactly ``amax`` (a power of two: exact scales)."""
    x = (torch.rand(64, generator=_gen(seed)) * 2 - 1) * amax * 0.9
    x[0], x[1] = amax, -amax / 2
    return x


def test_new_fake_quant_is_in_qat_and_knows_its_settings():
    fq = FakeQuantize(dtype="qint16", ch_axis=0)
    assert fq.state is QAT and not fq.has_scale and fq.is_per_channel
    assert (fq.bits, fq.quant_min, fq.quant_max, fq.dtype) == (16, -32768, 32767, "qint16")
    assert "state=QAT" in repr(fq)


@pytest.mark.parametrize("bad, match", [({"dtype": "qint3"}, "qint8"),
                                        ({"observer": "min_max"}, "observer class"),
                                        ({"observer": nn.Identity}, "observer class")])
def test_bad_constructor_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        FakeQuantize(**bad)


@pytest.mark.parametrize("src, dst", list(itertools.product([QAT, CAL, VAL], repeat=2)))
def test_every_state_transition(src, dst):
    """Stage 0 (QAT, max 1) -> ``src`` with a batch of max 2 -> ``dst`` with a batch of max 4."""
    fq = FakeQuantize(observer=MinMaxObserver)
    fq(_batch(1.0, 0))
    _exact(fq.scale, torch.tensor([1 / 128]))

    fq.set_state(src)
    assert fq.state is src and int(fq.state_code) == {QAT: 0, CAL: 1, VAL: 2}[src]
    a = _batch(2.0, 1)
    out = fq(a)
    seen = 2.0 if src in (QAT, CAL) else 1.0  # VALIDATION freezes the observer
    assert fq.observer.max_val.tolist() == [seen]
    scale = {QAT: 2 / 128, CAL: 1 / 128, VAL: 1 / 128}[src]  # CAL: no update until it ends
    _exact(fq.scale, torch.tensor([scale]))
    if src is CAL:
        assert out is a
    else:
        _exact(out, _ref(a, fq.scale, 8)[0])

    fq.set_state(dst)
    if src is CAL and dst is not CAL:  # leaving calibration computes the scale
        scale = seen / 128
    _exact(fq.scale, torch.tensor([scale]))
    batches = int(fq.observer.num_batches)
    b = _batch(4.0, 2)
    out = fq(b)
    if dst is QAT:
        _exact(fq.scale, torch.tensor([4 / 128]))
        _exact(out, _ref(b, torch.tensor([4 / 128]), 8)[0])
        assert int(fq.observer.num_batches) == batches + 1
    elif dst is CAL:
        assert out is b
        _exact(fq.scale, torch.tensor([scale]))
        assert int(fq.observer.num_batches) == batches + 1
        assert fq.observer.max_val.tolist() == [4.0]
    else:
        _exact(fq.scale, torch.tensor([scale]))
        _exact(out, _ref(b, torch.tensor([scale]), 8)[0])
        assert int(fq.observer.num_batches) == batches
        assert fq.observer.max_val.tolist() == [seen]


def test_calibration_passes_data_and_gradient_through_unchanged():
    fq = FakeQuantize()
    fq.set_state(CAL)
    x = torch.randn(10, generator=_gen(13)).requires_grad_(True)
    out = fq(x)
    assert out is x
    grad = torch.randn(10, generator=_gen(14))
    (out * 1.0).backward(grad)
    _exact(x.grad, grad)


@pytest.mark.parametrize("state", [QAT, CAL, VAL])
def test_train_and_eval_never_change_the_state(state):
    model = nn.Sequential(FakeQuantize(observer=MinMaxObserver), nn.BatchNorm1d(4))
    model(torch.randn(8, 4, generator=_gen(15)))
    set_fake_quant_state(model, state)
    fq = model[0]
    for mode in ("train", "eval", "train", "eval"):
        getattr(model, mode)()
        assert fq.state is state, f"model.{mode}() changed the fake-quant state"
        assert model[1].training is (mode == "train")
        batches = int(fq.observer.num_batches)
        x = torch.randn(8, 4, generator=_gen(16)) * 100
        out = fq(x)
        if state is CAL:
            assert out is x
        else:
            _exact(out, _ref(x, fq.scale, 8)[0])
        assert int(fq.observer.num_batches) == batches + (state is not VAL)


@pytest.mark.parametrize("observer", [PercentileObserver, MSEObserver, KLObserver])
def test_histogram_observers_compute_the_scale_once_when_calibration_ends(observer):
    fq = FakeQuantize(observer=observer)
    fq.set_state(CAL)
    batches = [torch.randn(5000, generator=_gen(20 + i)) * (1 + i) for i in range(3)]
    for b in batches:
        assert fq(b) is b
        assert not fq.has_scale, "no scale while calibrating"
    assert float(fq.observer.histogram.sum()) == 15000
    expected = fq.observer.calculate_scale()
    fq.set_state(VAL)
    _exact(fq.scale, expected)
    if observer is PercentileObserver:  # the 99.99th percentile of everything seen
        every = np.sort(np.abs(torch.cat(batches).double().numpy()))
        rank = math.ceil(every.size * 0.9999) - 1  # sparse tail: bounded by the neighbours
        width = float(fq.observer.bin_width)
        assert every[rank - 1] - width <= float(fq.scale) * 128 <= every[rank + 1] + width
    # QAT keeps the calibrated scale and does not touch the histogram
    hist = fq.observer.histogram.clone()
    fq.set_state(QAT)
    x = torch.randn(5000, generator=_gen(30)) * 10
    out = fq(x)
    _exact(fq.scale, expected)
    _exact(fq.observer.histogram, hist)
    _exact(out, _ref(x, expected, 8)[0])


def test_fixed_scale_fake_quant_needs_no_data():
    fq = FakeQuantize(observer=FixedScaleObserver, scale=1 / 64)
    fq.set_state(VAL)
    x = torch.linspace(-3, 3, 97)
    _exact(fq(x), _ref(x, torch.tensor([1 / 64]), 8)[0])
    fq.set_state(QAT)
    fq(x * 10)
    _exact(fq.scale, torch.tensor([1 / 64]))


# -- set_fake_quant_state --------------------------------------------------------------------------
class _TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Sequential(nn.Linear(4, 4), FakeQuantize())
        self.unused = nn.Sequential(nn.Linear(4, 4), FakeQuantize())

    def forward(self, x: torch.Tensor, branch: str = "used") -> torch.Tensor:
        return getattr(self, branch)(x)


def test_set_fake_quant_state_sets_every_fake_quant_and_counts_them():
    model = _TwoBranches()
    assert set_fake_quant_state(model, "Calibration") == 2
    assert get_fake_quant_state(model) == {CAL: 2}
    model(torch.randn(3, 4, generator=_gen(40)), "used")
    model(torch.randn(3, 4, generator=_gen(41)), "unused")
    assert set_fake_quant_state(model, FakeQuantState.VALIDATION) == 2
    assert get_fake_quant_state(model) == {VAL: 2}
    model.used[1].set_state(QAT)
    assert get_fake_quant_state(model) == {VAL: 1, QAT: 1}


def test_set_fake_quant_state_errors():
    with pytest.raises(ValueError, match="no FakeQuantize module.*prepare"):
        set_fake_quant_state(nn.Sequential(nn.Linear(2, 2)), QAT)
    with pytest.raises(ValueError, match=r"unknown fake-quant state 'training'.*"
                                         r"\['QAT', 'CALIBRATION', 'VALIDATION'\]"):
        set_fake_quant_state(_TwoBranches(), "training")
    with pytest.raises(ValueError, match="unknown fake-quant state"):
        FakeQuantize().set_state(3)


def test_leaving_calibration_warns_about_fake_quants_that_saw_no_data():
    model = _TwoBranches()
    set_fake_quant_state(model, CAL)
    model(torch.randn(3, 4, generator=_gen(42)))
    with pytest.warns(RuntimeWarning, match=r"1 fake quant\(s\) saw no data") as record:
        set_fake_quant_state(model, VAL)
    message = str(record[0].message)
    assert "unused.1" in message and "used.1," not in message and " used.1" not in message
    # the used branch works, the unused one says which module and what to do
    model(torch.randn(3, 4, generator=_gen(43)))
    with pytest.raises(RuntimeError, match=r"fake quant unused\.1 is in VALIDATION.*Calibrate"):
        model(torch.randn(3, 4, generator=_gen(44)), "unused")


def test_no_warning_when_every_fake_quant_saw_data():
    model = _TwoBranches()
    set_fake_quant_state(model, CAL)
    model(torch.randn(3, 4, generator=_gen(45)), "used")
    model(torch.randn(3, 4, generator=_gen(46)), "unused")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_fake_quant_state(model, VAL)


def test_qat_forward_without_any_finite_data_names_the_module():
    model = _TwoBranches()
    set_fake_quant_state(model, QAT)
    with pytest.raises(RuntimeError, match=r"fake quant used\.1: .*never saw data"):
        with pytest.warns(RuntimeWarning, match="non-finite"):
            model.used[1](torch.full((3, 4), float("nan")))


# -- state_dict and deepcopy --------------------------------------------------------------------
FQ_CONFIGS = [
    (FakeQuantize, {"observer": MovingAverageMinMaxObserver, "averaging_constant": 0.5}),
    (FakeQuantize, {"observer": MinMaxObserver, "dtype": "qint16"}),
    (FakeQuantize, {"observer": PercentileObserver, "percentile": 99.0}),
    (FakeQuantize, {"observer": MSEObserver, "ch_axis": 0}),
    (FakeQuantize, {"observer": KLObserver}),
    (FakeQuantize, {"observer": FixedScaleObserver, "scale": 0.03}),
    (FakeQuantize, {"observer": MovingAverageMinMaxObserver, "averaging_constant": 1.0,
                    "ch_axis": 0}),
    (LSQFakeQuantize, {}),
    (LSQFakeQuantize, {"observer": MinMaxObserver, "ch_axis": 0}),
]


def _calibrated(cls, kwargs, device):
    fq = cls(**kwargs).to(device)
    fq.set_state(CAL)
    for i in range(2):
        fq(torch.randn(4, 300, generator=_gen(50 + i)).mul(1 + 3 * i).to(device))
    fq.set_state(VAL)
    return fq


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("cls, kwargs", FQ_CONFIGS)
def test_fake_quant_survives_state_dict_and_deepcopy(cls, kwargs, device):
    fq = _calibrated(cls, kwargs, device)
    if cls is LSQFakeQuantize:
        with torch.no_grad():
            fq.scale.mul_(1.25)  # a "learned" scale, different from the observer's
    fresh = cls(**kwargs).to(device)
    assert fresh.state is QAT
    fresh.load_state_dict(fq.state_dict())
    x = torch.randn(4, 300, generator=_gen(60)).mul(5).to(device)
    for other in (fresh, copy.deepcopy(fq)):
        assert other.state is VAL
        assert type(other.scale) is type(fq.scale)
        own = dict(fq.named_buffers()) | dict(fq.named_parameters())
        theirs = dict(other.named_buffers()) | dict(other.named_parameters())
        assert theirs.keys() == own.keys()
        for name, value in own.items():
            assert theirs[name].device == value.device, name
            _exact(theirs[name], value, name)
        _exact(other(x), fq(x))
    # both go on identically: more calibration, then a new scale
    for m in (fq, fresh):
        m.set_state(CAL)
        m(x)
        m.set_state(VAL)
    _exact(fresh.scale, fq.scale)


def test_loading_a_state_dict_restores_the_state_and_keeps_the_lsq_parameter():
    fq = _calibrated(LSQFakeQuantize, {}, "cpu")
    fresh = LSQFakeQuantize()
    param = fresh.scale
    fresh.load_state_dict(fq.state_dict())
    assert fresh.scale is param and isinstance(param, nn.Parameter)
    _exact(param, fq.scale)
    model = nn.Sequential(_calibrated(FakeQuantize, {}, "cpu"), nn.ReLU(), FakeQuantize())
    model[2].set_state(CAL)
    fresh_model = nn.Sequential(FakeQuantize(), nn.ReLU(), FakeQuantize())
    fresh_model.load_state_dict(model.state_dict())
    assert get_fake_quant_state(fresh_model) == {VAL: 1, CAL: 1}
    assert not fresh_model[2].has_scale and not fresh_model[2].observer.has_data


# -- docstring examples -------------------------------------------------------------------------
def test_docstring_examples_are_true():
    globs = dict(vars(fake_quantize_module), nn=nn)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(verbose=False)
    tests = [t for t in finder.find(fake_quantize_module, globs=globs) if t.examples]
    assert {t.name.rsplit(".", 1)[-1] for t in tests} >= {
        "FakeQuantize", "LSQFakeQuantize", "FakeQuantState", "set_fake_quant_state",
        "get_fake_quant_state"}
    torch.manual_seed(0)
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0


# -- enabling and disabling fake quants ---------------------------------------------------------
def test_disabled_fake_quants_pass_through_without_observing_or_changing_state(calibrate):
    """set_fake_quant_enabled: a disabled fake quant returns its input in every state and its
    observer sees nothing; all off, the prepared model computes the float model; one weight
    fake quant off leaves that layer's float weight; the context restores every flag."""
    import qatkit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(4, 3, 10, 10)
    qm = calibrate(model.eval(), x)
    with torch.no_grad():
        ref, quantized = model(x), qm(x)
    fq = qm.get_submodule("0.activation_post_process")
    scale = fq.scale.clone()
    with qatkit.fake_quant_enabled(qm, False):
        with torch.no_grad():
            out = qm(x)
        fq.set_state(CAL)
        fq(torch.randn(8) * 100)  # disabled: not observed
        fq.set_state(VAL)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    _exact(fq.scale, scale)
    assert all(m.enabled for m in qm.modules() if isinstance(m, FakeQuantize))
    with torch.no_grad():
        _exact(qm(x), quantized)
    names = qatkit.set_fake_quant_enabled(qm, False, "0.weight_fake_quant")
    assert names == ["0.weight_fake_quant"] and "enabled=False" in repr(qm.get_submodule(names[0]))
    with torch.no_grad():
        partial = qm(x)
    assert not torch.equal(partial, quantized)
    qatkit.set_fake_quant_enabled(qm, True)
    with pytest.raises(ValueError, match="no fake quant named '0.weight_fake_quan'.*closest"):
        qatkit.set_fake_quant_enabled(qm, False, ["0.weight_fake_quan"])
    with pytest.raises(RuntimeError, match="boom"):
        with qatkit.fake_quant_enabled(qm, {"0.weight_fake_quant": False}):
            raise RuntimeError("boom")
    assert qm.get_submodule("0.weight_fake_quant").enabled
