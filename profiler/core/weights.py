"""compare_weights: each float weight against the fake-quantized / integer weight it became.

The float weight is folded with the float model's BatchNorm exactly as the QAT module folds
it (``W * gamma / sqrt(running_var + eps)`` per output channel, through the QAT module's own
:meth:`folded_weight_bias`), so that a calibrated model's weight differs from it by the
weight quantization alone.  The quantized weight is the QAT module's own integer weight
(:meth:`quantize_weight`, the one rounding rule) or a converted model's integer ``weight``,
times the scale its weight spec (the quantization annotation) names.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import pandas as pd
import qatkit
import torch
from qatkit.annotation import AnnotatedOp, QuantSpec, get_annotations, has_annotations
from qatkit.fx.patterns import BN_FOR
from qatkit.nn.qat import FLOAT_TO_QAT, from_float
from qatkit.quantized.conv import QuantizedConv
from torch import Tensor, nn

from .alignment import trace_model
from .metrics import get_metric
from .tables import write_table

__all__ = ["compare_weights", "check_weight_correspondence", "WEIGHT_COLUMNS"]

WEIGHT_COLUMNS = ["Module Name", "Module Type", "Similarity", "Max Abs Error", "Weight Scale",
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


def _same_tensors(a: nn.Module, b: nn.Module, names: tuple[str, ...]) -> bool:
    for name in names:
        x, y = getattr(a, name, None), getattr(b, name, None)
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            return False
    return True


def _reference_weight(name: str, float_mod: nn.Module, bn: nn.Module | None,
                      qat_mod: nn.Module | None = None) -> Tensor:
    """The float weight, folded with ``bn`` by the QAT module's own rule.  When ``qat_mod``
    holds the very same weight and BatchNorm (prepare copied them), its own fold is that
    rule's result; else a QAT module is built from the float layer to fold it."""
    if bn is None:
        return float_mod.weight.detach()
    qat_bn = getattr(qat_mod, "bn", None)
    if qat_bn is not None and getattr(qat_bn, "eps", None) == bn.eps and \
            _same_tensors(qat_mod, float_mod, ("weight", "bias")) and \
            _same_tensors(qat_bn, bn, ("weight", "bias", "running_mean", "running_var")):
        with torch.no_grad():
            return qat_mod.folded_weight_bias()[0].detach()
    bn_training = bn.training
    try:
        folder = from_float(float_mod, qatkit.default_qat_8bit_fake_quant_qconfig, bn=bn)
        with torch.no_grad():
            return folder.folded_weight_bias()[0].detach()
    finally:
        bn.train(bn_training)


def _weight_specs(model: nn.Module) -> dict[str, QuantSpec]:
    """Module path -> the weight's spec, from the quantization annotation (a model prepared
    by module swapping has none: each module states its own)."""
    if has_annotations(model):
        return {a.module: a.weight for a in get_annotations(model).values()
                if a.module is not None and a.weight is not None}
    return {name: spec for name, mod in model.named_modules()
            if isinstance(mod, AnnotatedOp) and (spec := mod.qatkit_weight_spec(name))}


def _dequantized(q: Tensor, spec: QuantSpec, model: nn.Module) -> tuple[Tensor, Tensor, int]:
    """(``q * scale`` in float32, the scale as a flat vector, the channel axis)."""
    scale = spec.scale(model).detach().float().reshape(-1)
    axis = 0 if spec.ch_axis is None else spec.ch_axis % q.dim()
    shape = [1] * q.dim()
    if scale.numel() > 1:
        shape[axis] = -1
    return q.float() * scale.view(shape).to(q.device), scale, axis


def _quantized_weight(name: str, mod: nn.Module, specs: dict[str, QuantSpec],
                      model: nn.Module) -> tuple[Tensor, Tensor, int] | None:
    """(quantized weight, per-channel scale, channel axis) of a QAT module (its own
    ``quantize_weight``) or an integer conv / linear (its integer ``weight``), each times the
    scale its weight spec names; None without a weight spec or scale."""
    spec = specs.get(name)
    if spec is None or not spec.has_scale(model):
        return None
    if isinstance(mod, QuantizedConv):
        return _dequantized(mod.weight, spec, model)
    return _dequantized(mod.quantize_weight(), spec, model)


