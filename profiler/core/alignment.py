"""Name alignment: which op of one model reproduces which op of another.

All models share one vocabulary of names (:mod:`qatkit.fx.naming`): a float model's node is
named by :func:`qatkit.fx.naming.float_node_names`; a prepared or converted model's op has its
own name (``layer1.0.conv1``, ``name(k)`` for the k-th call of a shared module) and, through
:func:`qatkit.get_provenance`, the float name of the node whose output it reproduces (a fused
conv+bn+relu -> the float relu).  Two models are aligned on that float name; nothing is
guessed from shapes or positions.

Example::

    >>> align_names(float_model, int_model).head(2)
      Model2 Name    Model1 Name   Float Name
    0     x_quant              x            x
    1       conv1           relu         relu
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Mapping

import pandas as pd
from qatkit.annotation import NodeAnnotation, get_annotations, has_annotations
from qatkit.fx.naming import float_node_names
from qatkit.fx.tracer import symbolic_trace
from qatkit.model_graph import annotated_graph
from torch import fx, nn

__all__ = ["trace_model", "shared_traces", "is_prepared", "op_names", "reference_names",
           "op_label", "align_names", "CALL_OPS"]

#: the FX opcodes of the nodes that call an op (a module, a function or a method)
CALL_OPS = ("call_module", "call_function", "call_method")


def is_prepared(model: nn.Module) -> bool:
    """True for a model made by :func:`qatkit.prepare_qat_fx` or :func:`qatkit.convert_fx`.

    Example::

        >>> is_prepared(float_model), is_prepared(qat_model)
        (False, True)
    """
    return has_annotations(model)


#: while :func:`shared_traces` is active: id(model) -> (model, its trace)
_TRACES: contextvars.ContextVar[dict[int, tuple[nn.Module, fx.GraphModule]] | None] = \
    contextvars.ContextVar("qatkit_profiler_traces", default=None)


@contextlib.contextmanager
def shared_traces() -> Iterator[None]:
    """Within this block :func:`trace_model` traces each model once: the tools of one
    :func:`~qatkit.profiler.model_profiler` run share the traces of its models.

    Example::

        >>> with shared_traces():
        ...     assert trace_model(model) is trace_model(model)
    """
    token = _TRACES.set({} if _TRACES.get() is None else _TRACES.get())
    try:
        yield
    finally:
        _TRACES.reset(token)


def trace_model(model: nn.Module, label: str = "model", share: bool = True) -> fx.GraphModule:
    """``model`` as a GraphModule: itself if it is one, the annotated trace of an eager-mode
    model (:func:`qatkit.model_graph.annotated_graph`), else traced with qatkit's tracer.

    The traced GraphModule shares ``model``'s submodules (nothing is copied or modified).
    Inside :func:`shared_traces`, a model is traced once (unless ``share=False``: a private
    copy that must not be kept alive).

    Raises:
        ValueError: the model cannot be traced (the message says how to pass a traced one).

    Example::

        >>> gm = trace_model(torchvision.models.resnet18())
    """
    if isinstance(model, fx.GraphModule):
        return model
    cache = _TRACES.get() if share else None
    if cache is not None and id(model) in cache and cache[id(model)][0] is model:
        return cache[id(model)][1]
    try:  # an eager-prepared model: its annotated trace (names are the float model's)
        gm = annotated_graph(model)
        gm = gm if isinstance(gm, fx.GraphModule) else symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(
            f"{label} ({type(model).__name__}) cannot be traced: {e}\nFix: trace it yourself "
            "with qatkit.fx.symbolic_trace(model, concrete_args=..., leaf_modules=...) -- the "
            "same arguments you gave prepare_qat_fx -- and pass the GraphModule") from e
    if cache is not None:
        cache[id(model)] = (model, gm)
    return gm


def op_names(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Each node's op name in ``gm`` (the "Module Name" of the profiler's tables).

    Example::

        >>> sorted(op_names(trace_model(model)).values())[:2]
        ['act(0)', 'act(1)']
    """
    return float_node_names(gm)


