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

Where onnxruntime's own int8 kernels are inexact on this CPU (x86 without VNNI:
:func:`onnxruntime_int8_exact` is False), a fused-kernel mismatch is reported with its cause
and the fix (a warning, and the ``note`` of the result) instead of as a silent disagreement.
"""

from __future__ import annotations

import dataclasses
import functools
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

__all__ = ["OPTIMIZATION_LEVELS", "X64_QUANT_PRECISION", "onnxruntime_session",
           "run_onnxruntime", "optimized_ops", "fused_kernels", "onnxruntime_int8_exact",
           "OutputAgreement", "compare_with_onnxruntime", "output_scales", "op_agreement"]

#: names accepted for onnxruntime's graph optimization level
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

#: onnxruntime's session option for exact int8 matrix kernels on x86 CPUs without VNNI: it
#: converts int8 weights to uint8 and runs the (slower) U8U8 kernels, which do not saturate;
#: onnxruntime applies it only where the U8S8 kernels can saturate (a no-op elsewhere)
X64_QUANT_PRECISION = "session.x64quantprecision"

#: fused kernels that multiply uint8 activations by int8 weights with MLAS's U8S8 GEMM: the
#: ones that saturate on x86 without VNNI (two activations in a QLinearMatMul are both uint8:
#: exact)
_U8S8_KERNELS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                 "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


def onnxruntime_session(path: str | bytes, optimization: str = "all",
                        optimized_model_path: str | None = None,
                        threads: int | None = 1, x64_quant_precision: bool = False) -> Any:
    """An onnxruntime CPU session for ``path`` (a file, or a serialized model) at graph
    optimization level ``optimization`` (``"disable"`` = ``ORT_DISABLE_ALL``, ``"all"`` =
    ``ORT_ENABLE_ALL``).  ``x64_quant_precision``: onnxruntime's
    :data:`X64_QUANT_PRECISION` option (exact int8 kernels on x86 CPUs without VNNI, see
    :func:`onnxruntime_int8_exact`).

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
    if x64_quant_precision:
        so.add_session_config_entry(X64_QUANT_PRECISION, "1")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _numpy_inputs(sess: Any, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"the file takes {len(names)} inputs {names}, got {len(inputs)}")
    return {n: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
            for n, x in zip(names, inputs, strict=True)}


def run_onnxruntime(path: str, inputs: Sequence[Any], optimization: str = "all",
                    threads: int | None = 1,
                    x64_quant_precision: bool = False) -> list[np.ndarray]:
    """The outputs of ``path`` run by onnxruntime (CPU) on ``inputs`` (tensors or arrays);
    ``x64_quant_precision`` as in :func:`onnxruntime_session`.

    Example::

        >>> [y] = run_onnxruntime("model.onnx", (x,), "disable")
    """
    sess = onnxruntime_session(path, optimization, threads=threads,
                               x64_quant_precision=x64_quant_precision)
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


def fused_kernels(path: str, optimization: str = "all") -> dict[str, int]:
    """The integer kernels onnxruntime runs for ``path`` (at ``ORT_ENABLE_ALL`` by default):
    op type (without domain) -> count, e.g. ``{'QLinearConv': 20, 'QGemm': 1}``.
    ``MatMulNBits`` here means a float matmul with int8 weights was rewritten to quantize its
    activations dynamically (inexact; qatkit writes ``Gemm(transB=1)`` to avoid it).

    Example::

        >>> fused_kernels("model.onnx")
        {'QGemm': 1, 'QLinearConv': 4, 'QLinearGlobalAveragePool': 1}
    """
    ops = optimized_ops(path, optimization)
    out: dict[str, int] = {}
    for op, n in sorted(ops.items()):
        short = op.split("::")[-1]
        if short.startswith(_FUSED):
            out[short] = out.get(short, 0) + n
    return out


