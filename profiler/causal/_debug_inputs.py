"""What every accuracy-debugging tool checks first: the model, the data, an eval_fn's result.

* :func:`private_model` -- the model (or a file saved with ``torch.save``) as a private deep
  copy in eval mode, VALIDATION state and calibrated, so that a tool may switch its fake quants
  and never touch the caller's model; a model in CALIBRATION state or never calibrated is an
  error that says how to fix it.
* :func:`collect_batches` -- the data in any form :func:`qatkit.data.as_batches` accepts, as a
  list of the model's positional inputs on its device, cut to ``data_num`` samples.
* :func:`as_score` -- an ``eval_fn``'s result as a float, or a clear error.
"""

from __future__ import annotations

import copy
import numbers
import os
from typing import Any, Callable

import torch
from qatkit.annotation import has_annotations
from qatkit.data import as_batches, batch_size, model_inputs
from qatkit.fake_quantize import FakeQuantize, FakeQuantState
from torch import Tensor, fx, nn

from ..core.running import model_device, positional_inputs, to_device

__all__ = ["load_model", "private_model", "collect_batches", "as_score", "check_fits"]


def load_model(model_or_file: Any, label: str = "model_or_file") -> nn.Module:
    """``model_or_file`` itself, or the model saved at that path with ``torch.save(model)``.

    Raises:
        ValueError: a path that does not exist or does not hold an ``nn.Module``, or an object
            that is neither.

    Example::

        >>> load_model("calib_model.pt")
        GraphModule(...)
    """
    if isinstance(model_or_file, (str, os.PathLike)):
        path = os.fspath(model_or_file)
        if not os.path.isfile(path):
            raise ValueError(f"{label}: no file at '{path}'. Pass the model, or the path of a "
                             "model saved with torch.save(model, path)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise ValueError(f"{label}: cannot load '{path}' with torch.load: {e}") from e
        if not isinstance(obj, nn.Module):
            raise ValueError(f"{label}: '{path}' holds a {type(obj).__name__}, not a model. "
                             "Save the whole model (torch.save(model, path)), not its "
                             "state_dict")
        return obj  # has_annotations undoes what unpickling does to a prepared model
    if not isinstance(model_or_file, nn.Module):
        raise ValueError(f"{label} must be a model (nn.Module) or the path of one saved with "
                         f"torch.save, got {type(model_or_file).__name__}")
    return model_or_file


def private_model(model_or_file: Any, label: str = "model_or_file",
                  device: Any = None) -> tuple[nn.Module, fx.GraphModule]:
    """``(model, copy)``: the model, and a deep copy of it to switch freely, in eval mode with
    every fake quant in VALIDATION state (a QAT-state model's scales are kept as they are).

    Args:
        model_or_file: a calibrated / QAT model made by ``prepare_qat_fx`` (or ``convert_fx``
            with ops kept in fake-quant form), or the path of one saved with ``torch.save``.
        label: how messages call it.
        device: move the copy there (default: where the model is).

    Raises:
        ValueError: not a qatkit model, no fake quant, fake quants in CALIBRATION state, or
            fake quants without a scale (never calibrated).

    Example::

        >>> model, work = private_model(calib_model)
    """
    model = load_model(model_or_file, label)
    if not has_annotations(model):
        raise ValueError(f"{label} ({type(model).__name__}) was not made by "
                         "qatkit.prepare_qat_fx: prepare the float model, calibrate it, and "
                         "pass the calibrated model")
    fqs = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantize)]
    if not fqs:
        raise ValueError(f"{label} ({type(model).__name__}) has no fake quant to analyse (an "
                         "integer model from convert_fx?). Pass the calibrated / QAT model, or "
                         "keep ops in fake-quant form with qatkit.set_preserve_qat_mode")
    calib = [n for n, m in fqs if m.state is FakeQuantState.CALIBRATION]
    if calib:
        raise ValueError(f"{label} has {len(calib)} fake quant(s) in CALIBRATION state "
                         f"({', '.join(calib[:3])}): fake quantization is off. Fix: "
                         "qatkit.set_fake_quant_state(model, qatkit.FakeQuantState.VALIDATION) "
                         "after calibrating (qatkit.calibrate does both)")
    missing = [n for n, m in fqs if m.enabled and not m.has_scale and not m.observer.has_data]
    if missing:
        raise ValueError(f"{label} was never calibrated: {len(missing)} fake quant(s) have no "
                         f"scale ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
                         "). Fix: qatkit.calibrate(model, calibration_data) first")
    try:
        work = copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise RuntimeError(f"cannot deep-copy {label} ({type(model).__name__}) to analyse it "
                           f"without changing it: {e}. Fix: make the model deep-copyable") from e
    if device is not None:
        work.to(torch.device(device))
    work.eval()
    for m in work.modules():
        if isinstance(m, FakeQuantize):
            m.set_state(FakeQuantState.VALIDATION)
            if not m.has_scale and m.observer.has_data:
                m.calculate_scale()
    return model, work


