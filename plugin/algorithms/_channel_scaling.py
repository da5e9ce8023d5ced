"""Per-channel rescaling that keeps the float model's math: shared by SmoothQuant and
cross-layer equalization.

A *scaling group* is a producer whose output channels can be divided by positive factors
``s`` (a conv / linear: its output channels, through the fused BatchNorm's gamma and beta when
there is one; a LayerNorm / GroupNorm / BatchNorm with affine parameters: gamma and beta) and
the conv / linear layers that read that output (directly, or through ops that commute with a
positive per-channel factor: ReLU, LeakyReLU, average / max pooling, flatten, dropout,
reshapes that keep the channel axis), whose input channels are multiplied by ``s``.
``consumer(s * (producer(x) / s)) == consumer(producer(x))``: the float model computes the
same function, up to float rounding.

The groups are read from the quantization annotation (each input bound by name to the node
that made it) and the FX graph's users; a layer whose input cannot be rescaled that way is
reported with the reason (its input is made by an add, a fused ReLU6 clips, another op also
reads the producer's output...).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..annotation import NodeAnnotation, get_annotations
from ..nn.qat import FusedMixin
from ._common import Layer, record

__all__ = ["ScalingGroup", "find_scaling_groups", "scale_group", "input_channel_max",
           "output_channel_max", "consumer_axis", "COMMUTING_KINDS", "COMMUTING_PREFIXES"]

#: quantized op kinds that commute with a positive per-channel factor (f(x / s) = f(x) / s)
COMMUTING_KINDS = frozenset({"relu", "leaky_relu", "avg_pool", "adaptive_avg_pool"})
#: data-moving op kinds (by prefix) that keep each channel's values together
COMMUTING_PREFIXES = ("max_pool", "maxpool", "adaptive_max_pool", "adaptivemaxpool", "dropout",
                      "alpha_dropout", "identity", "flatten", "reshape", "view", "contiguous",
                      "clone", "detach", "stochastic_depth")
#: norm kinds whose affine parameters take the factor, and their channel axis
_NORM_AXES = {"layer_norm": -1, "group_norm": 1, "batch_norm": 1}
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclasses.dataclass
class ScalingGroup:
    """A producer and the layers reading its output (see the module docstring).

    Attributes:
        producer: the producer's node name (``None`` when no producer was found).
        producer_module: its module path.
        kind: its op kind.
        axis: the channel axis of its output (1 or -1).
        consumers: ``(layer, node)`` of each conv / linear reading the output.
        reason: why the group cannot be rescaled (None: it can).
    """

    producer: str | None
    producer_module: str | None
    kind: str
    axis: int
    consumers: list[tuple[Layer, fx.Node]] = dataclasses.field(default_factory=list)
    reason: str | None = None

    @property
    def name(self) -> str:
        return self.producer_module or self.producer or "?"

    @property
    def consumer_names(self) -> str:
        return ", ".join(layer.path for layer, _ in self.consumers)


def _commutes(ann: NodeAnnotation) -> bool:
    if ann.role == "quantized":
        return ann.kind in COMMUTING_KINDS
    return ann.role == "passthrough" and ann.kind.startswith(COMMUTING_PREFIXES)


def consumer_axis(layer: Layer) -> int:
    """The channel axis of a layer's input: 1 for a conv, -1 for a linear."""
    return -1 if isinstance(layer.module, nn.Linear) else 1


def _producer_problem(model: nn.Module, ann: NodeAnnotation, calls: int) -> str | None:
    """Why the node ``ann`` cannot take a per-output-channel factor (None: it can)."""
    if ann.module is None:
        return f"its input is made by {ann.kind} '{ann.name}', which has no per-channel parameter"
    mod = model.get_submodule(ann.module)
    if calls > 1:
        return f"'{ann.module}' is called at several places"
    if isinstance(mod, FusedMixin):
        if mod.with_add:
            return f"the output of '{ann.name}' includes a residual add"
        if mod.act not in (None, "relu"):
            return f"'{ann.name}' has a fused {mod.act}, which a channel factor does not cross"
        if mod.bn is not None and (mod.bn.weight is None or mod.bn.bias is None):
            return f"the BatchNorm of '{ann.name}' has no affine parameters"
        if isinstance(mod, _TRANSPOSED) and mod.groups != 1:
            return f"'{ann.name}' is a grouped ConvTranspose"
        return None
    if ann.kind in _NORM_AXES:
        weight = getattr(mod, "weight", None)
        if weight is None:
            return f"the {ann.kind} '{ann.name}' has no affine parameters"
        if ann.kind == "layer_norm" and len(mod.normalized_shape) != 1:
            return f"the layer_norm '{ann.name}' normalizes over several dimensions"
        return None
    return (f"its input is made by {ann.kind} '{ann.name}', which has no per-channel "
            "parameter to fold a factor into")


