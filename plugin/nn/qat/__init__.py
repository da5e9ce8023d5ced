"""QAT modules: fused conv/linear with weight fake quant, and ops owning output fake quants."""

from ._fused import ACTIVATIONS as ACTIVATIONS
from ._fused import FusedMixin as FusedMixin
from ._fused import freeze_bn_stats as freeze_bn_stats
from ._fused import unfreeze_bn_stats as unfreeze_bn_stats
from .conv import FLOAT_TO_QAT as FLOAT_TO_QAT
from .conv import Conv1d as Conv1d
from .conv import Conv2d as Conv2d
from .conv import Conv3d as Conv3d
from .conv import ConvTranspose1d as ConvTranspose1d
from .conv import ConvTranspose2d as ConvTranspose2d
from .conv import from_float as from_float
from .linear import Linear as Linear
from .ops import OUTPUT_QUANTIZED_MODULES as OUTPUT_QUANTIZED_MODULES
from .ops import Divide as Divide
from .ops import FunctionalOp as FunctionalOp
from .ops import OutputQuantMixin as OutputQuantMixin
from .ops import QuantStub as QuantStub
from .ops import exact_grid as exact_grid
from .ops import output_quantized as output_quantized

__all__ = [
    "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "Linear",
    "FusedMixin", "ACTIVATIONS", "from_float", "FLOAT_TO_QAT",
    "freeze_bn_stats", "unfreeze_bn_stats",
    "QuantStub", "FunctionalOp", "Divide", "OutputQuantMixin", "output_quantized",
    "OUTPUT_QUANTIZED_MODULES", "exact_grid",
]
