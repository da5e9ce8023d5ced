"""ONNX emitters for the ops only eager mode makes (:data:`qatkit.export._graph.EMITTERS`).

* ``add_relu`` (:meth:`qatkit.nn.FloatFunctional.add_relu`): ``Add -> Relu`` between the
  inputs' ``DequantizeLinear`` and the output's ``QuantizeLinear`` -- one rounding, as the
  integer model;
* a fused float module of :func:`qatkit.fuse_modules` kept float (qconfig None): one float
  ``Conv`` / ``ConvTranspose`` / ``Gemm`` with the BatchNorm folded in (running statistics),
  then its ReLU / ReLU6, written by the exporter's conv emitter.
"""

from __future__ import annotations

from typing import Any

from ..eager.fuse import FUSED_FLOAT_CLASSES
from ._graph import EMITTERS, OpCall, register_emitter

__all__: list[str] = []


@register_emitter("add_relu")
def _emit_add_relu(call: OpCall) -> str:
    y = call.emit("Add", [call.tensor("input"), call.tensor("other")], "add")
    return call.emit("Relu", [y], "relu")


@register_emitter(*(cls.__name__.lower() for cls in FUSED_FLOAT_CLASSES.values()))
def _emit_fused_float(call: OpCall) -> Any:
    return EMITTERS["conv"](call)
