"""fuse_modules: fuse conv/linear (+ BatchNorm) (+ ReLU/ReLU6) in a float model by name.

Eager mode cannot see the data flow, so the user names each chain, as with torch.ao's
``fuse_modules``::

    model = qatkit.fuse_modules(model, [["conv1", "bn1", "relu1"], ["fc", "relu_fc"]])

The first module of a group becomes a *fused float module*: an instance of its own class
(``nn.Conv2d``...) that also holds the BatchNorm as its child ``bn`` and applies the
activation, so the float model computes what it computed before and its ``state_dict`` keys
are those of the QAT module :func:`qatkit.prepare_qat` makes of it (``conv1.weight``,
``conv1.bn.running_mean``); the other members become :class:`FusedIdentity` (an
``nn.Identity`` that tracing goes through: no node of its own, so the float op a fused module
reproduces has one name, the last member's).  The patterns are
those of ``prepare_qat_fx`` (:mod:`qatkit.fx.patterns`): a weighted module
(``WEIGHTED_MODULES``), optionally its BatchNorm (``BN_FOR``), optionally a ReLU / ReLU6
(``FUSED_ACTIVATION_MODULES``).

torch.ao's fused modules (``torch.ao.nn.intrinsic.ConvBnReLU2d``... made by
``torch.ao.quantization.fuse_modules``) are prepared too, so models written for torch.ao's
eager mode (torchvision's quantizable models) need no change.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.ao.nn.intrinsic as nni
from torch import Tensor, nn

from .._modules import set_module
from ..fx.patterns import BN_FOR, FUSED_ACTIVATION_MODULES, WEIGHTED_MODULES
from ..nn.qat import ACTIVATIONS

__all__ = ["fuse_modules", "FusedFloat", "FusedIdentity", "fused_parts", "FUSED_FLOAT_CLASSES"]

_ACT_NAMES = {None: "", "relu": "ReLU", "relu6": "ReLU6"}


class FusedFloat:
    """Mixed into a float conv / linear class: ``act(bn(op(x)))`` in float, the pattern
    :func:`qatkit.prepare_qat` turns into one QAT module.

    Attributes:
        bn: the fused BatchNorm (a child module) or None.
        act: ``None``, ``"relu"`` or ``"relu6"``.
        qatkit_float_name: the name of the last module of the group (the float model's op
            whose output the fused module reproduces).

    Example::

        >>> fused = qatkit.fuse_modules(model, [["conv1", "bn1", "relu1"]])
        >>> isinstance(fused.conv1, FusedFloat), fused.conv1.act
        (True, 'relu')
    """

    _qatkit_leaf = True
    bn: nn.Module | None
    act: str | None
    qatkit_float_name: str

    def forward(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        y = super().forward(input, *args, **kwargs)  # type: ignore[misc]
        if self.bn is not None:
            y = self.bn(y)
        fn = ACTIVATIONS[self.act]
        return y if fn is None else fn(y)

    def folded_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        """Weight and bias with the BatchNorm folded in (its running statistics): what the
        fused module computes in eval mode, as one conv / linear (the exporter writes a float
        fused module this way).

        Example::

            >>> w, b = fused.eval().folded_weight_bias()
        """
        weight, bias = self.weight, self.bias  # type: ignore[attr-defined]
        bn = self.bn
        if bn is None:
            return weight, bias
        std = torch.sqrt(bn.running_var + bn.eps)
        sf = std.reciprocal() if bn.weight is None else bn.weight / std
        axis = 1 if isinstance(self, (nn.ConvTranspose1d, nn.ConvTranspose2d)) else 0
        shape = [1] * weight.dim()
        shape[axis] = -1
        if axis == 1 and self.groups > 1:  # type: ignore[attr-defined]
            g = self.groups  # type: ignore[attr-defined]
            w = weight.reshape(g, weight.shape[0] // g, -1, *weight.shape[2:])
            weight = (w * sf.reshape(g, 1, -1, *[1] * (weight.dim() - 2))).reshape(weight.shape)
        else:
            weight = weight * sf.reshape(shape)
        shift = -bn.running_mean if bias is None else bias - bn.running_mean
        bias = shift * sf
        return weight, bias if bn.bias is None else bias + bn.bias

    def _get_name(self) -> str:
        base = _float_class(self).__name__  # (the class may carry boundary mixins)
        kind = "Linear" if base == "Linear" else base.rstrip("123d")
        dims = base[len(kind):]
        bn = "Bn" if self.bn is not None else ""
        return f"{kind}{bn}{_ACT_NAMES[self.act]}{dims}(float)"


class FusedIdentity(nn.Identity):
    """A module fused into another by :func:`fuse_modules`: the identity, traced through.

    Example::

        >>> FusedIdentity("conv1")
        FusedIdentity(into='conv1')
    """

    def __init__(self, into: str = "") -> None:
        super().__init__()
        self.into = into

    def extra_repr(self) -> str:
        return f"into={self.into!r}"


#: float weighted class -> its fused float class (one per class, so models pickle)
FUSED_FLOAT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}
for _cls in WEIGHTED_MODULES:
    _name = f"Fused{_cls.__name__}"
    FUSED_FLOAT_CLASSES[_cls] = type(_name, (FusedFloat, _cls), {"__module__": __name__})
    FUSED_FLOAT_CLASSES[_cls].__qualname__ = _name
    globals()[_name] = FUSED_FLOAT_CLASSES[_cls]
del _cls, _name


def _float_class(mod: nn.Module) -> type[nn.Module]:
    """The weighted float class ``mod`` is (or fuses)."""
    for cls in type(mod).__mro__:
        if cls in WEIGHTED_MODULES:
            return cls
    raise TypeError(type(mod).__name__)


def _plain(mod: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A plain ``cls`` sharing ``mod``'s parameters (``mod`` without its fusion)."""
    plain = cls.__new__(cls)
    plain.__dict__.update(mod.__dict__)
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        if key in mod.__dict__:
            plain.__dict__[key] = type(mod.__dict__[key])(mod.__dict__[key])
    plain._modules.pop("bn", None)
    for attr in ("bn", "act", "qatkit_float_name"):
        plain.__dict__.pop(attr, None)
    return plain


