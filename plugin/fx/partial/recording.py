"""Partial tracing, stage 2: record how each module is called.

One run of ``example_inputs`` (eval mode, no gradients) with hooks on every module: for each
call, which arguments are tensors and the values of the others (the trace's
``concrete_args``, or why an argument cannot be fixed), its enclosing call and its output's
class, and the multiply-adds of every conv / linear.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx._symbolic_trace import PH
from torch.utils._pytree import tree_flatten, tree_map

from .plan import WEIGHTED_TYPES

__all__ = ["Call", "record_calls", "run_example", "same_value"]

#: argument values a region can fix as constants (anything else holding state is not)
_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.Size,
                   enum.Enum, type)


@dataclasses.dataclass
class Call:
    """One module call of the example run."""

    module: nn.Module
    path: str
    parent: int  # index of the enclosing call, -1 for the outermost
    concrete: dict[str, Any] | None  # None: an argument cannot be fixed (``why``)
    params: tuple[tuple[str, int, Any], ...]
    why: str = ""
    out_type: type | None = None  # the class of its output


def _params(mod: nn.Module) -> tuple[tuple[str, int, Any], ...] | None:
    try:
        sig = inspect.signature(mod.forward)
    except (TypeError, ValueError):
        return None
    return tuple((p.name, p.kind, p.default) for p in sig.parameters.values())


def _describe_call(mod: nn.Module, args: tuple, kwargs: dict
                   ) -> tuple[dict[str, Any] | None, tuple, str]:
    """The trace's ``concrete_args`` for this call: tensors stay placeholders (inside lists /
    dicts as ``PH``), other values are fixed; None (and why) when a value cannot be fixed."""
    params = _params(mod)
    if params is None:
        return None, (), "its forward() has no readable signature"
    sig = inspect.Signature([inspect.Parameter(n, k, default=d) for n, k, d in params])
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        return None, params, f"its call does not fit forward(): {e}"
    bound.apply_defaults()
    concrete: dict[str, Any] = {}
    for name, kind, _ in params:
        value = bound.arguments.get(name, () if kind == inspect.Parameter.VAR_POSITIONAL else {})
        if isinstance(value, Tensor):
            continue
        leaves, _ = tree_flatten(value)
        odd = [v for v in leaves if not isinstance(v, (Tensor, *_CONSTANT_TYPES))]
        if odd:
            return None, params, (f"argument '{name}' is a {type(odd[0]).__name__} (neither a "
                                  "tensor nor a constant)")
        concrete[_concrete_key(name, kind)] = tree_map(
            lambda v: PH if isinstance(v, Tensor) else v, value)
    return concrete, params, ""


def same_value(a: Any, b: Any) -> bool:
    """Whether two recorded argument values are equal (containers element by element;
    values that cannot be compared are different).

    Example::

        >>> same_value({"k": [1, PH]}, {"k": [1, PH]}), same_value(1, 1.0)
        (True, False)
    """
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable values are different
        return False


def _macs(mod: nn.Module, inputs: tuple, out: Any) -> int:
    if not isinstance(out, Tensor):
        return 0
    if isinstance(mod, nn.Linear):
        return out.numel() * mod.in_features
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        x = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
        k = int(torch.tensor(mod.kernel_size).prod())
        return 0 if x is None else x.numel() * mod.out_channels // mod.groups * k
    k = int(torch.tensor(mod.kernel_size).prod())
    return out.numel() * mod.in_channels // mod.groups * k


def record_calls(root: nn.Module, example_inputs: tuple
                 ) -> tuple[list[Call], dict[str, int], dict[int, list[int]]]:
    """Every module call of one run (in order), the MACs per weighted module path, and the
    call indices of each module (by ``id``)."""
    calls: list[Call] = []
    stack: list[int] = []
    macs: dict[str, int] = {}
    by_module: dict[int, list[int]] = {}
    paths = {id(m): p for p, m in root.named_modules()}
    handles = []

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        concrete, params, why = _describe_call(mod, args, kwargs)
        by_module.setdefault(id(mod), []).append(len(calls))
        calls.append(Call(mod, paths[id(mod)], stack[-1] if stack else -1, concrete, params,
                          why))
        stack.append(len(calls) - 1)

    def post(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        calls[stack.pop()].out_type = type(out)
        if isinstance(mod, WEIGHTED_TYPES):
            path = paths[id(mod)]
            macs[path] = macs.get(path, 0) + _macs(mod, args, out)

    for m in {id(m): m for m in root.modules()}.values():
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        run_example(root, example_inputs, handles)
    except Exception as e:
        raise RuntimeError(f"prepare_qat_fx (partial tracing): running example_inputs through "
                           f"{type(root).__name__} failed: {e}. Check that example_inputs match "
                           "the model's forward() arguments") from e
    return calls, macs, by_module


def run_example(root: nn.Module, example_inputs: tuple, handles: list[Any]) -> None:
    """Run ``example_inputs`` through ``root`` once (eval mode, no gradients) for the caller's
    hooks ``handles``, then remove them and restore every module's training flag.

    Example::

        >>> handles = [model.register_forward_pre_hook(pre, with_kwargs=True)]
        >>> run_example(model, (x,), handles)
    """
    was_training = {m: m.training for m in root.modules()}
    root.eval()
    try:
        with torch.no_grad():
            root(*example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, t in was_training.items():
            m.training = t


def _concrete_key(name: str, kind: int) -> str:
    if kind == inspect.Parameter.VAR_POSITIONAL:
        return "*" + name
    if kind == inspect.Parameter.VAR_KEYWORD:
        return "**" + name
    return name

