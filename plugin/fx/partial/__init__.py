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
float model (:mod:`.views`).

The package follows the stages: :mod:`.plan` (the plan types and the read API),
:mod:`.recording` (step 1), :mod:`.planner` (step 2), :mod:`.install` (steps 3 and 4, and the
warnings), :mod:`.views` (the float counterparts of the regions).
"""

from .install import prepare_partial as prepare_partial
from .plan import PARTIAL_ATTR as PARTIAL_ATTR
from .plan import WEIGHTED_TYPES as WEIGHTED_TYPES
from .plan import PartialTrace as PartialTrace
from .plan import RegionSpec as RegionSpec
from .plan import TracedPart as TracedPart
from .plan import is_partially_traced as is_partially_traced
from .plan import partial_trace_of as partial_trace_of
from .plan import region_inputs as region_inputs
from .plan import regions as regions
from .plan import trace_report as trace_report
from .views import float_region as float_region
from .views import region_pairs as region_pairs

__all__ = ["PartialTrace", "RegionSpec", "TracedPart", "prepare_partial", "trace_report",
           "partial_trace_of", "is_partially_traced", "regions", "region_inputs",
           "float_region", "region_pairs", "WEIGHTED_TYPES", "PARTIAL_ATTR"]
