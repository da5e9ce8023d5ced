"""Check an exported file with onnxruntime: run it, list the kernels it fused, and measure its
agreement with qatkit's integer model in units of each output's scale.

onnxruntime is a test / dev dependency (``pip install onnxruntime``), imported when these
functions run.

Example::

    >>> path = qatkit.export_onnx(qat_model, (x,), "model.onnx")
    >>> for level in ("disable", "all"):
    ...     print(level, compare_with_onnxruntime(qat_model, path, (x,), level))
    >>> fused_kernels(path)
    {'QLinearConv': 20, 'QGemm': 1, ...}
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from collections import Counter
from typing import Any, Sequence

import numpy as np
import onnx
import pandas as pd
import torch
from torch import fx, nn

from .._modules import set_module
from ..annotation import get_annotations, set_annotations
from ..fx.annotate import annotate
from ..quantized import Quantize, TensorQParams
from .onnx import integer_model_for_export, output_leaves, write_onnx

__all__ = ["OPTIMIZATION_LEVELS", "onnxruntime_session", "run_onnxruntime", "optimized_ops",
           "fused_kernels", "OutputAgreement", "compare_with_onnxruntime", "output_scales",
           "op_agreement"]

#: names accepted for onnxruntime's graph optimization level
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def onnxruntime_session(path: str, optimization: str = "all",
                        optimized_model_path: str | None = None,
                        threads: int | None = 1) -> Any:
    """An onnxruntime CPU session for ``path`` at graph optimization level ``optimization``
    (``"disable"`` = ``ORT_DISABLE_ALL``, ``"all"`` = ``ORT_ENABLE_ALL``).

    Example::

        >>> sess = onnxruntime_session("model.onnx", "disable")
    """
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise ValueError(f"optimization must be one of {OPTIMIZATION_LEVELS}, got "
                         f"{optimization!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization]
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = threads
    if optimized_model_path is not None:
        so.optimized_model_filepath = optimized_model_path
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _numpy_inputs(sess: Any, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"the file takes {len(names)} inputs {names}, got {len(inputs)}")
    return {n: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
            for n, x in zip(names, inputs, strict=True)}


def run_onnxruntime(path: str, inputs: Sequence[Any], optimization: str = "all",
                    threads: int | None = 1) -> list[np.ndarray]:
    """The outputs of ``path`` run by onnxruntime (CPU) on ``inputs`` (tensors or arrays).

    Example::

        >>> [y] = run_onnxruntime("model.onnx", (x,), "disable")
    """
    sess = onnxruntime_session(path, optimization, threads=threads)
    return sess.run(None, _numpy_inputs(sess, inputs))


def optimized_ops(path: str, optimization: str = "all") -> Counter:
    """How many nodes of each op type (``domain::op`` outside ai.onnx) onnxruntime runs after
    its graph optimizations: where ``QLinearConv``, ``QGemm``... appear, it fused the QDQ
    pattern into an integer kernel.

    Example::

        >>> optimized_ops("model.onnx")["com.microsoft::QLinearConv"]
        20
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        onnxruntime_session(path, optimization, optimized_model_path=out)
        model = onnx.load(out)
    return Counter((f"{n.domain}::" if n.domain else "") + n.op_type for n in model.graph.node)


#: integer kernels onnxruntime fuses QDQ patterns into (and the float kernel that breaks int16)
_FUSED = ("QLinear", "QGemm", "MatMulInteger", "ConvInteger", "MatMulNBits",
          "DynamicQuantize")


def fused_kernels(path: str) -> dict[str, int]:
    """The integer kernels onnxruntime (``ORT_ENABLE_ALL``) runs for ``path``: op type
    (without domain) -> count, e.g. ``{'QLinearConv': 20, 'QGemm': 1}``.  ``MatMulNBits``
    here means a float matmul with int8 weights was rewritten to quantize its activations
    dynamically (inexact; qatkit writes ``Gemm(transB=1)`` to avoid it).

    Example::

        >>> fused_kernels("model.onnx")
        {'QGemm': 1, 'QLinearConv': 4, 'QLinearGlobalAveragePool': 1}
    """
    ops = optimized_ops(path, "all")
    out: dict[str, int] = {}
    for op, n in sorted(ops.items()):
        short = op.split("::")[-1]
        if short.startswith(_FUSED):
            out[short] = out.get(short, 0) + n
    return out


