"""Shared by the benchmark scripts: arguments, and timing side by side."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch


def parse_args(doc: str) -> tuple[argparse.Namespace, torch.device]:
    """``--iters --warmup --device --threads``; sets the threads and the seed."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args, torch.device(args.device)


def interleaved_medians(runs: dict[str, Callable[[], object]], device: torch.device,
                        iters: int, warmup: int) -> dict[str, float]:
    """Median seconds of each run, the runs interleaved (A, B, A, B, ...) after a warm-up,
    so machine noise hits all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(warmup + iters):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
