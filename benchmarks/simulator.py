"""Integer-simulator cost: convert_fx model forward vs float eval forward, side by side.

resnet18 (random weights), batch 8, 3x112x112, 2 threads; the two forwards run interleaved
after a warm-up and the medians are compared.  Goal: integer / float <= 3x.

    python benchmarks/simulator.py [--iters 20] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import qatkit
import torch
import torchvision


def main() -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    float_model = torchvision.models.resnet18().to(device).eval()
    x = torch.randn(8, 3, 112, 112, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qconfig_dict = {"": qatkit.default_qat_8bit_fake_quant_qconfig}
        qat_model = qatkit.prepare_qat_fx(float_model, qconfig_dict, example_inputs=(x,)).eval()
    qatkit.set_fake_quantize(qat_model, "calibration")
    with torch.no_grad():
        qat_model(x)
    qatkit.set_fake_quantize(qat_model, "validation")
    int_model = qatkit.convert_fx(qat_model)

    def timed(model: torch.nn.Module) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    times: dict[str, list[float]] = {"float": [], "integer": []}
    for i in range(args.warmup + args.iters):
        for name, model in (("float", float_model), ("integer", int_model)):
            t = timed(model)
            if i >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["integer"] / med["float"]
    print(f"resnet18 forward, batch 8, 3x112x112, {args.threads} threads, {device.type}, "
          f"median of {args.iters} interleaved runs")
    print(f"  float eval   {med['float'] * 1000:8.1f} ms")
    print(f"  integer sim  {med['integer'] * 1000:8.1f} ms")
    print(f"  integer/float {ratio:.2f}x (goal <= 3x)")
    return ratio


if __name__ == "__main__":
    main()
