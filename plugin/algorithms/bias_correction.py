"""Empirical bias correction: remove the mean shift quantization adds to each layer's output.

Rounding the weights (and the inputs, and everything upstream) shifts the expected output of a
conv / linear channel by ``E[y_quantized] - E[y_float]``; ReLUs and the next layers turn that
bias into real error, most visibly for depthwise convs and low bit widths (Nagel et al., ICCV
2019; Finkelstein et al., 2019).  Empirical bias correction measures the shift on calibration
data, layer by layer in graph order, each layer seeing the already corrected quantized model
upstream, and subtracts it from the layer's bias (the folded BatchNorm's beta when one is
fused; a bias is added to a layer that has none).  The float output compared against is the
original model's, so the correction also absorbs the mean error accumulated upstream.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, fx, nn

from ._common import (
    Layer,
    algorithm_session,
    call_inputs,
    collect_batches,
    layer_progress,
    log_table,
    prepared_layers,
    record,
    working_copy,
)

__all__ = ["bias_correction"]

_NAME = "bias_correction"


def _channel_mean(y: Tensor, axis: int) -> tuple[Tensor, int]:
    """Per-channel sum of ``y`` along ``axis`` (float64) and how many values each holds."""
    axis = axis % y.dim()
    dims = [d for d in range(y.dim()) if d != axis]
    return y.double().sum(dim=dims), y.numel() // y.shape[axis]


def _output_axis(layer: Layer) -> int:
    return -1 if isinstance(layer.module, nn.Linear) else 1


@torch.no_grad()
def _mean_outputs(model: fx.GraphModule, layer: Layer, batches: list,
                  quantized: bool) -> Tensor:
    """The mean of each output channel of the layer's op (conv / linear + bias, before the
    add, activation and output fake quant) over the calibration data."""
    mod = model.get_submodule(layer.path)
    inputs = [ann.input("input").node for ann in layer.annotations]
    values = record(model, batches, inputs, quantized=quantized)
    weight, bias = mod.folded_weight_bias()
    if quantized:
        weight = mod.weight_fake_quant(weight)
    total, count = None, 0
    for vals in values:
        for node, ann in zip(layer.nodes, layer.annotations, strict=True):
            x, _, output_size = call_inputs(node, ann, vals)
            y = mod.weighted_op(x, weight, bias, output_size)
            s, n = _channel_mean(y, _output_axis(layer))
            total = s if total is None else total + s
            count += n
    return total / max(count, 1)


@torch.no_grad()
def _add_to_bias(mod: nn.Module, delta: Tensor) -> None:
    """Add ``delta`` to the folded bias of ``mod``."""
    if mod.bn is not None:
        if mod.bn.bias is None:
            raise ValueError("the fused BatchNorm has no beta to correct (affine=False)")
        mod.bn.bias.add_(delta.to(mod.bn.bias))
    elif mod.bias is not None:
        mod.bias.add_(delta.to(mod.bias))
    else:
        mod.bias = nn.Parameter(delta.to(mod.weight).clone(),
                                requires_grad=mod.weight.requires_grad)


def bias_correction(model: fx.GraphModule, data: Any, num_batches: int | None = None,
                    device: Any = None, progress: bool = True,
                    inplace: bool = False) -> fx.GraphModule:
    """Correct each layer's bias for the mean shift quantization causes (empirical).

    Args:
        model: a prepared (:func:`qatkit.prepare_qat_fx`) and calibrated model.
        data: the calibration data: the mean of every output channel is measured on it, in the
            quantized model and in the float model.
        num_batches: use at most this many batches of ``data``.
        device: where to run (default: the model's device).
        progress: show a progress bar over layers.
        inplace: change ``model`` itself instead of a copy.

    Returns:
        the corrected model; its scales are unchanged.  :func:`qatkit.ptq_log` lists, per
        layer, the largest shift corrected and the same in units of the layer's output scale.

    Raises:
        ValueError: a model that is not prepared or not calibrated.

    Example::

        >>> corrected = qatkit.bias_correction(qat_model, calib_batches)
        >>> qatkit.ptq_log(corrected)[["layer", "max_shift", "max_shift_lsb"]]
    """
    qm = working_copy(model, inplace)
    layers = prepared_layers(qm, _NAME)
    batches, _ = collect_batches(qm, data, num_batches, device, _NAME)
    reference = copy.deepcopy(qm)  # the float model of the original weights
    rows: list[dict[str, Any]] = []
    with algorithm_session(qm), algorithm_session(reference):
        for layer in layer_progress(layers, _NAME, progress):
            target = _mean_outputs(reference, layer, batches, quantized=False)
            got = _mean_outputs(qm, layer, batches, quantized=True)
            delta = (target - got).float()
            _add_to_bias(layer.module, delta)
            out_fq = layer.module.activation_post_process
            lsb = float("nan")
            if out_fq is not None and out_fq.has_scale and out_fq.scale.numel() == 1:
                lsb = float(delta.abs().max()) / float(out_fq.scale)
            rows.append({"layer": layer.path, "max_shift": float(delta.abs().max()),
                         "mean_shift": float(delta.abs().mean()), "max_shift_lsb": lsb})
    log_table(qm, _NAME, rows)
    return qm