def _probe_model() -> tuple[bytes, np.ndarray, int]:
    """A QDQ ``Gemm`` that onnxruntime fuses into ``QGemm``, with every input and weight
    integer at 127: as uint8 the activations are 255, and each pair of products ``2 * 255 *
    127`` exceeds int16, so a saturating kernel cannot get it right.  Returns the serialized
    model, its input and the exact output integer."""
    k, n = 64, 8
    s_x = s_w = np.float32(1 / 128)
    s_y = np.float32(0.5)
    x = np.full((1, k), 127 * s_x, np.float32)
    acc = k * 127 * 127  # + a zero bias
    q_y = int(np.clip(np.rint(acc * float(s_x) * float(s_w) / float(s_y)), -128, 127))
    inits = [onnx.numpy_helper.from_array(np.asarray(v, t), name) for name, v, t in (
        ("s_x", s_x, np.float32), ("z_x", 0, np.int8), ("w", np.full((n, k), 127), np.int8),
        ("s_w", np.full(n, s_w), np.float32), ("z_w", np.zeros(n), np.int8),
        ("b", np.zeros(n), np.int32), ("s_b", np.full(n, s_x * s_w), np.float32),
        ("z_b", np.zeros(n), np.int32), ("s_y", s_y, np.float32), ("z_y", 0, np.int8))]
    make = onnx.helper.make_node
    nodes = [make("QuantizeLinear", ["x", "s_x", "z_x"], ["x_q"]),
             make("DequantizeLinear", ["x_q", "s_x", "z_x"], ["x_dq"]),
             make("DequantizeLinear", ["w", "s_w", "z_w"], ["w_dq"], axis=0),
             make("DequantizeLinear", ["b", "s_b", "z_b"], ["b_dq"], axis=0),
             make("Gemm", ["x_dq", "w_dq", "b_dq"], ["acc"], transB=1),
             make("QuantizeLinear", ["acc", "s_y", "z_y"], ["y_q"]),
             make("DequantizeLinear", ["y_q", "s_y", "z_y"], ["y"])]
    io = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1, size])
          for name, size in (("x", k), ("y", n))]
    graph = onnx.helper.make_graph(nodes, "int8_probe", io[:1], io[1:], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)],
                                   ir_version=10)
    return model.SerializeToString(), x, q_y


@functools.lru_cache(maxsize=None)
def onnxruntime_int8_exact(x64_quant_precision: bool = False) -> bool:
    """Whether this CPU's onnxruntime int8 kernels (``ORT_ENABLE_ALL``: ``QLinearConv``,
    ``QGemm``...) compute exact integer products, measured once per process on a tiny probe.

    On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) onnxruntime multiplies uint8
    activations by int8 weights with ``vpmaddubsw``, which saturates each sum of two products
    at int16 (onnxruntime's quantization docs: "U8S8 ... saturation"): a ``QLinearConv`` or
    ``QGemm`` with large weights and activations then differs from the integer model by many
    LSB.  VNNI (``vpdpbusd``) and ARM kernels do not saturate, nor does an NPU's integer
    accumulator.  With ``x64_quant_precision=True`` (onnxruntime's
    :data:`X64_QUANT_PRECISION`) onnxruntime runs exact U8U8 kernels on such CPUs.

    Example::

        >>> onnxruntime_int8_exact()          # an AVX2 CPU without VNNI
        False
        >>> onnxruntime_int8_exact(x64_quant_precision=True)
        True
    """
    model, x, q_y = _probe_model()
    sess = onnxruntime_session(model, "all", x64_quant_precision=x64_quant_precision)
    [y] = sess.run(None, {"x": x})
    return bool(np.all(np.rint(y / np.float32(0.5)) == q_y))


def _saturating(path: str, optimization: str, x64_quant_precision: bool,
                kernels: Sequence[str] | None = None) -> list[str]:
    """The fused kernels of ``path`` (``kernels``, if known) that saturate on this CPU: none
    where onnxruntime's int8 kernels are exact here, or with ``"disable"``."""
    if optimization == "disable" or onnxruntime_int8_exact(x64_quant_precision):
        return []
    if kernels is None:
        kernels = list(fused_kernels(path, optimization))
    return sorted(set(kernels) & set(_U8S8_KERNELS))