def _cut(args: tuple, n: int, size: int) -> tuple:
    return tuple(a[:n] if isinstance(a, Tensor) and a.dim() and a.shape[0] == size else a
                 for a in args)


def collect_batches(model: fx.GraphModule, data: Any, data_num: int | None = None,
                    label: str = "calibrated_data",
                    input_fn: Callable[[Any], Any] | None = None) -> list[tuple]:
    """The batches of ``data`` as tuples of ``model``'s positional inputs on its device.

    Args:
        model: the GraphModule that will run them.
        data: a tensor or a tuple of tensors (one batch), a list / DataLoader of batches, or a
            folder of ``.pt`` / ``.npy`` files (:func:`qatkit.data.as_batches`).
        data_num: keep the first ``data_num`` samples (the last batch is cut), None: all.
        label: how messages call the data.
        input_fn: ``batch -> model input`` when batches hold more than the inputs.

    Raises:
        ValueError: data in a form that is not accepted, no batch, or a bad ``data_num``.

    Example::

        >>> collect_batches(work, [x1, x2], data_num=100)
    """
    if data is None:
        raise ValueError(f"{label} is required: a tensor, a tuple of tensors (one batch), a "
                         "list or DataLoader of batches, or a folder of .pt / .npy files")
    if data_num is not None and (not isinstance(data_num, int) or data_num < 1):
        raise ValueError(f"data_num={data_num!r}: pass a positive number of samples or None")
    try:
        batches, _ = as_batches(data)
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from e
    device = model_device(model)
    names = [n.target for n in model.graph.nodes if n.op == "placeholder"]
    out: list[tuple] = []
    seen = 0
    for batch in batches:
        if input_fn is not None:
            batch = input_fn(batch)
        args, kwargs = model_inputs(model, batch)
        if kwargs:
            args = positional_inputs(model, {**dict(zip(names, args, strict=False)), **kwargs})
        else:
            args = positional_inputs(model, args)
        size = batch_size(args, {})
        if data_num is not None and size and seen + size > data_num:
            args = _cut(args, data_num - seen, size)
            size = data_num - seen
        out.append(to_device(args, device))
        seen += size
        if data_num is not None and seen >= data_num:
            break
    if not out:
        raise ValueError(f"{label} holds no batch")
    return out


def check_fits(run: Callable[[], Any], model_label: str, data_label: str = "calibrated_data",
               batch: int = 0) -> Any:
    """``run()``; an exception becomes a ValueError saying the data does not fit the model.

    Example::

        >>> check_fits(lambda: model(*batches[0]), "model_or_file")
    """
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - re-raised with what to check
        raise ValueError(f"{data_label} does not fit {model_label}: running batch {batch} "
                         f"failed with {type(e).__name__}: {e}. Check that the batches are "
                         "the model's inputs (shape, dtype, number of inputs)") from e


def as_score(value: Any, label: str = "eval_fn") -> float:
    """An ``eval_fn``'s result as a python float.

    Raises:
        TypeError: not a real number (or a one-element tensor): a bool, None, a dict...

    Example::

        >>> as_score(torch.tensor(0.97))
        0.97...
    """
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{label} must return a number (e.g. the accuracy as a float), got "
                    f"{type(value).__name__} {value!r:.80}. Fix: return float(metric)")
