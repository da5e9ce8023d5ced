"""Partial tracing: prepare what traces, keep the code that does not trace float.

Detectors, optical-flow networks and Hugging Face models mix compute (backbones, FPNs, heads,
transformer layers) with Python control flow (anchors, box decoding, NMS, kwargs plumbing)
that ``torch.fx`` cannot trace.  When tracing the whole model fails, ``prepare_qat_fx`` calls
:func:`prepare_partial`, which

1. runs ``example_inputs`` once (eval mode, no gradients) and records how every submodule is
   called -- which arguments are tensors, the values of the others -- and the multiply-adds
   of every conv / linear;
2. plans top-down: a module that traces, with its recorded non-tensor arguments fixed
   (``concrete_args``) and its tensor lists / dicts flattened, becomes a *region*; where
   tracing stops inside a submodule, that submodule becomes a leaf of the region (float glue)
   and the trace is retried; a module whose own ``forward`` stops tracing is *float glue*, and
   its children are planned the same way.  Modules without conv / linear, or never called,
   stay float;
3. prepares each region with prepare's passes, named from the root: a region at
   ``backbone.body`` holds ``layer1.0.conv1``, which the root reaches, and ``qconfig_dict``,
   reports and provenance call ``backbone.body.layer1.0.conv1``;
4. installs the prepared regions: the root stays the float model's (deep-copied) module, or
   is the root region's GraphModule when the root traced with leaves.

The plan and the report (:class:`PartialTrace`, :func:`trace_report`) live on the prepared
root (and survive ``copy.deepcopy`` and :func:`~qatkit.fx.convert_fx`).  The whole-model
functions read the regions through :func:`regions`: ``convert_fx`` converts each region in
place (the glue stays float), ``get_provenance`` and ``set_preserve_qat_mode`` name every
op from the root, and ``model_profiler`` profiles each region against the same part of the
float model (:mod:`qatkit.fx.partial_views`).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import warnings
import weakref
from typing import Any

import pandas as pd
import torch
from torch import Tensor, fx, nn
from torch.fx._symbolic_trace import PH
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

from .._modules import set_module
from .naming import float_node_names
from .patterns import WEIGHTED_MODULES
from .qconfig_dict import check_keys, present_types
from .tracer import TraceFailure, as_output_type, symbolic_trace

__all__ = ["PartialTrace", "RegionSpec", "TracedPart", "prepare_partial", "trace_report",
           "partial_trace_of", "is_partially_traced", "regions", "region_inputs",
           "WEIGHTED_TYPES", "PARTIAL_ATTR"]

PARTIAL_ATTR = "qatkit_partial_trace"
#: modules whose multiply-adds the report counts (subclasses included)
WEIGHTED_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.Linear)
#: argument values a region can fix as constants (anything else holding state is not)
_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.Size,
                   enum.Enum, type)
#: the float model a prepared model came from -> its plan (for the profiler's float side)
_FLOAT_PLANS: weakref.WeakKeyDictionary[nn.Module, PartialTrace] = \
    weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class RegionSpec:
    """One traced part of a partially traced model.

    Attributes:
        path: the module's name in the model (``""`` for the root).
        concrete_args: the trace's fixed arguments (tensors as ``PH`` inside containers).
        params: the float ``forward``'s parameters as ``(name, kind, default)``.
        leaves: names, relative to the region, of the untraceable submodules kept float.
        calls: how often the example run called it.
        prefix: what the region's op names are relative to: ``path``, except for a conv /
            linear called directly by float glue, which the region holds as its child of the
            same name (``roi_heads.box_predictor.cls_score`` holds ``cls_score``, named from
            ``roi_heads.box_predictor``).
        trace: how the float module was traced (:func:`symbolic_trace`'s leaf modules, leaf
            names, wrapped functions), or ``{"held": name}`` for such a held conv / linear:
            :func:`float_region` traces the float model's part the same way.
    """

    path: str
    concrete_args: dict[str, Any]
    params: tuple[tuple[str, int, Any], ...]
    leaves: tuple[str, ...]
    calls: int
    prefix: str = ""
    trace: dict[str, Any] = dataclasses.field(default_factory=dict)

    def name(self, relative: str) -> str:
        """The whole model's name of an op named ``relative`` in the region."""
        return f"{self.prefix}.{relative}" if self.prefix and relative else (
            self.prefix or relative)

    def module(self, relative: str) -> str:
        """The root's path of the region's module ``relative``."""
        return f"{self.path}.{relative}" if self.path and relative else (self.path or relative)


