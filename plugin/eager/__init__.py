"""Eager mode: prepare and convert a model by swapping its modules (names and forward kept).

``prepare_qat`` swaps modules for the QAT modules of :mod:`qatkit.nn.qat` (``.qconfig``
attributes and ``qconfig_dict`` decide where), ``fuse_modules`` names the conv+bn+relu chains
to fuse, ``convert`` puts the integer modules of :mod:`qatkit.quantized` in their place, and
``eager_graph`` gives the annotated trace the profiler and the exporter read.  See
docs/eager.md.
"""

from .._deprecation import deprecated_aliases
from .convert import convert as convert
from .functional import FloatFunctionalReuseError as FloatFunctionalReuseError
from .functional import QATFloatFunctional as QATFloatFunctional
from .functional import QuantizedAddReLU as QuantizedAddReLU
from .fuse import fuse_modules as fuse_modules
from .graph import eager_graph as eager_graph
from .info import is_eager_model as is_eager_model
from .prepare import prepare_qat as prepare_qat

__all__ = ["prepare_qat", "convert", "fuse_modules", "eager_graph", "is_eager_model",
           "QATFloatFunctional", "FloatFunctionalReuseError", "QuantizedAddReLU"]

#: internals that left this namespace: reachable for one release, with a warning
__getattr__ = deprecated_aliases(__name__, {
    "annotated_graph": "qatkit.model_graph.annotated_graph",
    "link_eager_model": "qatkit.eager.graph.link_eager_model",
    "eager_info": "qatkit.eager.info.eager_info",
    "EagerInfo": "qatkit.eager.info.EagerInfo",
})
