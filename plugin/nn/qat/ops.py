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

from torch import Tensor, nn

from ...fake_quantize import FakeQuantize

__all__ = ["QuantStub", "FunctionalOp", "output_quantized", "OUTPUT_QUANTIZED_MODULES",
           "OutputQuantMixin"]


def _quantize(fq: FakeQuantize | None, out: Any) -> Any:
    if fq is None or not isinstance(out, Tensor) or not out.is_floating_point():
        return out
    return fq(out)


class QuantStub(nn.Module):
    """Quantize a float tensor with its own fake quant (non-tensors pass through).

    Example::

        >>> stub = QuantStub(qatkit.FakeQuantize.with_args(
        ...     observer=qatkit.FixedScaleObserver, scale=1 / 128)())
        >>> stub(torch.tensor([0.5]))
        tensor([0.5000])
    """

    _qatkit_leaf = True

    def __init__(self, activation_post_process: FakeQuantize | None) -> None:
        super().__init__()
        self.activation_post_process = activation_post_process

    def forward(self, x: Any) -> Any:
        return _quantize(self.activation_post_process, x)


class FunctionalOp(nn.Module):
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

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _quantize(self.activation_post_process, self.fn(*args, **kwargs))

    def _get_name(self) -> str:
        return f"FunctionalOp[{self.op}]"

    def extra_repr(self) -> str:
        return f"op={self.op}, fn={getattr(self.fn, '__name__', self.fn)}"


class OutputQuantMixin:
    """Mixed into a float module class: fake-quantize the float forward's output.

    Example::

        >>> qsig = output_quantized(nn.Sigmoid(), qatkit.FakeQuantize())
        >>> isinstance(qsig, OutputQuantMixin) and isinstance(qsig, nn.Sigmoid)
        True
    """

    _qatkit_leaf = True
    activation_post_process: FakeQuantize | None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _quantize(self.activation_post_process, super().forward(*args, **kwargs))


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
}

_QAT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}
for _float_cls in OUTPUT_QUANTIZED_MODULES:
    _cls = type(_float_cls.__name__, (OutputQuantMixin, _float_cls), {"__module__": __name__})
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