@dataclasses.dataclass(frozen=True)
class TracedPart:
    """One row of the partial-tracing report.

    Attributes:
        path: the module's name (``""`` for the root).
        module_type: its float class.
        status: ``"quantized"`` (a prepared region) or ``"float"``.
        reason: why a float part stays float (the source line that stopped tracing, ``no
            conv/linear``, ``not called``...).
        macs: conv / linear multiply-adds of the example run in this part (a float part's
            own, outside the regions inside it).
        quantized_macs: the part of ``macs`` whose weights are quantized.
    """

    path: str
    module_type: str
    status: str
    reason: str
    macs: int
    quantized_macs: int


@dataclasses.dataclass(frozen=True)
class PartialTrace:
    """How a model was partially traced (see the module docstring).

    Example::

        >>> plan = qatkit.fx.partial_trace_of(qat_detector)
        >>> plan.quantized_share, plan.table.query("Status == 'float'")["Reason"].tolist()

    Attributes:
        regions: the traced parts, outermost first.
        parts: the report's rows (regions and float parts).
        glue_calls: ``(glue path, call k)`` -> the region calls ``(path, j)`` made directly by
            that call of a float-glue module, in order (from the example run).
        root_is_region: the root itself traced (with leaves).
    """

    regions: tuple[RegionSpec, ...]
    parts: tuple[TracedPart, ...]
    glue_calls: dict[tuple[str, int], tuple[tuple[str, int], ...]]
    root_is_region: bool

    @property
    def macs(self) -> int:
        """Conv / linear multiply-adds of the example run."""
        return sum(p.macs for p in self.parts)

    @property
    def quantized_share(self) -> float:
        """The share of conv / linear multiply-adds whose weights are quantized."""
        total = self.macs
        return sum(p.quantized_macs for p in self.parts) / total if total else 1.0

    @property
    def table(self) -> pd.DataFrame:
        """The report as a DataFrame: Module, Type, Status, Reason, MACs, Quantized MACs."""
        return pd.DataFrame(
            [{"Module": p.path or "(root)", "Type": p.module_type, "Status": p.status,
              "Reason": p.reason, "MACs": p.macs, "Quantized MACs": p.quantized_macs}
             for p in self.parts],
            columns=["Module", "Type", "Status", "Reason", "MACs", "Quantized MACs"])

    def region(self, path: str) -> RegionSpec:
        """The region at ``path``."""
        return next(r for r in self.regions if r.path == path)

    def __repr__(self) -> str:
        floats = sum(1 for p in self.parts if p.status == "float")
        return (f"PartialTrace({len(self.regions)} regions, {floats} float parts, "
                f"{self.quantized_share:.1%} of conv/linear MACs quantized)")


# -- reading a prepared model -----------------------------------------------------------------
def partial_trace_of(model: nn.Module) -> PartialTrace | None:
    """The :class:`PartialTrace` of a partially traced model (prepared or converted), or of
    the float model it was prepared from (in this process); None otherwise.

    Example::

        >>> partial_trace_of(qat_detector).quantized_share
        0.97
    """
    found = getattr(model, PARTIAL_ATTR, None)
    if isinstance(found, PartialTrace):
        return found
    try:
        return _FLOAT_PLANS.get(model)
    except TypeError:
        return None


def is_partially_traced(model: nn.Module) -> bool:
    """True for a model prepared by partial tracing (or converted from one).

    Example::

        >>> is_partially_traced(prepare_qat_fx(detector, qconfig_dict, (images,)))
        True
    """
    return isinstance(getattr(model, PARTIAL_ATTR, None), PartialTrace)


