"""Capture one forward of a model, by name: every tool of a report reads it (an FX Interpreter).

Works on float, calibrated, QAT and integer models alike: the model is traced (float) or is
already a GraphModule (prepared / converted), and one ``torch.fx.Interpreter`` run records, as
a :class:`Capture`:

* each op's input and output tensors, moved to the CPU, as :class:`FeatureRecord` objects with
  the op's kind and role and, for an input, the op it comes from (all read from the
  quantization annotation, :mod:`qatkit.annotation`; a float model's trace is annotated by the
  same pass, :func:`qatkit.fx.annotate`, which gives kinds and roles without specs);
* which nodes produce floating-point tensors, how often each module is called, the outputs of
  the nodes a comparison needs (kept on the CPU), and the model's output.

:func:`model_profiler` captures each model once and hands the capture to every tool
(similarity, statistics, outlier channels, call counts, qconfig check); each tool called on its
own captures the model itself.  Names are the op names of :mod:`qatkit.fx.naming`
(``name(k)`` for the k-th call of a shared module).  The model is never changed (see
:func:`~qatkit.profiler.core.running.analysis_model`).

Example::

    >>> cap = capture_model(calib_model, x, records=True)
    >>> cap.calls["layer1.0.conv1"], cap.records[0].kind
    (1, 'quant_stub')
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import Counter
from typing import Any, Callable, Iterable, Sequence

import torch
from qatkit.annotation import NodeAnnotation, get_annotations, has_annotations, source_annotation
from qatkit.fake_quantize import FakeQuantize, FakeQuantState
from qatkit.fx import annotate
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_flatten

from .alignment import CALL_OPS, check_inputs, op_label, op_names
from .running import analysis_model, as_tuple, model_device, positional_inputs, to_device

__all__ = ["FeatureRecord", "Capture", "capture_model", "run_capture", "get_raw_features",
           "node_qparams", "model_annotations"]

#: ``on_output(interpreter, node, value) -> value``: sees (and may replace) each op's output
OnOutput = Callable[[fx.Interpreter, fx.Node, Any], Any]


@dataclasses.dataclass(frozen=True, repr=False)
class FeatureRecord:
    """One tensor seen by one op call.

    Attributes:
        name: the op's name (``layer1.0.conv1``, ``act(1)``, ``layer1.0.add``).
        module_type: ``ConvBnReLU2d``, ``FunctionalOp[add]``, ``Quantized[conv2d]``, ``add``...
        attr: ``"input"`` or ``"output"``.
        arg: position of the tensor among the op's tensor inputs (0 for outputs).
        data: the tensor on the CPU (integers ``q`` when captured with ``preserve_int``).
        scale: the quantization step of the tensor (per tensor), ``None`` for a float tensor.
        dtype: ``"qint8"``, ``"qint16"`` for quantized tensors, else the torch dtype
            (``"float32"``).
        unquantized: for the output of a fake-quant op (VALIDATION / QAT state), the op's
            value before its output fake quant (float32, on the CPU): what the op computes,
            so statistics can show how much of it the quantization grid cuts off. None
            elsewhere (integer ops round and saturate inside).
        kind: the op's kind from the annotation (``"conv"``, ``"add"``, ``"quant_stub"``,
            ``"sigmoid"``; the op's base name for other ops, e.g. ``"reshape"``).
        role: the op's role (:data:`qatkit.annotation.ROLES`: ``"quantized"``,
            ``"passthrough"``, ``"float"``...).
        source: for an input, the op whose output it is, looked up through data-moving ops
            (a graph input's own name for a model input); None for an output.
        source_kind: the kind of ``source`` (``"input"`` for a model input).
    """

    name: str
    module_type: str
    attr: str
    arg: int
    data: Tensor
    scale: float | None
    dtype: str
    unquantized: Tensor | None = None
    kind: str = ""
    role: str = ""
    source: str | None = None
    source_kind: str | None = None

    @property
    def is_int(self) -> bool:
        """True when ``data`` holds the integers ``q`` (``preserve_int=True``)."""
        return not self.data.is_floating_point()

    def __repr__(self) -> str:
        return (f"FeatureRecord(name={self.name!r}, module_type={self.module_type!r}, "
                f"kind={self.kind!r}, attr={self.attr!r}, arg={self.arg}, "
                f"shape={list(self.data.shape)}, scale={self.scale}, dtype={self.dtype!r})")


def node_qparams(gm: fx.GraphModule) -> dict[fx.Node, tuple[float | None, str | None]]:
    """``(scale, dtype)`` of every node's output, read from the quantization annotation
    (data-moving ops share their input's); ``(None, None)`` for float tensors and for every
    node of a float model.  A per-channel or not-yet-calibrated output gives
    ``(None, dtype)``.

    Example::

        >>> qp = node_qparams(qat_model)      # {node: (0.0123, 'qint8'), ...}
    """
    if not has_annotations(gm):
        return {node: (None, None) for node in gm.graph.nodes}
    out: dict[fx.Node, tuple[float | None, str | None]] = {}
    for node, ann in get_annotations(gm).items():
        spec = ann.output
        out[node] = (None, None) if spec is None else (spec.scale_value(gm), spec.dtype)
    return out


def model_annotations(gm: fx.GraphModule) -> dict[fx.Node, NodeAnnotation]:
    """The annotation of every node: the stored one of a prepared / converted model, or, for
    a float model's trace, the annotate pass's kinds and roles (no quantization specs).

    Example::

        >>> {a.name: a.kind for a in model_annotations(trace_model(resnet18)).values()}["fc"]
        'linear'
    """
    return get_annotations(gm) if has_annotations(gm) else annotate(gm)


# -- the capture -----------------------------------------------------------------------------
@dataclasses.dataclass(eq=False, repr=False)
class Capture:
    """One recorded forward of one model: what every tool of a report reads.

    Attributes:
        model: the model captured (it was not changed).
        label: how messages call it (``"model1"``).
        names: FX node name -> op name (the tables' "Module Name").
        annotations: FX node name -> :class:`~qatkit.annotation.NodeAnnotation`.
        tensors: op name -> True when the op (or graph input) produced a floating-point
            tensor.
        calls: module path -> how often the module ran in the forward (every path of the
            model that ran, including modules the tracer inlined).
        records: the :class:`FeatureRecord` objects asked for, in execution order.
        kept: op name -> output on the CPU, for the ops asked for (``keep``).
        output: the model's output.

    Example::

        >>> cap = capture_model(float_model, x)
        >>> cap.calls["relu"], cap.tensors["size"]
        (2, False)
    """

    model: nn.Module
    label: str
    names: dict[str, str] = dataclasses.field(default_factory=dict)
    annotations: dict[str, NodeAnnotation] = dataclasses.field(default_factory=dict)
    tensors: dict[str, bool] = dataclasses.field(default_factory=dict)
    calls: dict[str, int] = dataclasses.field(default_factory=dict)
    records: list[FeatureRecord] = dataclasses.field(default_factory=list)
    kept: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    output: Any = None

    def check_model(self, model: nn.Module, caller: str) -> None:
        """Raise a ValueError naming ``caller`` when this capture was not made from ``model``.

        Example::

            >>> cap.check_model(model, "get_module_called_count")
        """
        if self.model is not model:
            raise ValueError(f"{caller}: capture= was recorded from {self.label} "
                             f"({type(self.model).__name__}), not from the model passed "
                             f"({type(model).__name__}). Pass the capture of that model, or "
                             "leave capture=None to run it")

    def __repr__(self) -> str:
        return (f"Capture({self.label}: {type(self.model).__name__}, {len(self.names)} nodes, "
                f"{len(self.records)} records, {len(self.kept)} kept)")


def _version(t: Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter
        return None


class _Snapshots:
    """The tensors a capture keeps, on the CPU, one per (tensor, version): an op's output
    recorded again as the next op's input is kept once, while an in-place change gives a new
    one.  A CPU tensor is kept as it is, no copy, with its version: :meth:`changed` tells
    afterwards whether an in-place op changed one of them (the capture then runs again with
    ``copy``).  Tensors on other devices, and the model's own parameters and buffers
    (``copy=True``: the model keeps them after the capture), are copied at once."""

    def __init__(self, copy: bool = False) -> None:
        self.copy = copy
        self._cache: dict[int, tuple[weakref.ref, int | None, Tensor]] = {}
        self._held: list[tuple[Tensor, int]] = []

    def __call__(self, t: Tensor, copy: bool = False) -> Tensor:
        version = _version(t)
        hit = self._cache.get(id(t))
        if hit is not None and hit[0]() is t and version is not None and hit[1] == version:
            return hit[2]
        if self.copy or copy or version is None or t.device.type != "cpu":
            snap = t.detach().to("cpu", copy=True)
        else:
            snap = t.detach()  # shares t's version counter (views share their base's)
            self._held.append((snap, version))
        self._cache[id(t)] = (weakref.ref(t), version, snap)
        return snap

    def changed(self) -> bool:
        """True when an in-place op changed a tensor kept without a copy."""
        return any(t._version != v for t, v in self._held)


def _matches(node: fx.Node, name: str, mod: nn.Module | None, mtype: str, kind: str,
             prefixes: Sequence[str], types: Sequence[Any]) -> bool:
    if prefixes and not any(name == p or name.startswith(p + ".") or name.startswith(p + "(")
                            for p in prefixes):
        return False
    if not types:
        return True
    for t in types:
        if isinstance(t, type) and mod is not None and isinstance(mod, t):
            return True
        if isinstance(t, str) and t in (mtype, kind):
            return True
        if not isinstance(t, (type, str)) and node.target is t:
            return True
    return False


def _to_int(t: Tensor, scale: float) -> Tensor:
    return torch.round(t.to(torch.float64) / scale).to(torch.int32)


def _inlined_calls(gm: fx.GraphModule) -> dict[str, int]:
    """Calls of the modules the tracer traced through (their ops are in the graph, the module
    itself never runs): distinct ``nn_module_stack`` entries per module path, the entry of a
    ``call_module`` node's own module left out."""
    keys: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for key, value in stack.items():
            path = value[0] if isinstance(value, tuple) and value else None
            if not isinstance(path, str) or (node.op == "call_module" and node.target == path):
                continue
            keys.setdefault(path, set()).add(str(key))
    return {path: len(k) for path, k in keys.items()}


class _Recorder(fx.Interpreter):
    """Runs ``gm`` once, filling a :class:`Capture` (see :func:`run_capture`)."""

    def __init__(self, gm: fx.GraphModule, cap: Capture, record: bool, prefixes: Sequence[str],
                 types: Sequence[Any], preserve_int: bool, keep: set[str],
                 on_output: OnOutput | None, copy: bool) -> None:
        super().__init__(gm)
        self.cap, self.record_on, self.keep, self.on_output = cap, record, keep, on_output
        self.prefixes, self.types, self.preserve_int = prefixes, types, preserve_int
        self.modules = dict(gm.named_modules())
        self.qparams = node_qparams(gm) if record else {}
        self.snap = _Snapshots(copy)

    def _record(self, ann: NodeAnnotation, mtype: str, attr: str, arg: int, t: Tensor,
                qp: tuple[float | None, str | None], pre: Tensor | None = None,
                src: NodeAnnotation | None = None) -> None:
        scale, qdtype = qp
        data = self.snap(t, copy=src is not None and src.role == "attr")  # a parameter: copied
        if self.preserve_int and scale is not None and data.is_floating_point():
            data = _to_int(data, scale)
        dtype = qdtype if qdtype is not None else str(t.dtype).replace("torch.", "")
        if pre is not None:  # the op's own tensor, never handed on: no copy needed on the CPU
            pre = pre.detach().to("cpu", torch.float32)
        self.cap.records.append(FeatureRecord(
            ann.name, mtype, attr, arg, data, scale, dtype, pre, ann.kind, ann.role,
            None if src is None else src.name, None if src is None else src.kind))

    def run_node(self, n: fx.Node) -> Any:
        cap = self.cap
        name = cap.names[n.name]
        if n.op not in CALL_OPS:
            out = super().run_node(n)
            if n.op != "output":
                cap.tensors[name] = isinstance(out, Tensor) and out.is_floating_point()
            if name in self.keep and isinstance(out, Tensor):
                cap.kept[name] = self.snap(out)
            if self.on_output is not None:
                out = self.on_output(self, n, out)
            return out
        ann = cap.annotations[n.name]
        mod = self.modules.get(str(n.target)) if n.op == "call_module" else None
        keep = False
        if self.record_on:
            mtype = op_label(ann, self.modules)
            keep = _matches(n, ann.name, mod, mtype, ann.kind, self.prefixes, self.types)
        if keep:
            in_nodes = [a for a in tree_flatten((n.args, n.kwargs))[0] if isinstance(a, fx.Node)]
            k = 0
            for a in in_nodes:
                v = self.env[a]
                if isinstance(v, Tensor):
                    src = source_annotation(cap.annotations[a.name], cap.annotations)
                    self._record(ann, mtype, "input", k, v, self.qparams.get(a, (None, None)),
                                 src=src)
                    k += 1
        pre: list[Tensor] = []
        fq = getattr(mod, "activation_post_process", None) if keep else None
        hook = None
        if isinstance(fq, FakeQuantize) and fq.state is not FakeQuantState.CALIBRATION:
            hook = fq.register_forward_pre_hook(lambda m, a: pre.append(a[0]))
        try:
            out = super().run_node(n)
        finally:
            if hook is not None:
                hook.remove()
        is_tensor = isinstance(out, Tensor)
        cap.tensors[name] = is_tensor and out.is_floating_point()
        if keep and is_tensor:
            unq = pre[-1] if pre and isinstance(pre[-1], Tensor) and pre[-1] is not out and \
                pre[-1].shape == out.shape else None
            self._record(ann, mtype, "output", 0, out, self.qparams[n], unq)
        if name in self.keep and is_tensor:
            cap.kept[name] = self.snap(out)
        if self.on_output is not None:
            out = self.on_output(self, n, out)
        return out


def run_capture(gm: fx.GraphModule, inputs: tuple[Any, ...], model: nn.Module | None = None,
                label: str = "model", records: bool = False, prefixes: Iterable[str] = (),
                types: Iterable[Any] = (), preserve_int: bool = False,
                keep: Iterable[str] = (), on_output: OnOutput | None = None) -> Capture:
    """Run ``gm`` (from :func:`~qatkit.profiler.core.running.analysis_model`) once and record a
    :class:`Capture`.

    Args:
        gm: the GraphModule to run, in eval mode.
        inputs: the forward's positional arguments.
        model: the model ``gm`` stands for (default ``gm``); tools check a capture against it.
        label: how messages call the model.
        records: record :class:`FeatureRecord` objects (filtered by ``prefixes``/``types``,
            integers with ``preserve_int``, as :func:`get_raw_features` describes).
        keep: op names whose outputs are kept on the CPU (``Capture.kept``).
        on_output: ``on_output(interpreter, node, value) -> value`` after each op (a
            comparison; it may hand on another value).

    Records and kept outputs of a model on the CPU are its very tensors, not copies; when an
    in-place op of the model changed one of them later in the forward, the model runs again
    and they are copied as they are produced (``on_output`` then sees the second run too).

    Returns:
        the :class:`Capture`.

    Example::

        >>> with analysis_model(calib_model, "model2") as gm:
        ...     cap = run_capture(gm, (x,), calib_model, "model2", records=True)
    """
    anns = model_annotations(gm)
    names = {n.name: name for n, name in op_names(gm).items()}
    for copy in (False, True):  # without copies, unless an in-place op changed a kept tensor
        cap = Capture(model=gm if model is None else model, label=label, names=names,
                      annotations={n.name: a for n, a in anns.items()})
        counts: Counter = Counter()
        instances = {id(m): m for m in gm.modules() if m is not gm}
        hooks = [m.register_forward_hook(lambda mod, *_, c=counts: c.update((id(mod),)))
                 for m in instances.values()]
        try:
            recorder = _Recorder(gm, cap, records, list(prefixes), list(types), preserve_int,
                                 set(keep), on_output, copy)
            with torch.no_grad():
                cap.output = recorder.run(*to_device(inputs, model_device(gm)))
        finally:
            for h in hooks:
                h.remove()
        if copy or not recorder.snap.changed():
            break
    cap.calls = dict(_inlined_calls(gm))
    for path, m in gm.named_modules(remove_duplicate=False):
        if path and counts[id(m)]:
            cap.calls[path] = counts[id(m)]
    return cap


def capture_model(model: nn.Module, example_inputs: Any, label: str = "model",
                  device: Any = None, calibration: str = "warn", float_flow: bool = False,
                  **kwargs: Any) -> Capture:
    """Capture one forward of ``model`` (it is not changed; see
    :func:`~qatkit.profiler.core.running.analysis_model`).

    Args:
        model: a float, calibrated, QAT or integer model.
        example_inputs: the model's input, a tuple of its inputs, or a dict of keyword
            inputs.
        label: how messages call the model.
        device: run on this device (a copy of the model); None: where the model is.
        calibration: ``"warn"`` or ``"raise"`` for fake quants in CALIBRATION state.
        float_flow: run a copy with every fake quant in CALIBRATION state (no scale needed;
            for the structure: tensors and call counts).
        **kwargs: :func:`run_capture`'s ``records``, ``prefixes``, ``types``,
            ``preserve_int``, ``keep``, ``on_output``.

    Raises:
        ValueError: ``example_inputs`` do not fit the model's signature.

    Example::

        >>> cap = capture_model(calib_model, x, records=True)
        >>> get_module_called_count(calib_model, x, capture=cap)   # no second forward
    """
    with analysis_model(model, label, device, calibration, float_flow) as gm:
        inputs = (positional_inputs(gm, example_inputs) if isinstance(example_inputs, dict)
                  else as_tuple(example_inputs))
        check_inputs(gm, inputs, label)
        return run_capture(gm, inputs, model, label, **kwargs)


def get_raw_features(model: nn.Module, example_inputs: Any, prefixes: Iterable[str] = (),
                     types: Iterable[Any] = (), device: Any = None,
                     preserve_int: bool = False) -> list[FeatureRecord]:
    """Every op's inputs and output for one forward of ``model``, as records on the CPU.

    Args:
        model: a float, calibrated, QAT or integer (``convert_fx``) model.  It is not
            changed (see :func:`~qatkit.profiler.core.running.analysis_model`); a model in
            CALIBRATION state warns.
        example_inputs: the model's input, or a tuple of its inputs.
        prefixes: keep only ops whose name is one of these or starts with ``prefix.``
            (``"layer1"`` keeps ``layer1.0.conv1`` and ``layer1.0.add``).
        types: keep only ops matching one of these: a module class (``nn.Conv2d``,
            ``qatkit.nn.qat.Conv2d``), a type name or op kind (``"ConvBnReLU2d"``, ``"add"``),
            or a function (``torch.cat``).
        device: run on this device (a copy of the model); None: where the model is.
        preserve_int: for quantized tensors, ``data`` holds the integers
            ``q = round(x / scale)`` (int32) instead of the float values.

    Returns:
        records in execution order: per op call, one ``"input"`` record per tensor input
        (``arg`` = its position among the tensor inputs, ``cat([a, b])`` gives 0 and 1), then
        the ``"output"`` record.  A module called several times gives ``name(0)``,
        ``name(1)``...  Inputs carry their producer's scale and name it (``source``, through
        data-moving ops); every record carries the op's kind and role.

    Raises:
        ValueError: ``example_inputs`` do not fit the model's signature.

    Example::

        >>> records = get_raw_features(int_model, x, prefixes=["layer1"], preserve_int=True)
        >>> [(r.name, r.attr, r.dtype) for r in records[:2]]
        [('layer1.0.conv1', 'input', 'qint8'), ('layer1.0.conv1', 'output', 'qint8')]
    """
    return capture_model(model, example_inputs, "model", device, "warn", records=True,
                         prefixes=prefixes, types=types, preserve_int=preserve_int).records
