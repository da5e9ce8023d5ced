"""torch.compile of a prepared model: one graph, no graph break, no recompile per module; a
compiled QAT step computes what the eager step computes (within float rounding).

What qatkit computes under torch.compile (fake quants, observers, the BatchNorm fold) equals
eager bit for bit.  The model's own float ops are Inductor's: it runs convolutions
channels-last (on AVX2, oneDNN then sums in another order than the NCHW kernel eager uses),
writes its own BatchNorm formula and reduction order, so a calibrated activation range can
differ from eager's by the float32 rounding of those sums (ACT_RTOL).
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import qatkit
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
from digits import DigitsNet  # noqa: E402


def test_compiled_qat_step_equals_eager_in_one_graph():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 16, 16) * 2 - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(DigitsNet().eval(),
                                   {"": qatkit.default_qat_8bit_fake_quant_qconfig},
                                   example_inputs=(x,))
    qatkit.calibrate(qm, x, progress=False, state="qat")
    qm.train()
    eager = copy.deepcopy(qm)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(qm)
    out = compiled(x)
    out.sum().backward()
    ref = eager(x)
    ref.sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"], "no graph break"
    # float rounding may move a value across a rounding boundary: at most one output step
    step = float(qm.fc.activation_post_process.scale)
    lsb = ((out - ref).abs() / step).round()
    assert float(lsb.max()) <= 1 and float((lsb == 0).float().mean()) >= 0.98, lsb
    for (name, p), q in zip(qm.named_parameters(), eager.parameters(), strict=True):
        if q.grad is not None:
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), 0)
            assert cos > 0.9999, (name, float(cos))
    for a, b in zip(qm.modules(), eager.modules(), strict=True):  # observers moved alike
        if isinstance(a, qatkit.FakeQuantize):
            torch.testing.assert_close(a.scale, b.scale, rtol=1e-6, atol=0)


#: how far two float32 sums of up to 144 products (DigitsNet's 3x3x16 convolutions) in
#: different orders can differ, relative to the sum of their magnitudes: 2 * 144 * 2**-24
#: (measured under torch.compile on an AVX2 CPU: 2e-7, on AVX-512: 0)
ACT_RTOL = 2 * 144 * 2**-24


def _prepared(qconfig, x, settle: bool = False):
    """DigitsNet prepared; ``settle``: BatchNorm statistics of ``x`` first (a trained model's
    fold, gamma / sqrt(var + eps) != 1, instead of the default statistics' identity)."""
    net = DigitsNet()
    if settle:
        for bn in net.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.momentum = None  # the average of the batches seen
        net.train()
        with torch.no_grad():
            net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qatkit.prepare_qat_fx(net.eval(), {"": qconfig}, example_inputs=(x,))


def _fake_quants(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, qatkit.FakeQuantize)]


def _assert_scales_equal(compiled_model, eager_model):
    """The weights' scales (and the input's: nothing computed it) are eager's bit for bit;
    an activation's is within the float rounding of the model's float ops (ACT_RTOL)."""
    for (name, a), (_, b) in zip(_fake_quants(compiled_model), _fake_quants(eager_model),
                                 strict=True):
        if name.endswith("weight_fake_quant") or name.startswith("quant."):
            assert torch.equal(a.scale, b.scale), name
        else:
            torch.testing.assert_close(a.scale, b.scale, rtol=ACT_RTOL, atol=0, msg=name)


def test_compiled_calibration_then_validation_equal_eager():
    """Calibrate through the compiled model, switch state, evaluate: the weight scales (the
    BatchNorm fold of settled statistics included) are bit-equal to an eager calibration's,
    the activation scales within float rounding; with the same scales the output is equal to
    eager's; one graph per state."""
    torch.manual_seed(0)
    x = torch.rand(16, 1, 16, 16) * 2 - 1
    qm = _prepared(qatkit.default_qat_8bit_fake_quant_qconfig, x, settle=True)
    ref = copy.deepcopy(qm)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(qm)
    for model in (compiled, ref):
        qatkit.set_fake_quant_state(qm if model is compiled else ref, "calibration")
        with torch.no_grad():
            model(x)
        qatkit.set_fake_quant_state(qm if model is compiled else ref, "validation")
    _assert_scales_equal(qm, ref)
    qm.load_state_dict(ref.state_dict())  # the same scales: VALIDATION computes alike
    with torch.no_grad():
        out, expected = compiled(x), ref(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # one per state
    assert not torch._dynamo.utils.counters["graph_break"]


def test_compiled_integer_model_is_one_graph_and_bit_exact():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 16, 16) * 2 - 1
    qm = _prepared(qatkit.default_qat_8bit_fake_quant_qconfig, x)
    qatkit.calibrate(qm, x, progress=False)
    int_model = qatkit.convert_fx(qm)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        out, expected = torch.compile(int_model)(x), int_model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"], "no graph break"


def test_histogram_calibration_under_compile_warns_once_and_matches_eager():
    """A histogram observer's data-dependent update runs eagerly (one split per fake quant,
    not several) and says so once; its scales are those of an eager calibration (activations:
    within float rounding)."""
    from qatkit import fake_quantize

    torch.manual_seed(0)
    x = torch.rand(16, 1, 16, 16) * 2 - 1
    qm = _prepared(qatkit.default_calib_8bit_fake_quant_qconfig, x)
    ref = copy.deepcopy(qm)
    qatkit.calibrate(ref, x, progress=False)
    fake_quantize._WARNED_COMPILED_HISTOGRAM.clear()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(qm)
    qatkit.set_fake_quant_state(qm, "calibration")
    with pytest.warns(UserWarning, match=r"MSEObserver is calibrated under torch.compile.*"
                                         r"qatkit.calibrate\(model, data\)") as record:
        with torch.no_grad():
            compiled(x)
    assert sum("torch.compile" in str(w.message) for w in record) == 1
    qatkit.set_fake_quant_state(qm, "validation")
    _assert_scales_equal(qm, ref)
    histogram_fqs = [f for _, f in _fake_quants(qm) if getattr(f.observer, "is_histogram",
                                                                 False)]
    # one split per histogram update (a split inside a submodule's forward also splits its
    # caller's frame); tracing through the update split it 27 times here
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs <= 2 * len(histogram_fqs) + 1, graphs
