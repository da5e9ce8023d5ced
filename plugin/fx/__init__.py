"""FX passes: tracing, naming, fusion, prepare, hybrid float islands (one pass per file)."""

from .annotate import annotate as annotate
from .annotate import op_kind as op_kind
from .convert import convert_fx as convert_fx
from .convert import set_preserve_qat_mode as set_preserve_qat_mode
from .naming import float_node_names as float_node_names
from .partial import PartialTrace as PartialTrace
from .partial import partial_trace_of as partial_trace_of
from .partial import trace_report as trace_report
from .prepare import get_provenance as get_provenance
from .prepare import prepare_qat_fx as prepare_qat_fx
from .tracer import TraceFailure as TraceFailure
from .tracer import list_leaf_modules as list_leaf_modules
from .tracer import list_wrapped_functions as list_wrapped_functions
from .tracer import register_leaf_module as register_leaf_module
from .tracer import symbolic_trace as symbolic_trace
from .tracer import wrap as wrap

__all__ = [
    "prepare_qat_fx", "convert_fx", "set_preserve_qat_mode", "get_provenance",
    "float_node_names", "symbolic_trace",
    "register_leaf_module", "wrap", "list_leaf_modules", "list_wrapped_functions",
    "TraceFailure", "annotate", "op_kind", "trace_report", "partial_trace_of", "PartialTrace",
]
