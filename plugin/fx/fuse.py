"""FX pass: fuse conv/linear (+bn) (+add) (+relu/relu6) chains into QAT modules.

Patterns come from the tables in :mod:`qatkit.fx.patterns`: a weighted module
(``WEIGHTED_MODULES``), then optionally its BatchNorm (``BN_FOR``), then optionally a
residual add (``ADD_FUNCTIONS``/``ADD_METHODS``), then optionally a relu/relu6
(``FUSED_ACTIVATION_*``).  An intermediate result used anywhere else stops the chain there.

A weighted module called more than once is never fused (its weights are shared); a shared
BatchNorm is not fused either.  A shared *stateless* activation module (torchvision's
``BasicBlock.relu``) is fused into each call site, each with its own output scale.  Every
such decision is reported in a warning naming the module.  The chain of a quantized layer
stops before an op that must stay float (qconfig None, hybrid island); a float layer keeps its
whole chain float.

Each fused chain becomes one ``call_module`` node on the weighted module's name, holding a
QAT module from :mod:`qatkit.nn.qat`; its ``meta["qatkit_float_name"]`` is the float name of
the last op of the chain (a fused conv+bn+relu reproduces the relu's output).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from typing import Any, Callable

from torch import fx, nn

from .._modules import set_module
from ..nn import qat
from .patterns import (
    ADD_FUNCTIONS,
    ADD_METHODS,
    BN_FOR,
    FUSED_ACTIVATION_FUNCTIONS,
    FUSED_ACTIVATION_METHODS,
    FUSED_ACTIVATION_MODULES,
    WEIGHTED_MODULES,
)

__all__ = ["FusionGroup", "find_fusion_groups", "fuse_weighted_modules", "META_FLOAT_NAME",
           "META_ROLE", "act_kind", "is_add"]

META_FLOAT_NAME = "qatkit_float_name"
META_ROLE = "qatkit_role"


@dataclasses.dataclass
class FusionGroup:
    """A chain of nodes that becomes one QAT module."""

    weighted: fx.Node
    bn: fx.Node | None = None
    add: fx.Node | None = None
    other: fx.Node | None = None  # the add's other input
    act: fx.Node | None = None
    act_kind: str | None = None

    @property
    def nodes(self) -> list[fx.Node]:
        return [n for n in (self.weighted, self.bn, self.add, self.act) if n is not None]

    @property
    def last(self) -> fx.Node:
        return self.nodes[-1]


def act_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """``"relu"`` / ``"relu6"`` when ``node`` is an activation prepare fuses into the layer
    before it (``FUSED_ACTIVATION_*`` tables), else None.

    Example::

        >>> act_kind(relu_node, dict(gm.named_modules()))
        'relu'
    """
    if node.op == "call_module":
        return FUSED_ACTIVATION_MODULES.get(type(modules[node.target]))
    if node.op == "call_function":
        kind = FUSED_ACTIVATION_FUNCTIONS.get(node.target)
        if kind is None:
            return None
        extra = [a for a in node.args[1:] if not isinstance(a, bool)]
        return kind if not extra else None
    if node.op == "call_method":
        return FUSED_ACTIVATION_METHODS.get(node.target) if len(node.args) == 1 else None
    return None


def is_add(node: fx.Node) -> bool:
    """True for a residual add prepare can fuse (``a + b``, ``torch.add(a, b)``, ``a.add_(b)``;
    no ``alpha``, no ``out``).

    Example::

        >>> is_add(add_node)
        True
    """
    if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("out") is not None:
        return False
    if node.op == "call_function":
        return any(node.target is f for f in ADD_FUNCTIONS) and len(node.args) == 2
    return node.op == "call_method" and node.target in ADD_METHODS and len(node.args) == 2


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _unless_float(node: fx.Node | None,
                  stays_float: Callable[[fx.Node], bool] | None) -> fx.Node | None:
    """``node``, or None (the chain stops) when it must stay float."""
    if node is None or (stays_float is not None and stays_float(node)):
        return None
    return node


def find_fusion_groups(gm: fx.GraphModule,
                       stays_float: Callable[[fx.Node], bool] | None = None,
                       prefix: str = "") -> list[FusionGroup]:
    """Find every weighted-module chain of ``gm`` (each weighted call is one group).

    Args:
        gm: the traced float model.
        stays_float: says whether a node must stay float (qconfig None, hybrid island); the
            chain of a quantized weighted module stops before such a node, so that a float
            BatchNorm/add/activation is not fused into a quantized layer.
        prefix: the name of ``gm`` in the whole model (partial tracing), for the warnings.
    """
    def label(target: Any) -> str:
        return f"{prefix}.{target}" if prefix else str(target)

    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    groups: list[FusionGroup] = []
    claimed: set[fx.Node] = set()
    shared_acts: Counter = Counter()  # shared activation module -> call sites fused
    shared_weighted: set = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) not in WEIGHTED_MODULES:
            continue
        wmod = modules[node.target]
        group = FusionGroup(weighted=node)
        groups.append(group)
        if calls[node.target] > 1:
            if node.target not in shared_weighted:  # one warning per module, not per call
                shared_weighted.add(node.target)
                warnings.warn(
                    f"prepare: module '{label(node.target)}' ({type(wmod).__name__}) is called "
                    f"{calls[node.target]} times, so it is not fused with what follows it and "
                    "all its calls share one output scale. Fix: give each call site its own "
                    "module", UserWarning, stacklevel=3)
            continue
        cur = node
        # a float layer keeps its whole chain float; a quantized one stops before float ops
        keep_float = stays_float if stays_float is not None and not stays_float(node) else None
        nxt = _unless_float(_only_user(cur), keep_float)
        if (nxt is not None and nxt.op == "call_module" and nxt not in claimed
                and isinstance(modules[nxt.target], BN_FOR[type(wmod)])
                and modules[nxt.target].num_features == _out_channels(wmod)):
            if calls[nxt.target] > 1:
                warnings.warn(
                    f"prepare: BatchNorm '{label(nxt.target)}' is called {calls[nxt.target]} "
                    f"times; it is not fused into '{label(node.target)}'. Fix: one BatchNorm "
                    "per call site",
                    UserWarning, stacklevel=3)
            else:
                group.bn, cur = nxt, nxt
                nxt = _unless_float(_only_user(cur), keep_float)
        if nxt is not None and is_add(nxt) and nxt not in claimed:
            others = [a for a in nxt.args if a is not cur]
            if len(others) == 1 and isinstance(others[0], fx.Node) and others[0].op != "get_attr":
                group.add, group.other, cur = nxt, others[0], nxt
                nxt = _unless_float(_only_user(cur), keep_float)
        if nxt is not None and nxt not in claimed:
            kind = act_kind(nxt, modules)
            if kind is not None:
                group.act, group.act_kind = nxt, kind
                if nxt.op == "call_module" and calls[nxt.target] > 1:
                    shared_acts[str(nxt.target)] += 1
        claimed.update(group.nodes)
    if shared_acts:
        listing = ", ".join(f"'{label(t)}' ({n} of {calls[t]} calls fused)"
                            for t, n in shared_acts.items())
        warnings.warn(
            f"prepare: shared activation module(s) {listing}: each call site fused into the "
            "layer before it gets its own output scale", UserWarning, stacklevel=3)
    return groups


def _out_channels(mod: nn.Module) -> int:
    return mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels


def fuse_weighted_modules(gm: fx.GraphModule, groups: list[FusionGroup], qconfigs: dict,
                          names: dict[fx.Node, str]) -> dict[str, nn.Module]:
    """Replace each group whose qconfig is not None by one QAT module call.

    Args:
        gm: the traced model (modified in place).
        groups: from :func:`find_fusion_groups`.
        qconfigs: the QConfig (or None) of each group, keyed by the weighted node.
        names: float names of the nodes.

    Returns:
        the QAT modules created, by module name.
    """
    created: dict[str, nn.Module] = {}
    replaced: dict[fx.Node, fx.Node] = {}
    for group in groups:
        qconfig = qconfigs[group.weighted]
        if qconfig is None:
            for n in group.nodes:
                n.meta[META_ROLE] = "float_by_config"
            continue
        target = str(group.weighted.target)
        if target not in created:  # a shared (unfused) module: all its calls run one QAT module
            float_mod = gm.get_submodule(target)
            bn = gm.get_submodule(group.bn.target) if group.bn is not None else None
            qat_mod = qat.from_float(float_mod, qconfig, bn=bn, act=group.act_kind,
                                     add=group.add is not None)
            qat_mod.qconfig = qconfig
            set_module(gm, target, qat_mod)
            created[target] = qat_mod
        last = group.last
        other = replaced.get(group.other, group.other)
        kwargs = dict(group.weighted.kwargs)
        inp = group.weighted.args[0] if group.weighted.args else kwargs.pop("input")
        if len(group.weighted.args) > 1:  # ConvTranspose's output_size, given positionally
            kwargs["output_size"] = group.weighted.args[1]
        args = (inp,) + ((other,) if group.add is not None else ())
        with gm.graph.inserting_after(last):
            new = gm.graph.call_module(target, args=args, kwargs=kwargs)
        new.meta = dict(last.meta)
        new.meta[META_FLOAT_NAME] = names[last]
        new.meta[META_ROLE] = "weighted"
        last.replace_all_uses_with(new)
        replaced[last] = new
        for n in reversed(group.nodes):
            gm.graph.erase_node(n)
        if group.bn is not None and not any(
                n.op == "call_module" and n.target == group.bn.target for n in gm.graph.nodes):
            _del_module(gm, str(group.bn.target))
    return created


def _del_module(gm: fx.GraphModule, target: str) -> None:
    parent, _, leaf = target.rpartition(".")
    delattr(gm.get_submodule(parent) if parent else gm, leaf)
