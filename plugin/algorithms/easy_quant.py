"""EasyQuant: search the weight and activation scales that maximize each layer's output cosine.

Observers pick a scale from one tensor's statistics (min/max, MSE of that tensor); what matters
is the error of the layer that consumes it.  EasyQuant (Wu et al., 2020) searches, layer by
layer in graph order, the scales maximizing the cosine similarity between the layer's output in
the quantized model and in the float model, alternating:

* the weight scale of each output channel (coordinate ascent over the channels on the cosine
  of the whole output: a channel's magnitude matters relative to the others), then
* the scale of the layer's input activation,

each over ``search_steps`` candidates in ``search_range`` times the current scale (the
current one included, so no layer gets worse on the calibration data).  The output compared is
the conv / linear's (bias included, before the add and the activation).  An activation scale
shared by several layers (one tensor read by several convs) is searched for all of them
together (mean cosine).  Not searched: fixed scales (``QuantStub(scale=...)``), per-channel
activation scales, and the scale of a tensor that something else than a conv / linear input
also reads (a residual add, a concat, the model output): its effect there is not measured.
The quantized layer sees the already searched quantized model upstream; the float output is
the original model's.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import Tensor, fx, nn

from ..annotation import get_annotations
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

__all__ = ["easy_quant"]

_NAME = "easy_quant"


def _quant(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """Fake quantization (the FakeQuantize rule): ``clamp(round(x / s)) * s``."""
    return torch.div(x, scale).round_().clamp_(qmin, qmax).mul_(scale)


def _axis(layer: Layer) -> int:
    return -1 if isinstance(layer.module, nn.Linear) else 1


def _per_channel(y: Tensor, axis: int) -> Tensor:
    axis = axis % y.dim()
    return y.transpose(0, axis).reshape(y.shape[axis], -1).double()


class _LayerData:
    """One layer's recorded inputs (before its input fake quant) and float outputs."""

    def __init__(self, qm: fx.GraphModule, reference: fx.GraphModule, layer: Layer,
                 batches: Sequence, disabled: Sequence[str]) -> None:
        self.layer = layer
        self.mod = qm.get_submodule(layer.path)
        nodes = [ann.input("input").node for ann in layer.annotations]
        raw = record(qm, batches, nodes, quantized=True, disabled=disabled)
        flt = record(reference, batches, nodes, quantized=False)
        ref_mod = reference.get_submodule(layer.path)
        w_f, b_f = ref_mod.folded_weight_bias()
        self.inputs: list[tuple[Tensor, Any]] = []
        self.targets: list[Tensor] = []
        with torch.no_grad():
            for vals_q, vals_f in zip(raw, flt, strict=True):
                for node, ann in zip(layer.nodes, layer.annotations, strict=True):
                    x, _, size = call_inputs(node, ann, vals_q)
                    x_f, _, _ = call_inputs(node, ann, vals_f)
                    self.inputs.append((x, size))
                    self.targets.append(ref_mod.weighted_op(x_f, w_f, b_f, size))

    @torch.no_grad()
    def sums(self, weight: Tensor, in_quant: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Per output channel, over the recorded data: ``sum(y * t)``, ``sum(y * y)`` and
        ``sum(t * t)`` of the layer's output ``y`` with ``weight`` and inputs mapped by
        ``in_quant``, and the float output ``t`` (float64)."""
        bias = self.mod.folded_weight_bias()[1]
        axis = _axis(self.layer)
        dot = nq = nf = None
        for (x, size), target in zip(self.inputs, self.targets, strict=True):
            y = _per_channel(self.mod.weighted_op(in_quant(x), weight, bias, size), axis)
            t = _per_channel(target, axis)
            parts = ((y * t).sum(1), (y * y).sum(1), (t * t).sum(1))
            dot = parts[0] if dot is None else dot + parts[0]
            nq = parts[1] if nq is None else nq + parts[1]
            nf = parts[2] if nf is None else nf + parts[2]
        return dot, nq, nf

    def cosine(self, weight: Tensor, in_quant: Any) -> float:
        """Cosine similarity of the whole layer output with the float output."""
        dot, nq, nf = self.sums(weight, in_quant)
        return float(dot.sum() / (nq.sum().sqrt() * nf.sum().sqrt()).clamp_min(1e-30))


def _candidates(search_range: tuple[float, float], steps: int) -> list[float]:
    """The factors tried: 1 first (ties keep the current scale), then the grid."""
    lo, hi = search_range
    values = torch.linspace(lo, hi, steps).tolist() if steps > 1 else [lo]
    return [1.0] + sorted(set(values) - {1.0})


def _weight_search(data: _LayerData, in_quant: Any, factors: list[float],
                   rounds: int = 3) -> None:
    """Choose each output channel's weight scale among ``factors`` times the current one so
    that the cosine of the whole layer output is maximal: every candidate's per-channel sums
    are computed once, then coordinate ascent over the channels (a channel's choice changes
    the whole output's norm, so channels are not independent)."""
    wfq = data.mod.weight_fake_quant
    w = data.mod.folded_weight_bias()[0].detach().float()
    base = wfq.scale.detach().float().clone()
    shape = [1] * w.dim()
    shape[wfq.ch_axis % w.dim()] = -1
    dots, norms = [], []
    for f in factors:
        dot, nq, nf = data.sums(_quant(w, (base * f).view(shape), wfq.quant_min, wfq.quant_max),
                                in_quant)
        dots.append(dot)
        norms.append(nq)
    d, q = torch.stack(dots).cpu(), torch.stack(norms).cpu()  # [factors, channels]
    pick = [0] * d.shape[1]  # factors[0] == 1: the current scale
    total_d, total_q = float(d[0].sum()), float(q[0].sum())
    for _ in range(rounds):
        moved = False
        for c in range(d.shape[1]):
            rest_d, rest_q = total_d - float(d[pick[c], c]), total_q - float(q[pick[c], c])
            score = (rest_d + d[:, c]) / (rest_q + q[:, c]).clamp_min(1e-30).sqrt()
            best = int(score.argmax())
            if score[best] > score[pick[c]]:
                pick[c] = best
                total_d, total_q = rest_d + float(d[best, c]), rest_q + float(q[best, c])
                moved = True
        if not moved:
            break
    chosen = torch.tensor([factors[i] for i in pick], dtype=base.dtype, device=base.device)
    with torch.no_grad():
        wfq.scale.copy_(base * chosen)


def _quantized_weight(mod: nn.Module) -> Tensor:
    wfq = mod.weight_fake_quant
    w = mod.folded_weight_bias()[0].detach().float()
    shape = [1] * w.dim()
    shape[wfq.ch_axis % w.dim()] = -1
    return _quant(w, wfq.scale.detach().float().view(shape), wfq.quant_min, wfq.quant_max)


def _act_quant(fq: nn.Module | None, scale: Tensor | None = None) -> Any:
    if fq is None:
        return lambda x: x
    s = (fq.scale if scale is None else scale).detach().float().reshape(())
    return lambda x: _quant(x, s, fq.quant_min, fq.quant_max)


def _group_cos(datas: list[_LayerData], act_fq: nn.Module | None,
               scale: Tensor | None = None) -> float:
    quant = _act_quant(act_fq, scale)
    cos = [d.cosine(_quantized_weight(d.mod), quant) for d in datas]
    return sum(cos) / len(cos)


def _searchable(model: fx.GraphModule, layer: Layer, readers: dict[str, set]) -> str | None:
    """The input fake quant of ``layer`` whose scale can be searched, or None: a per-tensor,
    calibrated, not fixed fake quant whose tensor only conv / linear layers read, as their
    ``input`` (a residual add, a concat or the model output reading it too would be changed
    without being measured)."""
    paths = layer.input_spec_paths()
    if len(paths) != 1:
        return None
    fq = model.get_submodule(paths[0])
    fixed = type(fq.observer).__name__ == "FixedScaleObserver"
    if fixed or fq.is_per_channel or not fq.enabled or not fq.has_scale:
        return None
    if any(reader != "layer input" for reader in readers.get(paths[0], ())):
        return None
    return paths[0]


def _readers(model: fx.GraphModule, layers: list[Layer]) -> dict[str, set]:
    """For each activation fake quant (module path): how the ops reading its tensor read it
    (``"layer input"`` or the op's name); data-moving ops pass the tensor on and are not
    readers themselves."""
    calls = {node for layer in layers for node in layer.nodes}
    out: dict[str, set] = {}
    for node, ann in get_annotations(model).items():
        if ann.role == "passthrough":
            continue
        for inp in ann.inputs:
            if inp.spec is None:
                continue
            how = "layer input" if node in calls and inp.name == "input" else ann.name
            out.setdefault(inp.spec.module_path, set()).add(how)
    return out


def easy_quant(model: fx.GraphModule, data: Any, iterations: int = 2,
               search_range: tuple[float, float] = (0.5, 2.0), search_steps: int = 50,
               activations: bool = True, num_batches: int | None = None, device: Any = None,
               progress: bool = True, inplace: bool = False) -> fx.GraphModule:
    """Search weight and activation scales maximizing each layer's output cosine (EasyQuant).

    Args:
        model: a prepared (:func:`qatkit.prepare_qat_fx`) and calibrated model.
        data: the calibration data the cosines are measured on.
        iterations: alternations of the weight search and the activation search per layer.
        search_range: candidates are ``[lo, hi]`` times the current scale (the paper's
            ``[0.5, 2]``).
        search_steps: candidates per search (evenly spaced; the current scale is added).
        activations: also search the input activation scales (False: weights only).
        num_batches: use at most this many batches of ``data``.
        device: where to run (default: the model's device).
        progress: show a progress bar over layers.
        inplace: change ``model`` itself instead of a copy.

    Returns:
        the model with the searched scales.  :func:`qatkit.ptq_log` lists per layer the output
        cosine before and after and the input scale's change.  Calibrating again recomputes
        the scales with the observers: search after the last calibration.

    Raises:
        ValueError: a model that is not prepared or not calibrated, or a bad argument.

    Example::

        >>> qm = qatkit.easy_quant(qat_model, calib_batches, iterations=2)
    """
    lo, hi = search_range
    if not 0 < lo <= hi or iterations < 1 or search_steps < 1:
        raise ValueError(f"{_NAME}: need 0 < search_range[0] <= search_range[1], iterations >= "
                         f"1, search_steps >= 1; got {search_range}, {iterations}, "
                         f"{search_steps}")
    qm = working_copy(model, inplace)
    layers = prepared_layers(qm, _NAME)
    batches, _ = collect_batches(qm, data, num_batches, device, _NAME)
    reference = copy.deepcopy(qm)
    factors = _candidates(search_range, search_steps)
    readers = _readers(qm, layers)
    groups: dict[str, list[Layer]] = {}
    for layer in layers:
        key = _searchable(qm, layer, readers) if activations else None
        groups.setdefault(key or f"#{layer.path}", []).append(layer)
    rows: list[dict[str, Any]] = []
    with algorithm_session(qm), algorithm_session(reference):
        for key, glayers in layer_progress(list(groups.items()), _NAME, progress):
            act_path = None if key.startswith("#") else key
            act_fq = qm.get_submodule(act_path) if act_path else None
            disabled = [act_path] if act_path else []
            datas = [_LayerData(qm, reference, layer, batches, disabled) for layer in glayers]
            before = [d.cosine(_quantized_weight(d.mod), _act_quant(act_fq)) for d in datas]
            a0 = float(act_fq.scale) if act_fq is not None else float("nan")
            for _ in range(iterations):
                for d in datas:
                    _weight_search(d, _act_quant(act_fq), factors)
                if act_fq is not None:
                    base = act_fq.scale.detach().clone()
                    scores = [(_group_cos(datas, act_fq, base * f), f) for f in factors]
                    best = max(scores, key=lambda sf: (sf[0], sf[1] == 1.0))[1]
                    with torch.no_grad():
                        act_fq.scale.copy_(base * best)
            for d, cos0 in zip(datas, before, strict=True):
                cos1 = d.cosine(_quantized_weight(d.mod), _act_quant(act_fq))
                rows.append({"layer": d.layer.path, "input": act_path or "",
                             "cosine_before": cos0, "cosine_after": cos1,
                             "input_scale_ratio": (float(act_fq.scale) / a0
                                                   if act_fq is not None else float("nan"))})
    log_table(qm, _NAME, rows)
    return qm
