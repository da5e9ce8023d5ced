"""QAT modules for ops without weights: each owns its output fake quant.

* :class:`QuantStub` — quantizes a float tensor (graph inputs, float-island exits);
* :class:`FunctionalOp` — a functional op (``+``, ``torch.cat``, ``x.mean()``...) turned into a
  named module, e.g. ``layer1.0.add``;
* output-quantized versions of float modules (``ReLU``, ``Sigmoid``, ``LayerNorm``, ...): the
  float class with ``activation_post_process`` applied to its output, so parameter names in
  ``state_dict`` stay those of the float model.  :func:`output_quantized` builds one.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._exact import grid_int
from ...annotation import (
    AnnotatedOp,
    bind_arguments,
    map_arguments,
    module_signature,
    signature_names,
)
from ...fake_quantize import FakeQuantize, evaluates_exactly
from ...grid_sample_rule import sample_grid
from ..grid_sample_module import GridSample

__all__ = ["QuantStub", "FunctionalOp", "Divide", "output_quantized", "OUTPUT_QUANTIZED_MODULES",
           "OutputQuantMixin", "EXACT_OPS", "exact_grid", "ExactInputs", "grid_sample_call"]

#: op kinds whose integer twins are exact integer arithmetic; in VALIDATION they evaluate in
#: float64 (:func:`~qatkit.fake_quantize.evaluates_exactly`), where grid values add and multiply
#: exactly, so their output fake quant rounds where the integer model does
EXACT_OPS: frozenset[str] = frozenset({"add", "sub", "mul", "div", "matmul", "einsum", "mean",
                                       "grid_sample", "cat", "stack",
                                       "avg_pool", "adaptive_avg_pool", "layer_norm",
                                       "group_norm", "batch_norm"})


def _quantize(fq: FakeQuantize | None, out: Any) -> Any:
    if fq is None or not isinstance(out, Tensor) or not out.is_floating_point():
        return out
    return fq(out)


def exact_grid(t: Any, fq: nn.Module | None = None) -> Any:
    """A float32 tensor as float64; on ``fq``'s grid, the exact value ``q * s`` of ``t``.

    ``t = float32(q * s)`` carries the float32 rounding of ``q * s``; the integer model sees
    ``q`` itself, so exact evaluation works on ``q * s`` in float64, ``q`` recovered by
    :func:`qatkit._exact.grid_int` (per tensor or per channel).  Without a fake quant that
    has a scale, ``t`` is only widened.

    Example::

        >>> exact_grid(torch.tensor([0.1]), fq)  # fq.scale 0.1 -> tensor([0.1000...], float64)
    """
    if not isinstance(t, Tensor) or t.dtype != torch.float32:
        return t
    if not isinstance(fq, FakeQuantize) or not fq.has_scale or not fq.enabled:
        return t.double()
    s = fq.scale.detach()
    if fq.is_per_channel:
        shape = [1] * t.dim()
        shape[fq.ch_axis % t.dim()] = -1
        s = s.view(shape)
    else:
        s = s.reshape(())
    return grid_int(t, s).double().mul_(s.to(device=t.device, dtype=torch.float64))


def _is_float32(v: Any) -> bool:
    return isinstance(v, Tensor) and v.dtype == torch.float32


def _call_quantized(mod: nn.Module, op: str, fn: Callable, args: tuple, kwargs: dict) -> Any:
    """``fq(fn(*args, **kwargs))``; for EXACT_OPS in exact evaluation, in float64 on the exact
    grid values of the inputs (then back to float32).  ``kwargs["call_site"]`` (a module called
    at several places) picks that call's input links and is not passed to ``fn``."""
    call_site = kwargs.pop("call_site", None)
    fq = mod.activation_post_process
    if op not in EXACT_OPS or not evaluates_exactly(fq):
        return _quantize(fq, fn(*args, **kwargs))
    links = mod.exact_links(call_site)
    if op == "grid_sample":
        return _exact_grid_sample(mod, args, kwargs, links)
    args, kwargs = map_arguments(mod.qatkit_signature, args, kwargs,
                                 lambda name, t: exact_grid(t, links.get(name)), _is_float32)
    out = _quantize(fq, fn(*args, **kwargs))
    if isinstance(out, Tensor) and out.dtype == torch.float64:
        out = out.float()
    return out


