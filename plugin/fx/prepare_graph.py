"""prepare_traced: prepare's passes on a traced model (:func:`qatkit.fx.prepare_qat_fx` after
tracing, and each region of a partially traced model).

Name every node (:mod:`.naming`), resolve qconfigs (:mod:`.qconfig_dict`, hybrid float
islands included), fuse weighted chains into QAT modules (:mod:`.fuse`), then one walk over
the graph that

* turns every quantizable op into a named module owning its output fake quant — module ops
  become output-quantized QAT modules, functional ops become ``FunctionalOp`` modules named
  after their float name (``layer1.0.add``);
* leaves data-moving ops alone (they share their input's scale);
* keeps everything else float and lists it in one warning (:func:`warn_prepare`);
* inserts a ``QuantStub`` wherever a float tensor (graph input, float op, 32-bit output)
  feeds a quantized op, named ``<producer>_quant``; an explicit user ``QuantStub`` is
  honoured, a fixed ``scale`` included;
* writes the quantization annotation of every node (:mod:`qatkit.fx.annotate`): the float
  name it reproduces (provenance, :func:`qatkit.fx.get_provenance`), its op kind, its inputs'
  and output's quantization; exact evaluation's input links are made from it
  (:func:`link_exact_inputs`).
"""

from __future__ import annotations

import operator
import re
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, fx, nn

from .._modules import set_module
from ..annotation import (
    AnnotatedOp,
    NodeAnnotation,
    bind_arguments,
    get_annotations,
    set_annotations,
    signature_names,
)
from ..fake_quantize import FakeQuantize
from ..nn import qat
from ..nn.stubs import QuantStub
from ..observers import FixedScaleObserver, dtype_to_bits
from ..qconfig import default_qat_8bit_fake_quant_qconfig
from .annotate import annotate, op_kind
from .fuse import META_FLOAT_NAME, META_ROLE, find_fusion_groups, fuse_weighted_modules
from .naming import float_node_names, node_scope, op_base_name
from .patterns import (
    FLOAT_BOUNDARY_MODULES,
    NON_TENSOR_FUNCTIONS,
    NON_TENSOR_METHODS,
    OUT_OF_PLACE,
    PASSTHROUGH_FUNCTIONS,
    PASSTHROUGH_METHODS,
    PASSTHROUGH_MODULES,
)
from .qconfig_dict import QConfigResolver

__all__ = ["prepare_traced", "warn_prepare", "link_exact_inputs", "input_fake_quants"]

# quantization state of a node's output
_FLOAT, _QUANT, _OTHER = "float", "quant", "other"
# why an op stays float (the annotation's ``note``)
_NOTE_CONFIG = "qconfig None (float island)"
_NOTE_UNSUPPORTED = "no quantized implementation"
_NOTE_GLUE = "float glue (partial tracing)"
_NOTE_CONSTANT = "computes on parameters / constants only (folded before deployment)"
# data-moving ops whose input or output is a tuple: a QuantStub cannot move before them
_MULTI_OUTPUT = (operator.getitem, torch.chunk, torch.split, torch.unbind, torch.tensor_split,
                 "chunk", "split", "unbind", "tensor_split", "__getitem__")


