"""The quantization annotation: one frozen record per node of a prepared / converted model.

Every fact about how a model is quantized is written once, by :func:`qatkit.prepare_qat_fx`
(and again by :func:`qatkit.convert_fx` for the integer model), and read everywhere else:
convert and its converters, the ONNX exporter, the profiler's capture, checks, qconfig check,
weight comparison and advisor.  Nobody re-derives a scale or an op kind from module attributes.

* :class:`QuantSpec` -- how one tensor is quantized: dtype, channel axis, and where its scale
  lives (``source``: the dotted path of the scale tensor, e.g.
  ``layer1.0.conv1.activation_post_process.scale`` in a QAT model,
  ``layer1.0.conv1.output_scale`` in the integer model).  The spec names the scale's home
  rather than copying its value, so calibration and QAT updates are always seen.
* :class:`NodeAnnotation` -- one node: its op name and the float name it reproduces
  (provenance), its op kind, its *role* (:data:`ROLES`), each tensor argument bound by name
  with the spec of the tensor that reaches it, its output spec and output mode (quantized,
  32-bit out, float, or shared with an input by a data-moving op), and its weight spec.

The records are computed by one pass (:func:`qatkit.fx.annotate.annotate`): quantized ops
define their output spec, data-moving ops share their input's (pass-through), everything else
is float; each input takes its producer's spec.  They are stored on the GraphModule (so they
survive ``copy.deepcopy`` and ``torch.save``), keyed by node name, and read with
:func:`get_annotations`.

Call signatures: every quantized op's arguments are bound *by name* (:func:`bind_arguments`,
tables :data:`OP_SIGNATURES` / :data:`FUNCTION_SIGNATURES`): ``torch.add(a, b)``,
``a.add(b)`` and ``a + b`` all bind ``input`` and ``other``; ``torch.cat([a, b], 1)`` binds
``tensors.0``, ``tensors.1`` and ``dim``.  Converters and exporters look arguments up by these
names, never by counting graph nodes.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import operator
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from .observers import FixedScaleObserver, dtype_to_bits, qrange

__all__ = ["QuantSpec", "InputSpec", "NodeAnnotation", "ROLES", "OUTPUT_MODES",
           "ANNOTATIONS_ATTR", "get_annotations", "set_annotations", "has_annotations",
           "annotation_by_name", "source_annotation", "fake_quant_spec", "tensor_at",
           "OP_SIGNATURES",
           "FUNCTION_SIGNATURES", "bind_arguments", "signature_names", "flat_tensor_args",
           "map_arguments", "AnnotatedOp", "module_signature", "MODULE_CONSTANTS",
           "module_constants"]

ANNOTATIONS_ATTR = "qatkit_annotations"

#: what a node does: ``"input"`` (a graph input), ``"quantized"`` (a quantized op: QAT or
#: integer module, QuantStub included), ``"passthrough"`` (moves data: reshape, max pool,
#: getitem...; its output shares its input's spec), ``"float"`` (an op computed in float: a
#: float island, an op without a quantized implementation, a DeQuantStub), ``"non_tensor"``
#: (sizes, shapes, flags), ``"attr"`` (a ``get_attr``), ``"output"``
ROLES = ("input", "quantized", "passthrough", "float", "non_tensor", "attr", "output")

#: how a node's output leaves it: ``"quantized"`` (on ``output``'s grid), ``"32bit"`` (a
#: quantized op whose output is not quantized: high-precision output of a final conv/linear),
#: ``"shared"`` (a data-moving op: its input's spec), ``"float"`` (a float op / input),
#: ``"none"`` (not a tensor)
OUTPUT_MODES = ("quantized", "32bit", "shared", "float", "none")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized (symmetric, zero point 0).

    Attributes:
        source: dotted path, from the model root, of the tensor holding the scale (a fake
            quant's ``scale`` in a QAT model, an integer module's buffer in a converted one).
        dtype: ``"qint8"`` or ``"qint16"``.
        ch_axis: the channel axis of a per-channel scale (weights), None per tensor.
        fixed_scale: the scale, when fixed by a ``QuantStub(scale=...)`` / fixed-scale
            observer (it never changes), else None.

    Example::

        >>> spec = get_annotations(qat_model)[node].output
        >>> spec.dtype, spec.scale(qat_model)
        ('qint8', tensor([0.0123]))
    """

    source: str
    dtype: str
    ch_axis: int | None = None
    fixed_scale: float | None = None

    @property
    def bits(self) -> int:
        """8 or 16."""
        return dtype_to_bits(self.dtype)

    @property
    def quant_min(self) -> int:
        return qrange(self.bits)[0]

    @property
    def quant_max(self) -> int:
        return qrange(self.bits)[1]

    @property
    def module_path(self) -> str:
        """The module that owns the scale (``source`` without the tensor's own name)."""
        return self.source.rpartition(".")[0]

    def scale(self, model: nn.Module) -> Tensor:
        """The scale tensor (float32, ``[1]`` or ``[C]``), read from ``model`` now.

        Raises:
            ValueError: ``model`` has no tensor at ``source`` (not the model annotated).
        """
        return tensor_at(model, self.source)

    def has_scale(self, model: nn.Module) -> bool:
        """True once the scale is known (a fake quant gets it from calibration)."""
        return self.scale(model).numel() > 0

    def scale_value(self, model: nn.Module) -> float | None:
        """The per-tensor scale as a float (None before calibration or for a per-channel
        spec)."""
        s = self.scale(model)
        return float(s.reshape(-1)[0]) if s.numel() == 1 else None


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One tensor argument of a node.

    Attributes:
        name: the argument's name (``"input"``, ``"other"``, ``"tensors.1"``).
        node: the name of the graph node that produced the value.
        spec: its quantization, None for a float tensor.
    """

    name: str
    node: str
    spec: QuantSpec | None


@dataclasses.dataclass(frozen=True)
class NodeAnnotation:
    """The quantization annotation of one node (see the module docstring).

    Attributes:
        node: the FX node's name.
        name: the op name users and reports see (module name; ``name(k)`` for the k-th call
            of a module called several times; ``layer1.0.add`` for a functional op).
        float_name: the float model's op whose output this node reproduces (provenance).
        kind: the op kind (``"conv"``, ``"linear"``, ``"add"``, ``"quant_stub"``,
            ``"sigmoid"``...; for other nodes the op's base name, e.g. ``"reshape"``).
        role: one of :data:`ROLES`.
        inputs: the tensor arguments, bound by name, in call order.
        output: the output's spec (None: not quantized).
        output_mode: one of :data:`OUTPUT_MODES`.
        weight: the weight's spec (conv / linear), else None.
        module: the module called (``call_module`` nodes), else None.
        note: why a node stays float, where prepare knows (``"qconfig None"``...).
    """

    node: str
    name: str
    float_name: str
    kind: str
    role: str
    inputs: tuple[InputSpec, ...] = ()
    output: QuantSpec | None = None
    output_mode: str = "float"
    weight: QuantSpec | None = None
    module: str | None = None
    note: str = ""

    def input(self, name: str) -> InputSpec | None:
        """The tensor argument called ``name``, or None."""
        return next((i for i in self.inputs if i.name == name), None)

    def input_spec(self, name: str) -> QuantSpec | None:
        """The spec of argument ``name`` (None: float or absent)."""
        found = self.input(name)
        return None if found is None else found.spec

    @property
    def is_quantized(self) -> bool:
        """A quantized op (its own fake quant / integer module), QuantStub included."""
        return self.role == "quantized"


# -- storage ---------------------------------------------------------------------------------
def set_annotations(gm: fx.GraphModule, annotations: Mapping[fx.Node, NodeAnnotation]) -> None:
    """Store ``annotations`` on ``gm`` (replacing any); kept by deepcopy and pickling.

    Example::

        >>> set_annotations(gm, annotate(gm))
    """
    # in graph order: a model loaded with torch.load gets its node names back by position
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    table = {node.name: ann for node, ann in sorted(
        annotations.items(), key=lambda item: order.get(item[0], len(order)))}
    setattr(gm, ANNOTATIONS_ATTR, table)
    # GraphModule.__deepcopy__ keeps only graph-referenced attributes and these ones
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[ANNOTATIONS_ATTR] = table


def has_annotations(model: nn.Module) -> bool:
    """True for a model made by :func:`qatkit.prepare_qat_fx` or :func:`qatkit.convert_fx`
    (also once saved and loaded with ``torch.save`` / ``torch.load``)."""
    table = getattr(model, ANNOTATIONS_ATTR, None)
    if not isinstance(model, fx.GraphModule) or not isinstance(table, dict):
        return False
    _repair_after_load(model, table)
    return True


def _repair_after_load(gm: fx.GraphModule, table: dict[str, NodeAnnotation]) -> None:
    """Undo what unpickling a GraphModule (``torch.load``) does to a prepared model: it
    drops ``gm.meta`` (so a later deepcopy would drop the annotation) and traces the code
    again, which may name nodes otherwise.  Idempotent; nothing to do for a model that was
    not loaded."""
    preserved = gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})
    if preserved.get(ANNOTATIONS_ATTR) is not table:
        preserved[ANNOTATIONS_ATTR] = table
    if any(node.name not in table for node in gm.graph.nodes):
        _restore_node_names(gm, table)


def get_annotations(model: nn.Module) -> dict[fx.Node, NodeAnnotation]:
    """The annotation of every node of a prepared / converted model, in graph order.

    Raises:
        ValueError: ``model`` was not made by prepare / convert, or its graph was changed
            after (a node has no annotation).

    Example::

        >>> anns = get_annotations(qat_model)
        >>> [(a.name, a.kind, a.output.dtype) for a in anns.values() if a.is_quantized][:2]
        [('x_quant', 'quant_stub', 'qint8'), ('conv1', 'conv', 'qint8')]
    """
    if not has_annotations(model):
        raise ValueError(f"{type(model).__name__} has no qatkit quantization annotation: it was "
                         "not made by qatkit.prepare_qat_fx / convert_fx")
    table = getattr(model, ANNOTATIONS_ATTR)
    out: dict[fx.Node, NodeAnnotation] = {}
    for node in model.graph.nodes:
        ann = table.get(node.name)
        if ann is None:
            raise ValueError(
                f"node {node.format_node()} of {type(model).__name__} has no quantization "
                "annotation: the graph was changed after prepare_qat_fx / convert_fx. Make "
                "graph changes on the float model and prepare it again")
        out[node] = ann
    return out


def _restore_node_names(gm: fx.GraphModule, table: Mapping[str, NodeAnnotation]) -> None:
    """Give the nodes of ``gm`` the names its annotation was written for, when only the names
    differ: unpickling a GraphModule (``torch.load``) traces its code again and may name nodes
    otherwise (``conv1`` for the saved ``conv1_1``).  The graph is the same node for node when
    every node's op and called module agree with the record at its position; otherwise
    nothing changes (and :func:`get_annotations` names the node without annotation)."""
    nodes = list(gm.graph.nodes)
    if len(nodes) != len(table):
        return
    for node, ann in zip(nodes, table.values(), strict=True):
        if ann.module != (str(node.target) if node.op == "call_module" else None):
            return
    graph = fx.Graph(owning_module=gm)
    graph._codegen = copy.deepcopy(gm.graph._codegen)  # pytree specs of inputs / outputs
    env: dict[fx.Node, fx.Node] = {}
    for node, name in zip(nodes, table, strict=True):
        env[node] = graph.create_node(node.op, node.target, fx.map_arg(node.args, env.get),
                                      fx.map_arg(node.kwargs, env.get), name=name,
                                      type_expr=node.type)
        env[node].meta = node.meta
    if [n.name for n in graph.nodes] == list(table):
        gm.graph = graph  # recompiles the forward


def annotation_by_name(model: nn.Module) -> dict[str, NodeAnnotation]:
    """The annotations of ``model`` keyed by op name (:attr:`NodeAnnotation.name`).

    Example::

        >>> annotation_by_name(qat_model)["layer1.0.conv1"].weight.ch_axis
        0
    """
    return {a.name: a for a in get_annotations(model).values()}


def source_annotation(ann: NodeAnnotation, by_node: Mapping[str, NodeAnnotation]
                      ) -> NodeAnnotation:
    """The annotation of the op whose output ``ann``'s node passes on: ``ann`` itself unless it
    is a data-moving op (role ``"passthrough"``), whose first tensor input is followed back.

    Args:
        ann: a node's annotation.
        by_node: every annotation of the graph, keyed by node name.

    Example::

        >>> by_node = {a.node: a for a in get_annotations(qat_model).values()}
        >>> source_annotation(by_node["flatten"], by_node).name        # flatten(avgpool(x))
        'avgpool'
    """
    seen: set[str] = set()
    while ann.role == "passthrough" and ann.inputs and ann.node not in seen:
        seen.add(ann.node)
        nxt = by_node.get(ann.inputs[0].node)
        if nxt is None:
            break
        ann = nxt
    return ann


def tensor_at(model: nn.Module, path: str) -> Tensor:
    """The tensor (parameter or buffer) at dotted ``path`` in ``model``.

    Raises:
        ValueError: no tensor there (the message names the path).
    """
    owner, _, leaf = path.rpartition(".")
    try:
        mod = model.get_submodule(owner) if owner else model
    except AttributeError as e:
        raise ValueError(f"{type(model).__name__} has no module '{owner}' (scale source "
                         f"'{path}'): is this the model that was annotated?") from e
    value = getattr(mod, leaf, None)
    if not isinstance(value, Tensor):
        raise ValueError(f"{type(model).__name__}: '{path}' is not a tensor (scale source)")
    return value


def fake_quant_spec(fq: nn.Module | None, path: str) -> QuantSpec | None:
    """The :class:`QuantSpec` of the fake quant ``fq`` living at module path ``path``.

    Example::

        >>> fake_quant_spec(conv.weight_fake_quant, "conv1.weight_fake_quant")
        QuantSpec(source='conv1.weight_fake_quant.scale', dtype='qint8', ch_axis=0, ...)
    """
    if fq is None:
        return None

    obs = getattr(fq, "observer", None)
    fixed = float(obs.scale) if isinstance(obs, FixedScaleObserver) else None
    return QuantSpec(source=f"{path}.scale" if path else "scale", dtype=fq.dtype,
                     ch_axis=fq.ch_axis, fixed_scale=fixed)


# -- call signatures -------------------------------------------------------------------------
#: positional parameter names of each quantized op kind (``*name``: variadic positionals)
OP_SIGNATURES: dict[str, tuple[str, ...]] = {
    "add": ("input", "other", "alpha"), "sub": ("input", "other", "alpha"),
    "mul": ("input", "other"), "div": ("input", "other"), "matmul": ("input", "other"),
    "cat": ("tensors", "dim"), "stack": ("tensors", "dim"),
    "einsum": ("equation", "*operands"),
    "mean": ("input", "dim", "keepdim"),
    "softmax": ("input", "dim", "_stacklevel", "dtype"),
    "log_softmax": ("input", "dim", "_stacklevel", "dtype"),
    "avg_pool": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                 "divisor_override"),
    "adaptive_avg_pool": ("input", "output_size"),
    "interpolate": ("input", "size", "scale_factor", "mode", "align_corners",
                    "recompute_scale_factor", "antialias"),
    "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
    "group_norm": ("input", "num_groups", "weight", "bias", "eps"),
    "batch_norm": ("input", "running_mean", "running_var", "weight", "bias", "training",
                   "momentum", "eps"),
    "leaky_relu": ("input", "negative_slope", "inplace"),
    "hardtanh": ("input", "min_val", "max_val", "inplace"),
    "clamp": ("input", "min", "max"),
    "gelu": ("input", "approximate"),
    "grid_sample": ("input", "grid", "mode", "padding_mode", "align_corners"),
    "conv": ("input", "other", "output_size"), "linear": ("input", "other"),
}
#: module attributes that are arguments of the op kind the module computes (a float module, its
#: QAT module): the constants an integer module keeps and the exporter writes.  A module
#: class without one of them (``AvgPool1d`` has no ``divisor_override``) simply lacks it.
MODULE_CONSTANTS: dict[str, tuple[str, ...]] = {
    "softmax": ("dim",), "log_softmax": ("dim",),
    "layer_norm": ("normalized_shape", "weight", "bias", "eps"),
    "group_norm": ("num_groups", "weight", "bias", "eps"),
    "batch_norm": ("running_mean", "running_var", "weight", "bias", "eps"),
    "avg_pool": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                 "divisor_override"),
    "adaptive_avg_pool": ("output_size",),
    "interpolate": ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor"),
    "leaky_relu": ("negative_slope",), "elu": ("alpha",), "hardtanh": ("min_val", "max_val"),
    "gelu": ("approximate",),
    "maxpool1d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "adaptivemaxpool1d": ("output_size", "return_indices"),
    "flatten": ("start_dim", "end_dim"), "unflatten": ("dim", "unflattened_size"),
    "zeropad1d": ("padding",), "pixelshuffle": ("upscale_factor",),
}
for _d in ("2d", "3d"):
    MODULE_CONSTANTS[f"maxpool{_d}"] = MODULE_CONSTANTS["maxpool1d"]
    MODULE_CONSTANTS[f"adaptivemaxpool{_d}"] = MODULE_CONSTANTS["adaptivemaxpool1d"]
MODULE_CONSTANTS["zeropad2d"] = MODULE_CONSTANTS["zeropad1d"]


def module_constants(module: nn.Module, kind: str) -> dict[str, Any]:
    """The attributes of ``module`` that are arguments of op ``kind``
    (:data:`MODULE_CONSTANTS`), by name; those the module's class lacks are left out.

    Example::

        >>> module_constants(nn.LeakyReLU(0.2), "leaky_relu")
        {'negative_slope': 0.2}
    """
    return {name: getattr(module, name) for name in MODULE_CONSTANTS.get(kind, ())
            if hasattr(module, name)}


#: functions whose positional parameters differ from their kind's
FUNCTION_SIGNATURES: dict[Any, tuple[str, ...]] = {
    torch.softmax: ("input", "dim", "dtype"), torch.Tensor.softmax: ("input", "dim", "dtype"),
    torch.log_softmax: ("input", "dim", "dtype"),
    torch.Tensor.log_softmax: ("input", "dim", "dtype"),
    torch.bmm: ("input", "other"), torch.Tensor.bmm: ("input", "other"),  # mat2 -> other
    F.relu: ("input", "inplace"), F.relu6: ("input", "inplace"),
    F.hardswish: ("input", "inplace"), F.hardsigmoid: ("input", "inplace"),
    F.silu: ("input", "inplace"), F.mish: ("input", "inplace"),
    F.elu: ("input", "alpha", "inplace"),
    operator.add: ("input", "other"), operator.sub: ("input", "other"),
    operator.mul: ("input", "other"), operator.matmul: ("input", "other"),
    operator.truediv: ("input", "other"),
}
#: keyword spellings that mean the same argument
_ALIASES = {"self": "input", "mat2": "other", "axis": "dim", "x": "input"}


def signature_names(fn: Callable | None = None, kind: str | None = None) -> tuple[str, ...]:
    """Positional parameter names of a call: :data:`FUNCTION_SIGNATURES` for ``fn``, else
    :data:`OP_SIGNATURES` for ``kind``, else ``fn``'s Python signature, else ``("input",)``.

    Example::

        >>> signature_names(torch.cat, "cat")
        ('tensors', 'dim')
    """
    if fn is not None:
        try:
            if fn in FUNCTION_SIGNATURES:
                return FUNCTION_SIGNATURES[fn]
        except TypeError:  # unhashable callable
            pass
    if kind is not None and kind in OP_SIGNATURES:
        return OP_SIGNATURES[kind]
    if fn is not None:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        names = []
        for p in params:
            if p.name == "self" and not names:
                names.append("input")
            elif p.kind is p.VAR_POSITIONAL:
                names.append("*" + p.name)
            elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                names.append(p.name)
        if names:
            return tuple(names)
    return ("input",)


def bind_arguments(names: Sequence[str], args: Sequence[Any],
                   kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Bind a call's ``args``/``kwargs`` to parameter ``names`` (from :func:`signature_names`).

    Keywords keep their names (``self``/``mat2``/``axis`` become ``input``/``other``/``dim``);
    a variadic ``*name`` takes the remaining positionals as a list; extra positionals are
    named ``arg<i>``.

    Example::

        >>> bind_arguments(("input", "other", "alpha"), (a, b), {"alpha": 2})
        {'input': a, 'other': b, 'alpha': 2}
    """
    out: dict[str, Any] = {}
    args = list(args)
    for i, name in enumerate(names):
        if name.startswith("*"):
            out[name[1:]] = args[i:]
            args = []
            break
        if i < len(args):
            out[name] = args[i]
    for i in range(len(names), len(args)):
        out[f"arg{i}"] = args[i]
    for key, value in (kwargs or {}).items():
        out[_ALIASES.get(key, key)] = value
    return out


def flat_tensor_args(bound: Mapping[str, Any],
                     is_leaf: Callable[[Any], bool]) -> Iterator[tuple[str, Any]]:
    """``(name, leaf)`` for every leaf of the bound arguments that ``is_leaf`` accepts, nested
    lists/tuples/dicts flattened with dotted names (``tensors.0``, ``operands.1``).

    Example::

        >>> list(flat_tensor_args({"tensors": [a, b], "dim": 1},
        ...                       lambda v: isinstance(v, Tensor)))
        [('tensors.0', a), ('tensors.1', b)]
    """
    def walk(name: str, value: Any) -> Iterator[tuple[str, Any]]:
        if is_leaf(value):
            yield name, value
        elif isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            for i, v in enumerate(value):
                yield from walk(f"{name}.{i}", v)
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from walk(f"{name}.{k}", v)

    for name, value in bound.items():
        yield from walk(name, value)


def _arg_name(names: Sequence[str], i: int) -> str:
    """The bound name of positional argument ``i`` (see :func:`bind_arguments`)."""
    for j, name in enumerate(names):
        if name.startswith("*"):
            if i >= j:
                return f"{name[1:]}.{i - j}"
            break
        if i == j:
            return name
    return f"arg{i}"


def map_arguments(names: Sequence[str], args: Sequence[Any], kwargs: Mapping[str, Any],
                  fn: Callable[[str, Any], Any],
                  is_leaf: Callable[[Any], bool]) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with every leaf accepted by ``is_leaf`` replaced by ``fn(name,
    leaf)``, named as :func:`bind_arguments` and :func:`flat_tensor_args` name it.

    Example::

        >>> map_arguments(("tensors", "dim"), ([a, b], 1), {}, lambda n, t: n,
        ...               lambda v: isinstance(v, Tensor))
        ((['tensors.0', 'tensors.1'], 1), {})
    """
    def walk(name: str, value: Any) -> Any:
        if is_leaf(value):
            return fn(name, value)
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            return type(value)(walk(f"{name}.{i}", v) for i, v in enumerate(value))
        if isinstance(value, dict):
            return {k: walk(f"{name}.{k}", v) for k, v in value.items()}
        return value

    new_args = tuple(walk(_arg_name(names, i), a) for i, a in enumerate(args))
    new_kwargs = {k: walk(_ALIASES.get(k, k), v) for k, v in kwargs.items()}
    return new_args, new_kwargs


def module_signature(forward: Callable) -> tuple[str, ...]:
    """Positional parameter names of a module's bound ``forward`` (``("input",)`` when they
    cannot be read).

    Example::

        >>> module_signature(nn.Softmax(dim=1).forward)
        ('input',)
    """
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return ("input",)
    names = tuple(("*" + p.name) if p.kind is p.VAR_POSITIONAL else p.name for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL))
    return names or ("input",)


def _join(path: str, leaf: str) -> str:
    return f"{path}.{leaf}" if path else leaf


class AnnotatedOp:
    """Mixin of every module that is one quantized op (the QAT modules of
    :mod:`qatkit.nn.qat` and the integer modules of :mod:`qatkit.quantized`): what the
    annotation pass (:mod:`qatkit.fx.annotate`) asks a module about itself.

    * ``qatkit_op_kind``: the op kind (``"conv"``, ``"add"``...);
    * ``qatkit_signature``: the positional parameter names of ``forward``;
    * :meth:`qatkit_output_spec` / :meth:`qatkit_weight_spec`: the specs of the output and the
      weight, given the module's own path in the model (default: the fake quants
      ``activation_post_process`` and ``weight_fake_quant``).
    """

    qatkit_op_kind: str = ""
    qatkit_signature: tuple[str, ...] = ("input",)

    def qatkit_output_spec(self, path: str) -> QuantSpec | None:
        """The output's spec; None for an unquantized (32-bit / float) output."""
        return fake_quant_spec(getattr(self, "activation_post_process", None),
                               _join(path, "activation_post_process"))

    def qatkit_weight_spec(self, path: str) -> QuantSpec | None:
        """The weight's spec; None without a quantized weight."""
        return fake_quant_spec(getattr(self, "weight_fake_quant", None),
                               _join(path, "weight_fake_quant"))