def _producer_axis(model: nn.Module, ann: NodeAnnotation) -> int:
    if ann.kind in _NORM_AXES:
        return _NORM_AXES[ann.kind]
    return -1 if isinstance(model.get_submodule(ann.module), nn.Linear) else 1


def find_scaling_groups(model: fx.GraphModule, layers: list[Layer],
                        batches: list[Any]) -> list[ScalingGroup]:
    """The scaling groups of ``model`` for the consumer ``layers``.

    Args:
        model: a prepared model, in an :func:`~._common.algorithm_session`.
        layers: the candidate consumers (from :func:`~._common.prepared_layers`).
        batches: calibration batches; the first is run in float to learn every node's
            output shape (producer candidates and consumer inputs).

    Returns:
        one group per producer found, valid or not (``reason``), plus a group without producer
        for each layer whose input has none; in graph order of the producers.
    """
    shapes: dict[str, torch.Size] = {}
    record(model, batches[:1], [n.name for n in model.graph.nodes if n.op != "output"],
           quantized=False, sink=lambda _i, name, v: shapes.__setitem__(
               name, v.shape) if isinstance(v, Tensor) else None)
    anns = get_annotations(model)
    by_name = {n.name: n for n in model.graph.nodes}
    layer_of = {node.name: layer for layer in layers for node in layer.nodes}
    calls: dict[str, int] = {}
    for node, ann in anns.items():
        if node.op == "call_module" and ann.module is not None:
            calls[ann.module] = calls.get(ann.module, 0) + 1
    groups: dict[str, ScalingGroup] = {}
    orphans: list[ScalingGroup] = []
    for layer in layers:
        for node, ann in zip(layer.nodes, layer.annotations, strict=True):
            src = ann.input("input")
            cur = by_name[src.node] if src is not None else None
            while cur is not None and _commutes(anns[cur]) and len(anns[cur].inputs) == 1:
                cur = by_name[anns[cur].inputs[0].node]
            if cur is None or anns[cur].role != "quantized" or cur.name in groups:
                if cur is None or anns[cur].role != "quantized":
                    what = "a model input" if cur is None or cur.op == "placeholder" else \
                        f"{anns[cur].kind} '{anns[cur].name}'"
                    orphans.append(ScalingGroup(None, None, "", 1, [(layer, node)],
                                                f"its input is {what}, not a layer output"))
                continue
            pann = anns[cur]
            group = ScalingGroup(cur.name, pann.module, pann.kind, 1)
            groups[cur.name] = group
            group.reason = _producer_problem(model, pann, calls.get(pann.module or "", 0))
            if group.reason is None:
                group.axis = _producer_axis(model, pann)
            _collect_consumers(group, cur, anns, layer_of, calls)
            if group.reason is None:
                group.reason = _shape_problem(group, shapes)
    order = {n.name: i for i, n in enumerate(model.graph.nodes)}
    found = sorted(groups.values(), key=lambda g: order[g.producer])
    return found + orphans


def _collect_consumers(group: ScalingGroup, producer: fx.Node,
                       anns: dict[fx.Node, NodeAnnotation], layer_of: dict[str, Layer],
                       calls: dict[str, int]) -> None:
    frontier = [producer]
    seen = {producer}
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            uann = anns[user]
            layer = layer_of.get(user.name)
            uses = [i.name for i in uann.inputs if i.node == node.name]
            if layer is not None and uses == ["input"]:
                group.consumers.append((layer, user))
                if calls.get(layer.path, 0) > 1 and group.reason is None:
                    group.reason = f"the consumer '{layer.path}' is called at several places"
            elif _commutes(uann) and len(uann.inputs) == 1:
                frontier.append(user)
            elif group.reason is None:
                what = "the model output" if user.op == "output" else \
                    f"{uann.kind} '{uann.name}'" + (f" (as '{uses[0]}')" if layer else "")
                group.reason = f"the output of '{group.name}' also feeds {what}"
    order = {n: i for i, n in enumerate(producer.graph.nodes)}
    group.consumers.sort(key=lambda c: order[c[1]])


