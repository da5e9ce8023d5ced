"""qatkit.profiler: find why a quantized model lost accuracy.

Layer-by-layer comparisons of float / calibrated / QAT / integer models, statistics, structural
checks, an advisor, one self-contained HTML report (:func:`model_profiler`), and the causal
tools that switch quantizers and watch the output.  Three rooms, each importing only those
before it:

* :mod:`qatkit.profiler.core` -- capture, name alignment, metrics, similarity, statistics,
  weights, dumps;
* :mod:`qatkit.profiler.causal` -- sensitivity, cumulative error and partial un-quantization,
  distributions, bad cases, mixed precision;
* :mod:`qatkit.profiler.report` -- ``model_profiler``, the checks, the qconfig check, the
  advisor, the HTML page and the mermaid graph.

This package exports what users call; everything else is imported from its module (e.g.
``from qatkit.profiler.report.html import render_html``).  The import paths of qatkit 0.1 still
work for one release, with a ``DeprecationWarning`` naming the new one: the names that left
this namespace (below) and the flat modules (:mod:`qatkit.profiler._moved_modules`).

Example::

    >>> from qatkit.profiler import featuremap_similarity, model_profiler
    >>> table = featuremap_similarity(float_model, calib_model, x, method="PerLayer")
    >>> report = model_profiler(float_model, calib_model, x, out_dir="report")
"""

from __future__ import annotations

from qatkit._deprecation import deprecated_aliases

from . import _moved_modules
from .causal.acc_error import AccErrorResult as AccErrorResult
from .causal.acc_error import plot_acc_error as plot_acc_error
from .causal.bad_cases import BadCases as BadCases
from .causal.bad_cases import find_bad_cases as find_bad_cases
from .causal.distribution import DistributionResult as DistributionResult
from .causal.distribution import plot_distribution as plot_distribution
from .causal.mixed_precision import MixedPrecisionResult as MixedPrecisionResult
from .causal.mixed_precision import MixedPrecisionStep as MixedPrecisionStep
from .causal.mixed_precision import suggest_mixed_precision as suggest_mixed_precision
from .causal.sensitivity import NodeSensitivity as NodeSensitivity
from .causal.sensitivity import get_sensitivity_of_nodes as get_sensitivity_of_nodes
from .causal.switches import Quantizer as Quantizer
from .causal.switches import list_quantizers as list_quantizers
from .core.alignment import align_names as align_names
from .core.capture import Capture as Capture
from .core.capture import FeatureRecord as FeatureRecord
from .core.capture import capture_model as capture_model
from .core.capture import get_raw_features as get_raw_features
from .core.dumps import compare_dumps as compare_dumps
from .core.dumps import dump_layers as dump_layers
from .core.dumps import dump_tensors as dump_tensors
from .core.metrics import RENAMED as _RENAMED_METRICS
from .core.metrics import Metric as Metric
from .core.metrics import chebyshev as chebyshev
from .core.metrics import cosine as cosine
from .core.metrics import error_in_scale as error_in_scale
from .core.metrics import get_metric as get_metric
from .core.metrics import kl as kl
from .core.metrics import l1 as l1
from .core.metrics import list_metrics as list_metrics
from .core.metrics import max_abs as max_abs
from .core.metrics import mre as mre
from .core.metrics import mse as mse
from .core.metrics import register_metric as register_metric
from .core.metrics import sqnr as sqnr
from .core.similarity import featuremap_similarity as featuremap_similarity
from .core.statistics import FeatureProfile as FeatureProfile
from .core.statistics import outlier_channels as outlier_channels
from .core.statistics import profile_featuremap as profile_featuremap
from .core.weights import check_weight_correspondence as check_weight_correspondence
from .core.weights import compare_weights as compare_weights
from .report.advisor import advise as advise
from .report.checks import check_unfused_operations as check_unfused_operations
from .report.checks import get_module_called_count as get_module_called_count
from .report.mermaid import write_similarity_mermaid as write_similarity_mermaid
from .report.model_report import ProfilerReport as ProfilerReport
from .report.model_report import model_profiler as model_profiler
from .report.qconfig_check import check_qconfig as check_qconfig

__all__ = [
    # the report and its checks
    "model_profiler", "ProfilerReport", "get_module_called_count", "check_unfused_operations",
    "check_qconfig", "advise", "write_similarity_mermaid",
    # core: capture, similarity, statistics, weights, names, dumps
    "featuremap_similarity", "get_raw_features", "FeatureRecord", "capture_model", "Capture",
    "profile_featuremap", "FeatureProfile", "outlier_channels", "compare_weights",
    "check_weight_correspondence", "align_names", "dump_tensors", "dump_layers",
    "compare_dumps",
    # metrics: each function named by its key ("MaxAbs" -> max_abs)
    "Metric", "get_metric", "list_metrics", "register_metric", "cosine", "mse", "l1",
    "max_abs", "chebyshev", "mre", "sqnr", "kl", "error_in_scale",
    # causal tools
    "get_sensitivity_of_nodes", "NodeSensitivity", "plot_acc_error", "AccErrorResult",
    "plot_distribution", "DistributionResult", "find_bad_cases", "BadCases",
    "suggest_mixed_precision", "MixedPrecisionResult", "MixedPrecisionStep", "list_quantizers",
    "Quantizer",
]

#: names that left the top level or were renamed: reachable for one release, with a warning
__getattr__ = deprecated_aliases(__name__, {
    **{name: f"qatkit.profiler.core.metrics.{name}"
       for name in ("METRICS", "BatchMetric", "FINAL_SIMILARITY_THRESHOLD")},
    **{name: f"qatkit.profiler.report.html.{name}"
       for name in ("render_html", "build_verdict", "Verdict", "REPORT_SECTIONS")},
    **{name: f"qatkit.profiler.report.model_report.{name}" for name in ("MODES", "model_kind")},
    "ADVICE_COLUMNS": "qatkit.profiler.report.advisor.ADVICE_COLUMNS",
    "IncrementalRunner": "qatkit.profiler.causal.incremental.IncrementalRunner",
    **{old: f"qatkit.profiler.{new}" for old, new in _RENAMED_METRICS.items()},
})
_moved_modules.install()
