"""The pieces the sensitivity tools share: the guides' metric spellings, MRE / Chebyshev,
BatchMetric (several batches as one), the quantizers read from the annotation, and the
incremental runner (only what follows a change runs, with the numbers of a full run)."""

from __future__ import annotations

import copy
import math

import pytest
import qatkit
import torch
from qatkit.profiler.causal.incremental import IncrementalRunner
from qatkit.profiler.causal.switches import list_quantizers, resolve_quantizers
from qatkit.profiler.core.metrics import (
    BatchMetric,
    chebyshev,
    cosine,
    get_metric,
    kl,
    max_abs,
    mre,
    mse,
    sqnr,
)
from torch import nn


@pytest.mark.parametrize("spelling,name", [
    ("cosine-similarity", "Cosine"), ("cosine_similarity", "Cosine"), ("COSINE", "Cosine"),
    ("mse", "MSE"), ("mre", "MRE"), ("sqnr", "SQNR"), ("chebyshev", "Chebyshev"),
    ("L1", "L1"), ("l1", "L1"), ("max-abs", "MaxAbs"), ("kl-divergence", "KL")])
def test_spellings(spelling, name):
    assert get_metric(spelling).name == name


def test_mre_and_chebyshev():
    a, b = torch.tensor([1.0, -2.0, 1.0]), torch.tensor([1.0, -1.0, 1.0])
    assert mre(a, b) == 0.25 and mre(a, a) == 0.0
    assert mre(torch.zeros(2), torch.ones(2)) == math.inf
    assert mre(a, torch.zeros(3)) == 1.0
    assert math.isnan(mre(torch.tensor([math.nan]), torch.tensor([1.0])))
    assert chebyshev(torch.zeros(3), torch.tensor([0.5, -2.0, 1.0])) == 2.0
    assert not get_metric("mre").higher_is_better and not get_metric("chebyshev").higher_is_better


@pytest.mark.parametrize("metric", [cosine, mse, max_abs, sqnr, mre,
                                    chebyshev, kl, "L1"])
def test_batch_metric_equals_the_metric_of_the_concatenation(metric):
    g = torch.Generator().manual_seed(0)
    refs = [torch.rand(5, 7, generator=g) + 0.1 for _ in range(3)]
    outs = [r + 0.05 * torch.randn(r.shape, generator=g) for r in refs]
    outs = [o.abs() + 0.01 for o in outs]
    m = get_metric(metric)
    acc = BatchMetric(m)
    assert math.isnan(acc.value())
    acc.add(refs[0], outs[0])
    assert acc.value() == m(refs[0], outs[0]), "one batch: exactly the metric"
    for r, o in zip(refs[1:], outs[1:], strict=True):
        acc.add(r, o)
    want = m(torch.cat([r.reshape(-1) for r in refs]), torch.cat([o.reshape(-1) for o in outs]))
    assert acc.value() == pytest.approx(want, rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="shapes"):
        acc.add(torch.zeros(3), torch.zeros(4))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = qatkit.QuantStub(scale=1 / 128)
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.dequant = qatkit.DeQuantStub()

    def forward(self, x):
        x = self.relu(self.conv1(self.quant(x)))
        return self.dequant(self.conv3(self.conv2(x) + self.conv2(x * 2)))


@pytest.fixture(scope="module")
def calib(calibrate):
    torch.manual_seed(0)
    return calibrate(_Net().eval(), torch.rand(4, 2, 6, 6) * 2 - 1,
                     qatkit.default_calib_8bit_fake_quant_qconfig)


def test_quantizers_from_the_annotation(calib):
    w = list_quantizers(calib, "weight")
    assert [q.name for q in w] == ["conv1", "conv2", "conv3"]
    assert w[0].fake_quants == ("conv1.weight_fake_quant",) and w[0].float_name == "relu"
    conv2 = next(q for q in list_quantizers(calib, "node") if q.name == "conv2")
    assert conv2.shared and len(conv2.nodes) == 2
    assert set(conv2.fake_quants) == {"conv2.weight_fake_quant",
                                      "conv2.activation_post_process"}
    acts = list_quantizers(calib, "activation")
    assert all(len(q.fake_quants) >= 1 for q in acts)
    # names: op name, float name, fake quant path
    got = resolve_quantizers(acts, ["relu", "conv3.weight_fake_quant"],
                             list_quantizers(calib, "node"))
    assert [q.name for q in got] == ["conv1", "conv3"]
    assert got[1].fake_quants == ("conv3.weight_fake_quant",) and got[1].node_type == "weight"
    with pytest.raises(ValueError, match=r"unknown node 'conv4'.*conv"):
        resolve_quantizers(acts, ["conv4"])
    with pytest.raises(ValueError, match="node_type"):
        list_quantizers(calib, "layer")


def test_incremental_runner_runs_only_what_follows(calib):
    work = copy.deepcopy(calib)
    batches = [(torch.rand(2, 2, 6, 6) * 2 - 1,) for _ in range(2)]
    runner = IncrementalRunner(work, batches)
    base = runner.set_base()
    full_nodes = runner.nodes_run
    for b, out in zip(batches, base, strict=True):
        torch.testing.assert_close(out, work(*b), atol=0, rtol=0)
    q = next(q for q in list_quantizers(work, "activation") if q.name == "conv3")
    runner.nodes_run = 0
    with qatkit.fake_quant_enabled(work.get_submodule(q.name), False):
        outs = runner.run_from(q.nodes)
        for b, out in zip(batches, outs, strict=True):
            torch.testing.assert_close(out, work(*b), atol=0, rtol=0)
    assert 0 < runner.nodes_run < full_nodes / 2, (runner.nodes_run, full_nodes)
    # a shared module: both calls rerun
    conv2 = next(q for q in list_quantizers(work, "weight") if q.name == "conv2")
    plan = runner.plan(conv2.nodes)
    assert {n.name for n in plan} >= set(conv2.nodes)
    with pytest.raises(ValueError, match="no node named"):
        runner.plan(["nope"])
