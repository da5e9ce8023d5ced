"""QAT on several processes with DistributedDataParallel, launched by torchrun.

    torchrun --nproc-per-node 2 examples/ddp_qat.py            # CPU: gloo; GPUs: nccl

Every rank trains the same float ``DigitsNet`` (same seed), prepares it, and **calibrates on
its own shard** of the calibration images: when calibration ends, qatkit synchronizes the
observers (qatkit.distributed), so every rank holds the scales of all shards together.  QAT
then runs under ``DistributedDataParallel``, each rank on its own shard of the training set;
every batch, the observers reduce their statistics across ranks, so the scales stay identical
on every rank (the script checks it) -- the moving averages follow the global batch, exactly
as one process with the global batch would.  Rank 0 evaluates, converts and saves.

Run without torchrun it is a single process (the same code path, nothing to synchronize).
"""

from __future__ import annotations

import argparse
import os
import warnings

import qatkit
import torch
import torch.distributed as dist
import torch.nn.functional as F
from digits import SEED, DigitsNet, evaluate, load_digits_data, train_float
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def setup() -> tuple[int, int, torch.device]:
    """Initialize the process group when launched by torchrun; (rank, world size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return rank, world, torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return rank, world, torch.device("cpu")


def same_on_every_rank(model: torch.nn.Module, world: int) -> bool:
    """True when every fake quant's scale is bit-identical on every rank."""
    scales = torch.cat([m.scale.detach().reshape(-1) for m in model.modules()
                        if isinstance(m, qatkit.FakeQuantize)])
    if world == 1:
        return True
    gathered = [torch.empty_like(scales) for _ in range(world)]
    dist.all_gather(gathered, scales)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--float-epochs", type=int, default=12)
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--calibration-images", type=int, default=256)
    args = ap.parse_args()
    rank, world, device = setup()
    torch.set_num_threads(1)
    data = load_digits_data()
    torch.manual_seed(SEED)  # the same float model on every rank
    float_model = train_float(DigitsNet(), data, epochs=args.float_epochs).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qatkit.prepare_qat_fx(
            float_model, {"": qatkit.default_qat_8bit_fake_quant_qconfig}).eval()
    # calibration: each rank its own shard; the scales come from all shards together
    shard = data.train_x[:args.calibration_images][rank::world]
    summary = qatkit.calibrate(model, list(shard.split(32)), progress=rank == 0,
                               state="qat")
    calibrated_same = same_on_every_rank(model, world)
    # QAT under DDP, each rank its own shard of the training set
    train = TensorDataset(data.train_x, data.train_y)
    sampler = DistributedSampler(train, world, rank, shuffle=True, seed=SEED) if world > 1 \
        else None
    loader = DataLoader(train, batch_size=32, sampler=sampler, shuffle=sampler is None)
    ddp = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    for epoch in range(args.qat_epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(x.to(device)), y.to(device)).backward()
            optimizer.step()
    model.eval()
    qatkit.set_fake_quant_state(model, "validation")
    trained_same = same_on_every_rank(model, world)
    if rank == 0:
        acc = evaluate(model, (data.test_x.to(device), data.test_y.to(device)))
        int_acc = evaluate(qatkit.convert_fx(model), (data.test_x.to(device),
                                                      data.test_y.to(device)))
        print(f"world size {world}: calibrated on {summary.samples} images per rank")
        print(f"scales identical on every rank: after calibration {calibrated_same}, "
              f"after QAT {trained_same}")
        print(f"QAT accuracy {100 * acc:.2f}%, integer model {100 * int_acc:.2f}%")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
