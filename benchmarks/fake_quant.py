"""Activation fake quant cost: qatkit.FakeQuantize vs torch.ao's FusedMovingAvgObsFakeQuantize.

Both modules observe (moving-average min/max) and fake-quantize per tensor, as in QAT:

* ours:     ``qatkit.FakeQuantize(MovingAverageMinMaxObserver, dtype="qint8")`` in the QAT state
* torch.ao: ``FusedMovingAvgObsFakeQuantize`` (qint8, per-tensor symmetric, default averaging)

The two are timed on the same ``8x64x56x56`` float32 tensor with ``requires_grad``, forward
only and forward+backward, interleaved (A, B, A, B, ... so that machine noise hits both alike)
after a warmup.  The script prints the median times and the ratio ours / torch.ao (goal <= 1.0).

On CPU our fake quant is a few vectorized elementwise passes (bit-identical to the ATen kernel,
which is a scalar loop): several times less CPU work, but more parallel regions per call.  On
an oversubscribed machine (load average above the number of cores) every parallel region waits
for a descheduled worker thread, so wall-clock times there measure the scheduler, not the
kernels; the script prints the load average and says so.  Compare on an idle machine.

Usage::

    python benchmarks/fake_quant.py                 # CPU, 2 threads
    python benchmarks/fake_quant.py --device cuda   # GPU (when available)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import qatkit
import torch
from qatkit.observers import MovingAverageMinMaxObserver
from torch import Tensor
from torch.ao.quantization import FusedMovingAvgObsFakeQuantize
from torch.ao.quantization import MovingAverageMinMaxObserver as AOMovingAverageMinMaxObserver


def _ours() -> torch.nn.Module:
    return qatkit.FakeQuantize(observer=MovingAverageMinMaxObserver, dtype="qint8")


def _torch_ao() -> torch.nn.Module:
    return FusedMovingAvgObsFakeQuantize(
        observer=AOMovingAverageMinMaxObserver, quant_min=-128, quant_max=127,
        dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)


def _step(module: torch.nn.Module, x: Tensor, grad: Tensor | None) -> None:
    out = module(x)
    if grad is not None:
        out.backward(grad)
        x.grad = None


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def compare(device: torch.device, shape: tuple[int, ...], backward: bool, iters: int,
            warmup: int) -> tuple[float, float]:
    """Median seconds per call of (ours, torch.ao), timed interleaved."""
    torch.manual_seed(0)
    x = torch.randn(shape, device=device).requires_grad_(True)
    grad = torch.randn(shape, device=device) if backward else None
    ours, ref = _ours().to(device), _torch_ao().to(device)
    runs: dict[str, list[float]] = {"ours": [], "torch.ao": []}
    for i in range(warmup + iters):
        # alternate which one goes first, so neither always runs on a "warm" cache
        order = [("ours", ours), ("torch.ao", ref)]
        if i % 2:
            order.reverse()
        for name, module in order:
            t = _timed(lambda m=module: _step(m, x, grad), device)
            if i >= warmup:
                runs[name].append(t)
    return statistics.median(runs["ours"]), statistics.median(runs["torch.ao"])


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Print the comparison table and return ``{"forward": ratio, "forward+backward": ratio}``.

    Example::

        >>> ratios = main(["--iters", "5", "--warmup", "1"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--iters", type=int, default=50, help="timed runs of each (default: 50)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs (default: 10)")
    parser.add_argument("--shape", default="8x64x56x56", help="input shape (default: 8x64x56x56)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was given but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.lower().split("x"))

    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s), "
          f"input {'x'.join(map(str, shape))} float32 requires_grad, "
          f"median of {args.iters} interleaved runs after {args.warmup} warmup")
    load_before = _load_average()
    print(f"{'pass':<18}{'qatkit (ms)':>14}{'torch.ao (ms)':>16}{'ours/torch.ao':>16}")
    ratios: dict[str, float] = {}
    for label, backward in (("forward", False), ("forward+backward", True)):
        ours, ref = compare(device, shape, backward, args.iters, args.warmup)
        ratios[label] = ours / ref
        print(f"{label:<18}{ours * 1e3:>14.3f}{ref * 1e3:>16.3f}{ours / ref:>16.3f}")
    verdict = "OK" if max(ratios.values()) <= 1.0 else "SLOWER"
    print(f"goal ours/torch.ao <= 1.0: {verdict}")
    cores = os.cpu_count() or 1
    print(f"load average (1 min) before the runs: {load_before:.2f}, after: "
          f"{_load_average():.2f}, on {cores} core(s)")
    if device.type == "cpu" and load_before + args.threads > cores + 1:
        print("WARNING: the machine is busy: thread wake-ups dominate the CPU times above; "
              "re-run on an idle machine for a meaningful ratio")
    return ratios


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return 0.0


if __name__ == "__main__":
    main()
