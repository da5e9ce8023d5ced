"""QAT convolutions (1d/2d/3d, transposed 1d/2d) that fuse BatchNorm, add and ReLU/ReLU6.

Each class subclasses its float ``torch.nn`` class, so ``weight``/``bias`` keep their
state_dict names and padding modes work; what is fused is configuration (``bn``,
``with_add``, ``act``), shown by the module's repr (``ConvBnAddReLU2d``...).  The numerics
are in :class:`qatkit.nn.qat.FusedMixin`.  :func:`from_float` builds the QAT module of any float
module listed in :data:`FLOAT_TO_QAT`.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ._fused import FusedMixin
from .linear import Linear

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "FLOAT_TO_QAT",
    "from_float",
]


class _ConvNd(FusedMixin):
    _KIND = "Conv"
    _OUT_AXIS = 0

    @classmethod
    def _init_kwargs(cls, mod: nn.Module) -> dict[str, Any]:
        return dict(in_channels=mod.in_channels, out_channels=mod.out_channels,
                    kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding,
                    dilation=mod.dilation, groups=mod.groups, padding_mode=mod.padding_mode)

    def weighted_op(self, x: Tensor, weight: Tensor, bias: Tensor | None,
                    output_size: list[int] | None = None) -> Tensor:
        return self._conv_forward(x, weight, bias)

    def forward(self, input: Tensor, other: Tensor | None = None, *,
                call_site: int | None = None) -> Tensor:
        """``act(bn(conv(input)) [+ other])``, fake-quantized; ``other`` iff ``with_add``;
        ``call_site``: which call of a module called at several places (prepare sets it)."""
        return self._fused_forward(input, other, None, call_site)


class _ConvTransposeNd(FusedMixin):
    _KIND = "ConvTranspose"
    _OUT_AXIS = 1  # weight is [in, out / groups, *kernel]

    @classmethod
    def _init_kwargs(cls, mod: nn.Module) -> dict[str, Any]:
        return dict(in_channels=mod.in_channels, out_channels=mod.out_channels,
                    kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding,
                    output_padding=mod.output_padding, groups=mod.groups,
                    dilation=mod.dilation, padding_mode=mod.padding_mode)

    def _scale_weight(self, weight: Tensor, sf: Tensor) -> Tensor:
        # output channel o = g * (out / groups) + j lives at weight[block g of inputs, j]
        # (static shapes: no tensor.shape, so that the module stays FX-traceable)
        g, k = self.groups, tuple(self.kernel_size)
        opg = self.out_channels // g
        grouped = weight.reshape((g, self.in_channels // g, opg) + k)
        scaled = grouped * sf.reshape((g, 1, opg) + (1,) * len(k))
        return scaled.reshape((self.in_channels, opg) + k)

    def weighted_op(self, x: Tensor, weight: Tensor, bias: Tensor | None,
                    output_size: list[int] | None = None) -> Tensor:
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size,
            len(self.kernel_size), self.dilation)
        return self._CONV_FN(x, weight, bias, self.stride, self.padding, output_padding,
                             self.groups, self.dilation)

    def forward(self, input: Tensor, other: Tensor | None = None,
                output_size: list[int] | None = None, *,
                call_site: int | None = None) -> Tensor:
        """``act(bn(conv_transpose(input, output_size)) [+ other])``, fake-quantized."""
        return self._fused_forward(input, other, output_size, call_site)


class Conv1d(_ConvNd, nn.Conv1d):
    """QAT ``nn.Conv1d``, optionally fused with BatchNorm1d, an add and ReLU/ReLU6.

    Args:
        *args, **kwargs: those of ``nn.Conv1d``.
        qconfig: a :class:`qatkit.QConfig` (output and weight fake quants).
        bn: the ``nn.BatchNorm1d`` to fuse, kept as the child ``bn``.
        act: ``None``, ``"relu"`` or ``"relu6"``.
        add: fuse a residual add: ``forward(x, other)``.

    Example::

        >>> m = Conv1d.from_float(nn.Conv1d(4, 8, 3), qatkit.default_qat_8bit_fake_quant_qconfig,
        ...                       bn=nn.BatchNorm1d(8), act="relu")
        >>> m.fused_name
        'ConvBnReLU1d'
    """

    _FLOAT_MODULE = nn.Conv1d
    _BN_MODULE = nn.BatchNorm1d
    _SUFFIX = "1d"


class Conv2d(_ConvNd, nn.Conv2d):
    """QAT ``nn.Conv2d``, optionally fused with BatchNorm2d, an add and ReLU/ReLU6.

    Args:
        *args, **kwargs: those of ``nn.Conv2d``.
        qconfig: a :class:`qatkit.QConfig` (output and weight fake quants).
        bn: the ``nn.BatchNorm2d`` to fuse, kept as the child ``bn``.
        act: ``None``, ``"relu"`` or ``"relu6"``.
        add: fuse a residual add: ``forward(x, other)``.

    Example::

        >>> m = Conv2d.from_float(conv, qatkit.default_qat_8bit_fake_quant_qconfig,
        ...                       bn=bn, act="relu", add=True)
        >>> m.fused_name
        'ConvBnAddReLU2d'
        >>> y = m(x, identity)
    """

    _FLOAT_MODULE = nn.Conv2d
    _BN_MODULE = nn.BatchNorm2d
    _SUFFIX = "2d"


class Conv3d(_ConvNd, nn.Conv3d):
    """QAT ``nn.Conv3d``, optionally fused with BatchNorm3d, an add and ReLU/ReLU6.

    Args:
        *args, **kwargs: those of ``nn.Conv3d``.
        qconfig: a :class:`qatkit.QConfig` (output and weight fake quants).
        bn: the ``nn.BatchNorm3d`` to fuse, kept as the child ``bn``.
        act: ``None``, ``"relu"`` or ``"relu6"``.
        add: fuse a residual add: ``forward(x, other)``.

    Example::

        >>> m = Conv3d.from_float(nn.Conv3d(2, 4, 3), qatkit.default_qat_8bit_fake_quant_qconfig)
        >>> m.fused_name
        'Conv3d'
    """

    _FLOAT_MODULE = nn.Conv3d
    _BN_MODULE = nn.BatchNorm3d
    _SUFFIX = "3d"


class ConvTranspose1d(_ConvTransposeNd, nn.ConvTranspose1d):
    """QAT ``nn.ConvTranspose1d``, optionally fused with BatchNorm1d, an add and ReLU/ReLU6.

    The weight fake quant is per channel on axis 1 (the weight's output-channel axis).

    Args:
        *args, **kwargs: those of ``nn.ConvTranspose1d``.
        qconfig: a :class:`qatkit.QConfig` (output and weight fake quants).
        bn: the ``nn.BatchNorm1d`` to fuse, kept as the child ``bn``.
        act: ``None``, ``"relu"`` or ``"relu6"``.
        add: fuse a residual add: ``forward(x, other)``.

    Example::

        >>> m = ConvTranspose1d.from_float(nn.ConvTranspose1d(4, 8, 2, stride=2),
        ...                                qatkit.default_qat_8bit_fake_quant_qconfig, act="relu6")
        >>> m.fused_name
        'ConvTransposeReLU61d'
    """

    _FLOAT_MODULE = nn.ConvTranspose1d
    _BN_MODULE = nn.BatchNorm1d
    _SUFFIX = "1d"
    _CONV_FN = staticmethod(F.conv_transpose1d)


class ConvTranspose2d(_ConvTransposeNd, nn.ConvTranspose2d):
    """QAT ``nn.ConvTranspose2d``, optionally fused with BatchNorm2d, an add and ReLU/ReLU6.

    The weight fake quant is per channel on axis 1 (the weight's output-channel axis).

    Args:
        *args, **kwargs: those of ``nn.ConvTranspose2d``.
        qconfig: a :class:`qatkit.QConfig` (output and weight fake quants).
        bn: the ``nn.BatchNorm2d`` to fuse, kept as the child ``bn``.
        act: ``None``, ``"relu"`` or ``"relu6"``.
        add: fuse a residual add: ``forward(x, other)``.

    Example::

        >>> m = ConvTranspose2d.from_float(deconv, qatkit.default_qat_8bit_fake_quant_qconfig,
        ...                                bn=bn, act="relu")
        >>> m.fused_name
        'ConvTransposeBnReLU2d'
    """

    _FLOAT_MODULE = nn.ConvTranspose2d
    _BN_MODULE = nn.BatchNorm2d
    _SUFFIX = "2d"
    _CONV_FN = staticmethod(F.conv_transpose2d)


#: float module type -> its QAT module (exact types: subclasses are not matched)
FLOAT_TO_QAT: dict[type[nn.Module], type[FusedMixin]] = {
    nn.Conv1d: Conv1d,
    nn.Conv2d: Conv2d,
    nn.Conv3d: Conv3d,
    nn.ConvTranspose1d: ConvTranspose1d,
    nn.ConvTranspose2d: ConvTranspose2d,
    nn.Linear: Linear,
}


def from_float(mod: nn.Module, qconfig: Any, bn: nn.Module | None = None,
               act: str | None = None, add: bool = False, *,
               mapping: dict[type[nn.Module], type[FusedMixin]] | None = None) -> nn.Module:
    """Build the QAT module of a float conv/linear, fusing ``bn``, an add and ``act``.

    The QAT module shares ``mod``'s parameters and ``bn`` (no copy).

    Args:
        mod: a float module whose exact type is a key of ``mapping``.
        qconfig: a :class:`qatkit.QConfig`.
        bn: the float BatchNorm following ``mod``, or ``None``.
        act: ``None``, ``"relu"`` or ``"relu6"``.
        add: fuse a residual add (the module then takes ``forward(x, other)``).
        mapping: float type -> QAT class; default :data:`FLOAT_TO_QAT`.

    Raises:
        ValueError: an unsupported module type, a BatchNorm that does not match, or an
            unknown activation.

    Example::

        >>> qlin = from_float(nn.Linear(16, 8), qatkit.default_qat_8bit_fake_quant_qconfig,
        ...                   act="relu")
        >>> qlin
        LinearReLU(in_features=16, out_features=8, bias=True ...)
    """
    mapping = FLOAT_TO_QAT if mapping is None else mapping
    qat_cls = mapping.get(type(mod))
    if qat_cls is None:
        supported = ", ".join(t.__name__ for t in mapping)
        raise ValueError(
            f"no QAT module for {type(mod).__name__}: supported float types are {supported} "
            "(exact types; register a subclass in the mapping, or leave the layer float)"
        )
    return qat_cls.from_float(mod, qconfig, bn=bn, act=act, add=add)
