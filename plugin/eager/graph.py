"""eager_graph: the annotated GraphModule of an eager-prepared (or converted) model.

An eager model has no graph of its own, but every fact about its quantization lives in the
quantization annotation (:mod:`qatkit.annotation`), which is written on a graph.  So the
prepared model is traced with qatkit's tracer (QAT and integer modules are leaves) and the
trace is annotated by the FX path's own pass (:func:`qatkit.fx.annotate.annotate`): which
fake quant makes each input of each quantized op, which tensors are float.  The trace
shares the model's modules (nothing is copied), so what it says is about the model itself:

* :func:`link_eager_model` (run by :func:`qatkit.prepare_qat`) tells each QAT module which
  fake quants make its inputs (bias grid, exact evaluation), as prepare_qat_fx does;
* :func:`qatkit.convert` converts the trace with :func:`qatkit.convert_fx` and puts the
  integer modules back into the eager model by name;
* the profiler and the exporter take the trace: ``model_profiler(float_model,
  eager_graph(qat_model), x)``, ``export_onnx(eager_graph(qat_model), x, path)``.

Names: each node's op name is the module's name (``name(k)`` for the k-th call of a module
called several times); provenance (the float model's op a node reproduces) is the module's
``qatkit_float_name`` -- the last module of a fused group, ``<ff>.add`` for a
FloatFunctional (as the float model's trace names it), the float module for the
``output_quant`` of a float module.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Callable

from torch import fx, nn

from .._modules import set_module
from ..annotation import NodeAnnotation, get_annotations, set_annotations
from ..fx.annotate import annotate, op_kind
from ..fx.naming import node_scope
from ..fx.prepare_graph import input_fake_quants
from ..fx.tracer import TraceFailure, symbolic_trace
from ..model_graph import register_graph_reader
from ..nn.functional_modules import FloatFunctional, FunctionalMethods
from .boundaries import MixedModule, insert_boundaries, twin_boundary_leaves
from .functional import FLOAT_BASE_NAMES, FloatFunctionalReuseError, QATFloatFunctional
from .info import FLOAT_NOTE_ATTR, eager_info

__all__ = ["eager_graph", "link_eager_model", "float_inputs", "float_functional_ops"]


@register_graph_reader
def _eager_model_graph(model: nn.Module) -> fx.GraphModule | None:
    """:func:`qatkit.model_graph.annotated_graph` of an eager-mode model: its trace."""
    return eager_graph(model) if eager_info(model) is not None else None


def eager_graph(model: nn.Module, split_boundaries: bool = False) -> fx.GraphModule:
    """The annotated trace of an eager-prepared or converted model (see the module
    docstring); it shares the model's modules and parameters.

    Args:
        model: made by :func:`qatkit.prepare_qat` or :func:`qatkit.convert`.
        split_boundaries: call each boundary stub (``conv.input_quant.x``,
            ``conv.output_quant``) under a top-level alias of the trace, and give its owner a
            twin without those children, so that converting the owner leaves the stub's node
            valid (:func:`qatkit.convert`); the trace's ``qatkit_boundary_stubs`` maps each
            alias to the stub's path in ``model``.

    Returns:
        a GraphModule with the quantization annotation (:func:`qatkit.get_annotations`),
        usable wherever a model of ``prepare_qat_fx`` / ``convert_fx`` is: the profiler,
        :func:`qatkit.export_onnx`, :func:`qatkit.get_provenance`,
        :func:`qatkit.set_preserve_qat_mode` (it marks the eager model's modules).

    Raises:
        ValueError: ``model`` was not made by prepare_qat / convert.
        qatkit.fx.TraceFailure: the model's forward cannot be traced (the message names the
            module and source line; ``prepare_custom_config_dict`` of prepare_qat takes the
            fixes).

    Example::

        >>> gm = qatkit.eager.eager_graph(qat_model)
        >>> qatkit.get_provenance(gm)["conv1"]
        'relu1'
        >>> qatkit.profiler.model_profiler(float_model, gm, x, out_dir="report")
    """
    info = eager_info(model)
    if info is None:
        raise ValueError(f"{type(model).__name__} was not made by qatkit.prepare_qat / "
                         "qatkit.convert (eager mode); for prepare_qat_fx models use the model "
                         "itself")
    gm = symbolic_trace(model, **info.trace_args)
    twin_boundary_leaves(gm)
    modules = dict(model.named_modules())  # the eager modules (the trace may hold twins)
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    seen: Counter = Counter()
    float_names: dict[fx.Node, str] = {}
    notes: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        target = str(node.target)
        mod = modules[target]
        k = seen[target]
        seen[target] += 1
        kind = getattr(mod, "qatkit_op_kind", "")
        if isinstance(mod, FunctionalMethods) and kind:  # a FloatFunctional: its op's name
            base = f"{target}.{FLOAT_BASE_NAMES.get(kind, kind)}"
            float_names[node] = base if k == 0 else f"{base}_{k}"
            continue
        base = getattr(mod, "qatkit_float_name", None) or target
        float_names[node] = f"{base}({k})" if calls[target] > 1 else base
        note = mod.__dict__.get(FLOAT_NOTE_ATTR)
        if note:
            notes[node] = note
    gm.training = model.training
    if split_boundaries:
        gm.qatkit_boundary_stubs = _split_boundary_stubs(gm, model)
    set_annotations(gm, annotate(gm, float_names=float_names, notes=notes))
    return gm


def _split_boundary_stubs(gm: fx.GraphModule, model: nn.Module) -> dict[str, str]:
    """See ``split_boundaries`` of :func:`eager_graph`; returns ``{alias: stub path}``."""
    out: dict[str, str] = {}
    owners: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        target = str(node.target)
        parts = target.split(".")
        owner = next((".".join(parts[:i]) for i in range(1, len(parts))
                      if isinstance(model.get_submodule(".".join(parts[:i])), MixedModule)),
                     None)
        if owner is None:
            continue
        alias = "_qatkit_stub_" + target.replace(".", "__")
        if alias not in out:
            gm.add_submodule(alias, model.get_submodule(target))
            out[alias] = target
        node.target = alias
        owners.add(owner)
    for owner in owners:
        twin = gm.get_submodule(owner)
        bare = type(twin).__new__(type(twin))
        bare.__dict__.update(twin.__dict__)
        bare.__dict__["_modules"] = {k: v for k, v in twin._modules.items()
                                     if k not in ("input_quant", "output_quant")}
        set_module(gm, owner, bare)
    gm.recompile()
    return out


def _unprepare_unused_functionals(model: nn.Module) -> None:
    """A prepared FloatFunctional the forward never calls (torchvision's
    ``InvertedResidual.skip_add`` of a block without residual) has no op, so no output to
    quantize: it becomes a float ``FloatFunctional`` again (no scale to calibrate)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QATFloatFunctional) and not mod.kind:
            float_ff = FloatFunctional().train(mod.training)
            set_module(model, name, float_ff)


