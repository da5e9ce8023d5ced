"""Partial tracing, stage 4: prepare and install the regions, and say what stays float.

:func:`prepare_partial` (called by ``prepare_qat_fx`` when the whole model does not trace)
records the calls (:mod:`.recording`), plans (:mod:`.planner`), checks ``qconfig_dict`` /
``hybrid_dict`` names against the whole model, prepares each region with prepare's passes
(named from the root), installs the prepared regions in the deep-copied float model (or
returns the root region's GraphModule when the root traced with leaves), keeps the plan on the
root (:func:`~.plan.attach_plan`), and warns: the ops without a quantized implementation, the
float parts with their reasons, a ``QuantStub`` left in float glue.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from ..._modules import set_module
from ...nn.stubs import DeQuantStub, QuantStub
from ..annotate import op_kind
from ..naming import float_node_names
from ..prepare_graph import prepare_traced, warn_prepare
from ..qconfig_dict import check_keys, present_types
from ..tracer import TraceFailure
from .plan import PartialTrace, TracedPart, attach_plan, region_inputs
from .planner import Planner, Region, glue_calls
from .recording import record_calls, run_example

__all__ = ["prepare_partial"]


def _region_example(root: nn.Module, regions: list[Region], example_inputs: tuple
                    ) -> dict[str, list[Any]]:
    """The placeholder values of each region's first call in the example run."""
    found: dict[str, list[Any]] = {}
    handles = []
    for r in regions:
        mod = root.get_submodule(r.path) if r.path else root

        def pre(m: nn.Module, args: tuple, kwargs: dict, r: Region = r) -> None:
            if r.path not in found:
                found[r.path] = region_inputs(r.gm, args, kwargs)

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    run_example(root, example_inputs, handles)
    return found


def prepare_partial(original: nn.Module, model: nn.Module, qconfig_dict: dict,
                    example_inputs: Any, float_islands: dict | None, custom: dict,
                    trace_kwargs: dict, failure: TraceFailure) -> nn.Module:
    """Prepare ``model`` (the deep copy of ``original`` that did not trace whole) region by
    region (see the module docstring).

    Returns:
        the prepared root: ``model`` with its regions replaced by prepared GraphModules, or
        the root region's GraphModule; it carries its :class:`PartialTrace`.

    Raises:
        TraceFailure: nothing with a conv / linear traces (the message names the module and
            source line that stopped the root).

    Example::

        >>> qat = prepare_qat_fx(detector, qconfig_dict, example_inputs=([image],))
        >>> qatkit.fx.trace_report(qat)
    """
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    if custom.get("concrete_args"):
        raise TraceFailure(f"{failure}\nPartial tracing fixes each submodule's arguments "
                           "from example_inputs: remove prepare_custom_config_dict"
                           "['concrete_args'], or set 'partial_tracing': False",
                           failure.module_path, failure.module_type, failure.where,
                           failure.line) from failure
    calls, macs, by_module = record_calls(model, example_inputs)
    planner = Planner(model, calls, macs, by_module, trace_kwargs)
    planner.plan(model, "")
    found = planner.regions
    if not found:
        raise TraceFailure(
            f"prepare_qat_fx: nothing in {type(original).__name__} with a conv or linear can be "
            f"traced, so nothing would be quantized. The root stops at {failure.reason}; "
            + "; ".join(f"'{p}' ({type(m).__name__}): {r}" for p, m, r in planner.floats[1:6])
            + ". Fix: make the compute modules traceable (see the fixes above) or pass "
            "prepare_custom_config_dict={'partial_tracing': False} for the whole-model error",
            failure.module_path, failure.module_type, failure.where, failure.line) from failure
    _check_names(model, found, qconfig_dict, float_islands)
    inputs = _region_example(model, found, example_inputs)
    _warn_stubs_in_glue(model, planner)
    prepared: dict[str, fx.GraphModule] = {}
    float_ops: dict[str, list[str]] = {}
    shared: set[str] = set()
    for r in found:
        gm, ops, sh = prepare_traced(r.gm, model, qconfig_dict, float_islands,
                                     tuple(inputs.get(r.path, ())) or None, prefix=r.spec.prefix,
                                     check=False, float_leaves=r.leaf_reasons)
        prepared[r.path] = gm
        for k, v in ops.items():
            float_ops.setdefault(k, []).extend(v)
        shared |= sh
    for path, gm in prepared.items():
        _keep_attributes(gm, model.get_submodule(path) if path else model)
    root: nn.Module = prepared.get("", model)
    for path, gm in prepared.items():
        if path:
            set_module(root, path, gm)
    root.train(original.training)
    plan = PartialTrace(
        regions=tuple(r.spec for r in found),
        parts=_parts(root, found, planner.floats, macs),
        glue_calls=glue_calls(calls, {r.path for r in found}, planner.glue),
        root_is_region="" in prepared)
    attach_plan(root, plan, original)
    warn_prepare(float_ops, shared, stacklevel=4)
    _warn_summary(original, plan)
    return root


