"""qatkit.profiler: find why a quantized model lost accuracy.

Layer-by-layer comparisons of float / calibrated / QAT / integer models, statistics, structural
checks, an advisor, and one self-contained HTML report (:func:`model_profiler`).

Example::

    >>> from qatkit.profiler import featuremap_similarity
    >>> table = featuremap_similarity(float_model, calib_model, x, method="PerLayer")
"""

from __future__ import annotations

# --- profiler core (capture, metrics, similarity, statistics, weights) ---
from .core.alignment import align_names as align_names
from .core.capture import Capture as Capture
from .core.capture import FeatureRecord as FeatureRecord
from .core.capture import capture_model as capture_model
from .core.capture import get_raw_features as get_raw_features
from .core.metrics import METRICS as METRICS
from .core.metrics import Metric as Metric
from .core.metrics import cosine_similarity as cosine_similarity
from .core.metrics import error_in_scale as error_in_scale
from .core.metrics import get_metric as get_metric
from .core.metrics import kl_divergence as kl_divergence
from .core.metrics import l1 as l1
from .core.metrics import list_metrics as list_metrics
from .core.metrics import max_abs_error as max_abs_error
from .core.metrics import mse as mse
from .core.metrics import register_metric as register_metric
from .core.metrics import sqnr as sqnr
from .core.similarity import featuremap_similarity as featuremap_similarity
from .core.statistics import FeatureProfile as FeatureProfile
from .core.statistics import outlier_channels as outlier_channels
from .core.statistics import profile_featuremap as profile_featuremap
from .core.weights import check_weight_correspondence as check_weight_correspondence
from .core.weights import compare_weights as compare_weights

__all__: list[str] = []
__all__ += ["get_raw_features", "FeatureRecord", "Capture", "capture_model",
            "check_weight_correspondence", "profile_featuremap", "FeatureProfile",
            "outlier_channels", "featuremap_similarity", "compare_weights", "align_names",
            "Metric", "METRICS", "get_metric", "list_metrics", "register_metric",
            "cosine_similarity", "mse", "l1", "max_abs_error", "sqnr", "kl_divergence",
            "error_in_scale"]
# --- end profiler core ---

# --- checks and advisor ---
from .report.advisor import ADVICE_COLUMNS as ADVICE_COLUMNS  # noqa: E402
from .report.advisor import advise as advise  # noqa: E402
from .report.checks import check_unfused_operations as check_unfused_operations  # noqa: E402
from .report.checks import get_module_called_count as get_module_called_count  # noqa: E402
from .report.qconfig_check import check_qconfig as check_qconfig  # noqa: E402

__all__ += ["get_module_called_count", "check_unfused_operations", "check_qconfig", "advise",
            "ADVICE_COLUMNS"]
# --- end checks and advisor ---

# --- report ---
from .report.html import FINAL_SIMILARITY_THRESHOLD as FINAL_SIMILARITY_THRESHOLD  # noqa: E402
from .report.html import REPORT_SECTIONS as REPORT_SECTIONS  # noqa: E402
from .report.html import Verdict as Verdict  # noqa: E402
from .report.html import build_verdict as build_verdict  # noqa: E402
from .report.html import render_html as render_html  # noqa: E402
from .report.mermaid import write_similarity_mermaid as write_similarity_mermaid  # noqa: E402

__all__ += ["render_html", "build_verdict", "Verdict", "REPORT_SECTIONS",
            "FINAL_SIMILARITY_THRESHOLD", "write_similarity_mermaid"]
# --- end report ---

# --- deployment alignment ---
from .core.dumps import compare_dumps as compare_dumps  # noqa: E402
from .core.dumps import dump_layers as dump_layers  # noqa: E402
from .core.dumps import dump_tensors as dump_tensors  # noqa: E402

__all__ += ["dump_tensors", "dump_layers", "compare_dumps"]
# --- end deployment alignment ---

# --- model_profiler ---
from .report.model_report import MODES as MODES  # noqa: E402
from .report.model_report import ProfilerReport as ProfilerReport  # noqa: E402
from .report.model_report import model_kind as model_kind  # noqa: E402
from .report.model_report import model_profiler as model_profiler  # noqa: E402

__all__ += ["model_profiler", "ProfilerReport", "MODES", "model_kind"]
# --- end model_profiler ---

# --- sensitivity, partial un-quantization, distributions, bad cases, mixed precision ---
from .causal.acc_error import AccErrorResult as AccErrorResult  # noqa: E402
from .causal.acc_error import plot_acc_error as plot_acc_error  # noqa: E402
from .causal.bad_cases import BadCases as BadCases  # noqa: E402
from .causal.bad_cases import find_bad_cases as find_bad_cases  # noqa: E402
from .causal.distribution import DistributionResult as DistributionResult  # noqa: E402
from .causal.distribution import plot_distribution as plot_distribution  # noqa: E402
from .causal.incremental import IncrementalRunner as IncrementalRunner  # noqa: E402
from .causal.mixed_precision import MixedPrecisionResult as MixedPrecisionResult  # noqa: E402
from .causal.mixed_precision import MixedPrecisionStep as MixedPrecisionStep  # noqa: E402
from .causal.mixed_precision import suggest_mixed_precision as suggest_mixed_precision  # noqa: E402
from .causal.sensitivity import NodeSensitivity as NodeSensitivity  # noqa: E402
from .causal.sensitivity import get_sensitivity_of_nodes as get_sensitivity_of_nodes  # noqa: E402
from .causal.switches import Quantizer as Quantizer  # noqa: E402
from .causal.switches import list_quantizers as list_quantizers  # noqa: E402
from .core.metrics import BatchMetric as BatchMetric  # noqa: E402
from .core.metrics import chebyshev as chebyshev  # noqa: E402
from .core.metrics import mre as mre  # noqa: E402

__all__ += ["get_sensitivity_of_nodes", "NodeSensitivity", "plot_acc_error", "AccErrorResult",
            "plot_distribution", "DistributionResult", "find_bad_cases", "BadCases",
            "suggest_mixed_precision", "MixedPrecisionResult", "MixedPrecisionStep",
            "list_quantizers", "Quantizer", "IncrementalRunner", "BatchMetric", "mre",
            "chebyshev"]
# --- end sensitivity ---