def prepare_traced(gm: fx.GraphModule, model: nn.Module, qconfig_dict: dict,
                   float_islands: dict | None, example_inputs: tuple | None, prefix: str = "",
                   check: bool = True, float_leaves: dict[str, str] | None = None
                   ) -> tuple[fx.GraphModule, dict[str, list[str]], set[str]]:
    """The passes of :func:`~qatkit.fx.prepare_qat_fx` after tracing, on ``gm`` (traced from
    ``model``, or from ``model``'s submodule at ``prefix``: qconfig_dict names and module
    ``.qconfig`` attributes are then looked up from ``model``'s root).

    Returns:
        ``(gm, float_ops, shared)``: the prepared GraphModule, the ops that stay float
        without a quantized implementation (op -> float names) and the modules whose call
        sites share one scale (for :func:`warn_prepare`).

    Example::

        >>> gm, float_ops, shared = prepare_traced(symbolic_trace(model), model, qconfig_dict,
        ...                                        None, (x,))
    """
    names = float_node_names(gm)
    modules = dict(gm.named_modules())
    op_kinds = {n: op_kind(n, modules) for n in gm.graph.nodes}
    op_kinds = {n: k for n, k in op_kinds.items() if k is not None}
    resolver = QConfigResolver(qconfig_dict, gm, names, op_kinds, float_overrides=float_islands,
                               root=model, prefix=prefix, check=check)
    tensors, holders = _float_tensor_nodes(gm, example_inputs)
    for node in gm.graph.nodes:
        node.meta[META_FLOAT_NAME] = names[node]

    groups = find_fusion_groups(
        gm, lambda n: _node_qconfig(n, names, modules, resolver, op_kinds) is None, prefix)
    qconfigs = {g.weighted: _node_qconfig(g.weighted, names, modules, resolver, op_kinds)
                for g in groups}
    fuse_weighted_modules(gm, groups, qconfigs, names)
    rewriter = _Rewriter(gm, names, resolver, tensors, op_kinds, prefix, float_leaves or {},
                         measured=example_inputs is not None)
    rewriter.run()

    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    _tag_call_sites(gm)
    gm.graph.lint()
    gm.recompile()
    nodes = list(gm.graph.nodes)
    set_annotations(gm, annotate(
        gm, float_names={n: n.meta.get(META_FLOAT_NAME, n.name) for n in nodes},
        non_tensor={n for n in nodes if not holders.get(n, True)
                    and n.op in ("placeholder", "call_function", "call_method", "call_module")},
        notes=rewriter.notes))
    link_exact_inputs(gm)
    return gm, rewriter.float_ops, rewriter.shared_scales


def warn_prepare(float_ops: dict[str, list[str]], shared: set[str], stacklevel: int = 3
                 ) -> None:
    """One warning listing the ops that stay float (no quantized implementation), one for
    modules whose call sites share a scale.

    Example::

        >>> warn_prepare({"Gate": ["gate"]}, set())
    """
    if float_ops:
        listing = "; ".join(f"{op}: {', '.join(ns[:4])}{' ...' if len(ns) > 4 else ''}"
                            for op, ns in sorted(float_ops.items()))
        warnings.warn(
            f"prepare: {sum(map(len, float_ops.values()))} op(s) have no quantized "
            f"implementation and stay float (their outputs are re-quantized where "
            f"quantized ops use them): {listing}", UserWarning, stacklevel=stacklevel)
    if shared:
        warnings.warn(
            f"prepare: module(s) {sorted(shared)} are called at several places "
            "that are not fused into a layer: all those calls share one output scale. "
            "Fix: give each call site its own module", UserWarning, stacklevel=stacklevel)


def _tag_call_sites(gm: fx.GraphModule) -> None:
    """Give the k-th call of a QAT module called at several places the keyword
    ``call_site=k``: each call then finds its own inputs' fake quants (its own bias grid and
    exact evaluation), and convert_fx gives it its own integer module."""
    sites: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and hasattr(gm.get_submodule(str(node.target)),
                                                "link_exact_inputs"):
            sites.setdefault(str(node.target), []).append(node)
    for nodes in sites.values():
        if len(nodes) > 1:
            for k, node in enumerate(nodes):
                node.kwargs = {**node.kwargs, "call_site": k}


def input_fake_quants(gm: fx.GraphModule, ann: NodeAnnotation) -> dict[str, FakeQuantize]:
    """The fake quant that makes each quantized tensor input of the op ``ann`` annotates, by
    argument name (through data-moving ops: the annotation's input specs name it).

    Example::

        >>> input_fake_quants(qat_model, annotation_by_name(qat_model)["fc"])
        {'input': FakeQuantize(...)}
    """
    found: dict[str, FakeQuantize] = {}
    for inp in ann.inputs:
        if inp.spec is not None:
            fq = gm.get_submodule(inp.spec.module_path)
            if isinstance(fq, FakeQuantize):
                found[inp.name] = fq
    return found


