"""Learned weight rounding by output reconstruction: the engine of AdaRound and BRECQ.

Each weight of a layer is rounded down or up, as learned (AdaRound, Nagel et al., ICML 2020):

    W~ = s * clamp(floor(W / s) + h(V), qmin, qmax)
    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)      zeta = 1.1, gamma = -0.1

``W`` is the folded weight (BatchNorm included), ``s`` its per-channel scale and
``qmin, qmax`` its integer range, all read from the layer's weight fake quant (so the bit width
is the fake quant's: at 4 bits once qatkit has int4 weights).  ``V`` starts where ``W~ = W``
and minimizes, with Adam, the reconstruction error of a *block* of the model plus a
regularizer that pushes every ``h`` to 0 or 1:

    | block_quantized(x_q) - block_float(x_f) |^2  +  lambda * sum(1 - |2 h - 1| ** beta)

with ``beta`` annealed from 20 to 2 after a warm-up without the regularizer (BRECQ's
schedule).  ``x_q`` is the block's input in the quantized model (blocks before already
rounded: errors upstream are compensated), ``x_f`` and the target the float model's.  Inside
a block activations are fake-quantized with their calibrated scales (straight-through
gradient); a layer's output is compared before its output fake quant.  A block is one layer
(AdaRound) or a run of consecutive layers and everything between them (BRECQ).

The result is written as ordinary float weights whose rounding gives the learned integers
(:func:`~._common.set_integer_weights`): ``quantize_weight()``, ``convert_fx`` and the
exporter read them unchanged.  The elements that set each channel's range keep nearest
rounding, so observing the weights again gives the same scale.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence

import torch
from torch import Tensor, fx, nn

from ._common import (
    Batch,
    Layer,
    algorithm_session,
    call_inputs,
    channel_view,
    collect_batches,
    exact_evaluation_off,
    layer_progress,
    log_table,
    prepared_layers,
    record,
    samples_in,
    set_integer_weights,
    working_copy,
)

__all__ = ["Rounding", "Block", "reconstruct", "layer_blocks", "consecutive_blocks"]

ZETA, GAMMA = 1.1, -0.1


class Rounding(nn.Module):
    """AdaRound's learnable rounding of one layer's folded weight (see the module docstring).

    Example::

        >>> r = Rounding(qconv)
        >>> torch.equal(r.hard_int(), qconv.quantize_weight())   # starts at nearest rounding
        True
    """

    def __init__(self, mod: nn.Module) -> None:
        super().__init__()
        wfq = mod.weight_fake_quant
        w = mod.folded_weight_bias()[0].detach().float()
        self.qmin, self.qmax = wfq.quant_min, wfq.quant_max
        self.register_buffer("scale", channel_view(wfq, w).clone())
        x = torch.div(w, self.scale)
        self.register_buffer("floor", torch.floor(x))
        self.register_buffer("nearest", torch.round(x).clamp_(self.qmin, self.qmax))
        # the elements setting each channel's range keep nearest rounding
        if wfq.is_per_channel:
            axis = wfq.ch_axis % w.dim()
            dims = [d for d in range(w.dim()) if d != axis]
            amax = w.abs().amax(dim=dims, keepdim=True)
        else:
            amax = w.abs().amax()
        self.register_buffer("fixed", w.abs() >= amax)
        rest = (x - self.floor).clamp(0.0, 1.0 - 1e-6)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0))

    def h(self) -> Tensor:
        """The rounding offsets in [0, 1]."""
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def soft_weight(self) -> Tensor:
        """The differentiable weight of the relaxation."""
        q = torch.where(self.fixed, self.nearest, self.floor + self.h())
        return q.clamp(self.qmin, self.qmax) * self.scale

    def hard_int(self) -> Tensor:
        """The learned integers (``h >= 0.5`` rounds up)."""
        q = torch.where(self.fixed, self.nearest, self.floor + (self.v >= 0).float())
        return q.clamp(self.qmin, self.qmax)

    def hard_weight(self) -> Tensor:
        return self.hard_int() * self.scale

    def regularizer(self, beta: float) -> Tensor:
        """``sum(1 - |2h - 1| ** beta)`` over the learnable elements."""
        reg = 1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)
        return reg.masked_fill(self.fixed, 0.0).sum()


@dataclasses.dataclass
class Block:
    """What one reconstruction step optimizes.

    Attributes:
        layers: the layers whose rounding is learned here (a layer already rounded in an
            earlier block -- a module called again -- is not).
        nodes: the graph nodes run, in graph order.
        inputs: nodes outside the block whose values it reads (recorded).
        outputs: nodes of the block whose values leave it (compared with the float model).
    """

    layers: list[Layer]
    nodes: list[fx.Node]
    inputs: list[str]
    outputs: list[str]

    @property
    def name(self) -> str:
        return ", ".join(layer.path for layer in self.layers)


def _make_block(model: fx.GraphModule, layers: list[Layer], nodes: list[fx.Node]) -> Block:
    inside = set(nodes)
    inputs: list[str] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr" and a.name not in inputs:
                inputs.append(a.name)
    outputs = [n.name for n in nodes if any(u not in inside for u in n.users)]
    return Block(layers, nodes, inputs, outputs)


def layer_blocks(model: fx.GraphModule, layers: list[Layer]) -> list[Block]:
    """One block per layer (AdaRound): the layer's calls only."""
    return [_make_block(model, [layer], list(layer.nodes)) for layer in layers]