def fused_parts(mod: nn.Module, path: str
                ) -> tuple[nn.Module, nn.Module | None, str | None, str] | None:
    """``(weighted float module, bn, act, float name)`` of a fused float module (from
    :func:`fuse_modules`, or one of torch.ao's ``ConvBnReLU2d``-style fused modules); None
    for anything else.

    Example::

        >>> conv, bn, act, name = fused_parts(model.conv1, "conv1")
        >>> act, name
        ('relu', 'relu1')
    """
    if isinstance(mod, FusedFloat):
        return _plain(mod, _float_class(mod)), mod.bn, mod.act, mod.qatkit_float_name
    if not isinstance(mod, nni._FusedModule):
        return None
    parts = list(mod.children())
    if not parts or type(parts[0]) not in WEIGHTED_MODULES:
        return None
    weighted, bn, act = parts[0], None, None
    for p in parts[1:]:
        if isinstance(p, BN_FOR[type(weighted)]) and bn is None and act is None:
            bn = p
        elif type(p) in FUSED_ACTIVATION_MODULES and act is None:
            act = FUSED_ACTIVATION_MODULES[type(p)]
        else:
            return None
    last = f"{path}.{len(parts) - 1}" if path else str(len(parts) - 1)
    return weighted, bn, act, last


def fuse_modules(model: nn.Module, modules_to_fuse: Sequence[Sequence[str]],
                 inplace: bool = False) -> nn.Module:
    """Fuse named chains ``[weighted, bn?, relu?]`` of a float model (see the module
    docstring), for :func:`qatkit.prepare_qat`.

    Args:
        model: the float model.
        modules_to_fuse: groups of module names, each a weighted module (conv, conv-transpose,
            linear), then optionally its BatchNorm, then optionally a ReLU / ReLU6, in the
            order the forward calls them.
        inplace: fuse ``model`` itself instead of a copy.

    Returns:
        the fused model (its float outputs unchanged).

    Raises:
        ValueError: a name that does not exist, a group that is not such a chain (the
            message names the group and the module at fault), a module in two groups.

    Example::

        >>> fused = qatkit.fuse_modules(model, [["conv1", "bn1", "relu1"], ["fc1", "relu2"]])
        >>> fused.relu1
        FusedIdentity(into='conv1')
    """
    if isinstance(modules_to_fuse, (str, bytes)) or not all(
            isinstance(g, (list, tuple)) and g and all(isinstance(n, str) for n in g)
            for g in modules_to_fuse):
        raise ValueError("fuse_modules takes a list of groups of module names, e.g. "
                         "[['conv1', 'bn1', 'relu1'], ['fc', 'relu']]")
    if not inplace:
        model = copy.deepcopy(model)
    seen: set[str] = set()
    plans = []
    for group in modules_to_fuse:
        for name in group:
            if name in seen:
                raise ValueError(f"fuse_modules: '{name}' is in two groups")
            seen.add(name)
        plans.append((list(group), _check_group(model, list(group))))
    for group, (weighted, bn, act) in plans:
        fused = _fused(weighted, bn, act, group[-1])
        set_module(model, group[0], fused)
        for name in group[1:]:
            ident = FusedIdentity(group[0])
            ident.train(model.get_submodule(name).training)
            set_module(model, name, ident)
    return model