def link_exact_inputs(gm: fx.GraphModule,
                      annotations: dict[fx.Node, NodeAnnotation] | None = None) -> None:
    """Tell each QAT module which fake quants made its inputs, by argument name, from the
    quantization annotation: weighted modules put their bias on the integer accumulator grid
    with their input's, and exact evaluation snaps every linked input to its grid.  A module
    called at several places gets one set of links per call (its calls carry
    ``call_site=k``).

    Example::

        >>> link_exact_inputs(qat_model)      # prepare_qat_fx does this
    """
    annotations = annotations or get_annotations(gm)
    for node, ann in annotations.items():
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        if not hasattr(mod, "link_exact_inputs"):
            continue
        mod.link_exact_inputs(input_fake_quants(gm, ann), node.kwargs.get("call_site"))


def _stub_dtype(stub: QuantStub, qconfig: Any) -> str:
    """The dtype of a user QuantStub's fake quant: its own ``dtype`` when given, else its
    qconfig's activation dtype (a 16-bit qconfig gives a 16-bit input, fixed scale or not)."""
    if stub.dtype is not None:
        return f"qint{dtype_to_bits(stub.dtype)}"
    return qconfig.activation().dtype if qconfig.activation is not None else "qint8"


def _node_qconfig(node: fx.Node, names, modules, resolver: QConfigResolver, op_kinds) -> Any:
    if node.op == "call_module":
        mod = modules[node.target]
        return resolver.resolve(str(node.target), str(node.target), mod,
                                (type(mod), op_kinds.get(node)))
    return resolver.resolve(names[node], node_scope(node), None,
                            (node.target, op_kinds.get(node)))


def _float_tensor_nodes(gm: fx.GraphModule, example_inputs: tuple | None
                        ) -> tuple[dict[fx.Node, bool], dict[fx.Node, bool]]:
    """Which nodes produce float tensors (quantizable), and which produce values holding any
    tensor (a tuple with a None, an expanded parameter...): measured with example inputs, else
    inferred (then both the same)."""
    if example_inputs is not None:
        if not isinstance(example_inputs, tuple):
            example_inputs = (example_inputs,)
        kinds = _run_types(gm, example_inputs)
        return ({n: k == 2 for n, k in kinds.items()}, {n: k >= 1 for n, k in kinds.items()})
    out: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":  # an argument with a number/str/bool default: not a tensor
            out[node] = not node.args or node.args[0] is None or isinstance(node.args[0], Tensor)
        elif node.op in ("get_attr", "call_module"):
            out[node] = True
        elif node.op == "output":
            out[node] = False
        elif (node.op == "call_method" and node.target in NON_TENSOR_METHODS) or (
                node.op == "call_function" and node.target in NON_TENSOR_FUNCTIONS):
            out[node] = False
        else:
            deps = [a for a in node.all_input_nodes]
            out[node] = any(out.get(a, False) for a in deps)
    return out, out


