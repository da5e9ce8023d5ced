"""convert_fx: turn a calibrated / QAT model into the integer model an NPU runs (in torch ops).

The pass reads the quantization annotation prepare wrote (:mod:`qatkit.annotation`) and:

* replaces every quantized op module by its integer module from :mod:`qatkit.quantized`,
  chosen by op kind through :data:`qatkit.quantized.CONVERTERS` (a registry: a new op is a new
  entry), given the call's arguments bound by name, each tensor with the qparams its
  annotation names, and the output's qparams;
* gives each call site of a module called with inputs of different scales its own integer
  module (the same integer weights, its own requantization), named ``<module>(<k>)`` like the
  call sites in every report;
* keeps float islands (hybrid / ``qconfig=None``) float, and keeps modules marked with
  :func:`set_preserve_qat_mode` in fake-quant form (VALIDATION state), so a user can find the
  op whose conversion loses accuracy;
* writes the integer model's own annotation (its scales live in the integer modules).

Module names do not change (call sites of a split module aside), and provenance is carried
over, so the profiler compares float, QAT and integer models by name.  Float in, float out:
integer tensors travel as float32 values on their grid (see :mod:`qatkit.quantized.base`).
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any, Iterable

import torch
from torch import fx, nn

from .._modules import module_device, set_module
from ..annotation import (
    NodeAnnotation,
    get_annotations,
    has_annotations,
    map_arguments,
    set_annotations,
)
from ..fake_quantize import FakeQuantize, FakeQuantState
from ..quantized import CONVERTERS, TensorQParams
from ..quantized.base import BoundCall, TensorArg, spec_qparams
from .annotate import annotate
from .partial import is_partially_traced, regions

__all__ = ["convert_fx", "set_preserve_qat_mode", "bound_call"]


def _quantized_modules(model: nn.Module) -> dict[str, NodeAnnotation]:
    """Module name -> the annotation of (one of) its calls, for every quantized op module
    (of every region of a partially traced model, named from its root)."""
    if is_partially_traced(model):
        return {(f"{path}.{name}" if path else name): ann
                for path, gm in regions(model).items()
                for name, ann in _quantized_modules(gm).items()}
    if not has_annotations(model):
        raise ValueError(f"{type(model).__name__} was not made by qatkit.prepare_qat_fx (no "
                         "quantization annotation)")
    out: dict[str, NodeAnnotation] = {}
    for ann in get_annotations(model).values():
        if ann.is_quantized and ann.module is not None:
            out.setdefault(ann.module, ann)
    return out


def set_preserve_qat_mode(model: nn.Module, prefixes: Iterable[str] = (),
                          types: Iterable[type] = (), value: bool = True) -> list[str]:
    """Mark QAT modules to stay in fake-quant form after :func:`convert_fx`.

    Args:
        model: a prepared model.
        prefixes: module names (or prefixes of names: ``"layer1"`` covers ``layer1.0.conv1``);
            a single string is one name.
        types: QAT module classes (``qatkit.nn.qat.Conv2d``) or float classes they replace
            (``torch.nn.Sigmoid``), or op kinds (``"add"``); a single one may be given alone.
        value: True to preserve, False to clear the mark.

    Returns:
        the names of the modules marked.

    Raises:
        ValueError: a prefix or type matches no quantized module.

    Example::

        >>> set_preserve_qat_mode(qat_model, prefixes=["layer4.1.conv2"])
        ['layer4.1.conv2']
        >>> int_model = convert_fx(qat_model)   # layer4.1.conv2 stays fake-quant
    """
    if isinstance(prefixes, str):  # one name, as set_preserve_qat_mode(m, ("conv1"), ()) gives
        prefixes = [prefixes]
    if isinstance(types, (str, type)):
        types = [types]
    prefixes, types = list(prefixes), list(types)
    marked: list[str] = []
    hit_prefix, hit_type = set(), set()
    quantized = _quantized_modules(model)
    for name, ann in quantized.items():
        mod = model.get_submodule(name)
        kind = ann.kind
        for p in prefixes:
            if name == p or name.startswith(p + "."):
                hit_prefix.add(p)
                break
        else:
            matches = [t for t in types
                       if t == kind or (isinstance(t, type) and isinstance(mod, t))]
            if not matches:
                continue
            hit_type.update(map(id, matches))
        mod.preserve_qat_mode = value
        marked.append(name)
    missing = [p for p in prefixes if p not in hit_prefix]
    missing += [getattr(t, "__name__", t) for t in types if id(t) not in hit_type]
    if missing:
        raise ValueError(f"set_preserve_qat_mode: {missing} match no quantized module of "
                         f"{type(model).__name__}; names look like "
                         f"{list(quantized)[:8]}")
    return marked


def convert_fx(qat_model: fx.GraphModule, inplace: bool = False) -> fx.GraphModule:
    """The integer model of a calibrated or QAT model.

    Args:
        qat_model: made by :func:`qatkit.prepare_qat_fx`, calibrated (every fake quant has a
            scale).  Its fake-quant state does not matter.
        inplace: convert ``qat_model`` itself instead of a copy.

    Returns:
        a GraphModule in eval mode whose quantized ops are ``qatkit.quantized`` modules
        (int weights, int32 bias, fixed-point requantization, lookup tables), with the QAT
        model's module names and call signature.

    Raises:
        ValueError: not a prepared model, or a fake quant without a scale (not calibrated).
        NotImplementedError: a quantized op has no integer implementation (the message names
            the module and the ways out: keep it float or preserve it in QAT mode).

    Example::

        >>> set_fake_quant_state(qat_model, FakeQuantState.VALIDATION)
        >>> int_model = convert_fx(qat_model)
        >>> y = int_model(x)     # float in, float out; integer arithmetic inside
    """
    if is_partially_traced(qat_model):
        return _convert_partial(qat_model, inplace)
    if not has_annotations(qat_model):
        raise ValueError(f"convert_fx takes a model made by qatkit.prepare_qat_fx, got "
                         f"{type(qat_model).__name__}")
    model = qat_model if inplace else copy.deepcopy(qat_model)
    _check_calibrated(model)
    return _convert_graph(model)


def _convert_partial(qat_model: nn.Module, inplace: bool) -> nn.Module:
    """Convert each region of a partially traced model in place (the float glue stays)."""
    model = qat_model if inplace else copy.deepcopy(qat_model)
    _check_calibrated(model)
    for path, gm in regions(model).items():
        try:
            _convert_graph(gm)
        except (ValueError, NotImplementedError) as e:
            raise type(e)(f"convert_fx, region '{path or '(root)'}' (names inside are "
                          f"relative to it): {e}") from e
    return model.eval()


def _convert_graph(model: fx.GraphModule) -> fx.GraphModule:
    """convert_fx on a calibrated prepared GraphModule, in place."""
    model.eval()
    annotations = get_annotations(model)
    modules = dict(model.named_modules())
    calls = Counter(str(n.target) for n in model.graph.nodes if n.op == "call_module")
    sites: dict[str, list[tuple[fx.Node, BoundCall]]] = {}
    for node, ann in annotations.items():
        if not ann.is_quantized or node.op != "call_module":
            continue
        mod = modules[str(node.target)]
        if getattr(mod, "preserve_qat_mode", False):
            for fq in mod.modules():
                if isinstance(fq, FakeQuantize):
                    fq.set_state(FakeQuantState.VALIDATION)
            continue
        sites.setdefault(str(node.target), []).append((node, bound_call(model, node, ann)))
    for target, calls_of in sites.items():
        mod = modules[target]
        ann = annotations[calls_of[0][0]]
        out_qp = _out_qparams(model, ann, target)
        converter = CONVERTERS.get(ann.kind)
        if converter is None:
            raise NotImplementedError(
                f"convert_fx: no integer implementation for op '{ann.kind}' at module "
                f"'{target}' ({mod._get_name()}). Keep it float (qconfig_dict "
                f"{{'module_name': [('{target}', None)]}}) or keep it in fake-quant form "
                f"(set_preserve_qat_mode(model, prefixes=['{target}']))")
        for node, _ in calls_of:  # integer modules are not linked: no call sites
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "call_site"}
        keys = {_call_key(call) for _, call in calls_of}
        if len(keys) == 1:  # called once, or every call sees the same scales: one module
            new = _convert_one(converter, mod, calls_of[0], out_qp, target)
            set_module(model, target, new.to(module_device(mod, torch.device("cpu"))))
            continue
        # call sites with different input scales: one integer module per call site
        parent, _, leaf = target.rpartition(".")
        for k, (node, call) in enumerate(calls_of):
            new = _convert_one(converter, mod, (node, call), out_qp, target)
            name = f"{parent}.{leaf}({k})" if parent else f"{leaf}({k})"
            set_module(model, name, new.to(module_device(mod, torch.device("cpu"))))
            node.target = name
        if calls[target] == len(calls_of):
            delattr(model.get_submodule(parent) if parent else model, leaf)
    model.graph.lint()
    model.recompile()
    nodes = list(model.graph.nodes)
    set_annotations(model, annotate(
        model, float_names={n: annotations[n].float_name for n in nodes},
        non_tensor={n for n in nodes if annotations[n].role == "non_tensor"},
        notes={n: annotations[n].note for n in nodes}))
    return model


def bound_call(model: fx.GraphModule, node: fx.Node,
               ann: NodeAnnotation | None = None) -> BoundCall:
    """The call of quantized op ``node`` as its converter sees it: the arguments bound by
    name, each tensor argument a :class:`~qatkit.quantized.TensorArg` with the qparams its
    annotation names.

    Example::

        >>> call = bound_call(qat_model, node)
        >>> CONVERTERS[call_kind](qat_model.get_submodule(node.target), call, out_qparams)
    """
    ann = ann if ann is not None else get_annotations(model)[node]
    names = model.get_submodule(str(node.target)).qatkit_signature
    kwargs = {k: v for k, v in node.kwargs.items() if k != "call_site"}  # prepare's, not the op's
    args, kwargs = map_arguments(
        names, node.args, kwargs,
        lambda name, _: TensorArg(spec_qparams(ann.input_spec(name), model)),
        lambda v: isinstance(v, fx.Node))
    return BoundCall(names, args, kwargs)


def _call_key(call: BoundCall) -> tuple:
    """What makes two calls of a module convert differently: their input scales."""
    return tuple((name, None if a.qparams is None else
                  (a.qparams.bits, tuple(a.qparams.scale.tolist())))
                 for name, a in call.tensors())


def _convert_one(converter: Any, mod: nn.Module, site: tuple[fx.Node, BoundCall],
                 out_qp: TensorQParams | None, target: str) -> nn.Module:
    node, call = site
    try:
        new = converter(mod, call, out_qp)
        new.qatkit_name = target
        return new
    except (ValueError, NotImplementedError) as e:
        raise type(e)(f"convert_fx failed at module '{target}' ({mod._get_name()}, "
                      f"node {node.format_node()}): {e}") from e


def _check_calibrated(model: nn.Module) -> None:
    missing = [name for name, m in model.named_modules()
               if isinstance(m, FakeQuantize) and not m.has_scale]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"convert_fx: {len(missing)} fake quant(s) have no scale: {shown}. "
                         "Calibrate first: set_fake_quant_state(model, "
                         "FakeQuantState.CALIBRATION), run representative data, then "
                         "set_fake_quant_state(model, FakeQuantState.VALIDATION)")


def _out_qparams(model: nn.Module, ann: NodeAnnotation, target: str) -> TensorQParams | None:
    if ann.output is not None and ann.output.ch_axis is not None:
        raise ValueError(f"convert_fx: per-channel activation quantization is not supported "
                         f"(module '{target}')")
    return spec_qparams(ann.output, model)
