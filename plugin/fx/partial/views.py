"""The float counterparts of a partially traced model's regions, for comparing them.

:func:`region_pairs` gives, for each region of a partially traced model, the same part of the
float model it was prepared from (traced as prepare traced it, nested as in the prepared
model, the float model unchanged), both as plain GraphModules an ``fx.Interpreter`` runs, and
the inputs the float run hands that part: ``model_profiler`` profiles a partially traced
model region by region with them.
"""

from __future__ import annotations

import copy

from torch import fx, nn

from ...annotation import get_annotations, has_annotations, set_annotations
from ..tracer import symbolic_trace
from .plan import (
    PartialTrace,
    RegionSpec,
    is_partially_traced,
    partial_trace_of,
    region_inputs,
    regions,
)
from .planner import Holder, holder_region, restore_output_type
from .recording import run_example

__all__ = ["float_region", "region_pairs"]


def float_region(model: nn.Module, spec: RegionSpec) -> fx.GraphModule:
    """The float GraphModule of region ``spec`` in ``model`` (the float model it was
    prepared from): traced as prepare traced it, so its op names are the region's.

    Example::

        >>> float_region(detector, partial_trace_of(qat_detector).region("backbone"))
    """
    mod = model.get_submodule(spec.path) if spec.path else model
    if "held" in spec.trace:
        return holder_region(mod, spec.trace["held"], spec.params)
    trace = dict(spec.trace)
    out_type = trace.pop("output_type", None)
    gm = symbolic_trace(mod, concrete_args=spec.concrete_args or None, inline_constants=True,
                        **trace)
    restore_output_type(gm, out_type)
    return gm


def region_pairs(model1: nn.Module, model2: nn.Module, example_inputs: tuple
                 ) -> list[tuple[RegionSpec, nn.Module, nn.Module, tuple]]:
    """For each region of a partially traced ``model2`` that ``example_inputs`` reach:
    ``(spec, model1's part, model2's part, the part's inputs)``, the inputs those of its
    first call in ``model1``'s run.  ``model1`` is the float model (its parts traced by
    :func:`float_region`) or partially traced as ``model2`` (a calibrated / integer model).

    Example::

        >>> for spec, f, q, x in region_pairs(detector, qat_detector, (images,)): ...
    """
    plan = partial_trace_of(model2)
    if not is_partially_traced(model2) or plan is None:
        raise ValueError(f"{type(model2).__name__} is not partially traced")
    parts2 = regions(model2)
    parts1 = regions(model1) if is_partially_traced(model1) else _float_parts(model1, plan)
    found: dict[str, tuple] = {}
    handles = []
    for r in plan.regions:
        mod = model1.get_submodule(r.path) if r.path else model1

        def pre(m: nn.Module, args: tuple, kwargs: dict, r: RegionSpec = r) -> None:
            if r.path not in found:
                found[r.path] = tuple(parts1[r.path].graph.process_inputs(
                    *region_inputs(parts1[r.path], args, kwargs)))

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    run_example(model1, example_inputs, handles)
    return [(r, _flat_view(parts1[r.path]), _flat_view(parts2[r.path]), found[r.path])
            for r in plan.regions if r.path in found]


def _float_parts(model: nn.Module, plan: PartialTrace) -> dict[str, fx.GraphModule]:
    """Each region's float GraphModule, nested as in the prepared model (a region inside the
    float glue of another is that GraphModule there too), without changing ``model``: the
    containers on the way are shallow copies."""
    copies: dict[int, nn.Module] = {}

    def own(mod: nn.Module) -> nn.Module:
        if any(c is mod for c in copies.values()):
            return mod
        new = copy.copy(mod)
        new._modules = dict(mod._modules)
        copies[id(mod)] = new
        return new

    mirror = own(model)
    parts: dict[str, fx.GraphModule] = {}
    for spec in sorted(plan.regions, key=lambda r: -len(r.path)):  # innermost first
        part = float_region(mirror, spec)
        parts[spec.path] = part
        if not spec.path:
            continue
        node = mirror
        names = spec.path.split(".")
        for name in names[:-1]:
            child = own(node._modules[name])
            node._modules[name] = child
            node = child
        node._modules[names[-1]] = part
    return parts


def _flat_view(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` taking its placeholders' values as they are (no flattening of a tensor list
    argument), a plain GraphModule sharing its modules and annotation: what the profiler's
    ``fx.Interpreter`` runs."""
    if type(gm.graph._codegen) is fx.graph.CodeGen and not isinstance(gm, Holder) and \
            not is_partially_traced(gm):
        return gm  # (a holder shows its conv's weight; the root region holds the plan)
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    old_output = next(n for n in gm.graph.nodes if n.op == "output")
    val_map[old_output] = graph.output(out)
    flat = fx.GraphModule(gm, graph, type(gm).__name__)
    flat.train(gm.training)
    if has_annotations(gm):
        set_annotations(flat, {val_map[n]: a for n, a in get_annotations(gm).items()})
    return flat
