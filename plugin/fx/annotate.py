"""FX pass that writes the quantization annotation of every node (:mod:`qatkit.annotation`).

One walk in topological order settles which quantization reaches every tensor:

* a quantized op (a QAT or integer module, QuantStub included) defines its output's spec and
  its weight's (it knows them: :class:`qatkit.annotation.AnnotatedOp`);
* a data-moving op (the ``PASSTHROUGH_*`` tables of :mod:`qatkit.fx.patterns`: reshape,
  permute, max pool, getitem...) shares its first tensor input's spec;
* a non-tensor op (``NON_TENSOR_*``: sizes, shapes) carries none, and neither does any other
  op: it computes in float;
* each tensor argument, bound by name (:func:`qatkit.annotation.bind_arguments`), takes the
  spec of the node that produced it.

:func:`op_kind` is the one op-kind function: every other module asks it (or reads the
annotation it wrote).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import fx, nn

from ..annotation import (
    AnnotatedOp,
    InputSpec,
    NodeAnnotation,
    QuantSpec,
    bind_arguments,
    flat_tensor_args,
    module_signature,
    signature_names,
)
from ..nn import qat
from .naming import float_node_names, op_base_name
from .patterns import (
    FLOAT_BOUNDARY_MODULES,
    NON_TENSOR_FUNCTIONS,
    NON_TENSOR_METHODS,
    PASSTHROUGH_FUNCTIONS,
    PASSTHROUGH_METHODS,
    PASSTHROUGH_MODULES,
    QUANTIZED_FUNCTIONS,
    QUANTIZED_METHODS,
    WEIGHTED_MODULES,
)

__all__ = ["annotate", "op_kind", "is_passthrough", "is_non_tensor"]


def op_kind(target: Any, modules: Mapping[str, nn.Module] | None = None) -> str | None:
    """The quantized op kind of a module or an FX node, None if qatkit has no quantized op
    for it.

    A QAT / integer module says its kind (``qatkit_op_kind``); a float module is looked up in
    ``WEIGHTED_MODULES`` (``"conv"`` / ``"linear"``) and ``OUTPUT_QUANTIZED_MODULES``; a
    function / method node in ``QUANTIZED_FUNCTIONS`` / ``QUANTIZED_METHODS``.

    Args:
        target: an ``nn.Module`` or an ``fx.Node``.
        modules: ``dict(gm.named_modules())``, needed for ``call_module`` nodes.

    Example::

        >>> op_kind(nn.Conv2d(3, 8, 3)), op_kind(qat_model.get_submodule("layer1.0.add"))
        ('conv', 'add')
    """
    if isinstance(target, fx.Node):
        if target.op == "call_module":
            if modules is None:
                raise ValueError("op_kind of a call_module node needs modules="
                                 "dict(gm.named_modules())")
            return op_kind(modules[str(target.target)])
        if target.op == "call_function":
            return QUANTIZED_FUNCTIONS.get(target.target)
        if target.op == "call_method":
            return QUANTIZED_METHODS.get(str(target.target))
        return None
    if isinstance(target, AnnotatedOp):
        return target.qatkit_op_kind or None
    if isinstance(target, nn.Module):
        if type(target) in WEIGHTED_MODULES:
            return "linear" if isinstance(target, nn.Linear) else "conv"
        return qat.OUTPUT_QUANTIZED_MODULES.get(type(target))
    return None


def is_passthrough(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """True for a data-moving op (its output shares its input's quantization).

    Example::

        >>> is_passthrough(flatten_node, dict(gm.named_modules()))
        True
    """
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], PASSTHROUGH_MODULES)
    if node.op == "call_function":
        return node.target in PASSTHROUGH_FUNCTIONS
    return node.op == "call_method" and node.target in PASSTHROUGH_METHODS


def is_non_tensor(node: fx.Node) -> bool:
    """True for an op on sizes / shapes / flags (``x.size(0)``, ``getattr``, ``len``).

    Example::

        >>> is_non_tensor(size_node)
        True
    """
    return (node.op == "call_method" and node.target in NON_TENSOR_METHODS) or (
        node.op == "call_function" and node.target in NON_TENSOR_FUNCTIONS)


def _signature(node: fx.Node, mod: nn.Module | None) -> tuple[str, ...]:
    if node.op == "call_module":
        if isinstance(mod, AnnotatedOp):
            return mod.qatkit_signature
        return module_signature(mod.forward)
    if node.op == "call_method":
        fn = getattr(torch.Tensor, str(node.target), None)
        return signature_names(fn, QUANTIZED_METHODS.get(str(node.target)))
    if node.op == "call_function":
        return signature_names(node.target, QUANTIZED_FUNCTIONS.get(node.target))
    return ()


def _is_node(v: Any) -> bool:
    return isinstance(v, fx.Node)


def annotate(gm: fx.GraphModule, float_names: Mapping[fx.Node, str] | None = None,
             non_tensor: set[fx.Node] | None = None,
             notes: Mapping[fx.Node, str] | None = None) -> dict[fx.Node, NodeAnnotation]:
    """The :class:`~qatkit.annotation.NodeAnnotation` of every node of ``gm``.

    Args:
        gm: a prepared / converted model (or a traced float model: every node is then float,
            passthrough or non-tensor).
        float_names: provenance, the float op each node reproduces (default: its op name).
        non_tensor: nodes known not to produce tensors (prepare measures them); the
            ``NON_TENSOR_*`` tables decide for the others.
        notes: why a node stays float (prepare's reasons).

    Returns:
        ``{node: annotation}`` in graph order (store it with
        :func:`qatkit.annotation.set_annotations`).

    Example::

        >>> anns = annotate(qat_model, float_names)
        >>> anns[conv_node].inputs[0].spec.source
        'x_quant.activation_post_process.scale'
    """
    names = float_node_names(gm)
    modules = dict(gm.named_modules())
    non_tensor = non_tensor or set()
    specs: dict[fx.Node, QuantSpec | None] = {}
    out: dict[fx.Node, NodeAnnotation] = {}
    for node in gm.graph.nodes:
        name = names[node]
        mod = modules.get(str(node.target)) if node.op == "call_module" else None
        fields: dict[str, Any] = {"output": None, "output_mode": "float", "weight": None}
        if node.op == "placeholder":
            role, kind = "input", "input"
        elif node.op == "get_attr":
            role, kind, fields["output_mode"] = "attr", "get_attr", "none"
        elif node.op == "output":
            role, kind, fields["output_mode"] = "output", "output", "none"
        elif isinstance(mod, AnnotatedOp):
            role, kind = "quantized", mod.qatkit_op_kind
            spec = mod.qatkit_output_spec(str(node.target))
            fields.update(output=spec, output_mode="quantized" if spec is not None else "32bit",
                          weight=mod.qatkit_weight_spec(str(node.target)))
        elif node in non_tensor or is_non_tensor(node):
            role, kind, fields["output_mode"] = "non_tensor", op_base_name(node), "none"
        elif is_passthrough(node, modules):
            role = "passthrough"
            kind = type(mod).__name__.lower() if mod is not None else op_base_name(node)
            src = next((a for a in node.all_input_nodes if specs.get(a) is not None), None)
            if src is None:  # moves a float tensor
                fields["output_mode"] = "float"
            else:
                fields.update(output=specs[src], output_mode="shared")
        else:
            role = "float"
            kind = op_kind(node, modules) or (type(mod).__name__.lower() if mod is not None
                                              else op_base_name(node))
            if isinstance(mod, FLOAT_BOUNDARY_MODULES):
                kind = "dequant_stub"
        if node.op == "output":
            bound = {"output": node.args[0] if node.args else None}
        else:
            bound = bind_arguments(_signature(node, mod), node.args, node.kwargs)
        inputs = tuple(InputSpec(arg, leaf.name, specs.get(leaf))
                       for arg, leaf in flat_tensor_args(bound, _is_node)
                       if not _is_non_tensor_value(leaf, out))
        specs[node] = fields["output"]
        out[node] = NodeAnnotation(
            node=node.name, name=name, kind=kind, role=role, inputs=inputs,
            float_name=(float_names or {}).get(node, name), module=(
                str(node.target) if node.op == "call_module" else None),
            note=(notes or {}).get(node, ""), **fields)
    return out


def _is_non_tensor_value(leaf: fx.Node, done: Mapping[fx.Node, NodeAnnotation]) -> bool:
    ann = done.get(leaf)
    return ann is not None and ann.role == "non_tensor"
