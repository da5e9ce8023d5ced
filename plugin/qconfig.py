"""QConfig: how a layer's output activation and its weight are fake-quantized.

The named qconfigs mirror the ones NPU toolchain docs tell users to copy:

=============================================================  ==================  ==========
qconfig                                                        activation          weight
=============================================================  ==================  ==========
default_qat_8bit_fake_quant_qconfig                            qint8, moving avg   qint8/ch
default_qat_8bit_out_fake_quant_qconfig (last layer, int8 out) qint8, moving avg   qint8/ch
default_calib_8bit_fake_quant_qconfig                          qint8, MSE          qint8/ch
default_calib_8bit_out_fake_quant_qconfig                      qint8, MSE          qint8/ch
default_qat_8bit_lsq_quant_qconfig                             qint8, LSQ          qint8/ch LSQ
default_qat_8bit_weight_32bit_out_fake_quant_qconfig           none (32-bit out)   qint8/ch
default_calib_8bit_weight_32bit_out_fake_quant_qconfig         none (32-bit out)   qint8/ch
default_qat_8bit_weight_16bit_act_fake_quant_qconfig           qint16, moving avg  qint8/ch
default_calib_8bit_weight_16bit_act_fake_quant_qconfig         qint16, MSE         qint8/ch
default_qat_16bit_fake_quant_qconfig                           qint16, moving avg  qint16/ch
default_calib_16bit_fake_quant_qconfig                         qint16, MSE         qint16/ch
default_qat_4bit_weight_8bit_act_fake_quant_qconfig            qint8, moving avg   qint4/ch
default_calib_4bit_weight_8bit_act_fake_quant_qconfig          qint8, MSE          qint4/ch
=============================================================  ==================  ==========

Weights are always per output channel (``ch_axis=0``; prepare switches ConvTranspose to
axis 1) with the min/max of the current weight (``averaging_constant=1``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ._deprecation import deprecated_aliases
from .fake_quantize import FakeQuantize, LSQFakeQuantize
from .observers import OBSERVERS, MinMaxObserver, MovingAverageMinMaxObserver, dtype_to_bits

__all__ = [
    "QConfig",
    "get_default_qconfig",
    "FAKE_QUANTS",
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
]

#: old spellings, for one release (qatkit._deprecation)
__getattr__ = deprecated_aliases(__name__, {
    "default_qat_out_8bit_fake_quant_qconfig":
        "qatkit.qconfig.default_qat_8bit_out_fake_quant_qconfig",
    "default_calib_out_8bit_fake_quant_qconfig":
        "qatkit.qconfig.default_calib_8bit_out_fake_quant_qconfig",
})

FakeQuantFactory = Callable[[], FakeQuantize]

#: fake-quant names accepted by :func:`get_default_qconfig`
FAKE_QUANTS: dict[str, type[FakeQuantize]] = {"fake_quant": FakeQuantize, "lsq": LSQFakeQuantize}


@dataclasses.dataclass(frozen=True)
class QConfig:
    """Fake-quant factories for a layer's output activation and its weight.

    Args:
        activation: builds the output fake quant; ``None`` leaves the output unquantized
            (high-precision 32-bit output, e.g. for a model's last conv/linear).
        weight: builds the weight fake quant; ``None`` leaves weights float.

    Example::

        >>> qc = QConfig(activation=FakeQuantize.with_args(dtype="qint16"),
        ...              weight=FakeQuantize.with_args(ch_axis=0))
    """

    activation: FakeQuantFactory | None
    weight: FakeQuantFactory | None

    def __post_init__(self) -> None:
        for field in ("activation", "weight"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                raise ValueError(
                    f"QConfig.{field} must be a factory such as FakeQuantize.with_args(...) "
                    f"or None, got {value!r}"
                )
            if isinstance(value, FakeQuantize):
                raise ValueError(
                    f"QConfig.{field} got a FakeQuantize instance; pass a factory so each "
                    "layer gets its own: FakeQuantize.with_args(...)"
                )


def _choice(kind: str, value: str, table: dict[str, Any]) -> Any:
    if value not in table:
        raise ValueError(f"unknown {kind} {value!r}: choose one of {sorted(table)}")
    return table[value]


def get_default_qconfig(
    activation_fake_quant: str | None = "fake_quant",
    weight_fake_quant: str | None = "fake_quant",
    activation_observer: str = "min_max",
    weight_observer: str = "min_max",
    activation_qkwargs: dict[str, Any] | None = None,
    weight_qkwargs: dict[str, Any] | None = None,
) -> QConfig:
    """Build a QConfig from names.

    Args:
        activation_fake_quant: ``"fake_quant"``, ``"lsq"``, or ``None`` for a 32-bit output.
        weight_fake_quant: ``"fake_quant"``, ``"lsq"`` or ``None`` (float weights).
        activation_observer: one of ``"min_max"``, ``"moving_average"``, ``"percentile"``,
            ``"mse"``, ``"kl"``, ``"fixed_scale"``.
        weight_observer: same choices; weights are per output channel (``ch_axis=0``), and
            ``"min_max"``/``"moving_average"`` always use the current weight's range.
        activation_qkwargs: extra arguments of the activation fake quant and its observer,
            e.g. ``{"dtype": "qint16"}``, ``{"percentile": 99.9}``, ``{"scale": 1/128}``.
        weight_qkwargs: same for the weight (e.g. ``{"dtype": "qint16"}``).

    Raises:
        ValueError: an unknown name, a dtype other than qint8/qint16, a bad observer argument.

    Example::

        >>> qc = get_default_qconfig(activation_observer="percentile",
        ...                          activation_qkwargs={"percentile": 99.99})
    """
    activation = _factory("activation", activation_fake_quant, activation_observer,
                          activation_qkwargs, default_ch_axis=None)
    weight = _factory("weight", weight_fake_quant, weight_observer, weight_qkwargs,
                      default_ch_axis=0)
    return QConfig(activation=activation, weight=weight)


def _factory(role: str, fake_quant: str | None, observer: str, qkwargs: dict[str, Any] | None,
             default_ch_axis: int | None) -> FakeQuantFactory | None:
    if fake_quant is None:
        return None
    fq_cls = _choice(f"{role}_fake_quant", fake_quant, FAKE_QUANTS)
    obs_cls = _choice(f"{role}_observer", observer, OBSERVERS)
    kwargs: dict[str, Any] = {"ch_axis": default_ch_axis}
    if role == "weight" and obs_cls in (MinMaxObserver, MovingAverageMinMaxObserver):
        # Weights change during QAT: their range is always the current weight's.
        obs_cls = MovingAverageMinMaxObserver
        kwargs["averaging_constant"] = 1.0
    kwargs.update(qkwargs or {})
    dtype_to_bits(kwargs.get("dtype", "qint8"))  # validate now, not at prepare time
    factory = fq_cls.with_args(observer=obs_cls, **kwargs)
    try:
        factory()  # validate observer arguments now, where the user can see them
    except TypeError as e:
        raise ValueError(f"bad {role}_qkwargs {qkwargs!r} for {obs_cls.__name__}: {e}") from e
    return factory


default_qat_8bit_fake_quant_qconfig = get_default_qconfig(
    activation_observer="moving_average")
default_qat_8bit_out_fake_quant_qconfig = get_default_qconfig(
    activation_observer="moving_average")
default_calib_8bit_fake_quant_qconfig = get_default_qconfig(
    activation_observer="mse")
default_calib_8bit_out_fake_quant_qconfig = get_default_qconfig(
    activation_observer="mse")
default_qat_8bit_lsq_quant_qconfig = get_default_qconfig(
    activation_fake_quant="lsq", weight_fake_quant="lsq",
    activation_observer="moving_average")
default_qat_8bit_weight_32bit_out_fake_quant_qconfig = get_default_qconfig(
    activation_fake_quant=None)
default_calib_8bit_weight_32bit_out_fake_quant_qconfig = get_default_qconfig(
    activation_fake_quant=None)
default_qat_8bit_weight_16bit_act_fake_quant_qconfig = get_default_qconfig(
    activation_observer="moving_average",
    activation_qkwargs={"dtype": "qint16"})
default_calib_8bit_weight_16bit_act_fake_quant_qconfig = get_default_qconfig(
    activation_observer="mse",
    activation_qkwargs={"dtype": "qint16"})
default_qat_16bit_fake_quant_qconfig = get_default_qconfig(
    activation_observer="moving_average",
    activation_qkwargs={"dtype": "qint16"}, weight_qkwargs={"dtype": "qint16"})
default_calib_16bit_fake_quant_qconfig = get_default_qconfig(
    activation_observer="mse",
    activation_qkwargs={"dtype": "qint16"}, weight_qkwargs={"dtype": "qint16"})
default_qat_4bit_weight_8bit_act_fake_quant_qconfig = get_default_qconfig(
    activation_observer="moving_average", weight_qkwargs={"dtype": "qint4"})
default_calib_4bit_weight_8bit_act_fake_quant_qconfig = get_default_qconfig(
    activation_observer="mse", weight_qkwargs={"dtype": "qint4"})
