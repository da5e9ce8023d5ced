"""convert: the integer model of an eager-prepared model, module by module, names kept.

An integer module needs the scales of its inputs, which only the data flow knows.  So the
calibrated / QAT model is traced and annotated (:func:`qatkit.eager.eager_graph`), the trace
is converted by :func:`qatkit.convert_fx` itself (the same converters,
:data:`qatkit.quantized.CONVERTERS`, the same checks and preserve-QAT mode), and each integer
module is put back into the eager model under the QAT module's name.  The model keeps its
class and forward: a ``FloatFunctional``'s integer module answers the same methods
(``ff.add(a, b)``), a float module's ``output_quant`` becomes an integer ``Quantize``.

A module called at several places with inputs of different scales needs one integer module
per call site, which an eager forward cannot pick: that is an error naming the module (give
each call site its own module, as :func:`qatkit.prepare_qat_fx` does by itself).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

from torch import nn

from .._modules import set_module
from ..annotation import AnnotatedOp, get_annotations
from ..fake_quantize import FakeQuantize
from ..fx.convert import convert_fx
from ..quantized import QuantizedModule
from .boundaries import InputQuantEntry, OutputQuantExit, mixed_class
from .functional import QATFloatFunctional, functional_class
from .graph import eager_graph
from .info import EAGER_ATTR, eager_info

__all__ = ["convert"]


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The integer model of a calibrated or QAT model made by :func:`qatkit.prepare_qat`.

    Args:
        model: made by :func:`qatkit.prepare_qat`, calibrated (every fake quant it uses has
            a scale).  Its fake-quant state does not matter.
        inplace: convert ``model`` itself instead of a copy.

    Returns:
        the model (its own class and forward) in eval mode, each quantized module replaced by
        its integer module (``qatkit.quantized``) under the same name; modules marked with
        ``qatkit.set_preserve_qat_mode(qatkit.eager.eager_graph(model), ...)`` stay in
        fake-quant form.  In VALIDATION under ``torch.no_grad()`` the fake-quant model equals
        it bit for bit (docs/exact_evaluation.md).

    Raises:
        ValueError: not an eager-prepared model, not calibrated, or a module called at
            several places with inputs of different scales.
        NotImplementedError: an op without an integer implementation (the message names
            the module and the ways out).
        qatkit.fx.TraceFailure: the model cannot be traced.

    Example::

        >>> qat_model = qatkit.prepare_qat(model, {"": qatkit.default_qat_8bit_fake_quant_qconfig})
        >>> qatkit.calibrate(qat_model, data)
        >>> int_model = qatkit.convert(qat_model)
        >>> y = int_model(x)        # float in, float out; integer arithmetic inside
    """
    info = eager_info(model)
    if info is None:
        raise ValueError(f"qatkit.convert takes a model made by qatkit.prepare_qat (eager "
                         f"mode), got {type(model).__name__}; for prepare_qat_fx models use "
                         "qatkit.convert_fx")
    if info.converted:
        raise ValueError(f"{type(model).__name__} is already an integer model (qatkit.convert)")
    model = model if inplace else copy.deepcopy(model)
    gm = eager_graph(model, split_boundaries=True)
    stubs = gm.qatkit_boundary_stubs
    targets = list(dict.fromkeys(
        ann.module for node, ann in get_annotations(gm).items()
        if ann.is_quantized and ann.module is not None and node.op == "call_module"
        and str(node.target) not in stubs))
    try:
        convert_fx(gm, inplace=True)
    except (ValueError, NotImplementedError) as e:
        raise type(e)(f"qatkit.convert (eager mode): {e}") from e
    for alias, path in stubs.items():  # the integer Quantize of each boundary stub
        set_module(model, path, gm.get_submodule(alias))
    names = {n for n, _ in gm.named_modules()}
    for target in targets:
        split = sorted(n for n in names if n.startswith(f"{target}("))
        if split:
            raise ValueError(
                f"qatkit.convert: module '{target}' is called at {len(split)} places whose "
                "inputs have different scales, so each call needs its own integer module, "
                "which an eager forward cannot pick. Fix: give each call site its own module "
                "(or use qatkit.prepare_qat_fx, which does it by itself)")
        old, new = model.get_submodule(target), gm.get_submodule(target)
        if new is old:  # kept in fake-quant form (set_preserve_qat_mode)
            continue
        new.qatkit_float_name = getattr(old, "qatkit_float_name", target)
        if isinstance(old, QATFloatFunctional):
            new.__class__ = functional_class(type(new))
        for mixin in getattr(type(old), "_qatkit_mixins", ()):  # boundary stubs stay on
            if mixin in (OutputQuantExit, InputQuantEntry):
                new.__class__ = mixed_class(mixin, type(new))
                attr = "output_quant" if mixin is OutputQuantExit else "input_quant"
                setattr(new, attr, getattr(old, attr))
        set_module(model, target, new)
    model.eval()
    model.__dict__[EAGER_ATTR] = dataclasses.replace(info, converted=True)
    left = [n for n, m in model.named_modules() if isinstance(m, AnnotatedOp)
            and not isinstance(m, QuantizedModule) and not getattr(m, "preserve_qat_mode", False)
            and any(isinstance(f, FakeQuantize) for f in m.modules())]
    if left:
        warnings.warn(f"qatkit.convert: module(s) {left[:6]} never run in the traced forward "
                      "and stay in fake-quant form", UserWarning, stacklevel=2)
    return model
