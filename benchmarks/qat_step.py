"""QAT training-step cost: qatkit vs float vs torch.ao's prepare_qat_fx, measured side by side.

resnet18 (random weights), batch 8, 3x112x112, SGD step, 2 threads.  The three steps run
interleaved (float, qatkit, torch.ao, float, ...) after a warm-up, and the medians are
compared, so machine noise hits all three alike.

    python benchmarks/qat_step.py [--iters 20] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import qatkit
import torch
import torchvision
from torch.ao.quantization import get_default_qat_qconfig_mapping
from torch.ao.quantization.quantize_fx import prepare_qat_fx as ao_prepare_qat_fx


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    float_model = torchvision.models.resnet18(num_classes=10).to(device).train()
    x = torch.randn(8, 3, 112, 112, device=device)
    y = torch.randint(0, 10, (8,), device=device)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = qatkit.prepare_qat_fx(float_model, {"": qatkit.default_qat_8bit_fake_quant_qconfig},
                                     example_inputs=(x,)).train()
        ao = ao_prepare_qat_fx(copy.deepcopy(float_model), get_default_qat_qconfig_mapping("x86"),
                               example_inputs=(x,)).train()
    steps = {
        "float": make_step(copy.deepcopy(float_model), x, y),
        "qatkit": make_step(ours, x, y),
        "torch.ao": make_step(ao, x, y),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(args.warmup + args.iters):
        for name, step in steps.items():
            t = timed(step, device)
            if i >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"resnet18 QAT step, batch 8, 3x112x112, {args.threads} threads, {device.type}, "
          f"median of {args.iters} interleaved runs")
    for k, v in med.items():
        print(f"  {k:9s} {v * 1000:8.1f} ms")
    ratios = {
        "qatkit/float": med["qatkit"] / med["float"],
        "torch.ao/float": med["torch.ao"] / med["float"],
        "qatkit/torch.ao": med["qatkit"] / med["torch.ao"],
    }
    for k, v in ratios.items():
        print(f"  {k:16s} {v:.3f}x")
    return ratios


if __name__ == "__main__":
    main()
