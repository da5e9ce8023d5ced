"""Running a model for analysis without changing it: eval mode, no gradients, its device.

:func:`analysis_model` is the context manager every profiler function runs a model in: it
checks the fake-quant state, puts the model in eval mode (restoring every train / eval flag
afterwards) and runs a deep copy when the forward would change the model (fake quants in QAT
or CALIBRATION state update their observers) or when it must move to another device.

Example::

    >>> with analysis_model(qat_model, "model2", device="cpu") as gm:
    ...     out = gm(*to_device(as_tuple(x), model_device(gm)))
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterator

import torch
from qatkit.fake_quantize import FakeQuantize, FakeQuantState, set_fake_quant_state
from torch import Tensor, fx, nn

from .alignment import trace_model

__all__ = ["analysis_model", "to_device", "model_device", "as_tuple", "positional_inputs",
           "device_pair"]


def _private_copy(model: nn.Module, label: str) -> nn.Module:
    """A deep copy to run: BatchNorm statistics, observers and hooks of ``model`` stay as is."""
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
        copied = _private_copy(model, label)
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
