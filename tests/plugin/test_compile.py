"""torch.compile of a prepared model: one graph, no graph break, no recompile per module; a
compiled QAT step computes what the eager step computes (within float rounding)."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

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
