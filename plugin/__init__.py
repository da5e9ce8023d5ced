"""qatkit: quantization-aware training and accuracy debugging for integer NPUs.

Example::

    >>> import qatkit
    >>> fq = qatkit.FakeQuantize(dtype="qint8")
"""

from ._deprecation import deprecated_aliases
from ._version import __version__ as __version__
from .algorithms import adaround as adaround
from .algorithms import bias_correction as bias_correction
from .algorithms import bn_reestimation as bn_reestimation
from .algorithms import brecq as brecq
from .algorithms import cross_layer_equalization as cross_layer_equalization
from .algorithms import easy_quant as easy_quant
from .algorithms import refine_weight_range as refine_weight_range
from .algorithms import smooth_quant as smooth_quant
from .annotation import NodeAnnotation as NodeAnnotation
from .annotation import QuantSpec as QuantSpec
from .annotation import get_annotations as get_annotations
from .calibration import CalibrationSummary as CalibrationSummary
from .calibration import calibrate as calibrate
from .distributed import sync_observers as sync_observers
from .eager import convert as convert
from .eager import fuse_modules as fuse_modules
from .eager import prepare_qat as prepare_qat
from .export import export_onnx as export_onnx
from .fake_quantize import FakeQuantize as FakeQuantize
from .fake_quantize import FakeQuantState as FakeQuantState
from .fake_quantize import LSQFakeQuantize as LSQFakeQuantize
from .fake_quantize import exact_evaluation as exact_evaluation
from .fake_quantize import fake_quant_enabled as fake_quant_enabled
from .fake_quantize import get_fake_quant_state as get_fake_quant_state
from .fake_quantize import set_exact_evaluation as set_exact_evaluation
from .fake_quantize import set_fake_quant_enabled as set_fake_quant_enabled
from .fake_quantize import set_fake_quant_state as set_fake_quant_state
from .fx import convert_fx as convert_fx
from .fx import get_provenance as get_provenance
from .fx import prepare_qat_fx as prepare_qat_fx
from .fx import set_preserve_qat_mode as set_preserve_qat_mode
from .grid_sample_rule import grid_sample_scale as grid_sample_scale
from .nn import DeQuantStub as DeQuantStub
from .nn import QuantStub as QuantStub
from .nn.qat import freeze_bn_stats as freeze_bn_stats
from .nn.qat import unfreeze_bn_stats as unfreeze_bn_stats
from .observers import FixedScaleObserver as FixedScaleObserver
from .observers import KLObserver as KLObserver
from .observers import MinMaxObserver as MinMaxObserver
from .observers import MovingAverageMinMaxObserver as MovingAverageMinMaxObserver
from .observers import MSEObserver as MSEObserver
from .observers import PercentileObserver as PercentileObserver
from .qconfig import QConfig as QConfig
from .qconfig import (
    default_calib_4bit_weight_8bit_act_fake_quant_qconfig as default_calib_4bit_weight_8bit_act_fake_quant_qconfig,  # noqa: E501
)
from .qconfig import default_calib_8bit_fake_quant_qconfig as default_calib_8bit_fake_quant_qconfig
from .qconfig import (
    default_calib_8bit_out_fake_quant_qconfig as default_calib_8bit_out_fake_quant_qconfig,
)
from .qconfig import (
    default_calib_8bit_weight_16bit_act_fake_quant_qconfig as default_calib_8bit_weight_16bit_act_fake_quant_qconfig,  # noqa: E501
)
from .qconfig import (
    default_calib_8bit_weight_32bit_out_fake_quant_qconfig as default_calib_8bit_weight_32bit_out_fake_quant_qconfig,  # noqa: E501
)
from .qconfig import (
    default_calib_16bit_fake_quant_qconfig as default_calib_16bit_fake_quant_qconfig,
)
from .qconfig import (
    default_qat_4bit_weight_8bit_act_fake_quant_qconfig as default_qat_4bit_weight_8bit_act_fake_quant_qconfig,  # noqa: E501
)
from .qconfig import default_qat_8bit_fake_quant_qconfig as default_qat_8bit_fake_quant_qconfig
from .qconfig import default_qat_8bit_lsq_quant_qconfig as default_qat_8bit_lsq_quant_qconfig
from .qconfig import (
    default_qat_8bit_out_fake_quant_qconfig as default_qat_8bit_out_fake_quant_qconfig,
)
from .qconfig import (
    default_qat_8bit_weight_16bit_act_fake_quant_qconfig as default_qat_8bit_weight_16bit_act_fake_quant_qconfig,  # noqa: E501
)
from .qconfig import (
    default_qat_8bit_weight_32bit_out_fake_quant_qconfig as default_qat_8bit_weight_32bit_out_fake_quant_qconfig,  # noqa: E501
)
from .qconfig import default_qat_16bit_fake_quant_qconfig as default_qat_16bit_fake_quant_qconfig
from .qconfig import get_default_qconfig as get_default_qconfig

__all__ = [
    "FakeQuantState",
    "FakeQuantize",
    "LSQFakeQuantize",
    "set_fake_quant_state",
    "get_fake_quant_state",
    "set_exact_evaluation",
    "exact_evaluation",
    "calibrate",
    "CalibrationSummary",
    "sync_observers",
    "grid_sample_scale",
    "set_fake_quant_enabled",
    "fake_quant_enabled",
    "get_annotations",
    "NodeAnnotation",
    "QuantSpec",
    "prepare_qat_fx",
    "convert_fx",
    "set_preserve_qat_mode",
    "prepare_qat",
    "convert",
    "fuse_modules",
    "export_onnx",
    "get_provenance",
    "freeze_bn_stats",
    "unfreeze_bn_stats",
    "QuantStub",
    "DeQuantStub",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PercentileObserver",
    "MSEObserver",
    "KLObserver",
    "FixedScaleObserver",
    "QConfig",
    "get_default_qconfig",
    "default_qat_8bit_fake_quant_qconfig",
    "default_qat_8bit_out_fake_quant_qconfig",
    "default_calib_8bit_fake_quant_qconfig",
    "default_calib_8bit_out_fake_quant_qconfig",
    "default_qat_8bit_lsq_quant_qconfig",
    "default_qat_8bit_weight_32bit_out_fake_quant_qconfig",
    "default_calib_8bit_weight_32bit_out_fake_quant_qconfig",
    "default_qat_8bit_weight_16bit_act_fake_quant_qconfig",
    "default_calib_8bit_weight_16bit_act_fake_quant_qconfig",
    "default_qat_16bit_fake_quant_qconfig",
    "default_calib_16bit_fake_quant_qconfig",
    "default_qat_4bit_weight_8bit_act_fake_quant_qconfig",
    "default_calib_4bit_weight_8bit_act_fake_quant_qconfig",
    "smooth_quant",
    "cross_layer_equalization",
    "bias_correction",
    "bn_reestimation",
    "refine_weight_range",
    "easy_quant",
    "adaround",
    "brecq",
]

#: names that left the top level or were renamed: reachable for one release, with a warning
__getattr__ = deprecated_aliases(__name__, {
    "set_fake_quantize": "qatkit.set_fake_quant_state",
    "get_fake_quantize_state": "qatkit.get_fake_quant_state",
    "default_qat_out_8bit_fake_quant_qconfig": "qatkit.default_qat_8bit_out_fake_quant_qconfig",
    "default_calib_out_8bit_fake_quant_qconfig":
        "qatkit.default_calib_8bit_out_fake_quant_qconfig",
    "release_exact_caches": "qatkit.fake_quantize.release_exact_caches",
    "ptq_log": "qatkit.algorithms.ptq_log",
})