def trace_report(model: nn.Module) -> pd.DataFrame:
    """The partial-tracing report of a prepared model: every region and float part with the
    reason it stays float and its conv / linear multiply-adds (see :class:`TracedPart`).

    Raises:
        ValueError: ``model`` was traced whole (nothing stays float by tracing).

    Example::

        >>> qatkit.fx.trace_report(qat_model).query("Status == 'float'")[["Module", "Reason"]]
    """
    plan = getattr(model, PARTIAL_ATTR, None)
    if not isinstance(plan, PartialTrace):
        raise ValueError(f"{type(model).__name__} was traced whole (or not prepared): it has no "
                         "partial-tracing report")
    return plan.table


def regions(model: nn.Module) -> dict[str, fx.GraphModule]:
    """The prepared (or converted) regions of a partially traced model by path, outermost
    first.

    Example::

        >>> list(regions(qat_detector))[:2]
        ['backbone', 'head.classification_head.conv']
    """
    plan = getattr(model, PARTIAL_ATTR, None)
    if not isinstance(plan, PartialTrace):
        raise ValueError(f"{type(model).__name__} is not partially traced")
    return {r.path: (model if not r.path else model.get_submodule(r.path)) for r in plan.regions}


def region_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """The arguments of a region's GraphModule, in the order of its signature, for one call
    ``(args, kwargs)`` of the float module it replaces (defaults filled in):
    ``fx.Interpreter(gm).run(*values)`` runs it.

    Example::

        >>> region_inputs(regions(qat_model)["head"], ([f1, f2],), {})
        [[f1, f2]]
    """
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())


def _concrete_key(name: str, kind: int) -> str:
    if kind == inspect.Parameter.VAR_POSITIONAL:
        return "*" + name
    if kind == inspect.Parameter.VAR_KEYWORD:
        return "**" + name
    return name


# -- step 1: how each module is called ---------------------------------------------------------
@dataclasses.dataclass
class _Call:
    module: nn.Module
    path: str
    parent: int  # index of the enclosing call, -1 for the outermost
    concrete: dict[str, Any] | None  # None: an argument cannot be fixed (``why``)
    params: tuple[tuple[str, int, Any], ...]
    why: str = ""
    out_type: type | None = None  # the class of its output


def _params(mod: nn.Module) -> tuple[tuple[str, int, Any], ...] | None:
    try:
        sig = inspect.signature(mod.forward)
    except (TypeError, ValueError):
        return None
    return tuple((p.name, p.kind, p.default) for p in sig.parameters.values())


def _describe_call(mod: nn.Module, args: tuple, kwargs: dict
                   ) -> tuple[dict[str, Any] | None, tuple, str]:
    """The trace's ``concrete_args`` for this call: tensors stay placeholders (inside lists /
    dicts as ``PH``), other values are fixed; None (and why) when a value cannot be fixed."""
    params = _params(mod)
    if params is None:
        return None, (), "its forward() has no readable signature"
    sig = inspect.Signature([inspect.Parameter(n, k, default=d) for n, k, d in params])
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        return None, params, f"its call does not fit forward(): {e}"
    bound.apply_defaults()
    concrete: dict[str, Any] = {}
    for name, kind, _ in params:
        value = bound.arguments.get(name, () if kind == inspect.Parameter.VAR_POSITIONAL else {})
        if isinstance(value, Tensor):
            continue
        leaves, _ = tree_flatten(value)
        odd = [v for v in leaves if not isinstance(v, (Tensor, *_CONSTANT_TYPES))]
        if odd:
            return None, params, (f"argument '{name}' is a {type(odd[0]).__name__} (neither a "
                                  "tensor nor a constant)")
        concrete[_concrete_key(name, kind)] = tree_map(
            lambda v: PH if isinstance(v, Tensor) else v, value)
    return concrete, params, ""


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable values are different
        return False


