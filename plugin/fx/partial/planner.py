"""Partial tracing, stage 3: the planner.

Top-down over the recorded calls: a module that traces, with its recorded non-tensor
arguments fixed (``concrete_args``) and its tensor lists / dicts flattened, becomes a
*region*; where tracing stops inside a submodule, that submodule becomes a leaf of the region
(float glue) and the trace is retried; a module whose own ``forward`` stops tracing is *float
glue*, and its children are planned the same way.  Modules without conv / linear, or never
called, stay float.  A conv / linear called directly by float glue becomes a region holding it
(:class:`Holder`).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx._symbolic_trace import PH
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
from torch.utils._pytree import tree_leaves

from ..patterns import WEIGHTED_MODULES
from ..tracer import TraceFailure, as_output_type, symbolic_trace
from .plan import WEIGHTED_TYPES, RegionSpec
from .recording import Call, same_value

__all__ = ["Planner", "Region", "Holder", "holder_region", "restore_output_type", "glue_calls"]


#: what a held conv / linear's region shows of it (float glue reads them; tools must not
#: mistake the region for the layer)
HELD_ATTRIBUTES = frozenset({
    "weight", "bias", "in_features", "out_features", "in_channels", "out_channels",
    "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"})


class Holder(fx.GraphModule):
    """The region of a conv / linear called by float glue: a GraphModule holding it as its
    child ``qatkit_held``, whose attributes it shows (glue reads ``projection.weight.dtype``
    to cast the image).  The model is float in, float out: an integer tensor of the
    converted module (its int8 weight) shows as float32."""

    def __getattr__(self, name: str) -> Any:
        if "_modules" not in self.__dict__:  # being copied / unpickled
            raise AttributeError(name)
        try:
            return super().__getattr__(name)
        except AttributeError:
            held = self.__dict__.get("qatkit_held")
            if held is None or held not in self._modules or name not in HELD_ATTRIBUTES:
                raise
            value = getattr(self._modules[held], name)
            if isinstance(value, Tensor) and not value.is_floating_point():
                return value.to(torch.float32)
            return value


def holder_region(mod: nn.Module, leaf: str, params: tuple) -> fx.GraphModule:
    """The region of ``mod``, a conv / linear called by float glue, holding it as its child
    ``leaf`` (a :class:`Holder` whose placeholders are ``mod.forward``'s ``params``).

    Example::

        >>> holder_region(detector.roi_heads.box_predictor.cls_score, "cls_score", params)
    """
    holder = nn.Module()
    holder.add_module(leaf, mod)
    graph = fx.Graph()
    names = [n for n, k, _ in params if k in (inspect.Parameter.POSITIONAL_ONLY,
                                              inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    args = [graph.placeholder(n, default_value=d) if d is not inspect.Parameter.empty
            else graph.placeholder(n)
            for n, (_, _, d) in zip(names, params, strict=False)]
    graph.output(graph.call_module(leaf, tuple(args)))
    gm = Holder(holder, graph, type(mod).__name__)
    gm.qatkit_held = leaf
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})["qatkit_held"] = leaf
    gm.train(mod.training)
    return gm



@dataclasses.dataclass
class Region:
    """A planned region: the float module's trace ``gm`` at ``path``, its :class:`RegionSpec`
    and why each of its leaves stays float."""

    path: str
    gm: fx.GraphModule
    spec: RegionSpec
    leaf_reasons: dict[str, str]


class Planner:
    """The top-down plan of one model over its recorded calls (see the module docstring):
    :meth:`plan` fills ``regions``, ``floats`` (path, module, reason) and ``glue``.

    Example::

        >>> planner = Planner(model, *record_calls(model, (x,)), trace_kwargs={})
        >>> planner.plan(model, "")
    """

    def __init__(self, root: nn.Module, calls: list[Call], macs: dict[str, int],
                 by_module: dict[int, list[int]], trace_kwargs: dict) -> None:
        self.root, self.calls, self.macs, self.by_module = root, calls, macs, by_module
        self.trace_kwargs = trace_kwargs
        self.regions: list[Region] = []
        self.floats: list[tuple[str, nn.Module, str]] = []  # path, module, reason
        self.glue: set[str] = set()

    def _weighted_inside(self, path: str) -> bool:
        return any(p == path or p.startswith(path + ".") or not path for p in self.macs)

    def _called_inside(self, mod: nn.Module) -> bool:
        return any(id(m) in self.by_module for m in mod.modules())

    def plan(self, mod: nn.Module, path: str) -> None:
        if not self._weighted_inside(path):
            return  # no conv / linear ran inside: pre/post-processing stays float, unreported
        idx = self.by_module.get(id(mod), [])
        if not idx:
            called = [(n, c) for n, c in mod.named_children()
                      if self._called_inside(c)]
            if not called:
                self.floats.append((path, mod, "not called by example_inputs"))
                return
            for name, child in called:  # a container (ModuleList...): its children run
                self.plan(child, f"{path}.{name}" if path else name)
            return
        first = self.calls[idx[0]]
        reason = first.why and f"cannot fix its arguments: {first.why}"
        if not reason and any(not same_value(self.calls[i].concrete, first.concrete) for i in idx):
            reason = "called with different non-tensor arguments"
        if not reason and type(mod) in WEIGHTED_MODULES and path:
            if first.concrete is not None and not any(
                    v is not PH for v in tree_leaves(first.concrete)):
                self._wrap_region(mod, path, first, len(idx))
                return
        if not reason:
            reason = self._try_region(mod, path, first, len(idx))
            if not reason:
                return
        self.glue_module(mod, path, reason)

    def glue_module(self, mod: nn.Module, path: str, reason: str) -> None:
        self.floats.append((path, mod, reason))
        self.glue.add(path)
        for name, child in mod.named_children():
            self.plan(child, f"{path}.{name}" if path else name)

    def _user_leaves(self, path: str) -> list[str]:
        names = self.trace_kwargs.get("leaf_module_names", ())
        if not path:
            return list(names)
        return [n[len(path) + 1:] for n in names if n.startswith(path + ".")]

    def _wrap_region(self, mod: nn.Module, path: str, call: Call, n_calls: int) -> None:
        """A conv / linear called by float glue: a region holding it as its only child."""
        parent, _, leaf = path.rpartition(".")
        gm = holder_region(mod, leaf, call.params)
        spec = RegionSpec(path, {}, call.params, (), n_calls, parent, {"held": leaf})
        self.regions.append(Region(path, gm, spec, {}))

    def _try_region(self, mod: nn.Module, path: str, call: Call, n_calls: int) -> str:
        """Trace ``mod`` (adding leaves where a submodule stops tracing); "" when it became a
        region, else why it is float glue."""
        leaves: dict[str, str] = {}
        user = self._user_leaves(path)
        while True:
            try:
                gm = symbolic_trace(mod, concrete_args=call.concrete or None,
                                    inline_constants=True,
                                    leaf_modules=self.trace_kwargs.get("leaf_modules", ()),
                                    leaf_module_names=[*user, *leaves],
                                    wrapped_functions=self.trace_kwargs.get(
                                        "wrapped_functions", ()))
            except TraceFailure as f:
                if not f.module_path or f.module_path in leaves:
                    return f.reason
                leaves[f.module_path] = f.reason
                continue
            except Exception as e:  # noqa: BLE001 - any other failure: float glue
                return f"tracing failed: {type(e).__name__}: {e}"
            break
        modules = dict(gm.named_modules())
        if not any(n.op == "call_module" and isinstance(modules.get(str(n.target)),
                                                        WEIGHTED_TYPES)
                   for n in gm.graph.nodes):
            return "no conv/linear outside its untraceable submodules" if leaves else \
                "no conv/linear"
        trace: dict[str, Any] = {"output_type": call.out_type} if restore_output_type(
            gm, call.out_type) else {}
        trace |= {"leaf_modules": tuple(self.trace_kwargs.get("leaf_modules", ())),
                 "leaf_module_names": (*user, *leaves),
                 "wrapped_functions": tuple(self.trace_kwargs.get("wrapped_functions", ()))}
        spec = RegionSpec(path, call.concrete or {}, call.params, tuple(leaves), n_calls, path,
                          trace)
        self.regions.append(Region(path, gm, spec, leaves))
        for leaf, reason in leaves.items():
            self.glue_module(mod.get_submodule(leaf), f"{path}.{leaf}" if path else leaf,
                             reason)
        return ""



def restore_output_type(gm: fx.GraphModule, out_type: type | None) -> bool:
    """Make ``gm`` return the float module's output class (a ``ModelOutput``, a named tuple)
    where the trace made it a plain dict / tuple; True when it did."""
    if out_type is None or out_type in (dict, tuple, list) or not (
            issubclass(out_type, dict) or (issubclass(out_type, tuple)
                                           and hasattr(out_type, "_fields"))):
        return False
    if "<locals>" in out_type.__qualname__:
        return False
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        typed = gm.graph.call_function(
            as_output_type, (output.args[0], f"{out_type.__module__}:{out_type.__qualname__}"))
    output.args = (typed,)
    gm.recompile()
    return True



def glue_calls(calls: list[Call], region_paths: set[str], glue: set[str]
               ) -> dict[tuple[str, int], tuple[tuple[str, int], ...]]:
    """For each call of a float-glue module, the region calls it makes directly."""
    count: dict[str, int] = {}
    index: list[tuple[str, int]] = []
    for c in calls:
        k = count.get(c.path, 0)
        count[c.path] = k + 1
        index.append((c.path, k))
    out: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for i, c in enumerate(calls):
        if c.path in glue:
            out.setdefault(index[i], [])
        if c.path not in region_paths:
            continue
        p = c.parent
        while p >= 0 and calls[p].path not in glue and calls[p].path not in region_paths:
            p = calls[p].parent
        if p >= 0 and calls[p].path in glue:
            out.setdefault(index[p], []).append(index[i])
    return {k: tuple(v) for k, v in out.items()}

