"""Run by tests/plugin/test_distributed.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

Each rank calibrates the same model on its own batches for every observer kind, then trains
it under DistributedDataParallel for two QAT steps on its own data, and saves what it ended
with (scales, observer statistics, parameters) to ``<out>/rank<k>.pt``.
"""

from __future__ import annotations

import sys
import warnings

import qatkit
import torch
import torch.distributed as dist
from torch import nn

KINDS = ("min_max", "moving_average", "percentile", "mse", "kl")


class Elementwise(nn.Module):
    """Per-sample ops only, so a global batch computes exactly what each rank computes."""

    def forward(self, x):
        y = torch.relu(x * 1.5)
        return torch.sigmoid(y + x)


class Trainable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def rank_batches(rank: int, steps: int = 3) -> list[torch.Tensor]:
    """Rank ``rank``'s batch of every step (ranks see different ranges)."""
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(4, 3, 5, 5, generator=gen) * (1 + 2 * rank + step)
            for step in range(steps)]


def prepared(kind: str, model: nn.Module) -> torch.fx.GraphModule:
    qconfig = qatkit.get_default_qconfig(activation_observer=kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qatkit.prepare_qat_fx(model, {"": qconfig}).eval()


def statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, fq in model.named_modules():
        if isinstance(fq, qatkit.FakeQuantize):
            out[f"{name}.scale"] = fq.scale.detach().clone()
            for buf in ("min_val", "max_val", "histogram"):
                value = getattr(fq.observer, buf, None)
                if isinstance(value, torch.Tensor):
                    out[f"{name}.{buf}"] = value.clone()
    return out


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    result: dict[str, dict] = {}
    for kind in KINDS:
        model = prepared(kind, Elementwise())
        qatkit.calibrate(model, rank_batches(rank), progress=False)
        result[kind] = statistics(model)
    # DDP QAT: the same model and initial weights on every rank, different data
    torch.manual_seed(0)
    qat = prepared("moving_average", Trainable())
    qatkit.calibrate(qat, rank_batches(rank), progress=False, state="qat")
    qat.train()
    ddp = nn.parallel.DistributedDataParallel(qat)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for x in rank_batches(rank, steps=2):
        opt.zero_grad()
        ddp(x).square().mean().backward()
        opt.step()
    result["ddp"] = {**statistics(qat), **{f"param.{n}": p.detach().clone()
                                           for n, p in qat.named_parameters()}}
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
