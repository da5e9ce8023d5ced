"""Post-training algorithms on a prepared, calibrated model (one per file).

Each takes the model and the calibration data and returns a new model (``inplace=True``
changes the given one) whose results are ordinary weights, BatchNorm statistics and scales, so
the integer model (:func:`qatkit.convert_fx`) and the exported ONNX keep matching the
fake-quant model bit for bit.  docs/ptq.md says what each fixes and when to use which.
"""

from ._common import ptq_log as ptq_log
from .adaround import adaround as adaround
from .bias_correction import bias_correction as bias_correction
from .bn_reestimation import bn_reestimation as bn_reestimation
from .brecq import brecq as brecq
from .cross_layer_equalization import cross_layer_equalization as cross_layer_equalization
from .easy_quant import easy_quant as easy_quant
from .refine_weight_range import refine_weight_range as refine_weight_range
from .smooth_quant import outlier_level as outlier_level
from .smooth_quant import smooth_quant as smooth_quant

#: every algorithm by name (tests and benchmarks parametrize over it)
ALGORITHMS = {
    "smooth_quant": smooth_quant,
    "cross_layer_equalization": cross_layer_equalization,
    "bias_correction": bias_correction,
    "bn_reestimation": bn_reestimation,
    "refine_weight_range": refine_weight_range,
    "easy_quant": easy_quant,
    "adaround": adaround,
    "brecq": brecq,
}

__all__ = ["ALGORITHMS", "smooth_quant", "cross_layer_equalization", "bias_correction",
           "bn_reestimation", "refine_weight_range", "easy_quant", "adaround", "brecq",
           "outlier_level", "ptq_log"]