@dataclasses.dataclass(frozen=True)
class OutputAgreement:
    """onnxruntime's output vs the integer model's, for one output.

    Attributes:
        name: the output's name in the file.
        numel: number of elements compared.
        exact: fraction of elements with equal integers (``round(y / scale)``).
        within_1_lsb: fraction within one step of the output scale.
        max_lsb: the largest difference in output steps (NaN for a float output).
        max_abs: the largest absolute difference.
        scale: the output's scale (None: a float output, e.g. 32-bit out).
    """

    name: str
    numel: int
    exact: float
    within_1_lsb: float
    max_lsb: float
    max_abs: float
    scale: float | None

    def __repr__(self) -> str:
        return (f"OutputAgreement({self.name!r}: {100 * self.exact:.4f}% exact, "
                f"max {self.max_lsb:g} LSB, n={self.numel})")


def output_scales(int_model: fx.GraphModule) -> list[float | None]:
    """The scale of each output of an integer (or QAT) model, read from its annotation (a
    ``DeQuantStub`` output has its input's scale); None for a float output."""
    anns = get_annotations(int_model)
    by_name = {n.name: n for n in int_model.graph.nodes}
    leaves = output_leaves(next(n for n in int_model.graph.nodes if n.op == "output"))
    scales: list[float | None] = []
    for leaf in leaves:
        ann = anns.get(leaf) if isinstance(leaf, fx.Node) else None
        while ann is not None and ann.output is None and ann.kind == "dequant_stub" \
                and len(ann.inputs) == 1:
            ann = anns[by_name[ann.inputs[0].node]]
        spec = ann.output if ann is not None else None
        scales.append(None if spec is None else float(spec.scale(int_model).reshape(-1)[0]))
    return scales


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _flat_outputs(o)]


def compare_with_onnxruntime(model: nn.Module, path: str, inputs: Sequence[Any],
                             optimization: str = "all") -> list[OutputAgreement]:
    """Run ``path`` in onnxruntime and ``model``'s integer model on ``inputs``; compare each
    output in units of its scale.

    Args:
        model: the model exported (QAT / calibrated: converted here with
            :func:`qatkit.convert_fx`), or its integer model.
        path: the exported file.
        inputs: the model's positional inputs.
        optimization: onnxruntime's graph optimization level (``"disable"`` or ``"all"``).

    Example::

        >>> compare_with_onnxruntime(qat_model, "model.onnx", (x,), "all")
        [OutputAgreement('output': 100.0000% exact, max 0 LSB, n=3600)]
    """
    int_model = integer_model_for_export(model)
    with torch.no_grad():
        ref = [t.detach().cpu().double().numpy() for t in _flat_outputs(int_model(*inputs))]
    got = run_onnxruntime(path, inputs, optimization)
    names = [o.name for o in onnxruntime_session(path, "disable").get_outputs()]
    out = []
    for name, r, g, s in zip(names, ref, got, output_scales(int_model), strict=True):
        g = np.asarray(g, np.float64).reshape(r.shape)
        diff = np.abs(g - r)
        if s is None:
            lsb = diff
            exact = float(np.mean(diff == 0))
            within = float("nan")
            max_lsb = float("nan")
        else:
            lsb = np.abs(np.round(g / s) - np.round(r / s))
            exact = float(np.mean(lsb == 0))
            within = float(np.mean(lsb <= 1))
            max_lsb = float(lsb.max(initial=0))
        out.append(OutputAgreement(name, int(r.size), exact, within, max_lsb,
                                   float(diff.max(initial=0)), s))
    return out


# -- per op -----------------------------------------------------------------------------------
class _Capture(fx.Interpreter):
    """Runs a model and keeps the values of the nodes in ``keep``."""

    def __init__(self, gm: fx.GraphModule, keep: set[fx.Node]) -> None:
        super().__init__(gm)
        self.keep = keep
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.keep:
            self.values[n] = out
        return out