def reference_names(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Each op node's float-model name: provenance for prepared/converted models, the op name
    for float models.  Placeholders keep their own name; ops without provenance are left out.

    Example::

        >>> reference_names(qat_model)[conv_node]
        'layer1.0.relu(0)'
    """
    if has_annotations(gm):
        return {node: (node.name if ann.role == "input" else ann.float_name)
                for node, ann in get_annotations(gm).items()
                if node.op == "placeholder" or node.op in CALL_OPS}
    names = float_node_names(gm)
    return {node: names[node] for node in gm.graph.nodes
            if node.op == "placeholder" or node.op in CALL_OPS}


def op_label(ann: NodeAnnotation, modules: Mapping[str, nn.Module]) -> str:
    """What a node is, as every table ("Module Type", the checks' "Pattern"), the HTML page and
    ``similarity.mmd`` spell it: the class of the module it calls (``_get_name()``:
    ``ConvBnReLU2d``, ``FunctionalOp[add]``, ``Quantized[conv2d]``), else the op kind of its
    quantization annotation (``add``, ``reshape``; a float model's trace is annotated too,
    :func:`~qatkit.profiler.core.capture.model_annotations`).

    Example::

        >>> anns = model_annotations(qat_model)
        >>> op_label(anns[conv_node], dict(qat_model.named_modules())), op_label(anns[add], {})
        ('ConvBnReLU2d', 'add')
    """
    if ann.module is not None:
        return modules[ann.module]._get_name()
    return ann.kind


def placeholders(gm: fx.GraphModule) -> tuple[list[str], int]:
    """The names of ``gm``'s inputs, and how many of them are required (no default).

    Example::

        >>> placeholders(trace_model(model))     # forward(self, x, y=None)
        (['x', 'y'], 1)
    """
    nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [str(n.target) for n in nodes]
    required = sum(1 for n in nodes if not n.args and not str(n.target).startswith("*"))
    return names, required


def check_inputs(gm: fx.GraphModule, inputs: tuple[Any, ...], label: str) -> None:
    """Raise a ValueError naming ``label`` when ``inputs`` do not fit ``gm``'s signature.

    Example::

        >>> check_inputs(trace_model(model), (x, x), "model1")
        ValueError: model1 (Net) takes 1 input(s) ['x'] but 2 were given. ...
    """
    names, required = placeholders(gm)
    if any(n.startswith("*") for n in names):
        return
    if not required <= len(inputs) <= len(names):
        want = (f"{required}" if required == len(names) else f"{required} to {len(names)}")
        raise ValueError(
            f"{label} ({type(gm).__name__}) takes {want} input(s) {names} but {len(inputs)} "
            "were given. Pass the inputs as a tuple: (x,) for one input, (x, y) for two")


def align_names(model1: nn.Module, model2: nn.Module) -> pd.DataFrame:
    """Which op of ``model1`` each op of ``model2`` is compared with.

    Args:
        model1: float, prepared (calibrated / QAT) or converted model.
        model2: idem.

    Returns:
        a DataFrame with one row per op of ``model2`` (execution order): "Model2 Name",
        "Model1 Name" (the last op of model1 with the same float name; empty when model1 has
        none), "Float Name".

    Example::

        >>> align_names(float_model, qat_model).set_index("Model2 Name").loc["layer1.0.conv1"]
        Model1 Name    layer1.0.relu(0)
        Float Name     layer1.0.relu(0)
    """
    gm1, gm2 = trace_model(model1, "model1"), trace_model(model2, "model2")
    names1, names2 = op_names(gm1), op_names(gm2)
    by_float: dict[str, str] = {}
    for node, fname in reference_names(gm1).items():
        by_float[fname] = names1[node]
    rows = []
    for node, fname in reference_names(gm2).items():
        if node.op == "placeholder":
            continue
        rows.append({"Model2 Name": names2[node], "Model1 Name": by_float.get(fname, ""),
                     "Float Name": fname})
    return pd.DataFrame(rows, columns=["Model2 Name", "Model1 Name", "Float Name"])