def grid_sample_call(mod: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A grid_sample call's ``input``, ``grid``, ``mode``, ``padding_mode``,
    ``align_corners`` and ``normalized`` (a GridSample module's attributes, else the call's
    arguments with ``F.grid_sample``'s defaults).

    Example::

        >>> grid_sample_call(qat_gs, (x, grid), {})["mode"]
        'bilinear'
    """
    bound = bind_arguments(mod.qatkit_signature, args, kwargs)
    if isinstance(mod, GridSample):
        params = {k: getattr(mod, k) for k in ("mode", "padding_mode", "align_corners",
                                               "normalized")}
    else:
        params = {"mode": bound.get("mode", "bilinear"),
                  "padding_mode": bound.get("padding_mode", "zeros"),
                  "align_corners": bool(bound.get("align_corners") or False),
                  "normalized": True}
    return {"input": bound["input"], "grid": bound["grid"], **params}


def _exact_grid_sample(mod: nn.Module, args: tuple, kwargs: dict,
                       links: dict[str, nn.Module]) -> Tensor:
    """Exact evaluation of grid_sample, the integer model's own arithmetic
    (:mod:`qatkit.grid_sample_rule`): ``fq(fl64(sum_i w_i * q_i) * s_in)``."""
    p = grid_sample_call(mod, args, kwargs)
    in_fq, fq = links.get("input"), mod.activation_post_process
    grid = exact_grid(p["grid"], links.get("grid"))
    if not isinstance(in_fq, FakeQuantize) or not in_fq.has_scale or in_fq.is_per_channel:
        values, s_in = exact_grid(p["input"], in_fq), 1.0
    else:
        s_in = in_fq.scale.detach().reshape(()).to(torch.float64)
        values = grid_int(p["input"], in_fq.scale.reshape(())).to(torch.float64)
    acc = sample_grid(values, grid, p["mode"], p["padding_mode"], p["align_corners"],
                      p["normalized"])
    return _quantize(fq, acc * s_in).float()


_NORM_KINDS = frozenset({"layer_norm", "group_norm", "batch_norm"})


def _norm_float64(mod: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """The forward of a norm module with its parameters in float64 (exact evaluation), or None
    where exact evaluation does not apply (a BatchNorm using batch statistics)."""
    def d(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().double()

    if isinstance(mod, nn.LayerNorm):
        return lambda x: F.layer_norm(x, mod.normalized_shape, d(mod.weight), d(mod.bias),
                                      mod.eps)
    if isinstance(mod, nn.GroupNorm):
        return lambda x: F.group_norm(x, mod.num_groups, d(mod.weight), d(mod.bias), mod.eps)
    if (isinstance(mod, nn.modules.batchnorm._BatchNorm) and not mod.training
            and mod.running_mean is not None):
        return lambda x: F.batch_norm(x, d(mod.running_mean), d(mod.running_var), d(mod.weight),
                                      d(mod.bias), False, 0.0, mod.eps)
    return None


class ExactInputs:
    """Mixin: prepare links the fake quants of a module's inputs for exact evaluation (and the
    bias grid of conv / linear), per call site for a module called at several places."""

    def link_exact_inputs(self, fqs: dict[str, nn.Module], call_site: int | None = None) -> None:
        """``fqs``: argument name (as the annotation binds it: ``"input"``, ``"other"``,
        ``"tensors.1"``) -> the fake quant that made it, for the module's call ``call_site``
        (None: a module called once; prepare passes ``call_site=k`` to the k-th call of a
        module called several times).  prepare links them from the quantization annotation.
        A plain reference: ``state_dict`` is unchanged.

        Example::

            >>> add.link_exact_inputs({"input": fq_a, "other": fq_b})
        """
        store = dict(self.__dict__.get("_exact_input_fqs", {}))
        store[call_site] = dict(fqs)
        object.__setattr__(self, "_exact_input_fqs", store)

    def exact_links(self, call_site: int | None = None) -> dict[str, nn.Module]:
        """The linked input fake quants of call ``call_site`` (see :meth:`link_exact_inputs`).

        Example::

            >>> conv.exact_links()["input"] is qat_model.x_quant.activation_post_process
            True
        """
        return self.__dict__.get("_exact_input_fqs", {}).get(call_site, {})


class QuantStub(AnnotatedOp, nn.Module):
    """Quantize a float tensor with its own fake quant (non-tensors pass through).

    Example::

        >>> stub = QuantStub(qatkit.FakeQuantize.with_args(
        ...     observer=qatkit.FixedScaleObserver, scale=1 / 128)())
        >>> stub(torch.tensor([0.5]))
        tensor([0.5000])
    """

    _qatkit_leaf = True
    qatkit_op_kind = "quant_stub"

    def __init__(self, activation_post_process: FakeQuantize | None) -> None:
        super().__init__()
        self.activation_post_process = activation_post_process

    def forward(self, x: Any, call_site: int | None = None) -> Any:
        return _quantize(self.activation_post_process, x)

    def float_forward(self, x: Any) -> Any:
        """The op without its fake quant: the identity."""
        return x


class FunctionalOp(ExactInputs, AnnotatedOp, nn.Module):
    """A functional op as a named module that fake-quantizes its output.

    Args:
        op: the op kind (``"add"``, ``"cat"``, ``"matmul"``...), used by convert and reports.
        fn: the function called (``operator.add``, ``torch.cat``, ``torch.Tensor.mean``...).
        activation_post_process: the output fake quant, ``None`` for a float output.

    Example::

        >>> add = FunctionalOp("add", operator.add, qatkit.FakeQuantize())
        >>> add(torch.ones(2), torch.ones(2))
        tensor([2., 2.])
    """

    _qatkit_leaf = True

    def __init__(self, op: str, fn: Callable, activation_post_process: FakeQuantize | None) -> None:
        super().__init__()
        self.op = op
        self.fn = fn
        self.activation_post_process = activation_post_process

    @property
    def qatkit_op_kind(self) -> str:  # type: ignore[override]
        return self.op

    @property
    def qatkit_signature(self) -> tuple[str, ...]:  # type: ignore[override]
        return signature_names(self.fn, self.op)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _call_quantized(self, self.op, self.fn, args, kwargs)

    def float_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The op without its output fake quant: ``fn(*args, **kwargs)``."""
        return self.fn(*args, **kwargs)

    def _get_name(self) -> str:
        return f"FunctionalOp[{self.op}]"

    def extra_repr(self) -> str:
        return f"op={self.op}, fn={getattr(self.fn, '__name__', self.fn)}"


class Divide(FunctionalOp):
    """``input / other`` as an NPU computes it.

    * ``other`` a tensor of the model (an activation): ``input * rq(1 / other)`` -- the
      reciprocal through a lookup table, quantized by ``reciprocal_post_process`` (its own
      scale, calibrated like any activation), then an integer multiply;
    * ``other`` a constant (a number, a buffer or parameter): a multiply by the constant's
      reciprocal, done exactly by the integer model (``M = s_in / (c * s_out)``).

    Args:
        fn: the division called (``operator.truediv``, ``torch.div``...).
        activation_post_process: the output fake quant.
        reciprocal_post_process: the fake quant of ``1 / other`` (None: constant divisors).

    Example::

        >>> div = Divide(operator.truediv, qatkit.FakeQuantize(), qatkit.FakeQuantize())
        >>> div(torch.tensor([1.0, 2.0]), torch.tensor([4.0, 4.0])).shape
        torch.Size([2])
    """

    def __init__(self, fn: Callable, activation_post_process: FakeQuantize | None,
                 reciprocal_post_process: FakeQuantize | None = None) -> None:
        super().__init__("div", fn, activation_post_process)
        self.reciprocal_post_process = reciprocal_post_process

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call_site = kwargs.pop("call_site", None)
        bound = bind_arguments(self.qatkit_signature, args, kwargs)
        x, y = bound["input"], bound["other"]
        fq, rfq = self.activation_post_process, self.reciprocal_post_process
        exact = evaluates_exactly(fq)
        links = self.exact_links(call_site)
        if rfq is not None and isinstance(y, Tensor):
            r = rfq(torch.reciprocal(y))  # in y's float32, as the lookup table evaluates it
            if exact:
                out = _quantize(fq, exact_grid(x, links.get("input")) * exact_grid(r, rfq))
                return out.float() if isinstance(out, Tensor) else out
            return _quantize(fq, x * r)
        if exact:
            out = _quantize(fq, exact_grid(x, links.get("input")) / (
                y.double() if isinstance(y, Tensor) else y))
            return out.float() if isinstance(out, Tensor) else out
        return _quantize(fq, x / y)

    def float_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The float division (no fake quant at all)."""
        return self.fn(*args, **kwargs)


class OutputQuantMixin(ExactInputs, AnnotatedOp):
    """Mixed into a float module class: fake-quantize the float forward's output.

    Example::

        >>> qsig = output_quantized(nn.Sigmoid(), qatkit.FakeQuantize())
        >>> isinstance(qsig, OutputQuantMixin) and isinstance(qsig, nn.Sigmoid)
        True
    """

    _qatkit_leaf = True
    qatkit_op_kind = ""  # the op kind (OUTPUT_QUANTIZED_MODULES), set on each generated class
    activation_post_process: FakeQuantize | None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The float module's forward, output fake-quantized (``call_site``: see
        :meth:`link_exact_inputs`)."""
        fn = super().forward
        if self.qatkit_op_kind in _NORM_KINDS and evaluates_exactly(
                self.activation_post_process):
            fn = _norm_float64(self) or fn  # float64 parameters for a float64 input
        return _call_quantized(self, self.qatkit_op_kind, fn, args, kwargs)

    def float_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The float module's own forward, without the output fake quant."""
        return super().forward(*args, **kwargs)


#: float module classes whose outputs qatkit quantizes, and the op kind of each
OUTPUT_QUANTIZED_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh", nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "prelu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Hardsigmoid: "hardsigmoid",
    nn.Hardswish: "hardswish", nn.SiLU: "silu", nn.GELU: "gelu", nn.Mish: "mish",
    nn.ELU: "elu", nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax",
    nn.LayerNorm: "layer_norm", nn.GroupNorm: "group_norm",
    nn.BatchNorm1d: "batch_norm", nn.BatchNorm2d: "batch_norm", nn.BatchNorm3d: "batch_norm",
    nn.AvgPool1d: "avg_pool", nn.AvgPool2d: "avg_pool", nn.AvgPool3d: "avg_pool",
    nn.AdaptiveAvgPool1d: "adaptive_avg_pool", nn.AdaptiveAvgPool2d: "adaptive_avg_pool",
    nn.AdaptiveAvgPool3d: "adaptive_avg_pool", nn.Upsample: "interpolate",
    nn.UpsamplingNearest2d: "interpolate", nn.UpsamplingBilinear2d: "interpolate",
    GridSample: "grid_sample",
}

