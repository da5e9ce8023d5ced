"""Profiler cost: featuremap_similarity vs the two forwards it compares, time and memory.

resnet50 (random weights), batch 4, 3x224x224, 2 threads; float model vs the same model
prepared and calibrated on two random batches (VALIDATION state).  Two ratios, each measured
side by side:

* time: ``featuremap_similarity`` (EndToEnd and PerLayer) / (float forward + calibrated
  forward), the runs interleaved after a warm-up, medians compared.  Goal: <= 3x.
* memory: the peak bytes of tensors the profiler holds (model1's kept outputs plus the live
  values of the running interpreter, distinct storages) / the bytes of every op output of
  both models for one batch.  Goal: <= 1x.

    python benchmarks/profiler.py [--iters 5] [--device cpu|cuda]
"""

from __future__ import annotations

from typing import Any

import qatkit
import torch
import torchvision
from _common import calibrated, interleaved_medians, parse_args
from qatkit.profiler import featuremap_similarity
from qatkit.profiler.core import similarity as similarity_module
from torch import Tensor, fx


def feature_map_bytes(model: fx.GraphModule, x: Tensor) -> int:
    """Bytes of every op output (distinct storages) of one forward.  The outputs are kept
    alive until the end, so that a freed storage's address cannot be reused and undercounted;
    outputs sharing a storage (in-place ops, views) count once."""
    seen: dict[int, int] = {}
    alive: list[Tensor] = []

    class _Sizes(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, Tensor) and n.op != "placeholder":
                    s = t.untyped_storage()
                    seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
                    alive.append(t)
            return out

    with torch.no_grad():
        _Sizes(model).run(x)
    return sum(seen.values())


def main() -> tuple[float, float]:
    args, device = parse_args(__doc__)
    float_model = torchvision.models.resnet50().to(device).eval()
    x = torch.randn(4, 3, 224, 224, device=device)
    calib = calibrated(float_model, x,
                       [torch.randn(4, 3, 224, 224, device=device) for _ in range(2)])

    def forwards() -> None:
        with torch.no_grad():
            float_model(x)
            calib(x)

    runs = {
        "forwards": forwards,
        "EndToEnd": lambda: featuremap_similarity(float_model, calib, x),
        "PerLayer": lambda: featuremap_similarity(float_model, calib, x, method="PerLayer"),
    }
    med = interleaved_medians(runs, device, args.iters, args.warmup)

    maps = (feature_map_bytes(qatkit.fx.symbolic_trace(float_model), x)
            + feature_map_bytes(calib, x))
    peaks = {}
    for method in ("EndToEnd", "PerLayer"):
        meter = similarity_module._MemoryMeter()
        similarity_module._METER = meter
        try:
            rows = len(featuremap_similarity(float_model, calib, x, method=method))
        finally:
            similarity_module._METER = None
        peaks[method] = meter.peak

    print(f"resnet50 float vs calibrated, batch 4, 3x224x224, {args.threads} threads, "
          f"{device.type}, {rows} rows, median of {args.iters} interleaved runs")
    print(f"  float + calibrated forward  {med['forwards'] * 1000:8.1f} ms")
    ratios = []
    for method in ("EndToEnd", "PerLayer"):
        ratio = med[method] / med["forwards"]
        ratios.append(ratio)
        print(f"  featuremap_similarity {method:8s} {med[method] * 1000:8.1f} ms   "
              f"time ratio {ratio:.2f}x (goal <= 3x)")
    print(f"  both models' feature maps of one batch  {maps / 2**20:8.1f} MiB")
    for method in ("EndToEnd", "PerLayer"):
        print(f"  held by the profiler, {method:8s}       {peaks[method] / 2**20:8.1f} MiB   "
              f"memory ratio {peaks[method] / maps:.2f}x (goal <= 1x)")
    return max(ratios), max(peaks.values()) / maps


if __name__ == "__main__":
    main()
