"""SmoothQuant: move activation outliers into the next layer's weights, channel by channel.

Per-tensor activation scales are set by the largest channel: when a few channels of a tensor
are much larger than the rest (outlier channels, typical of transformers' LayerNorm outputs),
the other channels keep a handful of int8 levels.  SmoothQuant (Xiao et al., ICML 2023)
divides each input channel ``j`` of a conv / linear by

    s_j = max|X_j| ** alpha / max|W_:,j| ** (1 - alpha)

and multiplies the weight's input channel ``j`` by ``s_j``: the activation gets flatter, the
per-channel weights absorb the difficulty.  Here the division is folded into the producer of
``X`` (a conv / linear's output channels, through its BatchNorm's gamma and beta when fused;
a LayerNorm / GroupNorm / BatchNorm's affine parameters), so no op is added and the float
model computes the same function (up to float rounding).  Where ``X`` is made by an op without
per-channel parameters (an add, a model input, a GELU), nothing is changed and the log says
why (:func:`qatkit.ptq_log`).  The activation scales are then calibrated again on the same
data with the model's own observers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, fx, nn

from ._channel_scaling import consumer_axis, find_scaling_groups, input_channel_max, scale_group
from ._common import (
    algorithm_session,
    collect_batches,
    layer_progress,
    log_table,
    prepared_layers,
    recalibrate,
    record,
    working_copy,
)

__all__ = ["smooth_quant", "outlier_level"]

_NAME = "smooth_quant"


def outlier_level(channel_max: Tensor) -> float:
    """How far a tensor's largest channel exceeds its typical channel, in powers of two:
    ``log2(max_j a_j / median_j a_j)`` over the channels with ``a_j > 0`` (0 for an empty or
    all-zero tensor).  A level of ``k`` costs the typical channel ``k`` bits of the int8 range.

    Example::

        >>> outlier_level(torch.tensor([1.0, 1.0, 1.0, 64.0]))
        6.0
    """
    live = channel_max[channel_max > 0]
    if live.numel() == 0:
        return 0.0
    return math.log2(float(live.max()) / float(live.median()))


def _channel_amax(x: Tensor, axis: int) -> Tensor:
    axis = axis % x.dim()
    dims = [d for d in range(x.dim()) if d != axis]
    return x.detach().abs().float().amax(dim=dims) if dims else x.detach().abs().float()


def smooth_quant(model: fx.GraphModule, data: Any, alpha: float = 0.5, threshold: float = 2.0,
                 num_batches: int | None = None, device: Any = None, progress: bool = True,
                 inplace: bool = False) -> fx.GraphModule:
    """Migrate activation outliers into the next conv / linear's weights (SmoothQuant).

    Args:
        model: a prepared (:func:`qatkit.prepare_qat_fx`) and calibrated model.
        data: the calibration data (every form :func:`qatkit.calibrate` takes); its
            per-channel maxima set the factors, and the activation scales are calibrated
            again on it afterwards.
        alpha: migration strength in [0, 1]: 0 leaves the activations, 1 moves all of their
            range into the weights; 0.5 (the paper's default) balances them.
        threshold: only tensors whose outlier level (:func:`outlier_level`: largest channel
            over the median channel, in powers of two) is at least this take part; 0 smooths
            every tensor that can be.
        num_batches: use at most this many batches of ``data``.
        device: where to run (default: the model's device).
        progress: show a progress bar over layers.
        inplace: change ``model`` itself instead of a copy.

    Returns:
        the smoothed, recalibrated model (``model`` itself when ``inplace``), in the fake-quant
        state it came in.  :func:`qatkit.ptq_log` lists each producer, its consumers, the
        outlier level before and after, and why a layer was left alone.

    Raises:
        ValueError: a model that is not prepared or not calibrated, or a bad argument.

    Example::

        >>> _ = qatkit.calibrate(qat_model, data)
        >>> smoothed = qatkit.smooth_quant(qat_model, data, alpha=0.5, threshold=2.0)
        >>> qatkit.ptq_log(smoothed)[["layer", "level_before", "level_after", "applied"]]
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_quant: alpha must be in [0, 1], got {alpha}")
    if threshold < 0:
        raise ValueError(f"smooth_quant: threshold is a level in powers of two (>= 0), got "
                         f"{threshold}")
    qm = working_copy(model, inplace)
    layers = prepared_layers(qm, _NAME)
    batches, _ = collect_batches(qm, data, num_batches, device, _NAME)
    rows: list[dict[str, Any]] = []
    with algorithm_session(qm):
        groups = find_scaling_groups(qm, layers, batches)
        valid = [g for g in groups if g.reason is None]
        amax = _consumer_channel_max(qm, batches, valid)
        changed = False
        for group in layer_progress(groups, _NAME, progress):
            row: dict[str, Any] = {"layer": group.consumer_names, "producer": group.name,
                                   "level_before": float("nan"), "level_after": float("nan"),
                                   "applied": False, "reason": group.reason or ""}
            rows.append(row)
            if group.reason is not None:
                continue
            a = amax[group.producer]
            level = outlier_level(a)
            w = torch.stack([input_channel_max(layer).to(a) for layer, _ in group.consumers])
            w = w.amax(0)
            s = a.clamp_min(1e-12).pow(alpha) / w.clamp_min(1e-12).pow(1.0 - alpha)
            s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s)).clamp(1e-5, 1e5)
            row.update(level_before=level, level_after=outlier_level(a / s))
            if level < threshold:
                row["reason"] = f"outlier level {level:.2f} < threshold {threshold}"
                continue
            scale_group(qm, group, s)
            row["applied"] = True
            changed = True
        if changed:
            recalibrate(qm, batches)
    log_table(qm, _NAME, rows)
    return qm


@torch.no_grad()
def _consumer_channel_max(model: nn.Module, batches: list, groups: list) -> dict[str, Tensor]:
    """Per group (by producer node): max |x| of each channel of the consumers' inputs over
    the calibration data, in the float model."""
    wanted: dict[str, list[tuple[str, int]]] = {}
    for group in groups:
        for layer, node in group.consumers:
            ann = layer.annotations[layer.nodes.index(node)]
            wanted.setdefault(ann.input("input").node, []).append(
                (group.producer, consumer_axis(layer)))
    out: dict[str, Tensor] = {}

    def sink(_i: int, name: str, value: Any) -> None:
        for producer, axis in wanted[name]:
            m = _channel_amax(value, axis)
            out[producer] = m if producer not in out else torch.maximum(out[producer], m)

    record(model, batches, list(wanted), quantized=False, sink=sink)
    return out
