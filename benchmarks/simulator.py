"""Integer-simulator cost: convert_fx model forward vs float eval forward, side by side.

resnet18 (random weights), batch 8, 3x112x112, 2 threads; the two forwards run interleaved
after a warm-up and the medians are compared.  Goal: integer / float <= 3x.

    python benchmarks/simulator.py [--iters 20] [--device cpu|cuda]
"""

from __future__ import annotations

import qatkit
import torch
import torchvision
from _common import calibrated, interleaved_medians, parse_args


def main() -> float:
    args, device = parse_args(__doc__)
    float_model = torchvision.models.resnet18().to(device).eval()
    x = torch.randn(8, 3, 112, 112, device=device)
    qat_model = calibrated(float_model, x)
    int_model = qatkit.convert_fx(qat_model)

    def forward(model: torch.nn.Module):
        def run() -> None:
            with torch.no_grad():
                model(x)
        return run

    runs = {"float": forward(float_model), "integer": forward(int_model)}
    med = interleaved_medians(runs, device, args.iters, args.warmup)
    ratio = med["integer"] / med["float"]
    print(f"resnet18 forward, batch 8, 3x112x112, {args.threads} threads, {device.type}, "
          f"median of {args.iters} interleaved runs")
    print(f"  float eval   {med['float'] * 1000:8.1f} ms")
    print(f"  integer sim  {med['integer'] * 1000:8.1f} ms")
    print(f"  integer/float {ratio:.2f}x (goal <= 3x)")
    return ratio


if __name__ == "__main__":
    main()
