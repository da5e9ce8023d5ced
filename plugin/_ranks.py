"""The process group each observer reduces over, and the per-batch min / max reduction.

The part of :mod:`qatkit.distributed` that observers call on every batch, below them: which
``torch.distributed`` group an observer belongs to (:func:`group_of`, set by
:func:`qatkit.distributed.set_observer_group`), whether that group has several ranks
(:func:`is_distributed`), and the ``MIN`` / ``MAX`` all-reduce of a batch's range
(:func:`reduce_range`).  Synchronizing whole observers (histograms, counts) is
:mod:`qatkit.distributed`'s, above the observers.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["is_distributed", "group_of", "set_group_of", "reduce_range"]

# observer -> the process group it reduces over (default group when absent); kept beside the
# observers because process groups cannot be copied or pickled with a model
_GROUPS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def is_distributed(group: Any = None) -> bool:
    """True when a torch.distributed process group with more than one rank is initialized.

    Example::

        >>> is_distributed()          # a single process
        False
    """
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized()
                and dist.get_world_size(group) > 1)


def group_of(observer: nn.Module) -> Any:
    """The process group ``observer`` reduces over (None: the default group).

    Example::

        >>> group_of(qat_model.conv1.activation_post_process.observer) is None
        True
    """
    return _GROUPS.get(observer)


def set_group_of(observer: nn.Module, group: Any) -> None:
    """Make ``observer`` reduce over ``group`` (None: the default group).

    Example::

        >>> set_group_of(observer, torch.distributed.new_group([0, 1]))
    """
    if group is None:
        _GROUPS.pop(observer, None)
    else:
        _GROUPS[observer] = group


def reduce_range(bmin: Tensor, bmax: Tensor, group: Any = None) -> tuple[Tensor, Tensor]:
    """The element-wise min of ``bmin`` and max of ``bmax`` over the ranks of ``group``.

    Example::

        >>> bmin, bmax = reduce_range(torch.tensor([-1.0]), torch.tensor([2.0]))
    """
    both = torch.cat([bmin.reshape(-1), -bmax.reshape(-1)]).to(torch.float32)
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MIN, group=group)
    n = bmin.numel()
    return both[:n].reshape(bmin.shape), (-both[n:]).reshape(bmax.shape)
