"""QAT training-step cost: qatkit vs float vs torch.ao's prepare_qat_fx, measured side by side.

resnet18 (random weights), batch 8, 3x112x112, SGD step, 2 threads.  The three steps run
interleaved (float, qatkit, torch.ao, float, ...) after a warm-up, and the medians are
compared, so machine noise hits all three alike.

    python benchmarks/qat_step.py [--iters 20] [--device cpu|cuda] [--compile]

``--compile`` also times the qatkit step under ``torch.compile`` (one graph: Inductor fuses
the fake quants' elementwise ops into the neighbouring kernels); its compile time is printed
apart and excluded from the medians.  On a GPU expect the compiled step to gain more than on
a CPU: eager fake quantization is a handful of memory-bound elementwise kernels per tensor,
which compilation fuses into one pass.
"""

from __future__ import annotations

import copy
import time
import warnings

import qatkit
import torch
import torchvision
from _common import interleaved_medians, parse_args
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


def main() -> dict[str, float]:
    args, device = parse_args(__doc__, extra=[("--compile", {"action": "store_true"})])
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
    if args.compile:
        compiled = copy.deepcopy(ours)
        step = make_step(torch.compile(compiled), x, y)
        t0 = time.perf_counter()
        step()  # compiles
        print(f"torch.compile of the qatkit QAT step: {time.perf_counter() - t0:.1f} s")
        steps["qatkit compiled"] = step
    med = interleaved_medians(steps, device, args.iters, args.warmup)
    print(f"resnet18 QAT step, batch 8, 3x112x112, {args.threads} threads, {device.type}, "
          f"median of {args.iters} interleaved runs")
    for k, v in med.items():
        print(f"  {k:9s} {v * 1000:8.1f} ms")
    ratios = {
        "qatkit/float": med["qatkit"] / med["float"],
        "torch.ao/float": med["torch.ao"] / med["float"],
        "qatkit/torch.ao": med["qatkit"] / med["torch.ao"],
    }
    if "qatkit compiled" in med:
        ratios["compiled/qatkit"] = med["qatkit compiled"] / med["qatkit"]
        ratios["compiled/float"] = med["qatkit compiled"] / med["float"]
    for k, v in ratios.items():
        print(f"  {k:16s} {v:.3f}x")
    return ratios


if __name__ == "__main__":
    main()