def _saturation_note(kernels: Sequence[str]) -> str:
    """The cause and the fix of a mismatch of the saturating ``kernels``."""
    return (f"onnxruntime's {'/'.join(sorted(set(kernels)))} kernels saturate on this CPU (x86 "
            "without VNNI: vpmaddubsw clips each sum of two uint8 x int8 products to int16), "
            "so values differ from the integer model; an NPU, and onnxruntime on a CPU with "
            "VNNI or on ARM, do not. Check the file with optimization='disable' (the float "
            f"path), with x64_quant_precision=True (onnxruntime's {X64_QUANT_PRECISION}: "
            "exact U8U8 kernels), or on a CPU with VNNI (docs/export.md)")


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
        note: why onnxruntime differs where the cause is known ("" otherwise): its int8
            kernels saturate on this CPU (see :func:`onnxruntime_int8_exact`).
    """

    name: str
    numel: int
    exact: float
    within_1_lsb: float
    max_lsb: float
    max_abs: float
    scale: float | None
    note: str = ""

    def __repr__(self) -> str:
        note = "; u8s8 saturation on this CPU" if self.note else ""
        return (f"OutputAgreement({self.name!r}: {100 * self.exact:.4f}% exact, "
                f"max {self.max_lsb:g} LSB, n={self.numel}{note})")


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
                             optimization: str = "all",
                             x64_quant_precision: bool = False) -> list[OutputAgreement]:
    """Run ``path`` in onnxruntime and ``model``'s integer model on ``inputs``; compare each
    output in units of its scale.

    Where the fused int8 kernels disagree on a CPU whose onnxruntime int8 kernels saturate
    (:func:`onnxruntime_int8_exact` is False), the disagreeing outputs carry a ``note`` naming
    the cause and the fix, and a ``UserWarning`` says it once.

    Args:
        model: the model exported (QAT / calibrated: converted here with
            :func:`qatkit.convert_fx`), or its integer model.
        path: the exported file.
        inputs: the model's positional inputs.
        optimization: onnxruntime's graph optimization level (``"disable"`` or ``"all"``).
        x64_quant_precision: onnxruntime's :data:`X64_QUANT_PRECISION` option (exact int8
            kernels on x86 CPUs without VNNI; a no-op elsewhere).

    Example::

        >>> compare_with_onnxruntime(qat_model, "model.onnx", (x,), "all")
        [OutputAgreement('output': 100.0000% exact, max 0 LSB, n=3600)]
    """
    int_model = integer_model_for_export(model)
    with torch.no_grad():
        ref = [t.detach().cpu().double().numpy() for t in _flat_outputs(int_model(*inputs))]
    got = run_onnxruntime(path, inputs, optimization, x64_quant_precision=x64_quant_precision)
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
    used = _saturating(path, optimization, x64_quant_precision) if any(
        o.exact < 1 for o in out) else []
    if used:
        note = _saturation_note(used)
        out = [dataclasses.replace(o, note=note) if o.exact < 1 else o for o in out]
        warnings.warn(f"compare_with_onnxruntime({os.path.basename(path)!r}, "
                      f"{optimization!r}): {note}", UserWarning, stacklevel=2)
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
                 ops: Sequence[str] | None = None, x64_quant_precision: bool = False) -> Any:
    """onnxruntime vs the integer model, op by op: each quantized op is exported alone, fed
    the very inputs it receives in the integer model, and its output compared in units of its
    scale.  This measures each op's own arithmetic difference (end to end, a rare 1-LSB flip
    also propagates to everything after it).

    Args:
        model: a calibrated / QAT model or its integer model.
        inputs: the model's positional inputs.
        optimization: onnxruntime's graph optimization level (``"disable"``, ``"all"``).
        ops: op names to check (default: every quantized op with a quantized output).
        x64_quant_precision: onnxruntime's :data:`X64_QUANT_PRECISION` option (exact int8
            kernels on x86 CPUs without VNNI; a no-op elsewhere).

    Returns:
        a pandas DataFrame, one row per op call: ``op``, ``kind``, ``numel``, ``exact``
        (fraction of equal integers), ``max_lsb``, ``kernel`` (the integer kernel onnxruntime
        fused the op into, with ``"all"``), ``note`` (the cause where an op disagrees because
        onnxruntime's int8 kernels saturate on this CPU, as :func:`compare_with_onnxruntime`
        says it; one ``UserWarning`` names those ops).

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
    saturated: dict[str, list[str]] = {}
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
            [got] = run_onnxruntime(path, xs, optimization,
                                    x64_quant_precision=x64_quant_precision)
            ref = cap.values[node].detach().cpu().double().numpy()
            s = float(ann.output.scale(int_model).reshape(-1)[0])
            lsb = np.abs(np.round(np.asarray(got, np.float64) / s) - np.round(ref / s))
            kernels = list(fused_kernels(path)) if optimization == "all" else None
            kernel = "" if kernels is None else ", ".join(sorted(kernels)) or "float"
            exact = float(np.mean(lsb == 0))
            used = [] if exact == 1 else _saturating(path, optimization, x64_quant_precision,
                                                     kernels)
            if used:
                saturated[ann.name] = used
            rows.append(dict(op=ann.name, kind=ann.kind, numel=int(ref.size), exact=exact,
                             max_lsb=float(lsb.max(initial=0)), kernel=kernel,
                             note="u8s8 saturation" if used else ""))
    if saturated:
        note = _saturation_note([k for used in saturated.values() for k in used])
        warnings.warn(f"op_agreement({optimization!r}): {', '.join(saturated)}: {note}",
                      UserWarning, stacklevel=2)
    return pd.DataFrame(rows, columns=["op", "kind", "numel", "exact", "max_lsb", "kernel",
                                       "note"])
