"""Cost and effect of the post-training algorithms on resnet18 and mobilenet_v2.

Random weights (torchvision's initialization); BatchNorm statistics set from the calibration
data first (so the float model is a consistent reference); default int8 calibration (MSE
activations, per-channel min/max weights) on random images.  For each algorithm: wall time,
time per layer, peak memory above the calibrated model's (CPU: resident set size, sampled
every 5 ms after returning freed heap memory to the OS; CUDA: ``max_memory_allocated``), and
the cosine similarity of the final output to the float model's, on the calibration images
and on held-out random images, next to plain calibration's.

    python benchmarks/ptq.py [--models resnet18 mobilenet_v2] [--images 32] [--held-out 16]
                             [--size 112] [--steps 100] [--device cpu|cuda] [--threads 2]

``--steps`` is AdaRound's / BRECQ's ``finetune_epochs`` (500 is the guide's default).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import threading
import time
import warnings
from typing import Any, Callable

import qatkit
import torch
import torch.nn.functional as F
import torchvision
from _common import settle_batchnorm
from torch import nn


def _release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so that the resident set
    size measures what an algorithm allocates rather than what earlier runs left free."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """Peak memory above the level at entry: CUDA's allocator statistics, else the resident
    set size sampled by a thread."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        _release_freed_memory()
        self.base = self.top = _rss()
        self.stop = threading.Event()

        def sample() -> None:
            while not self.stop.wait(0.005):
                self.top = max(self.top, _rss())

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
            return
        self.stop.set()
        self.thread.join()
        self.peak = max(self.top, _rss()) - self.base


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def algorithms(steps: int) -> dict[str, Callable[..., nn.Module]]:
    recon = dict(finetune_epochs=steps, finetune_batch_size=4)
    return {
        "smooth_quant": lambda m, d: qatkit.smooth_quant(m, d, progress=False),
        "cross_layer_equalization":
            lambda m, d: qatkit.cross_layer_equalization(m, d, progress=False),
        "bias_correction": lambda m, d: qatkit.bias_correction(m, d, progress=False),
        "bn_reestimation": lambda m, d: qatkit.bn_reestimation(m, d, progress=False),
        "refine_weight_range": lambda m, d: qatkit.refine_weight_range(m, d, progress=False),
        "easy_quant": lambda m, d: qatkit.easy_quant(m, d, search_steps=20, progress=False),
        "adaround": lambda m, d: qatkit.adaround(m, d, progress=False, **recon),
        "brecq": lambda m, d: qatkit.brecq(m, d, progress=False, **recon),
    }


def run(name: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    float_model = torchvision.models.get_model(name, weights=None).to(device)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, args.size, args.size, generator=gen).to(device)
             for _ in range(max(1, args.images // 4))]
    test = torch.randn(args.held_out, 3, args.size, args.size, generator=gen).to(device)
    seen = torch.cat(calib)
    settle_batchnorm(float_model, calib)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(float_model, {"": qatkit.default_calib_8bit_fake_quant_qconfig},
                                   example_inputs=(calib[0],)).eval()
        qatkit.calibrate(qm, calib, progress=False)
    with torch.no_grad():
        ref, ref_seen = float_model(test), float_model(seen)
        plain, plain_seen = cosine(qm(test), ref), cosine(qm(seen), ref_seen)
    layers = sum(1 for m in qm.modules() if hasattr(m, "weight_fake_quant"))
    rows = []
    for algo, fn in algorithms(args.steps).items():
        if args.only and algo not in args.only:
            continue
        with PeakMemory(device) as mem:
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = fn(qm, calib)
            seconds = time.perf_counter() - t
        with torch.no_grad():
            after, after_seen = cosine(out(test), ref), cosine(out(seen), ref_seen)
        rows.append({"model": name, "algorithm": algo, "layers": layers, "seconds": seconds,
                     "per_layer": seconds / layers, "peak_mb": mem.peak / 2**20,
                     "cosine_plain": plain, "cosine_after": after,
                     "cosine_plain_calib": plain_seen, "cosine_after_calib": after_seen})
        print(f"| {name} | {algo} | {layers} | {seconds:.1f} s | {1e3 * seconds / layers:.0f} ms "
              f"| {mem.peak / 2**20:.0f} MB | {plain_seen:.5f} | {after_seen:.5f} | {plain:.5f} "
              f"| {after:.5f} |", flush=True)
        del out
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--images", type=int, default=32, help="calibration images (batches of 4)")
    ap.add_argument("--held-out", type=int, default=16, help="held-out images")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--only", nargs="*", help="run only these algorithms")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"{args.images} calibration / {args.held_out} held-out images {args.size}x{args.size}, "
          f"{args.threads} threads, "
          f"{device.type}; AdaRound / BRECQ {args.steps} steps, batch 4")
    print("| model | algorithm | layers | time | per layer | peak memory | cosine plain "
          "(calibration images) | after | cosine plain (held-out images) | after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        run(name, args, device)


if __name__ == "__main__":
    main()
