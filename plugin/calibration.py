"""calibrate: CALIBRATION state, run the data, VALIDATION state -- the calibration pass.

Scales are computed when the fake quants leave CALIBRATION; under a multi-rank
torch.distributed process group the observers are synchronized first
(:mod:`qatkit.distributed`), so every rank gets the scales of all ranks' data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from ._modules import module_device
from .data import as_batches, batch_size, iterate, model_inputs, to_device
from .fake_quantize import FakeQuantize, FakeQuantState, set_fake_quant_state

__all__ = ["calibrate", "CalibrationSummary"]


@dataclasses.dataclass(frozen=True)
class CalibrationSummary:
    """What :func:`calibrate` ran.

    Attributes:
        batches: batches run (on this rank).
        samples: samples run (the leading dimension of each batch's first tensor).
        unobserved: fake quants that saw no data (no scale: their layers were not reached).
        nonfinite: NaN / inf values the observers ignored during this calibration.
        state: the fake-quant state the model was left in.
    """

    batches: int
    samples: int
    unobserved: tuple[str, ...]
    nonfinite: int
    state: FakeQuantState

    def __repr__(self) -> str:
        shown = ", ".join(self.unobserved[:4]) + (" ..." if len(self.unobserved) > 4 else "")
        return (f"CalibrationSummary(batches={self.batches}, samples={self.samples}, "
                f"unobserved={len(self.unobserved)}{f' ({shown})' if shown else ''}, "
                f"nonfinite={self.nonfinite}, state={self.state.name})")


def _nonfinite(model: nn.Module) -> int:
    return sum(int(m.observer.nonfinite_count) for m in model.modules()
               if isinstance(m, FakeQuantize))


def calibrate(model: nn.Module, data: Any, num_batches: int | None = None, device: Any = None,
              progress: bool = True, state: FakeQuantState | str = FakeQuantState.VALIDATION,
              input_fn: Callable[[Any], Any] | None = None) -> CalibrationSummary:
    """Calibrate a prepared model: CALIBRATION, run ``data`` without gradients, then ``state``.

    The model's train / eval flags are left as they are (calibrate in ``model.eval()`` so that
    BatchNorm uses its running statistics, as the deployed model does).

    Args:
        model: a prepared model (or its ``DistributedDataParallel`` wrapper: the wrapped
            module is calibrated, each rank on its own data, and the observers are
            synchronized when calibration ends).
        data: a tensor or tuple of tensors (one batch), a list / DataLoader of batches, or a
            folder of ``.pt`` / ``.npy`` files (:func:`qatkit.data.as_batches`); a batch that
            is a tuple gives the model as many positional inputs as its forward takes, so a
            DataLoader's ``(images, labels)`` feeds the images.
        num_batches: stop after this many batches (None: all).
        device: move each batch there (default: the model's device).
        progress: show a progress bar.
        state: the state to leave the model in (VALIDATION: frozen scales; QAT to train next).
        input_fn: ``batch -> model input`` (a tensor, tuple or dict) when batches hold more
            than the inputs in another layout.

    Returns:
        a :class:`CalibrationSummary` (batches, samples, fake quants that saw no data,
        non-finite values seen).

    Raises:
        ValueError: a model without fake quants, data in a form that is not accepted, or
            data the model cannot run (the message names the batch).

    Example::

        >>> summary = qatkit.calibrate(qat_model, calib_loader, num_batches=32)
        >>> summary.unobserved
        ()
    """
    inner = getattr(model, "module", model) if type(model).__name__ == \
        "DistributedDataParallel" else model
    batches, count = as_batches(data)
    if isinstance(data, tuple) and len(data) > 1:
        args, _ = model_inputs(inner, data)
        if len(args) < len(data):
            raise ValueError(
                f"calibrate: a tuple of {len(data)} tensors is one batch of {len(data)} inputs, "
                f"but {type(inner).__name__}.forward takes {len(args)}. Pass several batches "
                "as a list (list(x.split(64))) or a DataLoader")
    dev = torch.device(device) if device is not None else module_device(inner)
    set_fake_quant_state(inner, FakeQuantState.CALIBRATION)
    before = _nonfinite(inner)
    n_batches = n_samples = 0
    with torch.no_grad():
        for batch in iterate(batches, count, progress, "calibration", num_batches):
            if input_fn is not None:
                batch = input_fn(batch)
            args, kwargs = model_inputs(inner, to_device(batch, dev))
            try:
                inner(*args, **kwargs)
            except Exception as e:
                raise ValueError(f"calibrate: running batch {n_batches} through "
                                 f"{type(inner).__name__} failed: {type(e).__name__}: {e}. "
                                 "Check that the batches match the model's forward "
                                 "(input_fn= picks the inputs out of a batch)") from e
            n_batches += 1
            n_samples += batch_size(args, kwargs)
    # a failed batch leaves the model in CALIBRATION (never half-calibrated scales in use)
    set_fake_quant_state(inner, state)  # computes (and synchronizes) the scales
    unobserved = tuple(name for name, m in inner.named_modules()
                       if isinstance(m, FakeQuantize) and not m.has_scale)
    return CalibrationSummary(n_batches, n_samples, unobserved, _nonfinite(inner) - before,
                              FakeQuantState(state) if isinstance(state, str) else state)
