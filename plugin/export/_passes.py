"""Passes over the emitted ONNX nodes, after every op is written.

* :func:`guard_float_layers` -- keeps float islands float in onnxruntime: a float conv / gemm
  between a ``DequantizeLinear`` and a ``QuantizeLinear`` gets a single-input ``Concat`` before
  the ``Q`` (onnxruntime's WeightBiasQuantization would quantize its weights to int8);
* :func:`live_nodes` -- drops nodes no graph output depends on.
"""

from __future__ import annotations

import onnx
from onnx import helper

from ._graph import OnnxGraph

__all__ = ["guard_float_layers", "live_nodes"]

#: ops onnxruntime folds into a conv / gemm before it looks for QDQ patterns (or that a QDQ
#: conv pattern may end with)
_FOLDED_INTO_LAYER = ("Relu", "Clip", "BatchNormalization", "Add", "Sub", "Mul", "Div",
                      "Identity")


def guard_float_layers(graph: OnnxGraph) -> list[onnx.NodeProto]:
    """The nodes, with a single-input ``Concat`` before the ``QuantizeLinear`` that a float
    conv / gemm (float weight initializer, dequantized input) reaches without branching through
    ops onnxruntime folds into it (ReLU, Clip, BatchNormalization, arithmetic):
    onnxruntime's WeightBiasQuantization (basic level and up) would otherwise quantize its
    float weights to int8 per tensor, and the float island would not run as float."""
    nodes = list(graph.nodes)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
        for o in n.output:
            producer[o] = n
    guards: dict[int, onnx.NodeProto] = {}
    for n in nodes:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(n.input) < 2:
            continue
        dq = producer.get(n.input[0])
        weight = graph.initializers.get(n.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or weight is None \
                or weight.data_type != onnx.TensorProto.FLOAT:
            continue
        cur = n
        while len(consumers.get(cur.output[0], [])) == 1:
            nxt = consumers[cur.output[0]][0]
            if nxt.op_type == "QuantizeLinear":
                name = graph.tensor_name(f"{n.name}.keep_float")
                guards[id(nxt)] = helper.make_node("Concat", [cur.output[0]], [name], axis=0,
                                                   name=f"{n.name}.keep_float")
                nxt.input[0] = name
                break
            if nxt.op_type not in _FOLDED_INTO_LAYER:
                break
            cur = nxt
    out = []
    for n in nodes:
        if id(n) in guards:
            out.append(guards[id(n)])
        out.append(n)
    return out


def live_nodes(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """The nodes the outputs depend on, in order (dead branches dropped)."""
    needed = set(outputs)
    keep = []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    return list(reversed(keep))
