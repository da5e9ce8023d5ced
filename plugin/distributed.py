"""Observer statistics across ranks (torch.distributed): every rank ends with the same scales.

Under ``torch.distributed`` (DDP launched by ``torchrun``) each rank sees its own share of the
data.  qatkit makes every rank's observers hold the statistics of the *global* batch -- all
ranks' batches of one step together -- so the scales are identical on every rank and equal to
those of one process that ran the global batches:

* **every batch** (CALIBRATION and QAT), an observer reduces the batch's min / max across
  ranks (``MIN`` / ``MAX`` all-reduce, a few floats) before using them: min/max and
  moving-average observers then update exactly as one process would, and histogram observers
  set and grow their bin width identically on every rank;
* **leaving CALIBRATION** (``set_fake_quant_state`` / ``calibrate``, automatically when a process
  group with more than one rank is initialized; or :func:`sync_observers` explicitly), the
  histograms' counts and the non-finite counts observed since the last synchronization are
  summed across ranks, so Percentile, MSE and KL thresholds come from the global histogram.

The per-batch part, which the observers call, lives below them in :mod:`qatkit._ranks`
(re-exported here).  Weight observers are not synchronized (DDP keeps the weights identical
on every rank).  An observer whose ``distributed_sync`` is False is left alone.  All ranks
must run the same observers the same number of times, in the same order (as DDP requires of
its forwards).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._ranks import group_of, is_distributed, reduce_range, set_group_of
from .observers import ObserverBase

__all__ = ["is_distributed", "reduce_range", "sync_observers", "set_observer_group"]


def set_observer_group(model: nn.Module, group: Any) -> int:
    """Make every observer of ``model`` reduce over ``group`` (None: the default group).

    Example::

        >>> set_observer_group(qat_model, torch.distributed.new_group([0, 1]))
        42
    """
    count = 0
    for mod in model.modules():
        if isinstance(mod, ObserverBase):
            set_group_of(mod, group)
            count += 1
    return count


def _sum_since_last(buf: Tensor, snapshot: Tensor | None, group: Any) -> Tensor:
    """``snapshot + sum over ranks of (buf - snapshot)``: what was counted since the last
    synchronization, summed (a snapshot is already the global count)."""
    base = snapshot if snapshot is not None and snapshot.shape == buf.shape else torch.zeros_like(
        buf)
    delta = (buf - base).contiguous()
    torch.distributed.all_reduce(delta, group=group)
    return base + delta


def sync_observer(observer: nn.Module) -> bool:
    """Sum ``observer``'s histogram and non-finite count across ranks (the counts seen since
    its last synchronization), and reduce its min / max; True when anything was synchronized.
    A no-op outside a multi-rank process group or for an observer with
    ``distributed_sync=False``.

    Raises:
        RuntimeError: ranks disagree on the observer's shape (different models or channel
            counts), naming the observer's class.
    """
    group = group_of(observer)
    if not getattr(observer, "distributed_sync", True) or not is_distributed(group):
        return False
    dist = torch.distributed
    device = observer.min_val.device
    # agree on whether anyone saw data and on the channel count
    head = torch.tensor([observer.min_val.numel(), -observer.min_val.numel()],
                        dtype=torch.float64, device=device)
    dist.all_reduce(head, op=dist.ReduceOp.MAX, group=group)
    most, fewest = int(head[0]), -int(head[1])
    if most == 0:
        return False
    if most != fewest and fewest != 0:
        raise RuntimeError(f"{type(observer).__name__}: ranks hold {fewest} and {most} channels; "
                           "every rank must run the same model")
    if observer.min_val.numel() == 0:  # this rank saw nothing: neutral elements
        observer.min_val = torch.full((most,), float("inf"), device=device)
        observer.max_val = torch.full((most,), float("-inf"), device=device)
    observer.min_val, observer.max_val = reduce_range(observer.min_val, observer.max_val, group)
    snaps = observer.__dict__.setdefault("_qatkit_synced", {})
    count = observer.nonfinite_count.to(torch.float64).reshape(1)
    count = _sum_since_last(count, snaps.get("nonfinite_count"), group)
    snaps["nonfinite_count"] = count.clone()
    observer.nonfinite_count.fill_(int(count.item()))
    hist = getattr(observer, "histogram", None)
    if isinstance(hist, Tensor):
        shape = torch.tensor([hist.numel(), -hist.numel()], dtype=torch.float64, device=device)
        dist.all_reduce(shape, op=dist.ReduceOp.MAX, group=group)
        if int(shape[0]) != -int(shape[1]):
            raise RuntimeError(f"{type(observer).__name__}: ranks hold histograms of different "
                               "sizes; every rank must observe every batch (the bin widths are "
                               "aligned batch by batch)")
        if hist.numel():
            observer.histogram = _sum_since_last(hist, snaps.get("histogram"), group)
            snaps["histogram"] = observer.histogram.clone()
    return True


def sync_observers(model: nn.Module, group: Any = None) -> int:
    """Synchronize every observer of ``model`` across the ranks of ``group`` now.

    Leaving CALIBRATION does this automatically under a multi-rank process group; call it to
    synchronize at another moment or over another group (the group is remembered for the
    per-batch reductions too).  Every rank must call it.

    Args:
        model: a prepared model (or any module holding qatkit observers).
        group: a ``torch.distributed`` process group; None: the default group.

    Returns:
        how many observers were synchronized (0 outside a multi-rank process group).

    Example::

        >>> qatkit.sync_observers(qat_model)     # on every rank, after calibrating
        42
    """
    if group is not None:
        set_observer_group(model, group)
    count = 0
    for mod in model.modules():
        if isinstance(mod, ObserverBase) and sync_observer(mod):
            count += 1
    return count
