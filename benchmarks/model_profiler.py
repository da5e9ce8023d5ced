"""model_profiler cost: a full FvsQ report on resnet50 against the two forwards, and page sizes.

resnet50 (random weights), batch 2, 3x224x224, 2 threads: the time of ``model_profiler(float,
calibrated, x, mode="FvsQ")`` next to the time of the two models' forwards (float eval,
calibrated VALIDATION), measured side by side: after a warm-up, forwards (the fastest of three
pairs) and reports alternate, each report is divided by the forwards next to it and the median
ratio is printed, so machine noise hits both alike (the fastest of each is printed too, for a
machine shared with other jobs).  Goal: report <= 4x the two forwards (every tool reads one
capture of each model: model1 runs once, model2 end to end once and once with model1's values
for the per-layer table).  Then the seconds per tool of the median report, and the size of
``profiler.html`` for resnet50 and for densenet201 (~700 ops, 64x64 inputs) (goal < 5 MB for
models with up to 500 layers).

    python benchmarks/model_profiler.py [--device cpu|cuda] [--threads 2] [--iters 5 (reports)]
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from _common import calibrated, parse_args
from qatkit.profiler import model_profiler


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def _models(name: str, res: int, batch: int, device: torch.device) -> tuple:
    float_model = torchvision.models.get_model(name, weights=None).to(device).eval()
    x = torch.randn(batch, 3, res, res, device=device)
    return float_model, calibrated(float_model, x), x


def main() -> float:
    args, device = parse_args(__doc__)
    reps = 5 if args.iters == 20 else max(1, args.iters)  # --iters N: N reports (default 5)
    warnings.simplefilter("ignore")
    float_model, calib, x = _models("resnet50", 224, 2, device)

    def forwards() -> float:
        with torch.no_grad():
            return (_timed(lambda: float_model(x), device)[0]
                    + _timed(lambda: calib(x), device)[0])

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)

        def report() -> Any:
            return model_profiler(float_model, calib, x, mode="FvsQ", out_dir=out / "resnet50")

        for _ in range(2):  # warm-up
            forwards()
            report()
        both, reports = [], []
        for _ in range(reps):  # forwards (fastest of 3), then a report, then again
            both.append(min(forwards() for _ in range(3)))
            reports.append(_timed(report, device))
        both.append(min(forwards() for _ in range(3)))
        ratios = [s / min(a, b) for (s, _), a, b in zip(reports, both, both[1:], strict=False)]
        med_both = statistics.median(both)
        med_seconds, med_report = sorted(reports, key=lambda r: r[0])[len(reports) // 2]
        ratio = statistics.median(ratios)
        print(f"resnet50, batch 2, 224x224, {args.threads} threads, {device.type}; {reps} reports "
              "alternated with the forwards")
        print(f"  float + calibrated forwards   {med_both:8.2f} s   (median)")
        print(f"  model_profiler FvsQ           {med_seconds:8.2f} s   (median)")
        print(f"  report / the two forwards:    {ratio:8.2f}x  (median of each report against the "
              "forwards next to it; goal <= 4x)")
        print("  each report / the forwards next to it: "
              + ", ".join(f"{r:.2f}x" for r in ratios))
        print(f"  fastest report / fastest forwards: "
              f"{min(s for s, _ in reports) / min(both):.2f}x (the least disturbed runs, for a "
              "machine shared with other jobs)")
        for tool, s in sorted(med_report.seconds.items(), key=lambda kv: -kv[1]):
            print(f"    {tool:<28}{s:8.2f} s")
        rows = len(med_report.tables["similarity_end_to_end"])
        print(f"  profiler.html {med_report.html.stat().st_size / 1e6:.2f} MB for {rows} ops "
              "(goal < 5 MB)")
        deep_model, deep_calib, deep_x = _models("densenet201", 64, 1, device)
        deep_s, deep = _timed(lambda: model_profiler(deep_model, deep_calib, deep_x,
                                                     out_dir=out / "densenet201"), device)
        rows = len(deep.tables["similarity_end_to_end"])
        print(f"densenet201, 64x64: profiler.html {deep.html.stat().st_size / 1e6:.2f} MB for "
              f"{rows} ops, statistics {len(deep.tables['statistics'])} rows, "
              f"model_profiler {deep_s:.1f} s")
    return ratio


if __name__ == "__main__":
    main()
