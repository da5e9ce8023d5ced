"""ONNX emitters for the ops that only move data (reshape, permute, slicing, split, pooling by
max, padding...) and for no-ops (dropout in eval, contiguous, clone).

A data-moving op on a quantized tensor is written between a ``DequantizeLinear`` and the
consumers' ``QuantizeLinear`` at the same scale (an explicit ``Q -> DQ`` after every reshape
also avoids an onnxruntime 1.32 session-creation bug, docs/export.md); onnxruntime then drops
the pair and moves the int8 data itself.  Shapes come from the recorded run
(:class:`~._graph.TensorMeta`), so reshape targets are constants, with ``0`` / ``-1`` where a
dynamic axis runs through them.  A no-op returns its input's value: no ONNX node at all.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._graph import INT64_MAX, OpCall, register_emitter

__all__: list[str] = []

INT64_MIN = np.iinfo(np.int64).min


def _flat(v: Any) -> list[Any]:
    if isinstance(v, (list, tuple, torch.Size)):
        out: list[Any] = []
        for x in v:
            out.extend(_flat(x))
        return out
    return [v]


@register_emitter("contiguous", "clone", "detach", "identity", "dropout", "dropout1d",
                  "dropout2d", "dropout3d", "alphadropout", "stochastic_depth",
                  "stochasticdepth", "float", "to")
def _no_op(call: OpCall) -> Any:
    if call.kind in ("dropout", "dropout1d", "dropout2d", "dropout3d", "stochastic_depth"):
        if call.module is None and call.const("training", call.kind != "stochastic_depth") \
                and call.const("p", 0.5):
            raise call.unsupported("dropout in training mode (pass training=self.training and "
                                   "export in eval mode)")
    if call.module is not None and call.module.training and "dropout" in call.kind:
        raise call.unsupported("a dropout module in training mode; call model.eval()")
    if call.kind in ("float", "to") and call.out.dtype != call.meta().dtype:
        raise call.unsupported(f"a cast to {call.out.dtype}")
    return call.value(call.args["input"])


@register_emitter("reshape", "view", "flatten", "unflatten", "view_as", "reshape_as", "squeeze",
                  "unsqueeze")
def _reshape(call: OpCall) -> Any:
    src, out = call.meta(), call.out
    if src.shape == out.shape and src.dynamic == out.dynamic:
        return call.value(call.args["input"])
    return call.reshape(call.tensor("input"), out, src)


def _perm(call: OpCall, rank: int) -> list[int]:
    kind = call.kind
    if kind == "permute":
        return [int(d) % rank for d in _flat(call.const("dims"))]
    perm = list(range(rank))
    if kind == "t":
        return perm[::-1]
    if kind == "movedim":
        src = [int(d) % rank for d in _flat(call.const("source"))]
        dst = [int(d) % rank for d in _flat(call.const("destination"))]
        out: list[int | None] = [None] * rank
        for s, d in zip(src, dst, strict=True):
            out[d] = s
        rest = iter(d for d in range(rank) if d not in src)
        return [next(rest) if o is None else o for o in out]
    a, b = int(call.const("dim0")) % rank, int(call.const("dim1")) % rank
    perm[a], perm[b] = perm[b], perm[a]
    return perm


@register_emitter("permute", "transpose", "t", "swapaxes", "swapdims", "movedim")
def _transpose(call: OpCall) -> Any:
    rank = call.meta().rank
    perm = _perm(call, rank) if rank >= 2 else list(range(rank))
    if perm == list(range(rank)):
        return call.value(call.args["input"])
    return call.emit("Transpose", [call.tensor("input")], perm=perm)


def _slice(call: OpCall, x: str, axes: list[int], starts: list[int], ends: list[int],
           steps: list[int]) -> str:
    return call.emit("Slice", [x, call.ints("starts", starts), call.ints("ends", ends),
                               call.ints("axes", axes), call.ints("steps", steps)])


@register_emitter("getitem")
def _getitem(call: OpCall) -> Any:
    """A list element (of a split / chunk), or basic tensor indexing: ``Slice`` of the sliced
    axes, then ``Reshape`` to the recorded shape (integer indices drop axes, ``None`` adds
    them)."""
    value = call.value(call.args["input"])
    index = call.const("index")
    if isinstance(value, (list, tuple)):
        return value[index]
    src = call.meta()
    items = list(index) if isinstance(index, tuple) else [index]
    for it in items:
        if not (it is None or it is Ellipsis or isinstance(it, slice)
                or (isinstance(it, int) and not isinstance(it, bool))):
            raise call.unsupported(f"indexing with {type(it).__name__} (only integers, slices, "
                                   "None and ...)")
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    axes, starts, ends, steps = [], [], [], []
    dim, squeezed = 0, False
    for it in items:
        if it is Ellipsis:
            dim += src.rank - consumed
            continue
        if it is None:
            continue
        if isinstance(it, int):
            squeezed = True
            start, end, step = it, (it + 1 if it != -1 else INT64_MAX), 1
        else:
            start = 0 if it.start is None else int(it.start)
            end = INT64_MAX if it.stop is None else int(it.stop)
            step = 1 if it.step is None else int(it.step)
            if (start, end, step) == (0, INT64_MAX, 1):
                dim += 1
                continue
        if src.dynamic[dim] and not (isinstance(it, slice) and it.stop is None and start >= 0):
            raise call.unsupported("slicing a dynamic axis")
        axes.append(dim)
        starts.append(start)
        ends.append(end)
        steps.append(step)
        dim += 1
    x = call.tensor("input")
    if axes:
        x = _slice(call, x, axes, starts, ends, steps)
    if squeezed or call.out.rank != src.rank:
        x = call.reshape(x, call.out, None if axes else src, "reshape")
    elif not axes:
        return value
    return x


@register_emitter("chunk", "split", "unbind")
def _split(call: OpCall) -> list[str]:
    src = call.meta()
    outs = call.out_list
    dim = int(call.const("dim", 0)) % src.rank
    if src.dynamic[dim]:
        raise call.unsupported("splitting a dynamic axis")
    sizes = [o.shape[dim] if call.kind != "unbind" else 1 for o in outs]
    names = call.emit("Split", [call.tensor("input"), call.ints("split", sizes)],
                      outputs=len(outs), axis=dim)
    names = [names] if isinstance(names, str) else list(names)
    if call.kind == "unbind":
        axes = call.ints("axes", [dim])
        names = [call.emit("Squeeze", [n, axes], f"squeeze_{i}") for i, n in enumerate(names)]
    return names


@register_emitter("narrow")
def _narrow(call: OpCall) -> str:
    src = call.meta()
    dim = int(call.const("dim")) % src.rank
    start, length = int(call.const("start")), int(call.const("length"))
    if src.dynamic[dim]:
        raise call.unsupported("narrowing a dynamic axis")
    start %= src.shape[dim]
    return _slice(call, call.tensor("input"), [dim], [start], [start + length], [1])


@register_emitter("flip")
def _flip(call: OpCall) -> str:
    rank = call.meta().rank
    dims = [int(d) % rank for d in _flat(call.const("dims"))]
    n = len(dims)
    return _slice(call, call.tensor("input"), dims, [-1] * n, [INT64_MIN] * n, [-1] * n)


@register_emitter("expand", "expand_as")
def _expand(call: OpCall) -> Any:
    src, out = call.meta(), call.out
    if src.shape == out.shape and src.dynamic == out.dynamic:
        return call.value(call.args["input"])
    shift = out.rank - src.rank
    target: list[Any] = []
    for i, (d, dyn) in enumerate(zip(out.shape, out.dynamic, strict=True)):
        if dyn:
            j = i - shift
            # broadcasting keeps an input dim of the same (dynamic) size; else read it at run time
            d = 1 if j >= 0 and src.dynamic[j] else call.dynamic_dim(out, i)
        target.append(d)
    return call.emit("Expand", [call.tensor("input"), call.shape_input("shape", target)])


@register_emitter("repeat")
def _repeat(call: OpCall) -> str:
    src = call.meta()
    reps = [int(r) for r in _flat(call.const("sizes"))]
    if len(reps) != src.rank:
        raise call.unsupported("repeat with more repeats than dims")
    return call.emit("Tile", [call.tensor("input"), call.ints("repeats", reps)])


def _ints(v: Any, n: int) -> list[int]:
    v = _flat(v)
    return [int(v[0])] * n if len(v) == 1 else [int(x) for x in v]


@register_emitter("maxpool1d", "maxpool2d", "maxpool3d", "max_pool1d", "max_pool2d",
                  "max_pool3d")
def _max_pool(call: OpCall) -> str:
    if call.const("return_indices", False):
        raise call.unsupported("max pooling with return_indices=True")
    dims = call.meta().rank - 2
    kernel = _ints(call.const("kernel_size"), dims)
    stride = call.const("stride")
    stride = kernel if stride is None or _flat(stride) == [] else _ints(stride, dims)
    return call.emit("MaxPool", [call.tensor("input")], kernel_shape=kernel, strides=stride,
                     pads=_ints(call.const("padding", 0), dims) * 2,
                     dilations=_ints(call.const("dilation", 1), dims),
                     ceil_mode=int(bool(call.const("ceil_mode", False))))


@register_emitter("adaptivemaxpool1d", "adaptivemaxpool2d", "adaptivemaxpool3d",
                  "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d")
def _adaptive_max_pool(call: OpCall) -> str:
    if call.const("return_indices", False):
        raise call.unsupported("max pooling with return_indices=True")
    src, out = call.meta(), call.out
    ins, outs = src.shape[2:], out.shape[2:]
    x = call.tensor("input")
    if all(o == 1 for o in outs):
        return call.emit("GlobalMaxPool", [x])
    if any(src.dynamic[2:]) or any(i % o for i, o in zip(ins, outs, strict=True)):
        raise call.unsupported(f"adaptive max pooling of {list(ins)} to {list(outs)}")
    kernel = [i // o for i, o in zip(ins, outs, strict=True)]
    return call.emit("MaxPool", [x], kernel_shape=kernel, strides=kernel)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge",
              "circular": "wrap"}


@register_emitter("pad", "zeropad1d", "zeropad2d")
def _pad(call: OpCall) -> str:
    """torch's pad tuple (last dim first, before/after pairs) as ONNX ``pads``."""
    rank = call.meta().rank
    pad = _flat(call.const("padding") if call.kind != "pad" else call.const("pad"))
    if call.kind != "pad" and len(pad) == 1:
        pad = pad * (2 if call.kind == "zeropad1d" else 4)
    mode = call.const("mode", "constant") if call.kind == "pad" else "constant"
    if mode not in _PAD_MODES:
        raise call.unsupported(f"pad mode {mode!r}")
    begin, end = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        begin[rank - 1 - i], end[rank - 1 - i] = int(pad[2 * i]), int(pad[2 * i + 1])
    inputs = [call.tensor("input"), call.ints("pads", begin + end)]
    value = call.const("value") if call.kind == "pad" else None
    if mode == "constant" and value:
        inputs.append(call.initializer("value", np.asarray(value, np.float32)))
    return call.emit("Pad", inputs, mode=_PAD_MODES[mode])


@register_emitter("pixelshuffle", "pixel_shuffle")
def _pixel_shuffle(call: OpCall) -> str:
    if call.meta().rank != 4:
        raise call.unsupported("pixel_shuffle of a tensor that is not 4-D")
    return call.emit("DepthToSpace", [call.tensor("input")],
                     blocksize=int(call.const("upscale_factor")), mode="CRD")
