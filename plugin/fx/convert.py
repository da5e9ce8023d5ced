"""convert_fx: turn a calibrated / QAT model into the integer model an NPU runs (in torch ops).

The pass walks the prepared GraphModule once, in topological order, and:

* propagates each tensor's quantization parameters (scale, bits): a QAT op's output fake quant
  defines them; data-moving ops (reshape, max pool, getitem, ...) pass them on; float ops and
  graph inputs have none;
* replaces every quantized op module by its integer module from :mod:`qatkit.quantized`,
  chosen by op kind through :data:`qatkit.quantized.CONVERTERS` (a registry: a new op is a new
  entry), given the qparams of the op's inputs and output;
* keeps float islands (hybrid / ``qconfig=None``) float, and keeps modules marked with
  :func:`set_preserve_qat_mode` in fake-quant form (VALIDATION state), so a user can find the
  op whose conversion loses accuracy.

Module names do not change, and the provenance map is carried over, so the profiler compares
float, QAT and integer models by name.  Float in, float out: integer tensors travel as float32
values on their grid (see :mod:`qatkit.quantized.base`).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import fx, nn

from ..fake_quantize import FakeQuantize, FakeQuantState
from ..nn import qat
from ..quantized import CONVERTERS, TensorQParams
from .patterns import PASSTHROUGH_FUNCTIONS, PASSTHROUGH_METHODS, PASSTHROUGH_MODULES
from .prepare import PROVENANCE_ATTR

__all__ = ["convert_fx", "set_preserve_qat_mode", "op_kind"]


def op_kind(module: nn.Module) -> str | None:
    """The integer-converter kind of a QAT module (``"conv"``, ``"add"``...), else None."""
    if isinstance(module, qat.QuantStub):
        return "quant_stub"
    if isinstance(module, qat.FunctionalOp):
        return module.op
    if isinstance(module, qat.Linear):
        return "linear"
    if hasattr(module, "folded_weight_bias"):
        return "conv"
    if isinstance(module, qat.OutputQuantMixin):
        for cls in type(module).__mro__[1:]:
            kind = qat.OUTPUT_QUANTIZED_MODULES.get(cls)
            if kind is not None:
                return kind
    return None


def set_preserve_qat_mode(model: nn.Module, prefixes: Iterable[str] = (),
                          types: Iterable[type] = (), value: bool = True) -> list[str]:
    """Mark QAT modules to stay in fake-quant form after :func:`convert_fx`.

    Args:
        model: a prepared model.
        prefixes: module names (or prefixes of names: ``"layer1"`` covers ``layer1.0.conv1``).
        types: QAT module classes (``qatkit.nn.qat.Conv2d``) or float classes they replace
            (``torch.nn.Sigmoid``), or op kinds (``"add"``).
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
    prefixes, types = list(prefixes), list(types)
    marked: list[str] = []
    hit_prefix, hit_type = set(), set()
    for name, mod in model.named_modules():
        kind = op_kind(mod)
        if kind is None:
            continue
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
                         f"{[n for n, m in model.named_modules() if op_kind(m)][:8]}")
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

        >>> set_fake_quantize(qat_model, FakeQuantState.VALIDATION)
        >>> int_model = convert_fx(qat_model)
        >>> y = int_model(x)     # float in, float out; integer arithmetic inside
    """
    if not isinstance(qat_model, fx.GraphModule) or not hasattr(qat_model, PROVENANCE_ATTR):
        raise ValueError(f"convert_fx takes a model made by qatkit.prepare_qat_fx, got "
                         f"{type(qat_model).__name__}")
    model = qat_model if inplace else copy.deepcopy(qat_model)
    _check_calibrated(model)
    model.eval()
    modules = dict(model.named_modules())
    qparams: dict[fx.Node, TensorQParams | None] = {}
    converted: dict[str, tuple[list, Any]] = {}
    for node in model.graph.nodes:
        qparams[node] = None
        if node.op == "call_module":
            mod = modules[str(node.target)]
            kind = op_kind(mod)
            if kind is None:
                if isinstance(mod, PASSTHROUGH_MODULES):
                    qparams[node] = _first_input_qparams(node, qparams)
                continue
            out_qp = _out_qparams(mod)
            qparams[node] = out_qp
            in_qps = [qparams.get(a) for a in _flat_nodes(node)]
            if getattr(mod, "preserve_qat_mode", False):
                for fq in mod.modules():
                    if isinstance(fq, FakeQuantize):
                        fq.set_state(FakeQuantState.VALIDATION)
                continue
            target = str(node.target)
            if target in converted:  # a module called several times: convert it once
                if _qp_key(converted[target][0]) != _qp_key(in_qps):
                    raise ValueError(f"convert_fx: module '{target}' is called with inputs of "
                                     "different scales; give each call site its own module")
                continue
            converter = CONVERTERS.get(kind)
            if converter is None:
                raise NotImplementedError(
                    f"convert_fx: no integer implementation for op '{kind}' at module "
                    f"'{target}' ({mod._get_name()}). Keep it float (qconfig_dict "
                    f"{{'module_name': [('{target}', None)]}}) or keep it in fake-quant form "
                    f"(set_preserve_qat_mode(model, prefixes=['{target}']))")
            try:
                new = converter(mod, in_qps, out_qp, node)
            except (ValueError, NotImplementedError) as e:
                raise type(e)(f"convert_fx failed at module '{target}' ({mod._get_name()}, "
                              f"node {node.format_node()}): {e}") from e
            converted[target] = (in_qps, new)
            _set_module(model, target, new.to(_device_of(mod)))
        elif node.op in ("call_function", "call_method"):
            if (node.op == "call_function" and node.target in PASSTHROUGH_FUNCTIONS) or (
                    node.op == "call_method" and node.target in PASSTHROUGH_METHODS):
                qparams[node] = _first_input_qparams(node, qparams)
    model.graph.lint()
    model.recompile()
    setattr(model, PROVENANCE_ATTR, dict(getattr(qat_model, PROVENANCE_ATTR)))
    return model


def _check_calibrated(model: nn.Module) -> None:
    missing = [name for name, m in model.named_modules()
               if isinstance(m, FakeQuantize) and not m.has_scale]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"convert_fx: {len(missing)} fake quant(s) have no scale: {shown}. "
                         "Calibrate first: set_fake_quantize(model, FakeQuantState.CALIBRATION), "
                         "run representative data, then set_fake_quantize(model, "
                         "FakeQuantState.VALIDATION)")


def _out_qparams(mod: nn.Module) -> TensorQParams | None:
    fq = getattr(mod, "activation_post_process", None)
    if fq is None:
        return None
    if fq.is_per_channel:
        raise ValueError(f"convert_fx: per-channel activation quantization is not supported "
                         f"({mod._get_name()})")
    return TensorQParams(fq.scale, fq.bits)


def _flat_nodes(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []

    def visit(a: Any) -> Any:
        if isinstance(a, fx.Node):
            found.append(a)
        return a

    fx.node.map_aggregate(node.args, visit)
    fx.node.map_aggregate(node.kwargs, visit)
    return found


def _first_input_qparams(node: fx.Node, qparams: dict) -> TensorQParams | None:
    inputs = _flat_nodes(node)
    return qparams.get(inputs[0]) if inputs else None


def _qp_key(qps: list) -> list:
    return [None if q is None else (q.bits, q.scale.tolist()) for q in qps]


def _device_of(mod: nn.Module) -> torch.device:
    for t in list(mod.parameters()) + list(mod.buffers()):
        return t.device
    return torch.device("cpu")


def _set_module(gm: fx.GraphModule, target: str, mod: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, mod)
