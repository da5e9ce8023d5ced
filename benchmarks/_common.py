"""Shared by the benchmark scripts: arguments, and timing side by side."""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable, Iterable

import qatkit
import torch


def parse_args(doc: str, extra: list[tuple[str, dict]] | None = None
               ) -> tuple[argparse.Namespace, torch.device]:
    """``--iters --warmup --device --threads`` (and ``extra`` ``(flag, add_argument
    keywords)``); sets the threads and the seed."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    for flag, kwargs in extra or []:
        ap.add_argument(flag, **kwargs)
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


def calibrated(float_model: torch.nn.Module, x: torch.Tensor,
               batches: Iterable[torch.Tensor] | None = None) -> torch.fx.GraphModule:
    """``float_model`` prepared with the default int8 QAT qconfig, calibrated on ``batches``
    (default: ``x``), in VALIDATION state and eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(float_model, {"": qatkit.default_qat_8bit_fake_quant_qconfig},
                                   example_inputs=(x,)).eval()
    qatkit.set_fake_quant_state(qm, "calibration")
    with torch.no_grad():
        for batch in batches if batches is not None else (x,):
            qm(batch)
    qatkit.set_fake_quant_state(qm, "validation")
    return qm


def settle_batchnorm(model: torch.nn.Module, batches: list[torch.Tensor]) -> torch.nn.Module:
    """Running statistics of ``batches`` in every BatchNorm (cumulative average), eval mode."""
    for bn in model.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.reset_running_stats()
            bn.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval()