def consecutive_blocks(model: fx.GraphModule, layers: list[Layer], size: int) -> list[Block]:
    """Blocks of ``size`` consecutive layers (graph order) and every node between the first
    call of the first and the last call of the last (BRECQ's ``finetune_block_size``)."""
    order = {n: i for i, n in enumerate(model.graph.nodes)}
    all_nodes = list(model.graph.nodes)
    blocks = []
    for k in range(0, len(layers), size):
        group = layers[k:k + size]
        first = min(order[n] for layer in group for n in layer.nodes)
        last = max(order[n] for layer in group for n in layer.nodes)
        nodes = [n for n in all_nodes[first:last + 1]
                 if n.op in ("call_module", "call_function", "call_method", "get_attr")]
        blocks.append(_make_block(model, group, nodes))
    return blocks


# -- running a block -------------------------------------------------------------------------
def _run_block(model: fx.GraphModule, block: Block, env: dict[str, Any],
               roundings: dict[str, Rounding], soft: bool) -> dict[str, Any]:
    """Run the block's nodes on ``env`` (its inputs) and return the values of its outputs
    (a learned layer's before its output fake quant)."""
    env = dict(env)
    raw: dict[str, Any] = {}
    learned = {n: layer for layer in block.layers if layer.path in roundings
               for n in layer.nodes}
    for n in block.nodes:
        args = fx.node.map_arg(n.args, lambda a: env[a.name])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a.name])
        if n in learned:
            layer = learned[n]
            mod = layer.module
            x, other, size = call_inputs(n, layer.annotations[layer.nodes.index(n)], env)
            r = roundings[layer.path]
            weight = r.soft_weight() if soft else r.hard_weight()
            bias = mod.folded_weight_bias()[1]
            y = mod.finish(mod.weighted_op(x, weight, None if bias is None else bias.detach(),
                                           size), other, fake_quant=False)
            raw[n.name] = y
            apq = mod.activation_post_process
            out = apq(y) if apq is not None else y
        elif n.op == "call_module":
            out = model.get_submodule(str(n.target))(*args, **kwargs)
        elif n.op == "call_function":
            out = n.target(*args, **kwargs)
        elif n.op == "call_method":
            out = getattr(args[0], str(n.target))(*args[1:], **kwargs)
        else:  # get_attr
            out = _fetch(model, str(n.target))
        env[n.name] = out
    return {name: raw.get(name, env[name]) for name in block.outputs}


