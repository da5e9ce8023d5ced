"""The integer simulator: one module per op, integer math in plain torch ops.

Importing this package registers every converter in :data:`CONVERTERS`.
"""

from . import conv as conv  # noqa: F401  (registers converters)
from . import integer_grid_sample as integer_grid_sample  # noqa: F401
from . import lut as lut  # noqa: F401
from . import norm as norm  # noqa: F401
from . import ops as ops  # noqa: F401
from . import stub as stub  # noqa: F401
from .base import CONVERTERS as CONVERTERS
from .base import BoundCall as BoundCall
from .base import QuantizedModule as QuantizedModule
from .base import TensorArg as TensorArg
from .base import TensorQParams as TensorQParams
from .base import bind_call as bind_call
from .base import quantize_multiplier as quantize_multiplier
from .base import register_converter as register_converter
from .base import requantize as requantize
from .stub import Quantize as Quantize

__all__ = ["CONVERTERS", "QuantizedModule", "TensorQParams", "register_converter",
           "quantize_multiplier", "requantize", "Quantize", "BoundCall", "TensorArg",
           "bind_call"]
