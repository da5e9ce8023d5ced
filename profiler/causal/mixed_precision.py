"""suggest_mixed_precision: raise the few layers that need it, and hand back the qconfig.

NPU toolchains offer a "highest mix precision" switch; this is its answer for one model: a
greedy search on a calibrated model that raises the most sensitive layers one at a time --
int16 activations first, then int16 weights, then float islands only where int16 is not
enough -- until ``target`` is met, re-measuring the whole model after each step (sensitivities
interact: once the worst layer is fixed, the next one is another).  Each trial is emulated on
a private copy of the calibrated model (:mod:`~qatkit.profiler.causal._precision_space`: the same
scales a fresh ``prepare_qat_fx`` + calibration would give) and scored by running only what
follows the changed layer (:mod:`~qatkit.profiler.causal.incremental`), or by ``eval_fn`` (a task
metric on the user's data).

The result holds the ``qconfig_dict`` and ``hybrid_dict`` to pass to ``prepare_qat_fx`` (the
model's own qconfigs, read from its layers or from the ``qconfig_dict`` given, plus one
``"module_name"`` entry per raised layer), each step with the score after it, and the cost
(layers changed, share of activation values in int16).

Example::

    >>> res = suggest_mixed_precision(calib_model, calib_data, target=0.99 * float_acc,
    ...                               eval_fn=accuracy, max_layers=3)
    >>> qm = qatkit.prepare_qat_fx(float_model, **res.prepare_kwargs, example_inputs=(x,))
    >>> qatkit.calibrate(qm, calib_data); accuracy(qm) >= 0.99 * float_acc
    True
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import math
from typing import Any, Callable, Mapping

import pandas as pd
import torch
from qatkit.annotation import get_annotations
from qatkit.fake_quantize import FakeQuantize
from qatkit.qconfig import QConfig
from torch import nn
from tqdm.auto import tqdm

from ..core.running import collect_batches, private_model
from ..core.tables import qconfig_key
from ._precision_space import LayerPrecision, PrecisionSpace
from .incremental import Evaluator, metric_list

__all__ = ["suggest_mixed_precision", "MixedPrecisionResult", "MixedPrecisionStep",
           "PRECISION_OPTIONS"]

#: option -> the changes it allows, cheapest first (tier 0 int16 activation, 1 int16 weight,
#: 2 float island)
PRECISION_OPTIONS: dict[str, tuple[str, ...]] = {
    "int16": ("int16 activation", "int16 weight"),
    "int16_activation": ("int16 activation",),
    "int16_weight": ("int16 weight",),
    "float": ("float",),
}
_TIERS = ("int16 activation", "int16 weight", "float")
#: a cheaper change is taken when it brings at least this share of the best change's gain
_CHEAPER_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class MixedPrecisionStep:
    """One step of the search: ``change`` applied to ``layer``, and the scores after it.

    Attributes:
        layer: the layer changed (a ``qconfig_dict`` ``"module_name"`` key).
        change: ``"int16 activation"``, ``"int16 weight"`` or ``"float"``.
        score: the target's score after the step (the whole model re-measured).
        scores: every score after the step (metric and eval_fn).
        candidates: trials scored to choose it.

    Example::

        >>> step = res.steps[0]
        >>> step.layer, step.change, round(step.score, 4)
        ('cat', 'int16 activation', 0.9917)
    """

    layer: str
    change: str
    score: float
    scores: dict[str, float]
    candidates: int


@dataclasses.dataclass(frozen=True, repr=False)
class MixedPrecisionResult:
    """What :func:`suggest_mixed_precision` found.

    Attributes:
        qconfig_dict: pass it to ``prepare_qat_fx``.
        hybrid_dict: the float islands (``prepare_qat_fx(..., hybrid=True, hybrid_dict=...)``),
            None when there are none.
        steps: each step, in order.
        key: the score the target applies to (the eval_fn's name, or the metric's).
        target: the target.
        reached: whether the final configuration meets it.
        initial_score: the score as calibrated (all layers as prepared).
        final_score: the score after the last step.
        float_score: the score of the float data flow: the best any configuration reaches.
        layers_changed: the layers changed, in step order.
        int16_activation_share: share of the activation values (per forward of the first
            batch; per fake quant without data) quantized in int16 at the end, before the
            search and after it.
        config: the final precision of every layer.
        evaluations: trials scored (each one run of what follows the change, or one eval_fn
            call).
        message: what happened, in one sentence (why the target was not reached, if so).

    Example::

        >>> res.layers_changed, res.final_score, res.prepare_kwargs["hybrid"]
        (('cat',), 0.994..., False)
    """

    qconfig_dict: dict
    hybrid_dict: dict | None
    steps: tuple[MixedPrecisionStep, ...]
    key: str
    target: float
    reached: bool
    initial_score: float
    final_score: float
    float_score: float
    layers_changed: tuple[str, ...]
    int16_activation_share: tuple[float, float]
    config: dict[str, LayerPrecision]
    evaluations: int
    message: str

    @property
    def prepare_kwargs(self) -> dict[str, Any]:
        """``{"qconfig_dict": ..., "hybrid": ..., "hybrid_dict": ...}`` for
        ``prepare_qat_fx(float_model, **kwargs)``."""
        return {"qconfig_dict": self.qconfig_dict, "hybrid": self.hybrid_dict is not None,
                "hybrid_dict": self.hybrid_dict}

    @property
    def table(self) -> pd.DataFrame:
        """The steps: Step, Module Name (the layer), Change, score after, candidates tried."""
        return pd.DataFrame([{"Step": i + 1, "Module Name": s.layer, "Change": s.change,
                              self.key: s.score, "Candidates": s.candidates}
                             for i, s in enumerate(self.steps)],
                            columns=["Step", "Module Name", "Change", self.key, "Candidates"])

    def __repr__(self) -> str:
        return (f"MixedPrecisionResult(reached={self.reached}, {self.key}: "
                f"{self.initial_score:.6g} -> {self.final_score:.6g} (target {self.target:.6g},"
                f" float {self.float_score:.6g}), layers_changed={list(self.layers_changed)}, "
                f"int16 activations {100 * self.int16_activation_share[1]:.1f}%)")


def _meets(value: float, target: float, higher: bool) -> bool:
    return not math.isnan(value) and (value >= target if higher else value <= target)


def _allowed(options: Any) -> set[str]:
    if isinstance(options, str):
        options = (options,)
    out: set[str] = set()
    for opt in options:
        if opt not in PRECISION_OPTIONS:
            raise ValueError(f"options entry {opt!r}: choose from {list(PRECISION_OPTIONS)}")
        out.update(PRECISION_OPTIONS[opt])
    if not out:
        raise ValueError("options is empty: pass e.g. ('int16', 'float')")
    return out


def _moves(space: PrecisionSpace, config: dict[str, LayerPrecision], allowed: set[str],
           allow_new: bool, changed: list[str]) -> list[tuple[int, str, str, dict]]:
    """(tier, layer, change, new config) for every single change allowed from ``config``."""
    out = []
    for name, st in config.items():
        if st.island or (not allow_new and name not in changed):
            continue
        options = []
        if st.act_bits is not None and st.act_bits < 16:
            options.append(("int16 activation", dataclasses.replace(st, act_bits=16)))
        if st.weight_bits is not None and st.weight_bits < 16:
            options.append(("int16 weight", dataclasses.replace(st, weight_bits=16)))
        options.append(("float", dataclasses.replace(space._initial[name], island=True)))
        for change, new in options:
            if change in allowed:
                out.append((_TIERS.index(change), name, change, {**config, name: new}))
    return out


def _choose(measured: list[tuple[int, str, str, dict, float]], current: float, target: float,
            higher: bool, changed: list[str]) -> tuple | None:
    """The change to make: the cheapest tier that meets the target (its best score), else
    the cheapest tier whose gain is at least half the best gain; None when nothing gains."""
    def gain(v: float) -> float:
        return -math.inf if math.isnan(v) else (v - current if higher else current - v)

    def best(cands: list) -> tuple:
        return min(cands, key=lambda c: (-gain(c[4]), c[1] not in changed))

    meeting = [c for c in measured if _meets(c[4], target, higher)]
    if meeting:
        tier = min(c[0] for c in meeting)
        return best([c for c in meeting if c[0] == tier])
    if not measured:
        return None
    top = max(gain(c[4]) for c in measured)
    if not top > 0:
        return None
    for tier in sorted({c[0] for c in measured}):
        pick = best([c for c in measured if c[0] == tier])
        if gain(pick[4]) >= _CHEAPER_SHARE * top:
            return pick
    return None


def suggest_mixed_precision(model: Any, calibrated_data: Any, target: float,
                            metric: Any = "cosine",
                            eval_fn: Callable[[Any], Any] | None = None,
                            options: Any = ("int16", "float"), max_layers: int | None = None,
                            qconfig_dict: dict | None = None, output_node: Any = None,
                            data_num: int | None = None, screen: int | None = 8,
                            verbose: bool = True, device: Any = None, incremental: bool = True,
                            input_fn: Callable[[Any], Any] | None = None) -> MixedPrecisionResult:
    """Greedily raise the most sensitive layers until ``target`` is met; return the qconfig.

    Args:
        model: a calibrated model made by ``prepare_qat_fx`` (or the path of one saved with
            ``torch.save``); never changed.
        calibrated_data: data the output is compared on against the float data flow (any
            form :func:`get_sensitivity_of_nodes` takes); may be None with ``eval_fn``.
        target: the score to reach: a value of ``metric`` (e.g. cosine 0.999), or of
            ``eval_fn`` when given (e.g. ``0.99 * float_accuracy``).
        metric: the comparison metric (``"cosine"``, ``"mse"``, ``"sqnr"``...).
        eval_fn: ``eval_fn(model) -> number`` (higher is better unless the function has
            ``higher_is_better = False``): then the target applies to it and, with
            ``calibrated_data``, the metric picks the ``screen`` most promising trials of each
            kind per step for it to score.
        options: ``"int16"`` (int16 activations, then weights), ``"int16_activation"``,
            ``"int16_weight"``, ``"float"`` (float islands, tried last).
        max_layers: change at most this many layers (None: no limit).
        qconfig_dict: the ``qconfig_dict`` the model was prepared with; None: rebuilt from
            the qconfigs its layers hold.
        output_node: which output is scored (None: all; an int; an op name).
        data_num: use the first ``data_num`` samples of ``calibrated_data``.
        screen: with ``eval_fn`` and data, how many trials of each kind ``eval_fn`` scores per
            step (None: all).
        verbose: show a progress bar over the steps.
        device: run on this device (a copy); None: where the model is.
        incremental: run only what follows each change (False: full runs, same numbers).
        input_fn: ``batch -> model input`` when batches hold more than the inputs.

    Returns:
        a :class:`MixedPrecisionResult` (``prepare_kwargs`` to pass to ``prepare_qat_fx``).

    Raises:
        ValueError: a bad option, a model in CALIBRATION state or never calibrated, data that
            does not fit the model.
        TypeError: ``eval_fn`` returned something that is not a number.

    Example::

        >>> res = suggest_mixed_precision(calib_model, data, target=0.999, metric="cosine")
        >>> res.table                   # Step, Module Name, Change, Cosine, Candidates
    """
    allowed = _allowed(options)
    if max_layers is not None and (not isinstance(max_layers, int) or max_layers < 1):
        raise ValueError(f"max_layers={max_layers!r}: pass a positive int or None")
    mets = metric_list(metric)[:1]
    original, work = private_model(model, "model", device)
    space = PrecisionSpace(work)
    batches = (collect_batches(work, calibrated_data, data_num, input_fn=input_fn)
               if calibrated_data is not None else [])
    ev = Evaluator(work, batches, mets, output_node, eval_fn, incremental, "model")
    key = ev.eval_key or mets[0].name
    higher = ev.better(key)
    float_scores = ev.set_reference()  # checks that the data fits first
    sizes = _activation_sizes(work, batches, space)
    float_scores.update({m.name: m(ev.reference, ev.reference) for m in ev.metrics})
    current = ev.set_base({})
    initial_score = current[key]
    initial_share = _int16_share(space, space.current, sizes)
    config = space.initial()
    changed: list[str] = []
    steps: list[MixedPrecisionStep] = []
    message = ""
    if not _meets(float_scores[key], target, higher):
        message = (f"even the float data flow (every layer float) scores {key} "
                   f"{float_scores[key]:.6g}, which does not meet the target {target:.6g}: "
                   f"{float_scores[key]:.6g} is the best any configuration reaches")
    with tqdm(desc="mixed precision", unit="step", disable=not verbose, leave=False) as bar:
        while not message and not _meets(current[key], target, higher):
            allow_new = max_layers is None or len(changed) < max_layers
            cands = _moves(space, config, allowed, allow_new, changed)
            measured = _measure(ev, space, cands, key, screen, target, higher)
            pick = _choose(measured, current[key], target, higher, changed)
            if pick is None:
                message = (f"no single further change improves {key} "
                           + ("within max_layers" if not allow_new else "")
                           + f" (best {current[key]:.6g}, target {target:.6g})")
                break
            tier, name, change, config, _ = pick
            space.commit(config)
            current = ev.set_base({})  # re-measure the whole model in its new configuration
            if name not in changed:
                changed.append(name)
            steps.append(MixedPrecisionStep(name, change, current[key], dict(current),
                                            len(measured)))
            bar.update(1)
    reached = _meets(current[key], target, higher)
    if reached:
        message = (f"target met: {key} {current[key]:.6g} with {len(changed)} layer(s) changed"
                   if changed else f"target met as calibrated ({key} {current[key]:.6g})")
    qdict, hdict = _qconfig_dicts(original, config, space, qconfig_dict)
    return MixedPrecisionResult(
        qconfig_dict=qdict, hybrid_dict=hdict, steps=tuple(steps), key=key, target=target,
        reached=reached, initial_score=initial_score, final_score=current[key],
        float_score=float_scores[key], layers_changed=tuple(changed),
        int16_activation_share=(initial_share, _int16_share(space, space.current, sizes)),
        config=dict(config), evaluations=ev.evaluations + ev.trials, message=message)


def _measure(ev: Evaluator, space: PrecisionSpace, cands: list, key: str,
             screen: int | None, target: float, higher: bool
             ) -> list[tuple[int, str, str, dict, float]]:
    """Score every candidate (``eval_fn`` only for the ``screen`` best of each tier by the
    metric, when both are there; tiers in order, stopping after the first tier with a
    candidate that meets the target -- :func:`_choose` takes the cheapest such tier)."""
    staged = []
    for tier, name, change, config in cands:
        diff = space.diff(config)
        if not diff:
            continue
        staged.append((tier, name, change, config, space.starts(list(diff))))
    out = []
    two_stage = ev.eval_fn is not None and ev.runner is not None and screen is not None
    prelim: list[float] = []
    for *_, config, starts in staged:
        scores = ev.measure(starts, change=functools.partial(space.applied, config),
                            evaluate=not two_stage)
        prelim.append(scores[key] if not two_stage else scores[ev.metrics[0].name])
    if not two_stage:
        return [(*s[:4], v) for s, v in zip(staged, prelim, strict=True)]
    by_tier: dict[int, list[int]] = collections.defaultdict(list)
    for i, s in enumerate(staged):
        by_tier[s[0]].append(i)
    metric_higher = ev.metrics[0].higher_is_better
    for tier in sorted(by_tier):
        idx = sorted(by_tier[tier], key=lambda i: -prelim[i] if metric_higher else prelim[i])
        for i in idx[:screen]:
            tier, name, change, config, starts = staged[i]
            scores = ev.measure(starts, change=functools.partial(space.applied, config),
                                metrics=False)
            out.append((tier, name, change, config, scores[key]))
        if any(_meets(c[4], target, higher) for c in out):
            break
    return out


def _activation_sizes(work: nn.Module, batches: list, space: PrecisionSpace) -> dict[str, int]:
    """Values each activation fake quant sees per forward of the first batch (1 each
    without data)."""
    acts = [p for p in space.fqs if not p.endswith("weight_fake_quant")]
    if not batches:
        return dict.fromkeys(acts, 1)
    sizes = dict.fromkeys(acts, 0)
    hooks = [space.fqs[p].register_forward_pre_hook(
        lambda m, args, p=p: sizes.__setitem__(p, sizes[p] + args[0].numel())) for p in acts]
    try:
        with torch.no_grad():
            work(*batches[0])
    finally:
        for h in hooks:
            h.remove()
    return sizes


def _int16_share(space: PrecisionSpace, settings: Mapping[str, tuple[bool, int]],
                 sizes: Mapping[str, int]) -> float:
    on = [(p, bits) for p, (enabled, bits) in settings.items() if enabled and p in sizes]
    total = sum(sizes[p] for p, _ in on)
    return sum(sizes[p] for p, bits in on if bits >= 16) / total if total else 0.0


# -- the qconfig_dict --------------------------------------------------------------------------
def _factory(fq: FakeQuantize) -> Callable[..., FakeQuantize]:
    """A factory building a fake quant like ``fq`` (when its layer holds no qconfig)."""
    obs = fq.observer
    kwargs = {}
    for name in inspect.signature(type(obs).__init__).parameters:
        if name not in ("self", "dtype", "ch_axis") and hasattr(obs, name):
            kwargs[name] = getattr(obs, name)
    return type(fq).with_args(observer=type(obs), dtype=fq.dtype, ch_axis=fq.ch_axis, **kwargs)


def _layer_qconfig(model: nn.Module, name: str) -> QConfig:
    mod = model.get_submodule(name)
    qc = mod.__dict__.get("qconfig")
    if isinstance(qc, QConfig):
        return qc
    act = getattr(mod, "activation_post_process", None)
    w = getattr(mod, "weight_fake_quant", None)
    return QConfig(activation=_factory(act) if isinstance(act, FakeQuantize) else None,
                   weight=_factory(w) if isinstance(w, FakeQuantize) else None)


def _model_qconfig_dict(model: nn.Module, space: PrecisionSpace) -> dict:
    """The qconfig_dict the model was prepared with, as far as its layers tell: the most
    common qconfig as ``""``, each layer holding another one by name, and the ops prepare
    kept float by configuration as None."""
    held = {name: _layer_qconfig(model, name) for name in space.layers}
    if not held:
        return {"": None}
    counts = collections.Counter(id(qc) for qc in held.values())
    common_id = counts.most_common(1)[0][0]
    common = next(qc for qc in held.values() if id(qc) == common_id)
    entries = [(name, qc) for name, qc in held.items() if id(qc) != common_id]
    for ann in get_annotations(model).values():
        if ann.role == "float" and ann.note.startswith("qconfig None"):
            entries.append((qconfig_key(ann.name), None))
    out: dict = {"": common}
    if entries:
        out["module_name"] = list(dict(entries).items())
    return out


def _with_bits(factory: Callable | None, bits: int) -> Callable | None:
    return None if factory is None else functools.partial(factory, dtype=f"qint{bits}")


def _qconfig_dicts(model: nn.Module, config: Mapping[str, LayerPrecision],
                   space: PrecisionSpace, given: dict | None) -> tuple[dict, dict | None]:
    base = dict(given) if given is not None else _model_qconfig_dict(model, space)
    raised: dict[str, QConfig] = {}
    islands: list[str] = []
    for name, st in config.items():
        first = space._initial[name]
        if st.island:
            islands.append(name)
            continue
        if st == first:
            continue
        qc = _layer_qconfig(model, name)
        act = qc.activation if st.act_bits == first.act_bits else _with_bits(qc.activation,
                                                                            st.act_bits)
        weight = qc.weight if st.weight_bits == first.weight_bits else _with_bits(
            qc.weight, st.weight_bits)
        raised[name] = QConfig(activation=act, weight=weight)
    if raised:
        entries = base.get("module_name", [])
        entries = list(entries.items()) if isinstance(entries, dict) else list(entries)
        entries = [(k, v) for k, v in entries if k not in raised]
        base["module_name"] = entries + list(raised.items())
    return base, ({"module_name": islands} if islands else None)
