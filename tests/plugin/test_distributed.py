"""Observers synchronized across ranks: 2 processes (torchrun, gloo, CPU), each seeing its own
data, end with the scales of one process that saw all the data -- bit for bit, for every
observer kind -- and a DDP QAT step keeps every rank's parameters and scales identical."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import qatkit
import torch

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(Path(ddp_worker.__file__)), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.parametrize("kind", ddp_worker.KINDS)
def test_every_rank_gets_the_scales_of_one_process_that_saw_all_the_data(ranks, kind):
    steps = zip(ddp_worker.rank_batches(0), ddp_worker.rank_batches(1), strict=True)
    model = ddp_worker.prepared(kind, ddp_worker.Elementwise())
    qatkit.calibrate(model, [torch.cat(step) for step in steps], progress=False)
    single = ddp_worker.statistics(model)
    assert set(ranks[0][kind]) == set(single)
    for name, value in single.items():
        for r in (0, 1):
            torch.testing.assert_close(ranks[r][kind][name], value, atol=0, rtol=0,
                                       msg=f"rank {r}, {kind}, {name}")
    # the ranks' own data differ: unsynchronized, their scales would too
    alone = ddp_worker.prepared(kind, ddp_worker.Elementwise())
    qatkit.calibrate(alone, ddp_worker.rank_batches(0), progress=False)
    assert any(not torch.equal(s, single[n]) for n, s in ddp_worker.statistics(alone).items()
               if n.endswith(".scale"))


def test_a_ddp_qat_step_keeps_parameters_and_scales_identical_on_every_rank(ranks):
    a, b = ranks[0]["ddp"], ranks[1]["ddp"]
    assert set(a) == set(b) and any(k.startswith("param.") for k in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)


def test_outside_a_process_group_sync_is_a_no_op():
    model = ddp_worker.prepared("mse", ddp_worker.Elementwise())
    qatkit.calibrate(model, ddp_worker.rank_batches(0), progress=False)
    assert qatkit.sync_observers(model) == 0