def _macs(mod: nn.Module, inputs: tuple, out: Any) -> int:
    if not isinstance(out, Tensor):
        return 0
    if isinstance(mod, nn.Linear):
        return out.numel() * mod.in_features
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        x = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
        k = int(torch.tensor(mod.kernel_size).prod())
        return 0 if x is None else x.numel() * mod.out_channels // mod.groups * k
    k = int(torch.tensor(mod.kernel_size).prod())
    return out.numel() * mod.in_channels // mod.groups * k


def _record(root: nn.Module, example_inputs: tuple
            ) -> tuple[list[_Call], dict[str, int], dict[int, list[int]]]:
    """Every module call of one run (in order), the MACs per weighted module path, and the
    call indices of each module (by ``id``)."""
    calls: list[_Call] = []
    stack: list[int] = []
    macs: dict[str, int] = {}
    by_module: dict[int, list[int]] = {}
    paths = {id(m): p for p, m in root.named_modules()}
    handles = []

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        concrete, params, why = _describe_call(mod, args, kwargs)
        by_module.setdefault(id(mod), []).append(len(calls))
        calls.append(_Call(mod, paths[id(mod)], stack[-1] if stack else -1, concrete, params,
                           why))
        stack.append(len(calls) - 1)

    def post(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        calls[stack.pop()].out_type = type(out)
        if isinstance(mod, WEIGHTED_TYPES):
            path = paths[id(mod)]
            macs[path] = macs.get(path, 0) + _macs(mod, args, out)

    for m in {id(m): m for m in root.modules()}.values():
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    was_training = {m: m.training for m in root.modules()}
    root.eval()
    try:
        with torch.no_grad():
            root(*example_inputs)
    except Exception as e:
        raise RuntimeError(f"prepare_qat_fx (partial tracing): running example_inputs through "
                           f"{type(root).__name__} failed: {e}. Check that example_inputs match "
                           "the model's forward() arguments") from e
    finally:
        for h in handles:
            h.remove()
        for m, t in was_training.items():
            m.training = t
    return calls, macs, by_module


#: what a held conv / linear's region shows of it (float glue reads them; tools must not
#: mistake the region for the layer)
_HELD_ATTRIBUTES = frozenset({
    "weight", "bias", "in_features", "out_features", "in_channels", "out_channels",
    "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"})


class _Holder(fx.GraphModule):
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
            if held is None or held not in self._modules or name not in _HELD_ATTRIBUTES:
                raise
            value = getattr(self._modules[held], name)
            if isinstance(value, Tensor) and not value.is_floating_point():
                return value.to(torch.float32)
            return value


def _holder_region(mod: nn.Module, leaf: str, params: tuple) -> fx.GraphModule:
    holder = nn.Module()
    holder.add_module(leaf, mod)
    graph = fx.Graph()
    names = [n for n, k, _ in params if k in (inspect.Parameter.POSITIONAL_ONLY,
                                              inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    args = [graph.placeholder(n, default_value=d) if d is not inspect.Parameter.empty
            else graph.placeholder(n)
            for n, (_, _, d) in zip(names, params, strict=False)]
    graph.output(graph.call_module(leaf, tuple(args)))
    gm = _Holder(holder, graph, type(mod).__name__)
    gm.qatkit_held = leaf
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})["qatkit_held"] = leaf
    gm.train(mod.training)
    return gm


# -- step 2: the plan --------------------------------------------------------------------------
@dataclasses.dataclass
class _Region:
    path: str
    gm: fx.GraphModule
    spec: RegionSpec
    leaf_reasons: dict[str, str]


class _Planner:
    def __init__(self, root: nn.Module, calls: list[_Call], macs: dict[str, int],
                 by_module: dict[int, list[int]], trace_kwargs: dict) -> None:
        self.root, self.calls, self.macs, self.by_module = root, calls, macs, by_module
        self.trace_kwargs = trace_kwargs
        self.regions: list[_Region] = []
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
        if not reason and any(not _same(self.calls[i].concrete, first.concrete) for i in idx):
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

    def _wrap_region(self, mod: nn.Module, path: str, call: _Call, n_calls: int) -> None:
        """A conv / linear called by float glue: a region holding it as its only child."""
        parent, _, leaf = path.rpartition(".")
        gm = _holder_region(mod, leaf, call.params)
        spec = RegionSpec(path, {}, call.params, (), n_calls, parent, {"held": leaf})
        self.regions.append(_Region(path, gm, spec, {}))

    def _try_region(self, mod: nn.Module, path: str, call: _Call, n_calls: int) -> str:
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
        trace: dict[str, Any] = {"output_type": call.out_type} if _restore_output_type(
            gm, call.out_type) else {}
        trace |= {"leaf_modules": tuple(self.trace_kwargs.get("leaf_modules", ())),
                 "leaf_module_names": (*user, *leaves),
                 "wrapped_functions": tuple(self.trace_kwargs.get("wrapped_functions", ()))}
        spec = RegionSpec(path, call.concrete or {}, call.params, tuple(leaves), n_calls, path,
                          trace)
        self.regions.append(_Region(path, gm, spec, leaves))
        for leaf, reason in leaves.items():
            self.glue_module(mod.get_submodule(leaf), f"{path}.{leaf}" if path else leaf,
                             reason)
        return ""


def _restore_output_type(gm: fx.GraphModule, out_type: type | None) -> bool:
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


def _glue_calls(calls: list[_Call], region_paths: set[str], glue: set[str]
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


# -- steps 3 and 4 -----------------------------------------------------------------------------
def _region_example(root: nn.Module, regions: list[_Region], example_inputs: tuple
                    ) -> dict[str, list[Any]]:
    """The placeholder values of each region's first call in the example run."""
    found: dict[str, list[Any]] = {}
    handles = []
    for r in regions:
        mod = root.get_submodule(r.path) if r.path else root

        def pre(m: nn.Module, args: tuple, kwargs: dict, r: _Region = r) -> None:
            if r.path not in found:
                found[r.path] = region_inputs(r.gm, args, kwargs)

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    was_training = {m: m.training for m in root.modules()}
    root.eval()
    try:
        with torch.no_grad():
            root(*example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, t in was_training.items():
            m.training = t
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
    from .prepare import prepare_traced, warn_prepare

    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    if custom.get("concrete_args"):
        raise TraceFailure(f"{failure}\nPartial tracing fixes each submodule's arguments "
                           "from example_inputs: remove prepare_custom_config_dict"
                           "['concrete_args'], or set 'partial_tracing': False",
                           failure.module_path, failure.module_type, failure.where,
                           failure.line) from failure
    calls, macs, by_module = _record(model, example_inputs)
    planner = _Planner(model, calls, macs, by_module, trace_kwargs)
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
        glue_calls=_glue_calls(calls, {r.path for r in found}, planner.glue),
        root_is_region="" in prepared)
    _attach(root, plan)
    _FLOAT_PLANS[original] = plan
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


def _attach(root: nn.Module, plan: PartialTrace) -> None:
    setattr(root, PARTIAL_ATTR, plan)
    if isinstance(root, fx.GraphModule):  # kept by GraphModule.__deepcopy__
        root.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[PARTIAL_ATTR] = plan


def _check_names(model: nn.Module, found: list[_Region], qconfig_dict: dict,
                 float_islands: dict | None) -> None:
    """qconfig_dict / hybrid_dict keys against the whole model's names (module names from the
    root, functional ops of every region)."""
    names = {n for n, _ in model.named_modules() if n}
    present = present_types(model.modules(), None, {})
    from .annotate import op_kind

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


def _parts(root: nn.Module, found: list[_Region], floats: list[tuple[str, nn.Module, str]],
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


def _warn_stubs_in_glue(model: nn.Module, planner: _Planner) -> None:
    """A QuantStub / DeQuantStub the user placed where the code stays float does nothing
    there: say so, with the line that made the code float."""
    from ..nn.stubs import DeQuantStub, QuantStub

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
