"""Running a model for analysis without changing it: eval mode, no gradients, its device, its
data.

* :func:`analysis_model` is the context manager every profiler function runs a model in: it
  checks the fake-quant state, puts the model in eval mode (restoring every train / eval flag
  afterwards) and runs a deep copy when the forward would change the model (fake quants in QAT
  or CALIBRATION state update their observers) or when it must move to another device.
* :func:`private_model` is what every causal tool starts from: the model (or a file saved with
  ``torch.save``) as a private deep copy in eval mode, VALIDATION state and calibrated, so that
  a tool may switch its fake quants and never touch the caller's model; a model in CALIBRATION
  state or never calibrated is an error that says how to fix it.
* :func:`collect_batches` turns data in any form :func:`qatkit.data.as_batches` accepts into a
  list of the model's positional inputs on its device, cut to ``data_num`` samples;
  :func:`check_fits` turns a failed run into an error saying the data does not fit the model.

Example::

    >>> with analysis_model(qat_model, "model2", device="cpu") as gm:
    ...     out = gm(*to_device(as_tuple(x), model_device(gm)))
    >>> model, work = private_model(calib_model)
    >>> batches = collect_batches(work, test_loader, data_num=256)
"""


from __future__ import annotations

import contextlib
import copy
import os
import warnings
from typing import Any, Callable, Iterator

import torch
from qatkit.annotation import has_annotations
from qatkit.data import as_batches, batch_size, model_inputs
from qatkit.fake_quantize import FakeQuantize, FakeQuantState, set_fake_quant_state
from torch import Tensor, fx, nn

from .alignment import trace_model

__all__ = ["analysis_model", "to_device", "model_device", "as_tuple", "positional_inputs",
           "device_pair", "private_copy", "load_model", "private_model", "collect_batches",
           "check_fits"]


def private_copy(model: nn.Module, label: str = "model") -> nn.Module:
    """A deep copy to run: BatchNorm statistics, observers and hooks of ``model`` stay as is.

    Raises:
        RuntimeError: ``model`` cannot be deep-copied (the message says how to fix it).

    Example::

        >>> runner = private_copy(model, "model1").eval()
    """
    try:
        return copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise RuntimeError(f"cannot deep-copy {label} ({type(model).__name__}) to run it without "
                           f"side effects: {e}. Fix: make the model deep-copyable (no open "
                           "files, locks or generators as attributes)") from e


def _fake_quant_states(model: nn.Module) -> dict[FakeQuantState, list[str]]:
    states: dict[FakeQuantState, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantize):
            states.setdefault(m.state, []).append(name)
    return states