def _shape_problem(group: ScalingGroup, shapes: dict[str, torch.Size]) -> str | None:
    p = shapes.get(group.producer)
    if p is None:
        return "the producer's output was not reached by the calibration data"
    channels = p[group.axis]
    for layer, node in group.consumers:
        ann = layer.annotations[layer.nodes.index(node)]
        q = shapes.get(ann.input("input").node)
        if q is None:
            return f"the input of '{layer.path}' was not reached by the calibration data"
        axis = consumer_axis(layer)
        if group.axis == 1:
            ok = len(q) >= 2 and tuple(q[:2]) == tuple(p[:2]) and (axis == 1 or len(q) == 2)
        else:
            ok = q[-1] == channels and axis == -1
        if not ok:
            return (f"the channels of '{group.name}' ({tuple(p)}) do not map one to one onto "
                    f"the input channels of '{layer.path}' ({tuple(q)})")
    if not group.consumers:
        return f"no conv / linear reads the output of '{group.name}'"
    return None


# -- ranges ------------------------------------------------------------------------------------
@torch.no_grad()
def input_channel_max(layer: Layer) -> Tensor:
    """max |folded weight| of each *input* channel of a layer (over outputs and kernel)."""
    mod = layer.module
    w = mod.folded_weight_bias()[0].detach().abs().float()
    if isinstance(mod, nn.Linear):
        return w.amax(0)
    if isinstance(mod, _TRANSPOSED):
        return w.flatten(1).amax(1)
    g = mod.groups
    per = w.flatten(2).amax(2)  # [out, in / g]
    out, in_g = per.shape
    return per.view(g, out // g, in_g).amax(1).reshape(g * in_g)


@torch.no_grad()
def output_channel_max(mod: nn.Module) -> Tensor:
    """max |folded weight| of each output channel of a conv / linear."""
    w = mod.folded_weight_bias()[0].detach().abs().float()
    if isinstance(mod, _TRANSPOSED):
        return w.transpose(0, 1).flatten(1).amax(1)
    return w.flatten(1).amax(1)


# -- applying a factor -------------------------------------------------------------------------
def _bshape(n: int, axis: int, ndim: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = n
    return shape


@torch.no_grad()
def _scale_inputs(layer: Layer, s: Tensor) -> None:
    mod = layer.module
    w = mod.weight
    s = s.to(w)
    if isinstance(mod, nn.Linear):
        w.mul_(s.view(1, -1))
    elif isinstance(mod, _TRANSPOSED):
        w.mul_(s.view(_bshape(-1, 0, w.dim())))
    else:
        g = mod.groups
        out, in_g = w.shape[0], w.shape[1]
        sw = s.view(g, 1, in_g).expand(g, out // g, in_g).reshape(out, in_g)
        w.mul_(sw.view(out, in_g, *([1] * (w.dim() - 2))))


@torch.no_grad()
def _scale_outputs(model: nn.Module, group: ScalingGroup, s: Tensor) -> None:
    mod = model.get_submodule(group.producer_module)
    inv = s.reciprocal()
    if isinstance(mod, FusedMixin) and mod.bn is not None:
        params: list[Any] = [mod.bn.weight, mod.bn.bias]
        axis_of = {id(p): 0 for p in params}
    elif isinstance(mod, FusedMixin):
        params = [mod.weight, mod.bias]
        axis_of = {id(mod.weight): 1 if isinstance(mod, _TRANSPOSED) else 0}
        if mod.bias is not None:
            axis_of[id(mod.bias)] = 0
    else:  # a norm's affine parameters
        params = [mod.weight, getattr(mod, "bias", None)]
        axis_of = {id(p): 0 for p in params if p is not None}
    for p in params:
        if p is not None:
            p.mul_(inv.to(p).view(_bshape(-1, axis_of[id(p)], p.dim())))


def scale_group(model: nn.Module, group: ScalingGroup, s: Tensor) -> None:
    """Divide the producer's output channels by ``s`` and multiply its consumers' input
    channels by ``s`` (``s > 0``, one per channel): the float function is unchanged."""
    if group.reason is not None:
        raise ValueError(f"cannot rescale '{group.name}': {group.reason}")
    if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise ValueError(f"channel factors for '{group.name}' must be positive and finite")
    _scale_outputs(model, group, s)
    for layer, _ in group.consumers:
        _scale_inputs(layer, s)