def _single_op_model(int_model: fx.GraphModule, node: fx.Node,
                     values: dict[fx.Node, Any]) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """A model of the one op ``node``: its tensor inputs are graph inputs, quantized as in
    ``int_model``, its other arguments the recorded constants."""

    anns = get_annotations(int_model)
    specs = {i.node: i.spec for i in anns[node].inputs}
    root, graph = nn.Module(), fx.Graph()
    inputs: list[torch.Tensor] = []
    made: dict[fx.Node, fx.Node] = {}

    def arg(a: fx.Node) -> Any:
        v = values[a]
        if not isinstance(v, torch.Tensor):
            if isinstance(v, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in v):
                raise ValueError("list input")
            return v
        if a not in made:
            p = graph.placeholder(f"input_{len(inputs)}")
            inputs.append(v)
            spec = specs.get(a.name)
            if spec is not None:
                name = f"input_{len(inputs) - 1}_quant"
                root.add_module(name, Quantize(TensorQParams(spec.scale(int_model), spec.bits)))
                p = graph.call_module(name, (p,))
            made[a] = p
        return made[a]

    args = fx.node.map_arg(node.args, arg)
    kwargs = fx.node.map_arg(node.kwargs, arg)
    name = anns[node].name
    set_module(root, name, int_model.get_submodule(str(node.target)), create=True)
    graph.output(graph.call_module(name, args, kwargs))
    gm = fx.GraphModule(root, graph)
    set_annotations(gm, annotate(gm))
    return gm, inputs


def op_agreement(model: nn.Module, inputs: Sequence[Any], optimization: str = "all",
                 ops: Sequence[str] | None = None) -> Any:
    """onnxruntime vs the integer model, op by op: each quantized op is exported alone, fed
    the very inputs it receives in the integer model, and its output compared in units of its
    scale.  This measures each op's own arithmetic difference (end to end, a rare 1-LSB flip
    also propagates to everything after it).

    Args:
        model: a calibrated / QAT model or its integer model.
        inputs: the model's positional inputs.
        optimization: onnxruntime's graph optimization level (``"disable"``, ``"all"``).
        ops: op names to check (default: every quantized op with a quantized output).

    Returns:
        a pandas DataFrame, one row per op call: ``op``, ``kind``, ``numel``, ``exact``
        (fraction of equal integers), ``max_lsb``, ``kernel`` (the integer kernel onnxruntime
        fused the op into, with ``"all"``).

    Example::

        >>> df = op_agreement(qat_model, (x,), "all")
        >>> df.sort_values("exact").head()
    """
    int_model = integer_model_for_export(model)
    anns = get_annotations(int_model)
    targets = [n for n, a in anns.items() if a.is_quantized and n.op == "call_module"
               and a.output is not None and (ops is None or a.name in ops)]
    keep = set(targets) | {a for n in targets for a in n.all_input_nodes}
    cap = _Capture(int_model, keep)
    with torch.no_grad():
        cap.run(*inputs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for node in targets:
            ann = anns[node]
            try:
                gm, xs = _single_op_model(int_model, node, cap.values)
            except ValueError:
                continue
            with warnings.catch_warnings():  # the model's own export already warned
                warnings.simplefilter("ignore")
                path = write_onnx(gm, tuple(xs), os.path.join(tmp, "op.onnx"))
            [got] = run_onnxruntime(path, xs, optimization)
            ref = cap.values[node].detach().cpu().double().numpy()
            s = float(ann.output.scale(int_model).reshape(-1)[0])
            lsb = np.abs(np.round(np.asarray(got, np.float64) / s) - np.round(ref / s))
            kernel = ""
            if optimization == "all":
                kernel = ", ".join(sorted(fused_kernels(path))) or "float"
            rows.append(dict(op=ann.name, kind=ann.kind, numel=int(ref.size),
                             exact=float(np.mean(lsb == 0)), max_lsb=float(lsb.max(initial=0)),
                             kernel=kernel))
    return pd.DataFrame(rows, columns=["op", "kind", "numel", "exact", "max_lsb", "kernel"])
