"""Float helpers users put in their models, and (in ``qatkit.nn.qat``) the QAT modules."""

from .functional_modules import FloatFunctional as FloatFunctional
from .grid_sample_module import GridSample as GridSample
from .stubs import DeQuantStub as DeQuantStub
from .stubs import QuantStub as QuantStub

__all__ = ["QuantStub", "DeQuantStub", "GridSample", "FloatFunctional"]