def _keep_attributes(gm: fx.GraphModule, mod: nn.Module) -> None:
    """Give a region the float module's plain public attributes (``config``,
    ``hidden_state_size``: float glue reads them), kept by ``copy.deepcopy``."""
    kept = {k: v for k, v in mod.__dict__.items()
            if not k.startswith("_") and k != "training" and not hasattr(gm, k)}
    for k, v in kept.items():
        setattr(gm, k, v)
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {}).update(kept)


def _check_names(model: nn.Module, found: list[Region], qconfig_dict: dict,
                 float_islands: dict | None) -> None:
    """qconfig_dict / hybrid_dict keys against the whole model's names (module names from the
    root, functional ops of every region)."""
    names = {n for n, _ in model.named_modules() if n}
    present = present_types(model.modules(), None, {})
    for r in found:
        modules = dict(r.gm.named_modules())
        for node, name in float_node_names(r.gm).items():
            if node.op in ("call_function", "call_method"):
                names.add(r.spec.name(name))
                present.add(node.target)
            kind = op_kind(node, modules)
            if kind is not None:
                present.add(kind)
        present |= {type(m) for m in modules.values()}
    check_keys(qconfig_dict, float_islands, "hybrid_dict", names, present)


def _parts(root: nn.Module, found: list[Region], floats: list[tuple[str, nn.Module, str]],
           macs: dict[str, int]) -> tuple[TracedPart, ...]:
    owners = [(r.path, r) for r in found] + [(p, None) for p, _, _ in floats]

    def owner(path: str) -> str:
        best = None
        for p, _ in owners:
            if (not p or path == p or path.startswith(p + ".")) and (
                    best is None or len(p) > len(best)):
                best = p
        return "" if best is None else best

    total: dict[str, int] = {}
    quant: dict[str, int] = {}
    for path, n in macs.items():
        o = owner(path)
        total[o] = total.get(o, 0) + n
        try:
            mod = root.get_submodule(path)
        except AttributeError:
            mod = None
        if isinstance(mod, fx.GraphModule):  # a conv / linear region holds it as its child
            mod = getattr(mod, path.rpartition(".")[2], None)
        if getattr(mod, "weight_fake_quant", None) is not None:
            quant[o] = quant.get(o, 0) + n
    rows = [TracedPart(r.path, type(r.gm).__name__, "quantized", "", total.get(r.path, 0),
                       quant.get(r.path, 0)) for r in found]
    rows += [TracedPart(p, type(m).__name__, "float", reason, total.get(p, 0),
                        quant.get(p, 0)) for p, m, reason in floats]
    return tuple(sorted(rows, key=lambda r: r.path))


def _warn_summary(original: nn.Module, plan: PartialTrace) -> None:
    floats = [p for p in plan.parts if p.status == "float"]
    shown = "; ".join(f"'{p.path or '(root)'}' ({p.module_type}): {p.reason}" for p in floats[:6])
    more = f"; ... ({len(floats) - 6} more)" if len(floats) > 6 else ""
    warnings.warn(
        f"prepare_qat_fx: {type(original).__name__} does not trace whole; partial tracing "
        f"quantizes {len(plan.regions)} region(s) holding {plan.quantized_share:.1%} of the "
        f"conv/linear multiply-adds and keeps {len(floats)} part(s) float: {shown}{more}. "
        "Full table: qatkit.fx.trace_report(qat_model); to make this an error: "
        "prepare_custom_config_dict={'partial_tracing': False}", UserWarning, stacklevel=4)


def _warn_stubs_in_glue(model: nn.Module, planner: Planner) -> None:
    """A QuantStub / DeQuantStub the user placed where the code stays float does nothing
    there: say so, with the line that made the code float."""
    def in_region(path: str) -> bool:
        for r in planner.regions:
            inside = not r.path or path.startswith(r.path + ".")
            rel = path[len(r.path) + 1:] if r.path else path
            if inside and not any(rel.startswith(leaf + ".") for leaf in r.spec.leaves):
                return True
        return False

    glue = {p: reason for p, _, reason in planner.floats}
    for path, mod in model.named_modules():
        if not isinstance(mod, (QuantStub, DeQuantStub)) or in_region(path):
            continue
        parent = max((p for p in glue if not p or path.startswith(p + ".")), key=len,
                     default="")
        warnings.warn(
            f"prepare_qat_fx: {type(mod).__name__} '{path}' is in float glue: module "
            f"'{parent or '(root)'}' stays float because {glue.get(parent, 'it does not trace')}"
            f", so '{path}' quantizes nothing (a fixed scale is not applied). Fix: move the "
            "stub into a traceable submodule, or make the module traceable",
            UserWarning, stacklevel=5)
