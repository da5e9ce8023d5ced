"""BatchNorm re-estimation: running statistics measured on the quantized model.

A BatchNorm folded into the conv before it normalizes with running statistics that were
estimated on the float model (or, after QAT, averaged over weights that kept changing).  The
quantized model's conv outputs have other means and variances -- quantized weights, quantized
inputs -- so the fold no longer normalizes them (Nagel et al., "Overcoming Oscillations in
Quantization-Aware Training", ICML 2022, re-estimate the statistics after QAT; the same holds
after post-training weight changes such as AdaRound or low-bit weights).

``bn_reestimation`` runs the calibration data through the fake-quant model with every
BatchNorm (fused or standalone) collecting fresh statistics as a cumulative average: a fused
conv + BatchNorm then runs the simulated fold of QAT (quantized folded weight, batch
statistics), quantized activations upstream.  Afterwards the weight scales are recomputed from
the new folded weights and (by default) the activation scales are calibrated again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from ..fake_quantize import FakeQuantState
from ..nn.qat import FusedMixin
from ._common import (
    algorithm_session,
    collect_batches,
    exact_evaluation_off,
    layer_progress,
    log_table,
    prepared_layers,
    recalibrate,
    refresh_weight_scale,
    working_copy,
)

__all__ = ["bn_reestimation"]

_NAME = "bn_reestimation"
_BN = nn.modules.batchnorm._BatchNorm


def bn_reestimation(model: fx.GraphModule, data: Any, num_batches: int | None = None,
                    device: Any = None, progress: bool = True, recalibrate_activations: bool = True,
                    inplace: bool = False) -> fx.GraphModule:
    """Re-estimate every BatchNorm's running statistics on the quantized model.

    Args:
        model: a prepared (:func:`qatkit.prepare_qat_fx`) model, calibrated or QAT-trained.
        data: the data to estimate on (use a few hundred samples of the training
            distribution; each batch counts equally).
        num_batches: use at most this many batches of ``data``.
        device: where to run (default: the model's device).
        progress: show a progress bar over batches.
        recalibrate_activations: calibrate the activation scales again afterwards with the
            model's own observers (False keeps them, e.g. scales learned by LSQ).
        inplace: change ``model`` itself instead of a copy.

    Returns:
        the model with new running statistics (momentum and train / eval flags as they
        were), weight scales recomputed from the new folded weights.  :func:`qatkit.ptq_log`
        lists per BatchNorm the largest change of its mean and of its standard deviation,
        relative to the old standard deviation.

    Raises:
        ValueError: a model that is not prepared or not calibrated, or without BatchNorm.

    Example::

        >>> qm = qatkit.bn_reestimation(qat_model, train_batches[:32])
    """
    qm = working_copy(model, inplace)
    prepared_layers(qm, _NAME)
    batches, _ = collect_batches(qm, data, num_batches, device, _NAME)
    fused = [(n, m) for n, m in qm.named_modules() if isinstance(m, FusedMixin) and
             m.bn is not None]
    fused_bns = {id(m.bn) for _, m in fused}
    plain = [(n, m) for n, m in qm.named_modules() if isinstance(m, _BN) and
             id(m) not in fused_bns]
    bns = [(n, m.bn) for n, m in fused] + plain
    if not bns:
        raise ValueError(f"{_NAME}: {type(model).__name__} has no BatchNorm to re-estimate")
    bad = [n for n, bn in bns if not bn.track_running_stats or bn.running_mean is None]
    if bad:
        raise ValueError(f"{_NAME}: BatchNorm of '{bad[0]}' keeps no running statistics "
                         "(track_running_stats=False)")
    old = {n: (bn.running_mean.clone(), bn.running_var.clone()) for n, bn in bns}
    rows: list[dict[str, Any]] = []
    with algorithm_session(qm):
        saved = [(bn, bn.momentum) for _, bn in bns]
        freeze = [(m, m.freeze_bn) for _, m in fused]
        weight_fqs = [m.weight_fake_quant for _, m in fused if m.weight_fake_quant is not None]
        try:
            for _, bn in bns:
                bn.momentum = None  # cumulative average over the batches
                bn.num_batches_tracked.zero_()  # the first batch replaces the old statistics
                bn.train()
            for m, _ in freeze:
                m.freeze_bn = False
                m.train()  # the fused module runs QAT's simulated fold
            for fq in weight_fqs:
                fq.set_state(FakeQuantState.QAT)  # the folded weight of the current statistics
            with torch.no_grad(), exact_evaluation_off(qm):
                for args, kwargs in layer_progress(batches, _NAME, progress, unit="batch"):
                    qm(*args, **kwargs)
        finally:
            for bn, momentum in saved:
                bn.momentum = momentum
            for m, flag in freeze:
                m.freeze_bn = flag
            for fq in weight_fqs:
                fq.set_state(FakeQuantState.VALIDATION)
        qm.eval()
        for _, m in fused:
            refresh_weight_scale(m)
        for n, bn in bns:
            mean0, var0 = old[n]
            std0 = (var0 + bn.eps).sqrt()
            std1 = (bn.running_var + bn.eps).sqrt()
            rows.append({"layer": n, "max_mean_change": float(((bn.running_mean - mean0).abs()
                                                              / std0).max()),
                         "max_std_change": float(((std1 - std0).abs() / std0).max())})
        if recalibrate_activations:
            recalibrate(qm, batches)
    log_table(qm, _NAME, rows)
    return qm