def _check_group(model: nn.Module, group: list[str]
                 ) -> tuple[nn.Module, nn.Module | None, str | None]:
    mods = []
    for name in group:
        try:
            mods.append(model.get_submodule(name))
        except AttributeError as e:
            names = [n for n, _ in model.named_modules() if n]
            raise ValueError(f"fuse_modules: {type(model).__name__} has no module '{name}' "
                             f"(group {group}); names look like {names[:8]}") from e
    first = mods[0]
    if type(first) not in WEIGHTED_MODULES:
        raise ValueError(
            f"fuse_modules: group {group} must start with a conv / conv-transpose / linear "
            f"({', '.join(c.__name__ for c in WEIGHTED_MODULES)}), got '{group[0]}' "
            f"({type(first).__name__})")
    bn, act = None, None
    for name, mod in zip(group[1:], mods[1:], strict=True):
        if bn is None and act is None and isinstance(mod, BN_FOR[type(first)]):
            out = first.out_features if isinstance(first, nn.Linear) else first.out_channels
            if mod.num_features != out:
                raise ValueError(f"fuse_modules: group {group}: '{name}' has num_features="
                                 f"{mod.num_features} but '{group[0]}' has {out} outputs")
            if mod.running_mean is None:
                raise ValueError(f"fuse_modules: group {group}: '{name}' keeps no running "
                                 "statistics (track_running_stats=False) and cannot be folded")
            bn = mod
        elif act is None and type(mod) in FUSED_ACTIVATION_MODULES:
            act = FUSED_ACTIVATION_MODULES[type(mod)]
        else:
            allowed = [c.__name__ for c in BN_FOR[type(first)]] + [
                c.__name__ for c in FUSED_ACTIVATION_MODULES]
            raise ValueError(
                f"fuse_modules: group {group}: '{name}' ({type(mod).__name__}) cannot follow; "
                f"a group is [weighted, BatchNorm?, activation?] with {allowed}")
    if len(group) == 1:
        raise ValueError(f"fuse_modules: group {group} has nothing to fuse")
    return first, bn, act


def _fused(weighted: nn.Module, bn: nn.Module | None, act: str | None,
           last: str) -> nn.Module:
    cls = FUSED_FLOAT_CLASSES[type(weighted)]
    fused = cls.__new__(cls)
    fused.__dict__.update(weighted.__dict__)
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        if key in weighted.__dict__:
            fused.__dict__[key] = type(weighted.__dict__[key])(weighted.__dict__[key])
    fused.bn = bn
    fused.act = act
    fused.qatkit_float_name = last
    return fused
