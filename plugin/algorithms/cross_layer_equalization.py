"""Cross-layer equalization: equal weight ranges across consecutive layers, channel by channel.

Per-channel weight scales cope with one layer's channels having different ranges, but not with
what follows: when a depthwise conv's channel ``j`` has tiny weights (its BatchNorm folded in),
its output channel ``j`` is tiny too, and the per-tensor activation scale of that output is set
by the other channels.  Cross-layer equalization (Nagel et al., "Data-Free Quantization",
ICCV 2019) uses ``relu(x / s) = relu(x) / s`` (s > 0) to divide the producer's output channel
``j`` by

    s_j = sqrt(r1_j / r2_j)

(``r1_j``: range of the producer's folded weight for output channel ``j``; ``r2_j``: range of
the consumer's folded weight for input channel ``j``) and multiply the consumer's input
channel ``j`` by it: both ranges become ``sqrt(r1_j * r2_j)``.  Over a chain (pointwise ->
depthwise -> pointwise) the pairs are equalized in turn until the factors stop changing.  The
float model computes the same function; the activation scales are then calibrated again.

Pairs are the scaling groups of :mod:`._channel_scaling` whose producer is a conv / linear:
a ReLU6 between them does not commute with the factor and stops equalization (DFQ replaces
ReLU6 by ReLU in the float model first; that changes the model, so qatkit leaves it to you).
DFQ's bias absorption is not done.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx

from ._channel_scaling import (
    find_scaling_groups,
    input_channel_max,
    output_channel_max,
    scale_group,
)
from ._common import (
    algorithm_session,
    collect_batches,
    layer_progress,
    log_table,
    prepared_layers,
    recalibrate,
    working_copy,
)

__all__ = ["cross_layer_equalization"]

_NAME = "cross_layer_equalization"
_WEIGHTED = ("conv", "linear")


def _imbalance(r1: Tensor, r2: Tensor) -> float:
    """The largest ``|log2(r1 / r2)|`` over channels with both ranges > 0."""
    live = (r1 > 0) & (r2 > 0)
    if not bool(live.any()):
        return 0.0
    return float((r1[live] / r2[live]).log2().abs().max())


def cross_layer_equalization(model: fx.GraphModule, data: Any, threshold: float = 2.0,
                             iterations: int = 20, tolerance: float = 1e-3,
                             num_batches: int | None = None,
                             device: Any = None, progress: bool = True,
                             inplace: bool = False) -> fx.GraphModule:
    """Equalize the weight ranges of consecutive conv / linear layers (DFQ's CLE).

    Args:
        model: a prepared (:func:`qatkit.prepare_qat_fx`) and calibrated model.
        data: the calibration data: the activation scales are calibrated again on it after
            the weights changed (the equalization itself needs no data).
        threshold: only pairs whose range imbalance (the largest ``|log2(r1_j / r2_j)|``) is
            at least this are equalized; 0 equalizes every pair.  Per-channel weight scales
            already absorb small imbalances: on random-weight resnet18 (imbalances up to 1.8)
            equalizing them lowered the output cosine slightly.
        iterations: at most this many sweeps over the pairs.
        tolerance: stop when no factor of a sweep is further than this from 1 (relative).
        num_batches: use at most this many batches of ``data``.
        device: where to run (default: the model's device).
        progress: show a progress bar over layer pairs.
        inplace: change ``model`` itself instead of a copy.

    Returns:
        the equalized, recalibrated model.  :func:`qatkit.ptq_log` lists each pair with its
        range imbalance (largest ``|log2(r1 / r2)|``) before and after, and the pairs left
        alone with the reason.

    Raises:
        ValueError: a model that is not prepared or not calibrated, or a bad argument.

    Example::

        >>> equalized = qatkit.cross_layer_equalization(qat_model, calib_batches)
        >>> qatkit.ptq_log(equalized)[["layer", "producer", "imbalance_before",
        ...                            "imbalance_after"]]
    """
    if iterations < 1 or threshold < 0:
        raise ValueError(f"{_NAME}: need iterations >= 1 and threshold >= 0, got {iterations}, "
                         f"{threshold}")
    qm = working_copy(model, inplace)
    layers = prepared_layers(qm, _NAME)
    batches, _ = collect_batches(qm, data, num_batches, device, _NAME)
    rows: list[dict[str, Any]] = []
    with algorithm_session(qm):
        groups = find_scaling_groups(qm, layers, batches)
        for g in groups:
            if g.reason is None and g.kind not in _WEIGHTED:
                g.reason = f"the producer is a {g.kind}, not a conv / linear"

        def ranges(g: Any) -> tuple[Tensor, Tensor]:
            r1 = output_channel_max(qm.get_submodule(g.producer_module))
            r2 = torch.stack([input_channel_max(layer).to(r1) for layer, _ in g.consumers])
            return r1, r2.amax(0)

        before = {g.producer: _imbalance(*ranges(g)) for g in groups if g.reason is None}
        for g in groups:
            if g.reason is None and before[g.producer] < threshold:
                g.reason = (f"range imbalance {before[g.producer]:.2f} < threshold "
                            f"{threshold}")
        valid = [g for g in groups if g.reason is None]
        for _ in layer_progress(range(iterations), _NAME, progress and bool(valid),
                                    unit="sweep"):
            worst = 0.0
            for g in valid:
                r1, r2 = ranges(g)
                s = torch.sqrt(r1 / r2)
                s = torch.where((r1 > 0) & (r2 > 0) & torch.isfinite(s), s,
                                torch.ones_like(s)).clamp(1e-4, 1e4)
                worst = max(worst, float((s - 1).abs().max()))
                scale_group(qm, g, s)
            if worst < tolerance:
                break
        for g in groups:
            row: dict[str, Any] = {"layer": g.consumer_names, "producer": g.name,
                                   "imbalance_before": float("nan"),
                                   "imbalance_after": float("nan"),
                                   "applied": g.reason is None, "reason": g.reason or ""}
            if g.producer in before:
                row["imbalance_before"] = before[g.producer]
            if g.reason is None:
                row["imbalance_after"] = _imbalance(*ranges(g))
            rows.append(row)
        if valid:
            recalibrate(qm, batches)
    log_table(qm, _NAME, rows)
    return qm
