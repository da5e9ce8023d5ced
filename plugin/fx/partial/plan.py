"""Partial tracing, stage 1: the plan types and how tools read a partially traced model.

:class:`PartialTrace` (its :class:`RegionSpec` regions and :class:`TracedPart` report rows) is
what prepare keeps on the prepared root (:func:`attach_plan`); :func:`partial_trace_of`,
:func:`is_partially_traced`, :func:`trace_report`, :func:`regions` and :func:`region_inputs`
are how ``convert_fx``, ``get_provenance``, ``set_preserve_qat_mode`` and the profiler read it.
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from typing import Any

import pandas as pd
from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

__all__ = ["PartialTrace", "RegionSpec", "TracedPart", "trace_report", "partial_trace_of",
           "is_partially_traced", "regions", "region_inputs", "attach_plan", "WEIGHTED_TYPES",
           "PARTIAL_ATTR"]

PARTIAL_ATTR = "qatkit_partial_trace"
#: modules whose multiply-adds the report counts (subclasses included)
WEIGHTED_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.Linear)
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


def attach_plan(root: nn.Module, plan: PartialTrace, float_model: nn.Module) -> None:
    """Keep ``plan`` on the prepared ``root`` (kept by ``copy.deepcopy`` and
    :func:`~qatkit.fx.convert_fx`) and beside ``float_model``, the model it was prepared from
    (for :func:`partial_trace_of`; in this process only).

    Example::

        >>> attach_plan(root, plan, float_model)      # prepare_partial does this
    """
    setattr(root, PARTIAL_ATTR, plan)
    if isinstance(root, fx.GraphModule):  # kept by GraphModule.__deepcopy__
        root.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[PARTIAL_ATTR] = plan
    _FLOAT_PLANS[float_model] = plan