def _run_types(gm: fx.GraphModule, example_inputs: tuple) -> dict[fx.Node, int]:
    """Per node: 2 for float tensor(s), 1 for a value holding some tensor, 0 for none."""
    seen: dict[fx.Node, int] = {}

    class _Types(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            seen[n] = 2 if _is_float_tensor(value) else int(_holds_tensor(value))
            return value

    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            _Types(gm).run(*example_inputs)
    except Exception as e:
        raise RuntimeError(f"prepare_qat_fx: running example_inputs through the traced "
                           f"{type(gm).__name__} failed: {e}. Check that example_inputs "
                           "match the model's forward() arguments") from e
    finally:
        gm.train(was_training)
    return seen


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


def _is_float_tensor(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.is_floating_point()
    if isinstance(value, (tuple, list)) and value:
        return all(isinstance(v, Tensor) and v.is_floating_point() for v in value)
    return False


def _is_op_module(mod: nn.Module) -> bool:
    """A module that is one op (replaced whole by convert_fx), not a container: a stub
    must not be put inside it."""
    return isinstance(mod, AnnotatedOp) or next(mod.parameters(recurse=False), None) is not None


def _module_name(name: str, taken: set[str]) -> str:
    """A legal, unused module path from a float name (``relu(1)_quant`` -> ``relu_1__quant``)."""
    parts = name.split(".")
    parts[-1] = re.sub(r"\W", "_", parts[-1])
    base = ".".join(parts)
    cand, k = base, 1
    while cand in taken:
        cand, k = f"{base}_{k}", k + 1
    taken.add(cand)
    return cand


class _Rewriter:
    """The walk described in the module docstring."""

    def __init__(self, gm: fx.GraphModule, names: dict[fx.Node, str], resolver: QConfigResolver,
                 tensors: dict[fx.Node, bool], op_kinds: dict[fx.Node, str], prefix: str = "",
                 float_leaves: dict[str, str] | None = None, measured: bool = False) -> None:
        self.gm = gm
        self.prefix = prefix
        self.float_leaves = float_leaves or {}  # untraceable modules (partial tracing): why
        self.names = names
        self.resolver = resolver
        self.tensors = tensors
        self.measured = measured  # ``tensors`` measured with example inputs, not inferred
        self.op_kinds = op_kinds
        self.state: dict[fx.Node, str] = {}
        self.quant_of: dict[fx.Node, fx.Node] = {}
        self.taken = {n for n, _ in gm.named_modules()}
        self.float_ops: dict[str, list[str]] = {}
        self.notes: dict[fx.Node, str] = {}  # why a node stays float
        self.moved_from: dict[fx.Node, fx.Node] = {}  # float data-moving op -> its input
        self.shared_scales: set[str] = set()  # modules whose call sites share one fake quant
        self.wrapped: set[str] = set()

    def run(self) -> None:
        for node in list(self.gm.graph.nodes):
            self.state[node] = self._visit(node)

    def _float_op(self, label: str, node: fx.Node) -> None:
        name = self.names[node]
        self.float_ops.setdefault(label, []).append(
            f"{self.prefix}.{name}" if self.prefix else name)

    def _modules(self) -> dict[str, nn.Module]:
        return dict(self.gm.named_modules())

    def _qconfig(self, node: fx.Node) -> Any:
        return _node_qconfig(node, self.names, self._modules(), self.resolver, self.op_kinds)

    # -- per node ---------------------------------------------------------------------------
    def _visit(self, node: fx.Node) -> str:
        role = node.meta.get(META_ROLE)
        if node.op == "placeholder":
            return _FLOAT if self.tensors.get(node, True) else _OTHER
        if node.op in ("get_attr", "output"):
            return _OTHER
        if role == "weighted":
            mod = self.gm.get_submodule(str(node.target))
            self._quantize_inputs(node, self._qconfig_of_module(mod), constants=True)
            return _QUANT if mod.activation_post_process is not None else _FLOAT
        if role == "float_by_config":
            self.notes[node] = _NOTE_CONFIG
            return _FLOAT
        if not self.tensors.get(node, True):
            return _OTHER
        if node.op == "call_module":
            return self._visit_module(node)
        return self._visit_function(node)

    def _qconfig_of_module(self, mod: nn.Module) -> Any:
        return getattr(mod, "qconfig", None)

    def _visit_module(self, node: fx.Node) -> str:
        mod = self.gm.get_submodule(str(node.target))
        if isinstance(mod, QuantStub):
            return self._visit_quant_stub(node, mod)
        if isinstance(mod, FLOAT_BOUNDARY_MODULES):
            return _FLOAT
        if isinstance(mod, PASSTHROUGH_MODULES):
            return self._first_input_state(node)
        if isinstance(mod, qat.OutputQuantMixin):  # a shared module already converted
            self._quantize_inputs(node, getattr(mod, "qconfig", None))
            if mod.activation_post_process is None:
                return _FLOAT
            self.shared_scales.add(f"{self.prefix}.{node.target}" if self.prefix
                                   else str(node.target))
            return _QUANT
        qconfig = self._qconfig(node)
        if type(mod) in qat.OUTPUT_QUANTIZED_MODULES:
            if qconfig is None:
                self.notes[node] = _NOTE_CONFIG
                return _FLOAT
            fq = qconfig.activation() if qconfig.activation is not None else None
            new = qat.output_quantized(mod, fq)
            new.qconfig = qconfig
            set_module(self.gm, str(node.target), new)
            self._quantize_inputs(node, qconfig)
            return _QUANT if fq is not None else _FLOAT
        if str(node.target) in self.float_leaves:  # partial tracing: float glue
            self.notes[node] = f"{_NOTE_GLUE}: {self.float_leaves[str(node.target)]}"
            return _FLOAT
        if qconfig is not None:
            self._float_op(type(mod).__name__, node)
        self.notes[node] = _NOTE_CONFIG if qconfig is None else _NOTE_UNSUPPORTED
        return _FLOAT

    def _visit_quant_stub(self, node: fx.Node, stub: QuantStub) -> str:
        qconfig = self._qconfig(node)
        if qconfig is None or (qconfig.activation is None and stub.scale is None):
            self.notes[node] = _NOTE_CONFIG
            return _FLOAT
        kwargs: dict[str, Any] = {"dtype": _stub_dtype(stub, qconfig)}
        if stub.scale is not None:
            fq = FakeQuantize(observer=FixedScaleObserver, scale=stub.scale, **kwargs)
        else:
            fq = qconfig.activation(**kwargs)
        new = qat.QuantStub(fq)
        new.qconfig = qconfig
        set_module(self.gm, str(node.target), new)
        return _QUANT

    def _visit_function(self, node: fx.Node) -> str:
        target = node.target
        if (node.op == "call_method" and target in NON_TENSOR_METHODS) or (
                node.op == "call_function" and target in NON_TENSOR_FUNCTIONS):
            # measured a float tensor (``outputs.last_hidden_state``): a float value
            return _FLOAT if self.measured and self.tensors.get(node) else _OTHER
        if (node.op == "call_method" and target in PASSTHROUGH_METHODS) or (
                node.op == "call_function" and target in PASSTHROUGH_FUNCTIONS):
            return self._first_input_state(node)
        kind = self.op_kinds.get(node)
        if kind is not None and node.all_input_nodes and not any(
                self.state.get(a) in (_QUANT, _FLOAT) for a in node.all_input_nodes):
            self.notes[node] = _NOTE_CONSTANT  # on parameters / constants only: folded
            return _OTHER
        qconfig = self._qconfig(node)
        if kind is None:
            if qconfig is not None:
                self._float_op(op_base_name(node), node)
            self.notes[node] = _NOTE_CONFIG if qconfig is None else _NOTE_UNSUPPORTED
            return _FLOAT
        if qconfig is None:
            self.notes[node] = _NOTE_CONFIG
            return _FLOAT
        if kind == "div" and node.kwargs.get("rounding_mode") is not None:
            self._float_op("div(rounding_mode)", node)
            self.notes[node] = _NOTE_UNSUPPORTED
            return _FLOAT
        fn = self._function(node)
        fq = qconfig.activation() if qconfig.activation is not None else None
        if kind == "div":  # a tensor divisor: reciprocal lookup table, then a multiply
            op_mod = qat.Divide(fn, fq, self._reciprocal_fq(node, qconfig))
        else:
            op_mod = qat.FunctionalOp(kind, fn, fq)
        op_mod.qconfig = qconfig
        name = _module_name(self.names[node], self.taken)
        self.gm.add_submodule(name, op_mod)
        self._quantize_inputs(node, qconfig)
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_module(name, args=node.args, kwargs=node.kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)
        self.state[new] = _QUANT if fq is not None else _FLOAT
        return self.state[new]

    def _reciprocal_fq(self, node: fx.Node, qconfig: Any) -> FakeQuantize | None:
        """The fake quant of ``1 / divisor`` when the divisor is an activation (a tensor the
        model computes); None for a constant divisor (a number, a buffer, a parameter)."""
        bound = bind_arguments(signature_names(self._function(node), "div"), node.args,
                               node.kwargs)
        divisor = bound.get("other")
        if not (isinstance(divisor, fx.Node) and self.state.get(divisor) in (_QUANT, _FLOAT)):
            return None
        return self._activation_qconfig(qconfig).activation()

    def _activation_qconfig(self, qconfig: Any) -> Any:
        """A qconfig that quantizes activations for a tensor the op itself does not output
        (an input QuantStub, a reciprocal): ``qconfig``, else the global one, else int8."""
        for candidate in (qconfig, self.resolver.global_qconfig):
            if candidate is not None and candidate.activation is not None:
                return candidate

        return default_qat_8bit_fake_quant_qconfig

    def _function(self, node: fx.Node) -> Callable:
        if node.op == "call_method":
            name = str(node.target)
            if name.endswith("_") and not name.endswith("__"):
                name = name[:-1]
            return getattr(torch.Tensor, name)
        return OUT_OF_PLACE.get(node.target, node.target)

    # -- helpers -----------------------------------------------------------------------------
    def _first_input_state(self, node: fx.Node) -> str:
        """The state of a data-moving op: that of the tensor it moves."""
        for a in node.all_input_nodes:
            st = self.state.get(a)
            if st in (_QUANT, _FLOAT):
                if st == _FLOAT and (node.op == "call_module" or node.target not in _MULTI_OUTPUT):
                    self.moved_from[node] = a
                return st
        # a float tensor taken out of a value that is not one (a tuple holding a None)
        return _FLOAT if self.tensors.get(node, False) else _OTHER

    def _quantize_inputs(self, node: fx.Node, qconfig: Any, constants: bool = False) -> None:
        """Insert a QuantStub after every float-tensor producer feeding ``node`` (before the
        data-moving ops between them, so that a tensor is quantized once, where it is made)."""
        def fix(arg: Any) -> Any:
            if not isinstance(arg, fx.Node):
                return arg
            # a conv / linear on a float tensor attribute (a buffer): quantized like an input
            constant = (constants and arg.op == "get_attr" and self.measured
                        and self.tensors.get(arg, False))
            if self.state.get(arg) != _FLOAT and not constant:
                return arg
            # quantize a float tensor once, where it is made (``x_quant``), not after each
            # reshape/transpose/... that moves it
            src, chain = arg, []
            while src in self.moved_from and self.state.get(src) == _FLOAT:
                chain.append(src)
                src = self.moved_from[src]
            qnode = self._quant_node(src, qconfig)
            if not chain:
                return qnode
            chain[-1].replace_input_with(src, qnode)
            for n in chain:
                self.state[n] = _QUANT
            return arg

        node.args = fx.node.map_aggregate(node.args, fix)
        node.kwargs = fx.node.map_aggregate(node.kwargs, fix)

    def _quant_node(self, producer: fx.Node, qconfig: Any) -> fx.Node:
        if producer in self.quant_of:
            return self.quant_of[producer]
        qconfig = self._activation_qconfig(qconfig)
        float_name = producer.meta.get(META_FLOAT_NAME, producer.name)
        parent, _, leaf = f"{float_name}_quant".rpartition(".")
        if parent and parent in self.taken and _is_op_module(self.gm.get_submodule(parent)):
            parent, leaf = parent.rpartition(".")[0], f"{parent.rpartition('.')[2]}_{leaf}"
        name = _module_name(f"{parent}.{leaf}" if parent else leaf, self.taken)
        stub = qat.QuantStub(qconfig.activation())
        stub.qconfig = qconfig
        self.gm.add_submodule(name, stub)
        with self.gm.graph.inserting_after(producer):
            qnode = self.gm.graph.call_module(name, args=(producer,))
        qnode.meta = {k: v for k, v in producer.meta.items() if k != META_ROLE}
        qnode.meta[META_FLOAT_NAME] = float_name
        self.quant_of[producer] = qnode
        self.state[qnode] = _QUANT
        return qnode
