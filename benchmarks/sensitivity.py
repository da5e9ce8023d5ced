"""Sensitivity cost: a full activation-sensitivity sweep vs (quantizers + 2) forward passes.

resnet18 (random weights, BatchNorm statistics of its own activations), batch 4, 3x112x112,
prepared and calibrated (VALIDATION state).  Two ratios:

* ``get_sensitivity_of_nodes(node_type="activation")`` over every activation quantizer /
  (number of quantizers + 2) forwards of the calibrated model -- the cost of measuring each
  quantizer once plus the float reference and the all-quantized run, if each took one plain
  forward.  Goal: <= 1.5x.  Also with ``incremental=False`` (every change run in full).
* ``suggest_mixed_precision`` (cosine target) / (its evaluations + 2) forwards -- each
  evaluation is one trial of the search.

Every sweep timing is a median of ``--sweeps`` runs (default 3), interleaved with the forwards
it is compared with (each the median of 5).  Measured on 2 shared CPU threads: forward 1.06 s,
24 activation quantizers, sweep 0.62x (full runs 1.15x), suggest_mixed_precision 1.05x.

    python benchmarks/sensitivity.py [--sweeps 3] [--device cpu|cuda]
"""

from __future__ import annotations

import statistics
import time

import qatkit.profiler as qp
import torch
import torchvision
from _common import calibrated, parse_args, settle_batchnorm
from qatkit.profiler.causal.switches import list_quantizers


def _timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main() -> None:
    args, device = parse_args(__doc__, [("--batch", {"type": int, "default": 4}),
                                        ("--size", {"type": int, "default": 112}),
                                        ("--sweeps", {"type": int, "default": 3})])
    x = torch.randn(args.batch, 3, args.size, args.size)
    model = torchvision.models.resnet18()
    settle_batchnorm(model, [torch.randn(16, 3, args.size, args.size)])
    calib = calibrated(model, x, [torch.randn(args.batch, 3, args.size, args.size)
                                  for _ in range(2)]).to(device)
    x = x.to(device)
    n_act = len(list_quantizers(calib, "activation"))

    def forward() -> None:
        with torch.no_grad():
            calib(x)

    def sweep(incremental: bool = True) -> qp.NodeSensitivity:
        return qp.get_sensitivity_of_nodes(calib, "cosine-similarity", x,
                                           node_type="activation", verbose=False,
                                           incremental=incremental)

    for _ in range(args.warmup):
        forward()
    sweep()
    times: dict[str, list[float]] = {"forward": [], "sweep": [], "sweep_full": []}
    for _ in range(args.sweeps):
        times["forward"].append(statistics.median(_timed(forward, device)[0]
                                                  for _ in range(5)))
        times["sweep"].append(_timed(sweep, device)[0])
        times["sweep_full"].append(_timed(lambda: sweep(False), device)[0])
    fwd = statistics.median(times["forward"])
    base = (n_act + 2) * fwd
    print(f"resnet18, batch {args.batch}, {args.size}x{args.size}, {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"forward (calibrated)                   {1e3 * fwd:8.1f} ms")
    print(f"activation quantizers                  {n_act:8d}")
    print(f"(quantizers + 2) forwards              {1e3 * base:8.1f} ms")
    for key, label in (("sweep", "sensitivity sweep (incremental)"),
                       ("sweep_full", "sensitivity sweep (full runs)")):
        t = statistics.median(times[key])
        print(f"{label:<38} {1e3 * t:8.1f} ms   ratio {t / base:5.2f}x"
              + ("   (goal <= 1.5x)" if key == "sweep" else ""))

    # suggest_mixed_precision: cost per evaluation
    t_mp, res = _timed(lambda: qp.suggest_mixed_precision(
        calib, x, target=0.9999, metric="cosine", options=("int16",), max_layers=2,
        verbose=False), device)
    t_fwd = statistics.median(_timed(forward, device)[0] for _ in range(5))
    mp_base = (res.evaluations + 2) * t_fwd
    print(f"suggest_mixed_precision                {1e3 * t_mp:8.1f} ms   "
          f"{res.evaluations} evaluations, {len(res.steps)} steps   ratio "
          f"{t_mp / mp_base:5.2f}x of (evaluations + 2) forwards")


if __name__ == "__main__":
    main()