def model_device(model: nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter or buffer (None for a model without any).

    Example::

        >>> model_device(torchvision.models.resnet18())
        device(type='cpu')
    """
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def device_pair(devices: Any) -> tuple[Any, Any]:
    """``(model1's device, model2's device)`` from a ``devices`` argument: None (each model
    where it is), one device for both, or a pair.

    Raises:
        ValueError: a sequence that is not a pair.

    Example::

        >>> device_pair("cpu"), device_pair(("cpu", "cuda:0"))
        (('cpu', 'cpu'), ('cpu', 'cuda:0'))
    """
    if devices is None:
        return None, None
    if isinstance(devices, (list, tuple)):
        if len(devices) != 2:
            raise ValueError(f"devices takes one device or a pair (model1's, model2's), got "
                             f"{devices!r}")
        return devices[0], devices[1]
    return devices, devices


def as_tuple(inputs: Any) -> tuple[Any, ...]:
    """``inputs`` as the tuple of a forward's positional arguments (one input -> ``(x,)``).

    Example::

        >>> as_tuple(x), as_tuple((x, y))
        ((x,), (x, y))
    """
    return inputs if isinstance(inputs, tuple) else (inputs,)


def positional_inputs(gm: fx.GraphModule, example_inputs: Any) -> tuple[Any, ...]:
    """The values of ``gm``'s placeholders in order (an Interpreter takes positional arguments
    only): ``example_inputs`` is a tuple / list of positional arguments, one tensor, or a dict
    of keyword arguments; missing ones take their defaults.

    Example::

        >>> positional_inputs(trace_model(model), {"x": x})     # forward(self, x, y=None)
        (x, None)
    """
    if isinstance(example_inputs, dict):
        args, rest = [], dict(example_inputs)
    else:
        args, rest = list(example_inputs if isinstance(example_inputs, (tuple, list))
                          else (example_inputs,)), {}
    for node in [n for n in gm.graph.nodes if n.op == "placeholder"][len(args):]:
        if node.target in rest:
            args.append(rest.pop(node.target))
        elif node.args:
            args.append(node.args[0])
    return tuple(args)


@contextlib.contextmanager
def analysis_model(model: nn.Module, label: str = "model", device: Any = None,
                   calibration: str = "raise", float_flow: bool = False
                   ) -> Iterator[fx.GraphModule]:
    """Yield a GraphModule that runs ``model`` in eval mode, leaving ``model`` unchanged.

    Fake-quant state: fake quants in CALIBRATION state (fake quantization off, the model
    computes in float) raise a ValueError with the fix when ``calibration="raise"``, or warn
    when ``"warn"``.  Fake quants in QAT state update their observer (and scale) on every
    batch: the model runs as a copy, with a warning.  VALIDATION needs nothing.

    Args:
        model: any model.
        label: how messages call it (``"model1"``).
        device: run on this device (a copy when ``model`` lives elsewhere); None: where it is.
        calibration: ``"raise"`` or ``"warn"``.
        float_flow: run a copy whose fake quants are all in CALIBRATION state, silently: the
            float data flow, which needs no scale, for structural questions (which nodes
            produce tensors, how often modules run) on models in any state, calibrated or not.

    Example::

        >>> with analysis_model(qat_model, "model2", device="cpu") as gm:
        ...     out = gm(x)
    """
    if float_flow:
        copied = private_copy(model, label)
        if any(isinstance(m, FakeQuantize) for m in copied.modules()):
            set_fake_quant_state(copied, FakeQuantState.CALIBRATION)
        if device is not None:
            copied.to(device)
        yield trace_model(copied, label, share=False).eval()
        return
    states = _fake_quant_states(model)
    calib = states.get(FakeQuantState.CALIBRATION, [])
    if calib:
        shown = ", ".join(calib[:4]) + (" ..." if len(calib) > 4 else "")
        msg = (f"{label} ({type(model).__name__}) has {len(calib)} fake quant(s) in CALIBRATION "
               f"state ({shown}): fake quantization is off and the model computes in float, so "
               "it would be analysed as a float model. Fix: qatkit.set_fake_quant_state("
               f"{label}, qatkit.FakeQuantState.VALIDATION) after calibrating")
        if calibration == "raise":
            raise ValueError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    qat = states.get(FakeQuantState.QAT, [])
    if qat:
        warnings.warn(f"{label} ({type(model).__name__}) has {len(qat)} fake quant(s) in QAT "
                      "state: their scales follow every batch, so a copy is analysed (the model "
                      "is not changed). For the frozen scales a deployed model uses: "
                      f"qatkit.set_fake_quant_state({label}, qatkit.FakeQuantState.VALIDATION)",
                      RuntimeWarning, stacklevel=3)
    here = model_device(model)
    device = torch.device(device) if device is not None else here
    if device is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    moving = device is not None and here is not None and here != device
    if qat or calib or moving:
        copied = copy.deepcopy(model)
        if device is not None:
            copied.to(device)
        gm = trace_model(copied, label, share=False).eval()
        yield gm
        return
    gm = trace_model(model, label)
    flags = [(m, m.training) for m in list(model.modules()) + list(gm.modules())]
    try:
        gm.eval()
        yield gm
    finally:
        for m, training in flags:
            m.training = training


def to_device(inputs: tuple[Any, ...], device: torch.device | None) -> tuple[Any, ...]:
    """``inputs`` with every tensor (also inside lists/dicts) moved to ``device``.

    Example::

        >>> to_device((x, [y]), torch.device("cpu"))
    """
    if device is None:
        return inputs

    def move(x: Any) -> Any:
        if isinstance(x, Tensor):
            return x.to(device)
        if isinstance(x, (list, tuple)):
            return type(x)(move(v) for v in x)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    return tuple(move(x) for x in inputs)


# -- models and data for the causal tools -----------------------------------------------
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
    work = private_copy(model, label)
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
