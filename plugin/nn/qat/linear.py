"""QAT ``nn.Linear`` that fuses, by configuration, a BatchNorm1d, an add and ReLU/ReLU6.

The numerics (BN folding, fake quantization) are shared with the convolutions, in
:class:`qatkit.nn.qat.FusedMixin`.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ._fused import FusedMixin

__all__ = ["Linear"]


class Linear(FusedMixin, nn.Linear):
    """QAT ``nn.Linear``, optionally fused with BatchNorm1d, an add and ReLU/ReLU6.

    The repr shows the fused kind: ``Linear``, ``LinearReLU``, ``LinearBn1d``,
    ``LinearBnReLU1d``, ``LinearAddReLU``...

    Args:
        *args, **kwargs: those of ``nn.Linear``.
        qconfig: a :class:`qatkit.QConfig` (output and weight fake quants).
        bn: the ``nn.BatchNorm1d`` over the output features to fuse (input ``[N, in]``).
        act: ``None``, ``"relu"`` or ``"relu6"``.
        add: fuse a residual add: ``forward(x, other)``.

    Example::

        >>> m = Linear.from_float(nn.Linear(16, 8), qatkit.default_qat_8bit_fake_quant_qconfig,
        ...                       bn=nn.BatchNorm1d(8))
        >>> m.fused_name
        'LinearBn1d'
        >>> m(torch.randn(4, 16)).shape
        torch.Size([4, 8])
    """

    _FLOAT_MODULE = nn.Linear
    _BN_MODULE = nn.BatchNorm1d
    _KIND = "Linear"
    _SUFFIX = ""
    _OUT_AXIS = 0

    @classmethod
    def _init_kwargs(cls, mod: nn.Module) -> dict[str, Any]:
        return dict(in_features=mod.in_features, out_features=mod.out_features)

    def weighted_op(self, x: Tensor, weight: Tensor, bias: Tensor | None,
                    output_size: list[int] | None = None) -> Tensor:
        return F.linear(x, weight, bias)

    def forward(self, input: Tensor, other: Tensor | None = None, *,
                call_site: int | None = None) -> Tensor:
        """``act(bn(linear(input)) [+ other])``, fake-quantized; ``other`` iff ``with_add``;
        ``call_site``: which call of a module called at several places (prepare sets it)."""
        return self._fused_forward(input, other, None, call_site)
