"""Capture every op's inputs and outputs of a model, by name (an FX Interpreter).

Works on float, calibrated, QAT and integer models alike: the model is traced (float) or is
already a GraphModule (prepared / converted), and a ``torch.fx.Interpreter`` runs it once,
recording each op's tensors as :class:`FeatureRecord` objects moved to the CPU.  Names are
the op names of :mod:`qatkit.fx.naming` (``name(k)`` for the k-th call of a shared module).

The model is never mutated: it runs in eval mode under ``torch.no_grad()`` and its train /
eval flags are restored; a model whose forward would change it (fake quants in QAT or
CALIBRATION state update their observers) or that must move to another device runs as a
deep copy.  :func:`analysis_model` is the context manager that does this for every profiler
function, and checks the fake-quant state (see its docstring).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import warnings
import weakref
from typing import Any, Iterable, Iterator, Sequence

import pandas as pd
import torch
from qatkit.annotation import get_annotations, has_annotations
from qatkit.fake_quantize import FakeQuantize, FakeQuantState
from qatkit.fx import op_kind
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_flatten

from .alignment import check_inputs, node_type, op_names, trace_model

__all__ = ["FeatureRecord", "get_raw_features", "analysis_model", "node_qparams",
           "write_table"]


@dataclasses.dataclass(frozen=True, repr=False)
class FeatureRecord:
    """One tensor seen by one op call.

    Attributes:
        name: the op's name (``layer1.0.conv1``, ``act(1)``, ``layer1.0.add``).
        module_type: ``ConvBnReLU2d``, ``FunctionalOp[add]``, ``Quantized[conv2d]``, ``add``...
        attr: ``"input"`` or ``"output"``.
        arg: position of the tensor among the op's tensor inputs (0 for outputs).
        data: the tensor on the CPU (integers ``q`` when captured with ``preserve_int``).
        scale: the quantization step of the tensor (per tensor), ``None`` for a float tensor.
        dtype: ``"qint8"``, ``"qint16"`` for quantized tensors, else the torch dtype
            (``"float32"``).
        unquantized: for the output of a fake-quant op (VALIDATION / QAT state), the op's
            value before its output fake quant (float32, on the CPU): what the op computes,
            so statistics can show how much of it the quantization grid cuts off. None
            elsewhere (integer ops round and saturate inside).
    """

    name: str
    module_type: str
    attr: str
    arg: int
    data: Tensor
    scale: float | None
    dtype: str
    unquantized: Tensor | None = None

    @property
    def is_int(self) -> bool:
        """True when ``data`` holds the integers ``q`` (``preserve_int=True``)."""
        return not self.data.is_floating_point()

    def __repr__(self) -> str:
        return (f"FeatureRecord(name={self.name!r}, module_type={self.module_type!r}, "
                f"attr={self.attr!r}, arg={self.arg}, shape={list(self.data.shape)}, "
                f"scale={self.scale}, dtype={self.dtype!r})")


def node_qparams(gm: fx.GraphModule) -> dict[fx.Node, tuple[float | None, str | None]]:
    """``(scale, dtype)`` of every node's output, read from the quantization annotation
    (data-moving ops share their input's); ``(None, None)`` for float tensors and for every
    node of a float model.  A per-channel or not-yet-calibrated output gives
    ``(None, dtype)``.

    Example::

        >>> qp = node_qparams(qat_model)      # {node: (0.0123, 'qint8'), ...}
    """
    if not has_annotations(gm):
        return {node: (None, None) for node in gm.graph.nodes}
    out: dict[fx.Node, tuple[float | None, str | None]] = {}
    for node, ann in get_annotations(gm).items():
        spec = ann.output
        out[node] = (None, None) if spec is None else (spec.scale_value(gm), spec.dtype)
    return out


# -- running a model without changing it ---------------------------------------------------
def _fake_quant_states(model: nn.Module) -> dict[FakeQuantState, list[str]]:
    states: dict[FakeQuantState, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantize):
            states.setdefault(m.state, []).append(name)
    return states


def _model_device(model: nn.Module) -> torch.device | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


@contextlib.contextmanager
def analysis_model(model: nn.Module, label: str = "model", device: Any = None,
                   calibration: str = "raise") -> Iterator[fx.GraphModule]:
    """Yield a GraphModule that runs ``model`` in eval mode, leaving ``model`` unchanged.

    Fake-quant state: fake quants in CALIBRATION state (fake quantization off, the model
    computes in float) raise a ValueError with the fix when ``calibration="raise"``, or warn
    when ``"warn"``.  Fake quants in QAT state update their observer (and scale) on every
    batch: the model runs as a copy, with a warning.  VALIDATION needs nothing.

    Args:
        model: any model.
        label: how messages call it (``"model1"``).
        device: run on this device (a copy when ``model`` lives elsewhere); None: where it is.
        calibration: ``"raise"`` or ``"warn"``.

    Example::

        >>> with analysis_model(qat_model, "model2", device="cpu") as gm:
        ...     out = gm(x)
    """
    states = _fake_quant_states(model)
    calib = states.get(FakeQuantState.CALIBRATION, [])
    if calib:
        shown = ", ".join(calib[:4]) + (" ..." if len(calib) > 4 else "")
        msg = (f"{label} ({type(model).__name__}) has {len(calib)} fake quant(s) in CALIBRATION "
               f"state ({shown}): fake quantization is off and the model computes in float, so "
               "it would be analysed as a float model. Fix: qatkit.set_fake_quantize("
               f"{label}, qatkit.FakeQuantState.VALIDATION) after calibrating")
        if calibration == "raise":
            raise ValueError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    qat = states.get(FakeQuantState.QAT, [])
    if qat:
        warnings.warn(f"{label} ({type(model).__name__}) has {len(qat)} fake quant(s) in QAT "
                      "state: their scales follow every batch, so a copy is analysed (the model "
                      "is not changed). For the frozen scales a deployed model uses: "
                      f"qatkit.set_fake_quantize({label}, qatkit.FakeQuantState.VALIDATION)",
                      RuntimeWarning, stacklevel=3)
    here = _model_device(model)
    device = torch.device(device) if device is not None else here
    if device is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    moving = device is not None and here is not None and here != device
    if qat or calib or moving:
        copied = copy.deepcopy(model)
        if device is not None:
            copied.to(device)
        gm = trace_model(copied, label).eval()
        yield gm
        return
    gm = trace_model(model, label)
    flags = [(m, m.training) for m in list(model.modules()) + list(gm.modules())]
    try:
        gm.eval()
        yield gm
    finally:
        for m, training in flags:
            m.training = training


def _as_tuple(inputs: Any) -> tuple[Any, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def to_device(inputs: tuple[Any, ...], device: torch.device | None) -> tuple[Any, ...]:
    """``inputs`` with every tensor (also inside lists/dicts) moved to ``device``.

    Example::

        >>> to_device((x, [y]), torch.device("cpu"))
    """
    if device is None:
        return inputs

    def move(x: Any) -> Any:
        if isinstance(x, Tensor):
            return x.to(device)
        if isinstance(x, (list, tuple)):
            return type(x)(move(v) for v in x)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    return tuple(move(x) for x in inputs)


class _Snapshots:
    """CPU copies of tensors, one per (tensor, version): an op's output recorded again as the
    next op's input is not copied twice, while an in-place change gives a fresh copy."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[weakref.ref, int, Tensor]] = {}

    def __call__(self, t: Tensor) -> Tensor:
        hit = self._cache.get(id(t))
        if hit is not None and hit[0]() is t and hit[1] == t._version:
            return hit[2]
        snap = t.detach().to("cpu", copy=True)
        self._cache[id(t)] = (weakref.ref(t), t._version, snap)
        return snap


def _matches(node: fx.Node, name: str, mod: nn.Module | None, mtype: str,
             prefixes: Sequence[str], types: Sequence[Any]) -> bool:
    if prefixes and not any(name == p or name.startswith(p + ".") or name.startswith(p + "(")
                            for p in prefixes):
        return False
    if not types:
        return True
    for t in types:
        if isinstance(t, type) and mod is not None and isinstance(mod, t):
            return True
        if isinstance(t, str) and (t == mtype or (mod is not None and t == op_kind(mod))):
            return True
        if not isinstance(t, (type, str)) and node.target is t:
            return True
    return False


def _to_int(t: Tensor, scale: float) -> Tensor:
    return torch.round(t.to(torch.float64) / scale).to(torch.int32)


def get_raw_features(model: nn.Module, example_inputs: Any, prefixes: Iterable[str] = (),
                     types: Iterable[Any] = (), device: Any = None,
                     preserve_int: bool = False) -> list[FeatureRecord]:
    """Every op's inputs and output for one forward of ``model``, as records on the CPU.

    Args:
        model: a float, calibrated, QAT or integer (``convert_fx``) model.  It is not
            changed (see :func:`analysis_model`); a model in CALIBRATION state warns.
        example_inputs: the model's input, or a tuple of its inputs.
        prefixes: keep only ops whose name is one of these or starts with ``prefix.``
            (``"layer1"`` keeps ``layer1.0.conv1`` and ``layer1.0.add``).
        types: keep only ops matching one of these: a module class (``nn.Conv2d``,
            ``qatkit.nn.qat.Conv2d``), a type name or op kind (``"ConvBnReLU2d"``, ``"add"``),
            or a function (``torch.cat``).
        device: run on this device (a copy of the model); None: where the model is.
        preserve_int: for quantized tensors, ``data`` holds the integers
            ``q = round(x / scale)`` (int32) instead of the float values.

    Returns:
        records in execution order: per op call, one ``"input"`` record per tensor input
        (``arg`` = its position among the tensor inputs, ``cat([a, b])`` gives 0 and 1), then
        the ``"output"`` record.  A module called several times gives ``name(0)``,
        ``name(1)``...  Inputs carry their producer's scale.

    Raises:
        ValueError: ``example_inputs`` do not fit the model's signature.

    Example::

        >>> records = get_raw_features(int_model, x, prefixes=["layer1"], preserve_int=True)
        >>> [(r.name, r.attr, r.dtype) for r in records[:2]]
        [('layer1.0.conv1', 'input', 'qint8'), ('layer1.0.conv1', 'output', 'qint8')]
    """
    inputs = _as_tuple(example_inputs)
    prefixes, types = list(prefixes), list(types)
    records: list[FeatureRecord] = []
    with analysis_model(model, "model", device, calibration="warn") as gm:
        check_inputs(gm, inputs, "model")
        names = op_names(gm)
        modules = dict(gm.named_modules())
        qparams = node_qparams(gm)
        snap = _Snapshots()

        def record(name: str, mtype: str, attr: str, arg: int, t: Tensor,
                   qp: tuple[float | None, str | None], pre: Tensor | None = None) -> None:
            scale, qdtype = qp
            data = snap(t)
            if preserve_int and scale is not None and data.is_floating_point():
                data = _to_int(data, scale)
            dtype = qdtype if qdtype is not None else str(t.dtype).replace("torch.", "")
            if pre is not None:
                pre = pre.detach().to("cpu", torch.float32, copy=True)
            records.append(FeatureRecord(name, mtype, attr, arg, data, scale, dtype, pre))

        class _Capture(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                if n.op not in ("call_module", "call_function", "call_method"):
                    return super().run_node(n)
                mod = modules.get(str(n.target)) if n.op == "call_module" else None
                mtype = node_type(n, modules)
                keep = _matches(n, names[n], mod, mtype, prefixes, types)
                if keep:
                    in_nodes = [a for a in tree_flatten((n.args, n.kwargs))[0]
                                if isinstance(a, fx.Node)]
                    values = [self.env[a] for a in in_nodes]
                    k = 0
                    for a, v in zip(in_nodes, values, strict=True):
                        if isinstance(v, Tensor):
                            record(names[n], mtype, "input", k, v, qparams.get(a, (None, None)))
                            k += 1
                pre: list[Tensor] = []
                fq = getattr(mod, "activation_post_process", None) if keep else None
                hook = None
                if isinstance(fq, FakeQuantize) and fq.state is not FakeQuantState.CALIBRATION:
                    hook = fq.register_forward_pre_hook(lambda m, a: pre.append(a[0]))
                try:
                    out = super().run_node(n)
                finally:
                    if hook is not None:
                        hook.remove()
                if keep and isinstance(out, Tensor):
                    unq = pre[-1] if pre and isinstance(pre[-1], Tensor) and \
                        pre[-1].shape == out.shape else None
                    record(names[n], mtype, "output", 0, out, qparams[n], unq)
                return out

        dev = _model_device(gm)
        with torch.no_grad():
            _Capture(gm).run(*to_device(inputs, dev))
    return records


def write_table(table: pd.DataFrame, out_dir: str | os.PathLike | None, file_name: str,
                title: str = "", extra: Sequence[tuple[str, pd.DataFrame]] = ()) -> list[str]:
    """Write ``table`` to ``out_dir/file_name.csv`` and a readable ``file_name.txt``.

    ``extra`` tables (``(title, table)`` pairs) are appended to the .txt only.  Nothing is
    written when ``out_dir`` is None.

    Returns:
        the paths written.

    Example::

        >>> write_table(table, "out", "featuremap_similarity", "float vs calibrated")
        ['out/featuremap_similarity.csv', 'out/featuremap_similarity.txt']
    """
    if out_dir is None:
        return []
    os.makedirs(out_dir, exist_ok=True)
    csv = os.path.join(os.fspath(out_dir), f"{file_name}.csv")
    txt = os.path.join(os.fspath(out_dir), f"{file_name}.txt")
    table.to_csv(csv, index=False)
    parts = []
    for t_title, t in [(title, table), *extra]:
        body = t.to_string(index=False, float_format=_fmt) if len(t) else "(no rows)"
        parts.append((f"{t_title}\n{'=' * len(t_title)}\n" if t_title else "") + body)
    with open(txt, "w", encoding="utf-8") as f:
        f.write("\n\n".join(parts) + "\n")
    return [csv, txt]


def _fmt(v: float) -> str:
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
        return f"{v:.4e}"
    return f"{v:.6g}"