def _fetch(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _loss(outputs: dict[str, Any], targets: dict[str, Any]) -> Tensor:
    """Sum over outputs of BRECQ's error: squared error summed over dim 1, mean over the
    rest."""
    total = None
    for name, y in outputs.items():
        t = targets[name]
        if not isinstance(y, Tensor) or not y.is_floating_point():
            continue
        err = (y - t).pow(2)
        e = err.sum(1).mean() if err.dim() >= 2 else err.mean()
        total = e if total is None else total + e
    if total is None:
        raise ValueError("the block has no floating-point output to reconstruct")
    return total


class _Samples:
    """The recorded inputs and targets of a block, per calibration batch; draws random
    samples (rows along dim 0 of the tensors whose dim 0 is the batch)."""

    def __init__(self, inputs: list[dict[str, Any]], targets: list[dict[str, Any]],
                 sizes: list[int], seed: int) -> None:
        self.inputs, self.targets, self.sizes = inputs, targets, sizes
        self.gen = torch.Generator().manual_seed(seed)

    def _take(self, values: dict[str, Any], n: int, idx: Tensor) -> dict[str, Any]:
        out = {}
        for k, v in values.items():
            if isinstance(v, Tensor) and v.dim() and v.shape[0] == n:
                out[k] = v.index_select(0, idx.to(v.device))
            else:
                out[k] = v
        return out

    def draw(self, k: int) -> tuple[dict[str, Any], dict[str, Any]]:
        weights = torch.tensor(self.sizes, dtype=torch.float64)
        b = int(torch.multinomial(weights, 1, generator=self.gen))
        n = self.sizes[b]
        idx = torch.randperm(n, generator=self.gen)[:max(1, min(k, n))]
        return self._take(self.inputs[b], n, idx), self._take(self.targets[b], n, idx)


@torch.no_grad()
def _block_error(model: fx.GraphModule, block: Block, samples: _Samples,
                 roundings: dict[str, Rounding]) -> float:
    """The reconstruction error with hard rounding, averaged over the calibration batches."""
    total = 0.0
    for inputs, targets, n in zip(samples.inputs, samples.targets, samples.sizes, strict=True):
        total += float(_loss(_run_block(model, block, inputs, roundings, soft=False),
                             targets)) * n
    return total / max(sum(samples.sizes), 1)


def reconstruct(model: fx.GraphModule, data: Any, *, algorithm: str, block_size: int | None,
                finetune_epochs: int, finetune_batch_size: int, finetune_lr: float,
                reg_weight: float, warmup: float, beta: tuple[float, float],
                num_batches: int | None, device: Any, progress: bool, inplace: bool,
                seed: int) -> fx.GraphModule:
    """Learn the rounding of every layer's weights, block by block (see the module
    docstring); ``block_size`` None: one layer per block (AdaRound)."""
    if finetune_epochs < 0 or finetune_batch_size < 1 or finetune_lr <= 0:
        raise ValueError(f"{algorithm}: need finetune_epochs >= 0, finetune_batch_size >= 1 "
                         f"and finetune_lr > 0; got {finetune_epochs}, {finetune_batch_size}, "
                         f"{finetune_lr}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"{algorithm}: finetune_block_size must be >= 1, got {block_size}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"{algorithm}: warmup is a fraction in [0, 1), got {warmup}")
    qm = working_copy(model, inplace)
    layers = prepared_layers(qm, algorithm)
    batches, _ = collect_batches(qm, data, num_batches, device, algorithm)
    reference = copy.deepcopy(qm)  # the float model the blocks are reconstructed against
    blocks = (layer_blocks(qm, layers) if block_size is None
              else consecutive_blocks(qm, layers, block_size))
    rows: list[dict[str, Any]] = []
    done: set[str] = set()
    grads = [(p, p.requires_grad) for p in qm.parameters()]
    with algorithm_session(qm), algorithm_session(reference), exact_evaluation_off(qm):
        try:
            for p, _ in grads:
                p.requires_grad_(False)
            for i, block in enumerate(layer_progress(
                    blocks, algorithm, progress, unit="layer" if block_size is None else "block")):
                block.layers = [layer for layer in block.layers if layer.path not in done]
                if not block.layers:
                    continue
                rows.append(_reconstruct_block(qm, reference, block, batches, finetune_epochs,
                                               finetune_batch_size, finetune_lr, reg_weight,
                                               warmup, beta, seed + i))
                done.update(layer.path for layer in block.layers)
        finally:
            for p, flag in grads:
                p.requires_grad_(flag)
    log_table(qm, algorithm, rows)
    return qm


def _reconstruct_block(qm: fx.GraphModule, reference: fx.GraphModule, block: Block,
                       batches: Sequence[Batch], steps: int, batch_size: int, lr: float,
                       reg_weight: float, warmup: float, beta: tuple[float, float],
                       seed: int) -> dict[str, Any]:
    inputs = record(qm, batches, block.inputs, quantized=True)
    targets = record(reference, batches, block.outputs, quantized=False)
    samples = _Samples(inputs, targets, [samples_in(b) for b in batches], seed)
    roundings = {layer.path: Rounding(layer.module) for layer in block.layers}
    nearest = {p: r.hard_int() for p, r in roundings.items()}
    err_nearest = _block_error(qm, block, samples, roundings)
    params = [r.v for r in roundings.values()]
    opt = torch.optim.Adam(params, lr=lr)
    start = int(warmup * steps)
    for step in range(steps):
        x, t = samples.draw(batch_size)
        loss = _loss(_run_block(qm, block, x, roundings, soft=True), t)
        if step >= start:
            progress = (step - start) / max(steps - start, 1)
            b = beta[1] + (beta[0] - beta[1]) * max(0.0, 1.0 - progress)
            loss = loss + reg_weight * sum(r.regularizer(b) for r in roundings.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    err_learned = _block_error(qm, block, samples, roundings)
    keep = err_learned <= err_nearest
    flipped = unset = 0
    for layer in block.layers:
        r = roundings[layer.path]
        q = r.hard_int() if keep else nearest[layer.path]
        flipped += int((q != nearest[layer.path]).sum())
        unset += set_integer_weights(layer.module, q)
    return {"layer": block.name, "error_nearest": err_nearest,
            "error_learned": err_learned, "kept": keep, "flipped": flipped,
            "weights": sum(int(r.v.numel()) for r in roundings.values()), "unset": unset}
