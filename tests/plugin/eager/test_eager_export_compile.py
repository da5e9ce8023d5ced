"""An eager-prepared model exports to ONNX (QDQ) through its annotated trace, and trains and
evaluates under torch.compile in one graph, as a prepare_qat_fx model does."""

from __future__ import annotations

import copy

import numpy as np
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
from torch import nn


def _calibrated_cat(n: int = 16) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(n, 3, 12, 12)
    return calibrated_eager(settle_batchnorm(CatNet(), x), CAT_GROUPS, x), x


def _calibrated_island(n: int = 16) -> tuple[torch.nn.Module, torch.Tensor]:
    """The digits CNN with conv2-bn2-relu2 a float island (one float Conv in the file)."""
    torch.manual_seed(0)
    x = torch.rand(n, 1, 16, 16) * 2 - 1
    fused = qatkit.fuse_modules(settle_batchnorm(EagerDigitsNet(), x), DIGITS_GROUPS)
    fused.qconfig = qatkit.default_qat_8bit_fake_quant_qconfig
    fused.conv2.qconfig = None
    qm = qatkit.prepare_qat(fused, hybrid=True)
    qatkit.calibrate(qm, x, progress=False)
    return qm.eval(), x


@pytest.mark.parametrize("which, optimization", [("cat", "disable"), ("cat", "all"),
                                                  ("island", "all")])
def test_onnx_export_agrees_with_the_integer_model(tmp_path, which, optimization):
    pytest.importorskip("onnxruntime")
    from qatkit.export.check import run_onnxruntime

    qm, x = _calibrated_cat() if which == "cat" else _calibrated_island()
    path = qatkit.export_onnx(qm, (x,), tmp_path / "cat.onnx")  # read through eager_graph
    # x64_quant_precision: exact int8 kernels also on x86 without VNNI (docs/export.md)
    [got] = run_onnxruntime(str(path), (x,), optimization, x64_quant_precision=True)
    with torch.no_grad():
        ref = qatkit.convert(qm)(x).double().numpy()
    scale = float(qm.fc.activation_post_process.scale)
    lsb = np.abs(np.asarray(got, np.float64).reshape(ref.shape) - ref) / scale
    # onnxruntime's float32 requantization may land a .5 tie on the other side (docs/export.md)
    assert float(np.mean(lsb.round() == 0)) >= 0.99 and float(lsb.max()) <= 1 + 1e-6, lsb.max()


class SmallNet(nn.Module):
    """The eager-mode pieces under torch.compile: a fused conv-bn-relu, FloatFunctional cat and
    add_relu, boundary-free quantized modules from input to head."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = qatkit.QuantStub()
        self.conv_a, self.bn_a, self.relu_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), \
            nn.ReLU()
        self.cat = qatkit.nn.FloatFunctional()
        self.conv_b = nn.Conv2d(11, 8, 1)
        self.add_relu = qatkit.nn.FloatFunctional()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)
        self.dequant = qatkit.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        a = self.relu_a(self.bn_a(self.conv_a(x)))
        y = self.add_relu.add_relu(self.conv_b(self.cat.cat([a, x], dim=1)), a)
        return self.dequant(self.fc(torch.flatten(self.pool(y), 1)))


@pytest.mark.parametrize("backend", [
    # Dynamo's capture: where eager mode differs from FX (mixins, FloatFunctional methods);
    # the QAT modules' code generation is tests/plugin/test_compile.py's (FX, inductor)
    "eager",
    pytest.param("inductor", marks=pytest.mark.slow),  # + AOT autograd and code generation
])
def test_compiled_eager_model_trains_and_evaluates_in_one_graph(backend):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 12, 12)
    qm = calibrated_eager(settle_batchnorm(SmallNet(), x), [["conv_a", "bn_a", "relu_a"]], x)
    qatkit.set_fake_quant_state(qm, "qat")
    qm.train()
    eager = copy.deepcopy(qm)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(qm, backend=backend)
    out = compiled(x)
    out.sum().backward()
    ref = eager(x)
    ref.sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, "no recompile"
    assert not torch._dynamo.utils.counters["graph_break"], "no graph break"
    step = float(qm.fc.activation_post_process.scale)
    lsb = ((out - ref).abs() / step).round().detach()
    assert float(lsb.max()) <= 1 and float((lsb == 0).float().mean()) >= 0.98, lsb
    largest = max(float(q.grad.norm()) for q in eager.parameters() if q.grad is not None)
    for (name, p), q in zip(qm.named_parameters(), eager.parameters(), strict=True):
        # (a conv bias before a training BatchNorm has a zero gradient up to rounding)
        if q.grad is not None and float(q.grad.norm()) > 1e-4 * largest:
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), 0)
            assert cos > 0.9999, (name, float(cos))
    # evaluation (frozen scales) compiles once more, then runs without recompiling
    for m in (qm, eager):
        qatkit.set_fake_quant_state(m, "validation")
        m.eval()
    with torch.no_grad():
        for _ in range(2):
            got, want = compiled(x), eager(x)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == 2, graphs
    lsb = ((got - want).abs() / step).round()
    assert float(lsb.max()) <= 1 and float((lsb == 0).float().mean()) >= 0.98, lsb


def test_tools_read_an_eager_model_through_its_trace():
    """get_provenance and the exporter take the eager model itself (annotated_graph)."""
    qm, x = _calibrated_island()
    gm = qatkit.eager.eager_graph(qm)
    assert qatkit.get_provenance(qm) == qatkit.get_provenance(gm)
    assert qatkit.get_provenance(qm)["conv1"] == "relu1"
    assert qatkit.model_graph.annotated_graph(gm) is gm
    with torch.no_grad():
        assert torch.equal(qatkit.export.onnx.integer_model_for_export(qm)(x),
                           qatkit.convert(qm)(x))
