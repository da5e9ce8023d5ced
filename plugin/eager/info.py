"""What an eager-prepared (or converted) model carries: its :class:`EagerInfo`, and the note
of each module kept float.

Read by every part of eager mode (prepare, the annotated trace, convert) and written by
prepare / convert, so it sits below them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

__all__ = ["EagerInfo", "EAGER_ATTR", "FLOAT_NOTE_ATTR", "eager_info", "is_eager_model"]

#: where a prepared / converted eager model keeps its :class:`EagerInfo`
EAGER_ATTR = "_qatkit_eager"
#: attribute of a module kept float: why (the annotation's ``note``)
FLOAT_NOTE_ATTR = "qatkit_float_note"


@dataclasses.dataclass
class EagerInfo:
    """What an eager-prepared model remembers (a plain attribute, not in ``state_dict``).

    Attributes:
        trace_args: keyword arguments of :func:`qatkit.fx.symbolic_trace` for this model
            (``concrete_args``, ``leaf_modules``, ``leaf_module_names``,
            ``wrapped_functions``), from ``prepare_custom_config_dict``.
        hybrid: prepared with ``hybrid=True``.
        converted: made by :func:`qatkit.convert` (an integer model).

    Example::

        >>> qatkit.eager.eager_info(qat_model)
        EagerInfo(trace_args={...}, hybrid=True, converted=False)
    """

    trace_args: dict[str, Any]
    hybrid: bool = False
    converted: bool = False


def eager_info(model: nn.Module) -> EagerInfo | None:
    """The :class:`EagerInfo` of a model made by :func:`qatkit.prepare_qat` /
    :func:`qatkit.convert`, else None.

    Example::

        >>> eager_info(qatkit.prepare_qat(model, {"": qconfig})).converted
        False
    """
    info = model.__dict__.get(EAGER_ATTR)
    return info if isinstance(info, EagerInfo) else None


def is_eager_model(model: nn.Module) -> bool:
    """True for a model made by :func:`qatkit.prepare_qat` or :func:`qatkit.convert`.

    Example::

        >>> is_eager_model(qat_model), is_eager_model(float_model)
        (True, False)
    """
    return eager_info(model) is not None
