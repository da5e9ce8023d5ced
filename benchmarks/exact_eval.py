"""Cost of VALIDATION's exact evaluation: a calibrated model's forward in VALIDATION under
no_grad (exact: integer accumulation, float64 epilogues) next to the same model's float32
fake-quant forward (a copy in QAT state, eval mode) and the float model, side by side.

resnet18 (batch 8, 112x112) and resnet50 (batch 2, 224x224), random weights, 2 threads.

    python benchmarks/exact_eval.py [--iters 20] [--device cpu|cuda]
"""

from __future__ import annotations

import copy

import qatkit
import torch
import torchvision
from _common import calibrated, interleaved_medians, parse_args


def _forward(model: torch.nn.Module, x: torch.Tensor):
    def run() -> None:
        with torch.no_grad():
            model(x)
    return run


def main() -> None:
    args, device = parse_args(__doc__)
    for name, batch, res in (("resnet18", 8, 112), ("resnet50", 2, 224)):
        float_model = torchvision.models.get_model(name, weights=None).to(device).eval()
        x = torch.randn(batch, 3, res, res, device=device)
        calib = calibrated(float_model, x)
        float32_fq = copy.deepcopy(calib)
        qatkit.set_fake_quant_state(float32_fq, "qat")  # float32 fake quant (observers update)
        med = interleaved_medians({"float": _forward(float_model, x),
                                   "fake quant float32": _forward(float32_fq, x),
                                   "VALIDATION exact": _forward(calib, x)},
                                  device, args.iters, args.warmup)
        print(f"{name}, batch {batch}, {res}x{res}, {args.threads} threads, {device.type}, "
              f"median of {args.iters} interleaved runs")
        for k, v in med.items():
            print(f"  {k:<20}{1e3 * v:9.1f} ms")
        exact = med["VALIDATION exact"]
        print(f"  exact / float32 fake quant {exact / med['fake quant float32']:.2f}x, "
              f"exact / float {exact / med['float']:.2f}x")


if __name__ == "__main__":
    main()