_QAT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}
for _float_cls in OUTPUT_QUANTIZED_MODULES:
    _cls = type(_float_cls.__name__, (OutputQuantMixin, _float_cls),
                {"__module__": __name__,
                 "qatkit_op_kind": OUTPUT_QUANTIZED_MODULES[_float_cls],
                 # forward's parameters, without self
                 "qatkit_signature": module_signature(_float_cls.forward)[1:] or ("input",)})
    _cls.__qualname__ = _float_cls.__name__
    _QAT_CLASSES[_float_cls] = _cls
    globals()[_float_cls.__name__] = _cls
    __all__.append(_float_cls.__name__)
del _float_cls, _cls


def output_quantized(mod: nn.Module, activation_post_process: FakeQuantize | None) -> nn.Module:
    """The output-quantized QAT version of float module ``mod`` (shares its parameters).

    In-place activations become out-of-place (a fake-quantized tensor must not be mutated).

    Raises:
        ValueError: ``type(mod)`` is not in :data:`OUTPUT_QUANTIZED_MODULES`.

    Example::

        >>> qrelu = output_quantized(nn.ReLU(inplace=True), qatkit.FakeQuantize())
    """
    cls = _QAT_CLASSES.get(type(mod))
    if cls is None:
        raise ValueError(
            f"no output-quantized QAT version of {type(mod).__name__}; supported: "
            f"{sorted(c.__name__ for c in OUTPUT_QUANTIZED_MODULES)}"
        )
    new = cls.__new__(cls)
    new.__dict__.update(mod.__dict__)
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        if key in mod.__dict__:
            new.__dict__[key] = type(mod.__dict__[key])(mod.__dict__[key])
    if getattr(new, "inplace", False):
        new.inplace = False
    new.activation_post_process = activation_post_process
    return new
