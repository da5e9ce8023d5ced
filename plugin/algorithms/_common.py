"""What every post-training algorithm shares.

* :func:`prepared_layers` -- check that a model is prepared and calibrated, and list its
  weighted layers (QAT conv / linear modules) from the quantization annotation;
* :func:`working_copy` and :func:`algorithm_session` -- the caller's model is never mutated
  unless ``inplace=True``; inside a session every fake quant is in VALIDATION and every module
  in eval mode, and both are restored on exit;
* :func:`collect_batches` -- the calibration data, once, as ``(args, kwargs)`` on the device;
* :func:`record` -- the values of chosen graph nodes, with the model quantized or float,
  stopping each forward at the last node needed;
* the layer math on folded weights (the QAT layer's own ``weighted_op``, ``finish`` and
  ``fold_factor``; :func:`call_inputs`), and the two ways results become ordinary weights and
  scales:
  :func:`set_integer_weights` and :func:`refresh_weight_scale` / :func:`recalibrate`;
* the PTQ log: each algorithm appends a table to the model (:func:`ptq_log`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from typing import Any, Callable, Iterator, Sequence

import pandas as pd
import torch
from torch import Tensor, fx, nn
from tqdm.auto import tqdm

from .._exact import release_exact_caches
from .._modules import module_device
from ..annotation import NodeAnnotation, get_annotations, has_annotations
from ..calibration import calibrate
from ..data import as_batches, batch_size, model_inputs, to_device
from ..fake_quantize import (
    FakeQuantize,
    FakeQuantState,
    LSQFakeQuantize,
    exact_evaluation,
    fake_quant_enabled,
)
from ..nn.qat import FusedMixin
from ..observers import FixedScaleObserver

__all__ = ["Layer", "prepared_layers", "working_copy", "algorithm_session", "collect_batches",
           "Batch", "record", "set_integer_weights",
           "refresh_weight_scale", "recalibrate", "exact_evaluation_off", "log_table",
           "ptq_log", "layer_progress", "PTQ_LOG_KEY", "call_inputs", "channel_view",
           "placeholder_args", "samples_in", "check_prepared"]

#: where each algorithm's table is kept on the model (``GraphModule.meta``: kept by deepcopy)
PTQ_LOG_KEY = "qatkit_ptq_log"

#: one calibration batch: the model's positional and keyword arguments, on its device
Batch = tuple[tuple, dict]


@dataclasses.dataclass(frozen=True)
class Layer:
    """One QAT conv / linear module of a prepared model (all its calls).

    Attributes:
        path: the module's path in the model (``layer1.0.conv1``), also its name in reports.
        module: the QAT module (``qatkit.nn.qat.Conv2d``...).
        nodes: the graph nodes calling it, in graph order (several for a module called at
            several places).
        annotations: the quantization annotation of each node.
    """

    path: str
    module: nn.Module
    nodes: tuple[fx.Node, ...]
    annotations: tuple[NodeAnnotation, ...]

    @property
    def weight_fake_quant(self) -> FakeQuantize:
        return self.module.weight_fake_quant

    def input_spec_paths(self) -> list[str]:
        """Module paths of the fake quants of the layer's ``input`` argument (one per call;
        empty for a float input)."""
        paths = []
        for ann in self.annotations:
            spec = ann.input_spec("input")
            if spec is not None and spec.module_path not in paths:
                paths.append(spec.module_path)
        return paths

    def __repr__(self) -> str:
        return f"Layer({self.path!r}, {type(self.module).__name__}, calls={len(self.nodes)})"


def _fake_quants(model: nn.Module) -> list[tuple[str, FakeQuantize]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantize)]


def check_prepared(model: nn.Module, algorithm: str) -> None:
    """Raise a ``ValueError`` naming the fix when ``model`` is not a prepared model, or when
    its calibration is not finished."""
    if not has_annotations(model):
        raise ValueError(
            f"{algorithm} needs a model prepared by qatkit.prepare_qat_fx and calibrated, got "
            f"{type(model).__name__}. Fix: qat_model = qatkit.prepare_qat_fx(model, "
            "qconfig_dict, example_inputs=(x,)); qatkit.calibrate(qat_model, data); then "
            f"qatkit.{algorithm}(qat_model, data)")
    calibrating = [n for n, fq in _fake_quants(model) if fq.state is FakeQuantState.CALIBRATION]
    if calibrating:
        raise ValueError(
            f"{algorithm}: {len(calibrating)} fake quant(s) are still in CALIBRATION state "
            f"({', '.join(calibrating[:3])}): calibration is not finished. Fix: "
            "qatkit.calibrate(model, data) (it leaves VALIDATION), or "
            "qatkit.set_fake_quant_state(model, 'validation') after running the data")


def prepared_layers(model: nn.Module, algorithm: str) -> list[Layer]:
    """The weighted layers of a prepared, calibrated model, in graph order.

    A layer takes part when its weight fake quant is enabled and has a scale, and its input's
    fake quant (if any) has one.  Layers the calibration data never reached are skipped with
    a warning; a model none of whose layers has scales is not calibrated.

    Raises:
        ValueError: not prepared, calibration unfinished, no weighted layer, or not calibrated.

    Example::

        >>> [layer.path for layer in prepared_layers(qat_model, "adaround")][:2]
        ['conv1', 'conv2']
    """
    check_prepared(model, algorithm)
    by_path: dict[str, list[tuple[fx.Node, NodeAnnotation]]] = {}
    for node, ann in get_annotations(model).items():
        if ann.weight is None or ann.module is None or node.op != "call_module":
            continue
        if isinstance(model.get_submodule(ann.module), FusedMixin):
            by_path.setdefault(ann.module, []).append((node, ann))
    if not by_path:
        raise ValueError(f"{algorithm}: {type(model).__name__} has no conv / linear layer with "
                         "quantized weights (every weighted layer is float or 32-bit?)")
    layers, missing = [], []
    for path, calls in by_path.items():
        mod = model.get_submodule(path)
        wfq = mod.weight_fake_quant
        if not wfq.enabled:
            continue  # float weights on purpose (set_fake_quant_enabled)
        inputs = [ann.input_spec("input") for _, ann in calls]
        if not wfq.has_scale or any(s is not None and not s.has_scale(model) for s in inputs):
            missing.append(path)
            continue
        layers.append(Layer(path, mod, tuple(n for n, _ in calls), tuple(a for _, a in calls)))
    if not layers:
        raise ValueError(
            f"{algorithm}: {type(model).__name__} is not calibrated (no layer has the scales of "
            f"its weight and input, e.g. '{missing[0] if missing else '?'}'). Fix: "
            "qatkit.calibrate(model, data) before the algorithm")
    if missing:
        warnings.warn(f"{algorithm}: {len(missing)} layer(s) have no scale and are left as they "
                      f"are (not reached by the calibration data?): {', '.join(missing[:5])}",
                      RuntimeWarning, stacklevel=3)
    return layers


def working_copy(model: nn.Module, inplace: bool) -> nn.Module:
    """``model`` itself when ``inplace``, else a deep copy (the caller's model is untouched)."""
    return model if inplace else copy.deepcopy(model)


@contextlib.contextmanager
def algorithm_session(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: every module in eval mode and every fake quant in VALIDATION (frozen scales).
    On exit the train / eval flags and the fake-quant states are restored (leaving VALIDATION
    for QAT computes nothing) and exact evaluation's cached integer weights are released.

    Example::

        >>> with algorithm_session(qat_model):
        ...     ...   # read scales, run the model, change weights
    """
    training = [(m, m.training) for m in model.modules()]
    states = [(fq, fq.state) for _, fq in _fake_quants(model)]
    model.eval()
    for fq, _ in states:
        fq.set_state(FakeQuantState.VALIDATION)
    try:
        yield model
    finally:
        for m, flag in training:
            m.training = flag
        for fq, state in states:
            if fq.state is not state:
                fq.set_state(state)
        release_exact_caches(model)


@contextlib.contextmanager
def exact_evaluation_off(model: nn.Module) -> Iterator[None]:
    """Inside: no fake quant of ``model`` evaluates exactly (float32 fake quantization, what
    training runs), with or without gradients; the flags are restored on exit."""
    saved = [(fq, fq.exact_evaluation) for _, fq in _fake_quants(model)]
    try:
        for fq, _ in saved:
            fq.exact_evaluation = False
        yield
    finally:
        for fq, flag in saved:
            fq.exact_evaluation = flag
        release_exact_caches(model)


def collect_batches(model: nn.Module, data: Any, num_batches: int | None,
                    device: Any, algorithm: str) -> tuple[list[Batch], torch.device]:
    """The calibration batches (at most ``num_batches``) as ``(args, kwargs)`` of the model's
    forward, on ``device`` (default: the model's; the model is moved there), and the device.

    ``data`` takes every form :func:`qatkit.calibrate` takes (tensor, tuple, list,
    DataLoader, folder of ``.pt`` / ``.npy``).
    """
    dev = torch.device(device) if device is not None else module_device(model,
                                                                        torch.device("cpu"))
    model.to(dev)
    batches, _ = as_batches(data)
    out: list[Batch] = []
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            break
        out.append(model_inputs(model, to_device(batch, dev)))
    if not out:
        raise ValueError(f"{algorithm}: the calibration data holds no batch")
    return out, dev


def samples_in(batch: Batch) -> int:
    """The batch size of one calibration batch."""
    return batch_size(*batch)


# -- recording node values -------------------------------------------------------------------
class _Stop(Exception):
    """Raised by the recorder after the last node it needs: the rest of the forward is
    skipped."""


def _detach(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_detach(v) for v in value)
    return value


class _Recorder(fx.Interpreter):
    """Runs a GraphModule and hands the values of the nodes named in ``keep`` to ``sink``."""

    def __init__(self, gm: fx.GraphModule, keep: set[str], last: str | None,
                 sink: Callable[[str, Any], None]) -> None:
        super().__init__(gm)
        self.keep, self.last, self.sink = keep, last, sink

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.keep:
            self.sink(n.name, _detach(out))
        if n.name == self.last:
            raise _Stop
        return out


def placeholder_args(gm: fx.GraphModule, batch: Batch) -> list[Any]:
    """The batch's positional and keyword arguments in the order of ``gm``'s placeholders."""
    args, kwargs = batch
    out = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        name = str(node.target).lstrip("*")
        if i < len(args):
            out.append(args[i])
        elif name in kwargs:
            out.append(kwargs[name])
        elif node.args:
            out.append(node.args[0])  # the default value
        else:
            raise ValueError(f"the calibration batch has no value for the input '{name}'")
    return out


@contextlib.contextmanager
def _mode(model: fx.GraphModule, quantized: bool, disabled: Sequence[str]) -> Iterator[None]:
    if quantized:
        with exact_evaluation(model, False):
            if disabled:
                with fake_quant_enabled(model, False, list(disabled)):
                    yield
            else:
                yield
    else:
        with fake_quant_enabled(model, False), torch.no_grad():
            yield


def record(model: fx.GraphModule, batches: Sequence[Batch], nodes: Sequence[str],
           quantized: bool, disabled: Sequence[str] = (),
           sink: Callable[[int, str, Any], None] | None = None) -> list[dict[str, Any]]:
    """The values of the graph nodes ``nodes`` (by name) for each batch, each forward stopped
    at the last of them.

    Args:
        model: a prepared model inside :func:`algorithm_session` (VALIDATION).
        batches: from :func:`collect_batches`.
        nodes: node names.
        quantized: True: the fake-quant model (float32 fake quantization, no exact
            evaluation: faster, equal but for rare float32 near-ties); False: the float model
            (every fake quant disabled).
        disabled: fake quants (module paths) switched off in the quantized run.
        sink: ``sink(batch_index, node_name, value)`` receives each value instead of the
            returned dicts (statistics without keeping the tensors); the dicts are then empty.

    Example::

        >>> [vals] = record(qm, batches[:1], ["conv2_1"], quantized=False)
    """
    keep = set(nodes)
    order = {n.name: i for i, n in enumerate(model.graph.nodes)}
    last_name = max(keep, key=order.__getitem__) if keep else None
    out: list[dict[str, Any]] = []
    with _mode(model, quantized, disabled):
        for i, batch in enumerate(batches):
            values: dict[str, Any] = {}
            out.append(values)

            def put(name: str, value: Any, i: int = i, values: dict = values) -> None:
                if sink is None:
                    values[name] = value
                else:
                    sink(i, name, value)

            try:
                _Recorder(model, keep, last_name, put).run(*placeholder_args(model, batch))
            except _Stop:
                pass
    return out


# -- the layer math ----------------------------------------------------------------------------
def call_inputs(node: fx.Node, ann: NodeAnnotation, values: dict[str, Any]
                ) -> tuple[Tensor, Tensor | None, Any]:
    """``(input, other, output_size)`` of a layer call, from recorded node values (arguments
    bound by name by the annotation; ``other`` None when not recorded)."""
    x = values[ann.input("input").node]
    other_in = ann.input("other")
    other = values.get(other_in.node) if other_in is not None else None
    output_size = node.kwargs.get("output_size", node.args[2] if len(node.args) > 2 else None)
    return x, other, output_size


def channel_view(fq: FakeQuantize, like: Tensor) -> Tensor:
    """``fq``'s scale shaped to broadcast against ``like`` (per channel along ``ch_axis``)."""
    scale = fq.scale.detach().to(device=like.device, dtype=torch.float32)
    if not fq.is_per_channel:
        return scale.reshape(())
    shape = [1] * like.dim()
    shape[fq.ch_axis % like.dim()] = -1
    return scale.view(shape)


@torch.no_grad()
def set_integer_weights(mod: nn.Module, q: Tensor) -> int:
    """Change ``mod.weight`` so that :meth:`quantize_weight` gives the integers ``q``.

    Only elements whose integer changes move: to ``(q + clamp(w / s - q, -0.4, 0.4)) * s`` in
    the folded domain (the point of ``q``'s rounding interval nearest the old weight), unfolded
    through the BatchNorm factor.  The others keep their float value bit for bit, so the
    elements that set each channel's range (never changed by the callers) keep it.

    Returns:
        how many elements could not be set (a BatchNorm factor of 0: the folded weight is 0
        whatever the weight).

    Example::

        >>> q = qconv.quantize_weight(); q[0, 0, 0, 0] += 1
        >>> set_integer_weights(qconv, q); bool((qconv.quantize_weight() == q).all())
        0
        True
    """
    wfq = mod.weight_fake_quant
    current = mod.quantize_weight()
    q = q.to(current)
    change = current != q
    if not bool(change.any()):
        return 0
    w_fold = mod.folded_weight_bias()[0].detach().float()
    s = channel_view(wfq, w_fold)
    target = (q + (w_fold / s - q).clamp(-0.4, 0.4)) * s
    factor = mod.fold_factor()
    ok = change & (factor != 0)
    new = torch.where(ok, target / torch.where(ok, factor, torch.ones_like(factor)), mod.weight)
    mod.weight.copy_(new.to(mod.weight.dtype))
    release_exact_caches(mod)
    return int((mod.quantize_weight() != q).sum())


@torch.no_grad()
def refresh_weight_scale(mod: nn.Module) -> None:
    """Recompute the weight scale of ``mod`` from its current folded weight with its own
    observer (after an algorithm changed the weights or the BatchNorm statistics).  A learned
    (LSQ) or fixed weight scale is kept."""
    wfq = mod.weight_fake_quant
    if wfq is None or isinstance(wfq, LSQFakeQuantize) or isinstance(wfq.observer,
                                                                     FixedScaleObserver):
        return
    wfq.observer.reset()
    wfq.observer(mod.folded_weight_bias()[0].detach())
    wfq.calculate_scale()


def recalibrate(model: nn.Module, batches: Sequence[Batch]) -> None:
    """Forget every observer's statistics and calibrate again on ``batches`` with the model's
    own observers (activation scales after an algorithm changed weights); the model is left in
    VALIDATION."""
    for _, fq in _fake_quants(model):
        fq.observer.reset()
    data = [dict(kw) if kw else tuple(args) for args, kw in batches]
    calibrate(model, data, progress=False)


# -- progress and log --------------------------------------------------------------------------
def layer_progress(items: Sequence[Any], algorithm: str, progress: bool,
                   unit: str = "layer") -> Any:
    """``items`` behind a tqdm bar (over layers by default; silenced by ``progress=False``)."""
    return tqdm(items, desc=algorithm, unit=unit, disable=not progress, leave=False)


def log_table(model: nn.Module, algorithm: str, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` (one dict per layer) to the model's PTQ log under ``algorithm``."""
    meta = getattr(model, "meta", None)
    if not isinstance(meta, dict):
        return
    step = len(meta.setdefault(PTQ_LOG_KEY, []))
    meta[PTQ_LOG_KEY].append([{"step": step, "algorithm": algorithm, **r} for r in rows])


def ptq_log(model: nn.Module) -> pd.DataFrame:
    """What the post-training algorithms did to ``model``: one row per layer and algorithm
    run, in the order they ran (columns: ``step``, ``algorithm``, ``layer`` and each
    algorithm's own measures, e.g. SmoothQuant's outlier level before and after, AdaRound's
    reconstruction error with nearest and with learned rounding).

    Example::

        >>> qm = qatkit.smooth_quant(qm, data)
        >>> qatkit.ptq_log(qm)[["algorithm", "layer", "applied"]].head(2)
    """
    meta = getattr(model, "meta", None)
    runs = meta.get(PTQ_LOG_KEY, []) if isinstance(meta, dict) else []
    rows = [r for run in runs for r in run]
    return pd.DataFrame(rows)
