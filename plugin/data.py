"""Calibration / analysis data in the forms users have it, as batches a model can take.

:func:`as_batches` accepts one batch (a tensor, or a tuple of tensors: the model's inputs), a
list of batches, any iterable of batches (a ``DataLoader``), or a folder of ``.pt`` / ``.npy``
files (one batch per file, in name order).  :func:`model_inputs` turns one batch into the
positional / keyword arguments of the model's ``forward``: a tensor is the only input, a dict
gives keywords, and a tuple / list gives positionals, cut to the arguments the model takes
(a ``DataLoader``'s ``(images, labels)`` feeds ``forward(x)`` the images).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["as_batches", "model_inputs", "batch_size", "to_device", "iterate"]


def _load_file(path: Path) -> Any:
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    return torch.load(path, map_location="cpu", weights_only=True)


def as_batches(data: Any) -> tuple[Iterable[Any], int | None]:
    """``(batches, count)``: ``data`` as an iterable of batches, and how many (None when the
    iterable does not say).

    Args:
        data: a tensor or a tuple of tensors (one batch), a list of batches, an iterable of
            batches (``DataLoader``), or a folder (``str`` / ``Path``) of ``.pt`` / ``.npy``
            files, one batch each.

    Raises:
        ValueError: a folder that does not exist or holds no ``.pt`` / ``.npy`` file, or an
            object that is not data (the message says which forms are accepted).

    Example::

        >>> batches, n = as_batches(torch.randn(8, 3, 32, 32))
        >>> n
        1
    """
    if isinstance(data, (str, os.PathLike)):
        folder = Path(data)
        if not folder.is_dir():
            raise ValueError(f"calibration data folder '{folder}' does not exist")
        files = sorted(p for p in folder.iterdir() if p.suffix in (".pt", ".npy"))
        if not files:
            raise ValueError(f"calibration data folder '{folder}' holds no .pt / .npy file")
        return (_load_file(p) for p in files), len(files)
    if isinstance(data, (Tensor, dict)):
        return [data], 1
    if isinstance(data, tuple) and data and all(isinstance(t, Tensor) for t in data):
        return [data], 1  # one batch of several inputs
    if isinstance(data, list):
        return data, len(data)
    if isinstance(data, Iterable):
        try:
            count = len(data)  # type: ignore[arg-type]
        except TypeError:
            count = None
        return data, count
    raise ValueError(f"cannot use a {type(data).__name__} as data: pass a tensor, a tuple of "
                     "tensors (one batch), a list or DataLoader of batches, or a folder of "
                     ".pt / .npy files")


def _positional_arity(model: nn.Module) -> int | None:
    """How many positional arguments ``model.forward`` takes (None: any number)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    n = 0
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            n += 1
    return n


def model_inputs(model: nn.Module, batch: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to call ``model`` on ``batch`` (see the module docstring).

    Example::

        >>> model_inputs(nn.Linear(4, 2), (torch.randn(8, 4), torch.zeros(8)))[0][0].shape
        torch.Size([8, 4])
    """
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        arity = _positional_arity(model)
        args = tuple(batch) if arity is None else tuple(batch)[: max(arity, 1)]
        return args, {}
    return (batch,), {}


def batch_size(args: tuple, kwargs: dict) -> int:
    """The leading dimension of a call's first tensor (0 when there is none).

    Example::

        >>> batch_size((torch.randn(8, 4),), {})
        8
    """
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, Tensor):
            return int(value.shape[0]) if value.dim() else 1
    return 0


def to_device(value: Any, device: torch.device | None) -> Any:
    """``value`` with every tensor (inside tuples, lists and dicts too) moved to ``device``.

    Example::

        >>> to_device((torch.ones(1), [torch.zeros(1)]), torch.device("cpu"))
        (tensor([1.]), [tensor([0.])])
    """
    if device is None:
        return value
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def iterate(batches: Iterable[Any], count: int | None, progress: bool, desc: str,
            limit: int | None = None) -> Iterator[Any]:
    """``batches`` (at most ``limit``) behind a tqdm progress bar (silenced by
    ``progress=False``).

    Example::

        >>> list(iterate([1, 2, 3], 3, progress=False, desc="calibration", limit=2))
        [1, 2]
    """
    total = count if limit is None else (limit if count is None else min(count, limit))
    with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        for i, batch in enumerate(batches):
            if limit is not None and i >= limit:
                break
            yield batch
            bar.update(1)

