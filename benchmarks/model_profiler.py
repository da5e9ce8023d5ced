"""model_profiler cost: a full FvsQ report on resnet50, and the page size on a deep model.

resnet50 (random weights), batch 2, 3x224x224, 2 threads: the time of ``model_profiler(float,
calibrated, x, mode="FvsQ")`` (goal <= 60 s), next to the time of the two models' forwards
(float eval, calibrated VALIDATION), with the seconds per tool; then the size of
``profiler.html`` for resnet50 and for densenet201 (~700 ops, 64x64 inputs) (goal < 5 MB for
models with up to 500 layers).

    python benchmarks/model_profiler.py [--device cpu|cuda] [--threads 2]
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from _common import calibrated, interleaved_medians, parse_args
from qatkit.profiler import model_profiler


def _report(name: str, res: int, batch: int, device: torch.device, out: Path) -> tuple:
    float_model = torchvision.models.get_model(name, weights=None).to(device).eval()
    x = torch.randn(batch, 3, res, res, device=device)
    calib = calibrated(float_model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        report = model_profiler(float_model, calib, x, mode="FvsQ", out_dir=out / name)
        seconds = time.perf_counter() - t0
    return float_model, calib, x, report, seconds


def main() -> None:
    args, device = parse_args(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        float_model, calib, x, report, seconds = _report("resnet50", 224, 2, device, out)

        def forward(model: torch.nn.Module):
            def run() -> None:
                with torch.no_grad():
                    model(x)
            return run

        med = interleaved_medians({"float": forward(float_model), "calib": forward(calib)},
                                  device, iters=3, warmup=1)
        both = med["float"] + med["calib"]
        size = report.html.stat().st_size
        print(f"resnet50, batch 2, 224x224, {args.threads} threads, {device.type}")
        print(f"  model_profiler FvsQ           {seconds:8.2f} s   (goal <= 60 s)")
        print(f"  float + calibrated forwards   {both:8.2f} s   -> report = {seconds / both:.1f}x "
              "the two forwards")
        for tool, s in sorted(report.seconds.items(), key=lambda kv: -kv[1]):
            print(f"    {tool:<28}{s:8.2f} s")
        rows = len(report.tables["similarity_end_to_end"])
        print(f"  profiler.html {size / 1e6:.2f} MB for {rows} ops (goal < 5 MB)")
        *_, deep, deep_s = _report("densenet201", 64, 1, device, out)
        rows = len(deep.tables["similarity_end_to_end"])
        print(f"densenet201, 64x64: profiler.html {deep.html.stat().st_size / 1e6:.2f} MB for "
              f"{rows} ops, statistics {len(deep.tables['statistics'])} rows, "
              f"model_profiler {deep_s:.1f} s")


if __name__ == "__main__":
    main()
