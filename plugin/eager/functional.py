"""The QAT and integer versions of :class:`qatkit.nn.FloatFunctional`.

* :class:`QATFloatFunctional` -- what :func:`qatkit.prepare_qat` puts in place of a
  ``FloatFunctional``: a :class:`~qatkit.nn.qat.FunctionalOp` (the op fake-quantizes its
  output, evaluates exactly in VALIDATION, is one leaf node for qatkit's tracer) whose op is
  fixed by the first method called (``ff.add(a, b)`` makes it an ``add``);
* the integer module of each op (:data:`qatkit.quantized.CONVERTERS`) gets the same methods
  (:func:`functional_class`), so the model's forward runs unchanged after
  :func:`qatkit.convert`;
* ``add_relu`` (torch.ao's fused ``FloatFunctional.add_relu``) is one op with one output
  rounding: its integer module is the integer add clamped at zero
  (:class:`QuantizedAddReLU`, registered in ``CONVERTERS``), exported as ``Add -> Relu``
  (:mod:`qatkit.eager.export`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..fake_quantize import FakeQuantize
from ..nn.functional_modules import FUNCTIONAL_OPS, FunctionalMethods
from ..nn.qat import FunctionalOp
from ..quantized import CONVERTERS, BoundCall, TensorQParams, register_converter
from ..quantized.ops import QuantizedAdd
from .boundaries import MixedModule, mixed_class

__all__ = ["QATFloatFunctional", "FloatFunctionalReuseError", "QuantizedAddReLU",
           "IntegerFunctional", "functional_class", "FLOAT_BASE_NAMES"]

#: the op kind that decides whether the QAT op evaluates exactly (``EXACT_OPS``)
_EXACT_KIND = {"add_relu": "add"}
#: op kind -> the base name of the float op whose output the quantized op reproduces
#: (``add_relu`` reproduces the float model's ``relu``, as named by :mod:`qatkit.fx.naming`)
FLOAT_BASE_NAMES = {"add_relu": "relu"}


class FloatFunctionalReuseError(ValueError):
    """One FloatFunctional called for two different ops (they would share one output scale).

    Example::

        >>> ff.add(a, b); ff.mul(a, b)
        FloatFunctionalReuseError: 'ff' is used for 'add' and 'mul': one FloatFunctional per op...
    """


class QATFloatFunctional(FunctionalMethods, FunctionalOp):
    """A ``FloatFunctional`` prepared for QAT: one quantized op with its output fake quant.

    The op is fixed by the first method called; calling another op's method afterwards is an
    error (two ops would share one output scale).

    Args:
        activation_post_process: the output fake quant (None: float output).

    Example::

        >>> ff = QATFloatFunctional(qatkit.FakeQuantize())
        >>> ff.add(torch.ones(2), torch.ones(2))
        tensor([2., 2.])
        >>> ff.qatkit_op_kind
        'add'
    """

    def __init__(self, activation_post_process: FakeQuantize | None) -> None:
        super().__init__("", None, activation_post_process)
        self.kind = ""
        self.method = ""

    @property
    def qatkit_op_kind(self) -> str:  # type: ignore[override]
        return self.kind

    def bind_method(self, method: str) -> None:
        """Fix the op to that of ``method`` (``"add"``, ``"cat"``...); a second, different op
        raises a ValueError naming the module."""
        if method not in FUNCTIONAL_OPS:
            raise ValueError(f"FloatFunctional has no op {method!r}; choose one of "
                             f"{sorted(FUNCTIONAL_OPS)}")
        kind, fn = FUNCTIONAL_OPS[method]
        if self.kind and (kind != self.kind or fn is not self.fn):
            where = getattr(self, "qatkit_path", "") or "FloatFunctional"
            raise FloatFunctionalReuseError(
                f"'{where}' is used for {self.method!r} and {method!r}: one FloatFunctional "
                "per op (each quantized op owns its output scale). Fix: give the model one "
                "qatkit.nn.FloatFunctional() per op")
        self.kind, self.method, self.fn = kind, method, fn
        self.op = _EXACT_KIND.get(kind, kind)

    def _functional(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self.bind_method(method)
        return self(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.kind:
            raise RuntimeError("a prepared FloatFunctional is called through its methods "
                               "(ff.add(x, y), ...), not through forward()")
        return super().forward(*args, **kwargs)

    def _get_name(self) -> str:
        return f"FloatFunctional[{self.kind or '?'}]"


class QuantizedAddReLU(QuantizedAdd):
    """``relu(input + other)`` on the output grid: the integer add (:class:`QuantizedAdd`),
    its result clamped at zero (``max(round(v), 0) == round(max(v, 0))``: one rounding, as
    the fake quant of ``relu(a + b)``).

    Example::

        >>> qadd_relu = CONVERTERS["add_relu"](qat_ff, bind_call(qat_ff, qp_a, qp_b), qp_out)
    """

    def _from_int(self, q: Tensor) -> Tensor:
        return super()._from_int(q.clamp(min=0))


@register_converter("add_relu")
def _convert_add_relu(qat_module: nn.Module, call: BoundCall,
                      out_qparams: TensorQParams | None) -> QuantizedAdd:
    new = CONVERTERS["add"](qat_module, call, out_qparams)
    new.__class__ = QuantizedAddReLU
    return new


# -- integer modules called by the FloatFunctional methods ----------------------------------------
class IntegerFunctional(FunctionalMethods, MixedModule):
    """The FloatFunctional methods on an integer module (mixed into its class by
    :func:`functional_class`): each checks that the method is the module's op and calls the
    module.

    Example::

        >>> int_model = qatkit.convert(qat_model)
        >>> y = int_model.skip.add(a, b)          # the integer add
    """

    def _functional(self, method: str, *args: Any, **kwargs: Any) -> Any:
        kind = FUNCTIONAL_OPS.get(method, ("?",))[0]
        have = getattr(self, "qatkit_op_kind", "")
        if have and kind != have:
            raise ValueError(f"'{getattr(self, 'qatkit_name', '')}' is the integer {have!r} op "
                             f"of a FloatFunctional; it was called as {method!r}")
        return self(*args, **kwargs)


def functional_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` with the FloatFunctional methods (``add``, ``cat``...), for the integer module
    that replaces a :class:`QATFloatFunctional`.

    Example::

        >>> int_ff.__class__ = functional_class(type(int_ff))
        >>> y = int_ff.add(a, b)
    """
    return mixed_class(IntegerFunctional, cls)