def _errors(err: Tensor, scale: Tensor, axis: int) -> tuple[float, float]:
    """(max |err|, max over channels of the channel's max |err| / its scale), from one
    per-channel reduction."""
    if not err.numel():
        return 0.0, 0.0
    per = err.abs_().movedim(axis, 0).reshape(err.shape[axis], -1).amax(dim=1)
    worst = float(per.max())
    if scale.numel() == 1:
        return worst, worst / float(scale) if float(scale) > 0 else math.nan
    return worst, float((per.double() / scale.double().to(per.device)).max())


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
        one row per conv / conv-transpose / linear of ``qat_model``: "Module Name"
        (the layer whose ``weight`` it is), "Module Type" (``ConvBnReLU2d``, ``Quantized[conv2d]``),
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
    specs = _weight_specs(qat_model)
    bns: dict[str, nn.Module] | None = None
    rows = []
    for name, mod in qat_model.named_modules():
        is_int = isinstance(mod, QuantizedConv)
        if not (is_int or hasattr(mod, "folded_weight_bias")):
            continue
        fmod = float_modules.get(name)
        # a subclass of a float layer is that layer (timm's Conv2dSame is an nn.Conv2d)
        if fmod is None or not isinstance(fmod, tuple(FLOAT_TO_QAT)):
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
        ref = _reference_weight(name, fmod, bn, None if is_int else mod).float().cpu()
        got_q = _quantized_weight(name, mod, specs, qat_model)
        row = {"Module Name": name, "Module Type": mod._get_name(),
               "Similarity": math.nan, "Max Abs Error": math.nan, "Weight Scale": math.nan,
               "Error (N weight scale)": math.nan}
        if got_q is not None:
            wq, scale, axis = got_q
            wq, scale = wq.cpu(), scale.cpu()
            if wq.shape != ref.shape:
                raise ValueError(f"compare_weights: layer '{name}' has weight shape "
                                 f"{list(wq.shape)} in qat_model but {list(ref.shape)} in "
                                 "float_model: the models do not correspond")
            worst, steps = _errors(wq - ref, scale, axis)
            row.update({"Similarity": metric(ref, wq), "Max Abs Error": worst,
                        "Weight Scale": float(scale.max()), "Error (N weight scale)": steps})
        rows.append(row)
    table = pd.DataFrame(rows, columns=WEIGHT_COLUMNS)
    write_table(table, out_dir, "weight_comparison",
                f"compare_weights ({metric.name}): {type(float_model).__name__} vs "
                f"{type(qat_model).__name__}")
    return table


#: how far, in steps of its own scale, an integer weight may lie from the float model's
#: (BN-folded) weight: half a step of rounding, one where a channel's maximum clamps to 127
_INTEGER_MAX_STEPS = 1.0 + 1e-3


def _called_modules(float_model: nn.Module) -> set[str] | None:
    """The modules the traced forward calls (None when the model cannot be traced)."""
    try:
        gm = trace_model(float_model, "model1")
    except ValueError:
        return None
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}


def _relative_difference(w1: Tensor, w2: Tensor) -> float:
    """``max |w2 - w1| / max |w1|`` (0 for equal tensors, inf against an all-zero w1)."""
    a, b = w1.detach().float().cpu(), w2.detach().float().cpu()
    if torch.equal(a, b):  # prepare copies the float weights: the usual case, one pass
        return 0.0
    diff = float((b - a).abs().max()) if a.numel() else 0.0
    ref = float(a.abs().max()) if a.numel() else 0.0
    if diff == 0:
        return 0.0
    return diff / ref if ref > 0 else math.inf