def float_inputs(gm: fx.GraphModule, anns: dict[fx.Node, NodeAnnotation]) -> list[str]:
    """``"'op' <- 'producer'"`` for every input of a quantized op (a QuantStub aside) that is
    a float tensor computed by the model (a parameter or buffer aside).

    Example::

        >>> float_inputs(gm, qatkit.get_annotations(gm))
        ["'conv1' <- 'x'"]
    """
    by_node = {a.node: a for a in anns.values()}
    out = []
    for ann in anns.values():
        if not ann.is_quantized or ann.kind == "quant_stub":
            continue
        for inp in ann.inputs:
            src = by_node.get(inp.node)
            if inp.spec is None and src is not None and src.role not in ("non_tensor", "attr"):
                out.append(f"'{ann.name}' <- '{src.name}'")
    return out


def link_eager_model(model: nn.Module,
                     qconfig_of: Callable[[nn.Module], Any] | None = None
                     ) -> fx.GraphModule | None:
    """Finish an eager-prepared model from its annotated trace: quantize the float tensors
    that enter quantized ops (:func:`qatkit.eager.boundaries.insert_boundaries`, when
    ``qconfig_of`` is given), then tell each QAT module which fake quants make its inputs
    (:meth:`~qatkit.nn.qat.ops.ExactInputs.link_exact_inputs`); warn about functional ops that
    stay float and about modules called at several places with inputs of different scales.

    Returns:
        the trace, or None (with a warning) when the model cannot be traced.

    Example::

        >>> link_eager_model(qat_model)      # prepare_qat does this
    """
    try:
        gm = eager_graph(model)
        if qconfig_of is not None:
            _unprepare_unused_functionals(model)
        if qconfig_of is not None and insert_boundaries(model, gm, get_annotations(gm),
                                                        qconfig_of):
            gm = eager_graph(model)
    except TraceFailure as e:
        if isinstance(e.__cause__, FloatFunctionalReuseError):  # a model error, not tracing's
            raise e.__cause__ from None
        warnings.warn(
            f"prepare_qat: the prepared {type(model).__name__} cannot be traced, so float "
            "tensors entering quantized ops are not quantized and QAT modules do not know "
            "which fake quants make their inputs: it trains and calibrates, but biases are "
            "not rounded to the accumulator grid, VALIDATION is not exact, and qatkit.convert "
            "/ the profiler / export_onnx need a traceable model. Fix: "
            f"prepare_custom_config_dict (leaf modules, wrapped functions, concrete args). {e}",
            UserWarning, stacklevel=3)
        return None
    anns = get_annotations(gm)
    links: dict[str, list[dict[str, Any]]] = {}
    for node, ann in anns.items():
        if node.op != "call_module":
            continue
        mod = model.get_submodule(str(node.target))
        if not hasattr(mod, "link_exact_inputs"):
            continue
        links.setdefault(str(node.target), []).append(input_fake_quants(gm, ann))
    shared = []
    for target, calls in links.items():
        ids = {tuple(sorted((k, id(v)) for k, v in c.items())) for c in calls}
        if len(ids) > 1:
            shared.append(target)
        model.get_submodule(target).link_exact_inputs(calls[0], None)
    if shared:
        warnings.warn(
            f"prepare_qat: module(s) {sorted(shared)} are called at several places whose "
            "inputs have different scales; eager mode keeps one module per name, so exact "
            "evaluation uses the first call's input grids and qatkit.convert cannot convert "
            "them. Fix: give each call site its own module", UserWarning, stacklevel=3)
    floats = float_functional_ops(gm, anns, model)
    if floats:
        shown = ", ".join(floats[:6]) + (" ..." if len(floats) > 6 else "")
        warnings.warn(
            f"prepare_qat: {len(floats)} functional op(s) compute in float (eager mode "
            f"quantizes modules; prepare_qat_fx would quantize these): {shown}. Fix: a module "
            "(nn.AdaptiveAvgPool2d, nn.ReLU...) or a qatkit.nn.FloatFunctional (add, cat, "
            "mul, matmul...) for each", UserWarning, stacklevel=3)
    return gm


def float_functional_ops(gm: fx.GraphModule, anns: dict[fx.Node, NodeAnnotation],
                         model: nn.Module) -> list[str]:
    """The functional ops of a trace that qatkit can quantize (an op kind) but that compute
    in float in the eager model, float islands aside.

    Example::

        >>> float_functional_ops(gm, get_annotations(gm), qat_model)
        ['adaptive_avg_pool2d']
    """
    out = []
    for node, ann in anns.items():
        if node.op not in ("call_function", "call_method") or ann.role != "float":
            continue
        if op_kind(node) is None or _in_island(model, node_scope(node)):
            continue
        out.append(ann.name)
    return out


def _in_island(model: nn.Module, scope: str) -> bool:
    parts = scope.split(".") if scope else []
    for i in range(len(parts), -1, -1):
        try:
            mod = model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            continue
        if mod.__dict__.get(FLOAT_NOTE_ATTR):
            return True
    return False
