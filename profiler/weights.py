"""compare_weights: each float weight against the fake-quantized / integer weight it became.

The float weight is folded with the float model's BatchNorm exactly as the QAT module folds
it (``W * gamma / sqrt(running_var + eps)`` per output channel, through the QAT module's own
:meth:`folded_weight_bias`), so that a calibrated model's weight differs from it by the
weight quantization alone.  The quantized weight is the QAT module's folded weight passed
through its weight fake quant, or a converted model's integer weight times its scale.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pandas as pd
import qatkit
import torch
from qatkit.fake_quantize import LSQFakeQuantize
from qatkit.fx.patterns import BN_FOR
from qatkit.nn.qat import FLOAT_TO_QAT, from_float
from qatkit.quantized.conv import QuantizedConv
from torch import Tensor, nn

from .alignment import trace_model
from .capture import write_table
from .metrics import get_metric

__all__ = ["compare_weights", "WEIGHT_COLUMNS"]

WEIGHT_COLUMNS = ["Weight Name", "Module Type", "Similarity", "Max Abs Error", "Weight Scale",
                  "Error (N weight scale)"]


def _float_bns(float_model: nn.Module) -> dict[str, nn.Module]:
    """Weighted module name -> the BatchNorm that directly follows it in the float graph."""
    try:
        gm = trace_model(float_model, "float_model")
    except ValueError:
        return {}
    modules = dict(gm.named_modules())
    out: dict[str, nn.Module] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        mod = modules[str(node.target)]
        user = next(iter(node.users))
        if user.op == "call_module" and isinstance(modules[str(user.target)],
                                                   BN_FOR.get(type(mod), ())):
            out[str(node.target)] = modules[str(user.target)]
    return out


def _reference_weight(name: str, float_mod: nn.Module, bn: nn.Module | None) -> Tensor:
    if bn is None:
        return float_mod.weight.detach()
    bn_training = bn.training
    try:
        folder = from_float(float_mod, qatkit.default_qat_8bit_fake_quant_qconfig, bn=bn)
        with torch.no_grad():
            return folder.folded_weight_bias()[0].detach()
    finally:
        bn.train(bn_training)


def _fake_quant_weight(mod: nn.Module) -> tuple[Tensor, Tensor, int] | None:
    """(quantized weight, per-channel scale, channel axis) of a QAT module, or None."""
    wfq = getattr(mod, "weight_fake_quant", None)
    if wfq is None or not wfq.has_scale:
        return None
    with torch.no_grad():
        w = mod.folded_weight_bias()[0].detach().float()
    scale = wfq.scale.detach().float().reshape(-1)
    if isinstance(wfq, LSQFakeQuantize):
        scale = scale.clamp(min=torch.finfo(torch.float32).eps)
    axis = 0 if wfq.ch_axis is None else wfq.ch_axis % w.dim()
    shape = [1] * w.dim()
    if scale.numel() > 1:
        shape[axis] = -1
    s = scale.view(shape).to(w.device)
    q = torch.mul(w, torch.ones_like(s) / s).round_().clamp_(wfq.quant_min, wfq.quant_max)
    return q * s, scale, axis


def _integer_weight(mod: QuantizedConv) -> tuple[Tensor, Tensor, int]:
    """(dequantized weight, per-channel scale, channel axis) of an integer conv / linear."""
    s_w = (mod.acc_scale.to(torch.float64) / mod.input_scale.to(torch.float64).reshape(-1)[0])
    w = mod.weight.to(torch.float64)
    if mod._kind == "ConvTranspose":
        axis, s_w = 1, s_w[: w.shape[1]]
    else:
        axis = 0
    shape = [1] * w.dim()
    shape[axis] = -1
    return (w * s_w.view(shape)).float(), s_w.float(), axis


def _steps(err: Tensor, scale: Tensor, axis: int) -> float:
    """max over channels of max |err| / scale of that channel."""
    if scale.numel() == 1:
        return float(err.abs().max()) / float(scale) if float(scale) > 0 else math.nan
    per = err.abs().movedim(axis, 0).reshape(err.shape[axis], -1).max(dim=1).values
    return float((per.double() / scale.double().to(per.device)).max())


def compare_weights(float_model: nn.Module, qat_model: nn.Module, similarity_func: Any = "Cosine",
                    out_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Compare every float weight with its quantized version in a QAT or integer model.

    Args:
        float_model: the float model ``qat_model`` was prepared from (not changed).
        qat_model: a calibrated / QAT model (its weight fake quants are applied to its folded
            weights; their state does not matter), or a ``convert_fx`` integer model.
        similarity_func: a metric name (``"Cosine"``, ``"SQNR"``...) or callable, as in
            :func:`~qatkit.profiler.featuremap_similarity`.
        out_dir: also write ``<out_dir>/weight_comparison.csv`` and ``.txt``.

    Returns:
        one row per conv / conv-transpose / linear of ``qat_model``: "Weight Name"
        (``<module>.weight``), "Module Type" (``ConvBnReLU2d``, ``Quantized[conv2d]``),
        "Similarity", "Max Abs Error", "Weight Scale" (the largest per-channel scale),
        "Error (N weight scale)" (max over channels of the channel's max error in steps of
        its own scale: <= 0.5 for a weight quantized from the float model, 1.0 where the
        channel maximum is clamped to 127).  A layer without a weight fake quant or scale
        gets NaNs.  The float weight is BN-folded with the float model's BatchNorm when
        the QAT module fused one (for integer models: when a BatchNorm follows the layer in
        the float model).

    Raises:
        ValueError: a layer of ``qat_model`` has no module of the same name and type in
            ``float_model``.

    Example::

        >>> compare_weights(float_model, calib_model).sort_values("Similarity").head(3)
    """
    metric = get_metric(similarity_func)
    float_modules = dict(float_model.named_modules())
    bns: dict[str, nn.Module] | None = None
    rows = []
    for name, mod in qat_model.named_modules():
        is_int = isinstance(mod, QuantizedConv)
        if not (is_int or hasattr(mod, "folded_weight_bias")):
            continue
        fmod = float_modules.get(name)
        if fmod is None or type(fmod) not in FLOAT_TO_QAT:
            got = "nothing" if fmod is None else type(fmod).__name__
            raise ValueError(
                f"compare_weights: qat_model's layer '{name}' ({mod._get_name()}) has no float "
                f"conv / linear of that name in float_model ({type(float_model).__name__}: "
                f"{got}). Pass the float model qat_model was prepared from")
        fuses_bn = (getattr(mod, "bn", None) is not None) if not is_int else True
        bn = None
        if fuses_bn:
            if bns is None:
                bns = _float_bns(float_model)
            bn = bns.get(name)
            if bn is None and not is_int:
                bn = mod.bn  # float model not traceable: the BatchNorm prepare copied
        ref = _reference_weight(name, fmod, bn).float().cpu()
        got_q = _integer_weight(mod) if is_int else _fake_quant_weight(mod)
        row = {"Weight Name": f"{name}.weight", "Module Type": mod._get_name(),
               "Similarity": math.nan, "Max Abs Error": math.nan, "Weight Scale": math.nan,
               "Error (N weight scale)": math.nan}
        if got_q is not None:
            wq, scale, axis = got_q
            wq, scale = wq.cpu(), scale.cpu()
            if wq.shape != ref.shape:
                raise ValueError(f"compare_weights: layer '{name}' has weight shape "
                                 f"{list(wq.shape)} in qat_model but {list(ref.shape)} in "
                                 "float_model: the models do not correspond")
            err = wq - ref
            row.update({"Similarity": metric(ref, wq),
                        "Max Abs Error": float(err.abs().max()) if err.numel() else 0.0,
                        "Weight Scale": float(scale.max()),
                        "Error (N weight scale)": _steps(err, scale, axis)})
        rows.append(row)
    table = pd.DataFrame(rows, columns=WEIGHT_COLUMNS)
    write_table(table, out_dir, "weight_comparison",
                f"compare_weights ({metric.name}): {type(float_model).__name__} vs "
                f"{type(qat_model).__name__}")
    return table