def check_weight_correspondence(float_model: nn.Module, model2: nn.Module,
                                rtol: float | None = 1e-5) -> list[str]:
    """Check that ``model2`` was made from ``float_model``: same weighted layers, same weights.

    Every conv / conv-transpose / linear of ``model2`` needs a float layer of the same name in
    ``float_model`` with the same weight: for a calibrated / QAT model the layer's own float
    ``weight`` (unfolded: a fused BatchNorm is not in it) must equal the float layer's within
    ``rtol`` (``max |w2 - w1| / max |w1|``); for an integer model (``convert_fx``) the
    dequantized weight must lie within one step of its scale of the float weight, BN-folded
    as :func:`compare_weights` folds it.  A report on models that do not correspond compares
    unrelated numbers (a cosine of -0.3 with no other sign of why), so this is an error.

    ``float_model``'s weighted layers with no counterpart in ``model2`` are not an error:
    they are returned and listed in a ``RuntimeWarning`` (layers its forward never calls are
    left out: prepare drops them).

    Args:
        float_model: the float model (model1 of ``model_profiler(mode="FvsQ")``).
        model2: a calibrated / QAT model or an integer model.
        rtol: the largest relative difference of a float weight; None skips the check (a
            QAT-trained model's weights differ on purpose).

    Returns:
        the names of ``float_model``'s weighted layers that ``model2`` lacks.

    Raises:
        ValueError: naming the first layer of ``model2`` with no float counterpart, another
            shape, or other weights, and how to fix it.

    Example::

        >>> check_weight_correspondence(float_model, calib_model)
        []
    """
    if rtol is None:
        return []
    fix = ("FvsQ compares a quantized model with the float model it was prepared from: pass "
           "that float model as model1 (and model2 prepared / calibrated from it). If model2 "
           "was QAT-trained from model1, its weights changed on purpose: compare it with the "
           "calibrated model (mode='CvsQ'), or skip this check with kwargs_dict="
           "{'check_weight_correspondence': {'rtol': None}}")
    float_modules = dict(float_model.named_modules())
    matched: set[str] = set()
    integer = False
    for name, mod in model2.named_modules():
        is_int = isinstance(mod, QuantizedConv)
        if not (is_int or hasattr(mod, "folded_weight_bias") or type(mod) in FLOAT_TO_QAT):
            continue
        fmod = float_modules.get(name)
        if fmod is None or not isinstance(fmod, tuple(FLOAT_TO_QAT)):
            got = "no module" if fmod is None else f"a {type(fmod).__name__}"
            raise ValueError(f"model2 ({type(model2).__name__}) does not correspond to model1 "
                             f"({type(float_model).__name__}): model2's layer '{name}' "
                             f"({mod._get_name()}) has {got} of that name in model1. {fix}")
        matched.add(name)
        if is_int:
            integer = True
            continue
        w1, w2 = fmod.weight, mod.weight
        if w1.shape != w2.shape:
            raise ValueError(f"model2 ({type(model2).__name__}) does not correspond to model1 "
                             f"({type(float_model).__name__}): layer '{name}' has weight shape "
                             f"{list(w2.shape)} in model2 but {list(w1.shape)} in model1. {fix}")
        rel = _relative_difference(w1, w2)
        if rel > rtol:
            raise ValueError(f"model2 ({type(model2).__name__}) does not correspond to model1 "
                             f"({type(float_model).__name__}): layer '{name}' has other weights "
                             f"(max |w2 - w1| / max |w1| = {rel:.3g} > {rtol:g}). {fix}")
    if integer:
        table = compare_weights(float_model, model2)
        far = table[table["Error (N weight scale)"] > _INTEGER_MAX_STEPS]
        if len(far):
            row = far.iloc[0]
            raise ValueError(f"model2 ({type(model2).__name__}) does not correspond to model1 "
                             f"({type(float_model).__name__}): the integer weight of "
                             f"'{row['Module Name']}' is {row['Error (N weight scale)']:.3g} "
                             "steps of its scale from model1's (BN-folded) weight; a model "
                             f"converted from model1 is within {_INTEGER_MAX_STEPS:.3g}. {fix}")
    called = _called_modules(float_model)
    missing = [name for name, mod in float_modules.items()
               if type(mod) in FLOAT_TO_QAT and name not in matched
               and (called is None or name in called)]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        warnings.warn(f"model1 ({type(float_model).__name__}) has {len(missing)} weighted "
                      f"layer(s) with no counterpart in model2 ({type(model2).__name__}): "
                      f"{shown}. They are not compared; if model2 should have them, it was not "
                      "prepared from model1", RuntimeWarning, stacklevel=2)
    return missing
