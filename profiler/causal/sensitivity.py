"""get_sensitivity_of_nodes: which quantizer causes the accuracy drop, by a causal test.

Per-layer similarity can stay high at every layer while the output collapses (a channel 512x
larger than the others squeezes the rest of its tensor to zero, and the damage only shows
after the op that undoes it).  Only switching quantizers and watching the output names the
culprit.  For each quantizer of a calibrated model (the weight fake quant of an op, its output
fake quant, or both: :mod:`~qatkit.profiler.causal.switches`):

* ``mode="only_this_quantized"`` (default): the output when *only* this quantizer is active,
  every other op float -- the damage it does on its own;
* ``mode="only_this_float"``: the output when only this quantizer is disabled -- how much
  leaving it float would recover, with the interactions of the others.

The output is compared with the float data flow of the same model (every fake quant passing
its tensor through) by one or more metrics (``"cosine-similarity"``, ``"mse"``, ``"mre"``,
``"sqnr"``, ``"chebyshev"``, ``"L1"``, a callable), and / or scored by ``eval_fn(model)``, a
task metric on the user's data.  The model runs once in full and then, per quantizer, only what
follows its op (:mod:`~qatkit.profiler.causal.incremental`).  The caller's model is never changed:
everything runs on a private copy.

Example::

    >>> node_message = get_sensitivity_of_nodes(calib_model, "cosine-similarity",
    ...                                         calibrated_data=x, node_type="activation")
    >>> list(node_message)[:3]                   # most sensitive first
    ['mid', 'cat', 'conv_h']
    >>> node_message.table.head()                # the same as a DataFrame
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
from tqdm.auto import tqdm

from ..core.running import collect_batches, private_model
from ..core.tables import write_table
from .incremental import Evaluator, metric_list
from .switches import NODE_TYPES, Quantizer, list_quantizers, resolve_quantizers

__all__ = ["get_sensitivity_of_nodes", "NodeSensitivity", "SENSITIVITY_MODES"]

#: what each quantizer's score measures (see the module docstring)
SENSITIVITY_MODES = ("only_this_quantized", "only_this_float")


class NodeSensitivity(dict):
    """``{node: {metric: value}}``, most sensitive first (an ordinary dict, as the NPU debug
    guides index it), with the same as a DataFrame and what was measured.

    Attributes:
        table: one row per quantizer, most sensitive first (Rank, Node, Type, Op Kind, Fake
            Quants, Dtype, Calls, Float Name, one column per metric / eval_fn).
        mode: ``"only_this_quantized"`` or ``"only_this_float"``.
        node_type: ``"weight"``, ``"activation"`` or ``"node"``.
        key: the score that ranks (the eval_fn's name when given, else the first metric).
        float_scores: the scores of the float data flow (every fake quant off).
        quantized_scores: the scores with every fake quant on.
        quantizers: the :class:`~qatkit.profiler.causal.switches.Quantizer` of each node, in rank
            order.
        paths: files written (``save_dir``).
        incremental: whether quantizers were measured by running only what follows them.

    Example::

        >>> res = get_sensitivity_of_nodes(calib_model, calibrated_data=x)
        >>> res.key, res.quantized_scores["Cosine"]
        ('Cosine', 0.23...)
    """

    table: pd.DataFrame
    mode: str
    node_type: str
    key: str
    float_scores: dict[str, float]
    quantized_scores: dict[str, float]
    quantizers: list[Quantizer]
    paths: list[str]
    incremental: bool

    def __repr__(self) -> str:
        top = ", ".join(f"{k}: {v[self.key]:.6g}" for k, v in list(self.items())[:3])
        return (f"NodeSensitivity({self.node_type}, {self.mode}, {len(self)} nodes, ranked by "
                f"{self.key}; top: {top})")


def _rank(values: list[float], higher_is_better: bool, best_first: bool) -> list[int]:
    """Indices in rank order: worst first (``best_first=False``) or best first; NaN first
    when ranking worst first, last otherwise."""
    def key(i: int) -> tuple[int, float]:
        v = values[i]
        if math.isnan(v):
            return (0 if not best_first else 2, 0.0)
        signed = v if higher_is_better else -v
        return (1, -signed if best_first else signed)
    return sorted(range(len(values)), key=key)


def get_sensitivity_of_nodes(model_or_file: Any, metrics: Any = "cosine-similarity",
                             calibrated_data: Any = None, output_node: Any = None,
                             node_type: str = "node", data_num: int | None = None,
                             verbose: bool = True,
                             interested_nodes: Iterable[str] | str | None = None,
                             mode: str = "only_this_quantized",
                             eval_fn: Callable[[Any], Any] | None = None,
                             save_dir: str | os.PathLike | None = None, device: Any = None,
                             incremental: bool = True,
                             input_fn: Callable[[Any], Any] | None = None) -> NodeSensitivity:
    """Rank the quantizers of a calibrated model by how much each one hurts the output.

    Args:
        model_or_file: a calibrated / QAT model made by ``prepare_qat_fx`` (or the path of one
            saved with ``torch.save``); hybrid models and converted models with ops kept in
            fake-quant form work too.  It is never changed.
        metrics: a metric name (``"cosine-similarity"``, ``"mse"``, ``"mre"``, ``"sqnr"``,
            ``"chebyshev"``, ``"L1"``, any :func:`~qatkit.profiler.core.metrics.get_metric`
            name), a callable ``fn(float_output, output) -> float``, or a list of them.
        calibrated_data: the data the output is compared on: a tensor, a tuple of tensors
            (one batch), a list / DataLoader of batches, or a folder of ``.pt`` / ``.npy``
            files.  May be None when ``eval_fn`` is given.
        output_node: which output is scored: None (every output tensor), an int (the k-th
            output tensor), or an op name (that op's output).
        node_type: ``"weight"``, ``"activation"`` or ``"node"`` (both of one op).
        data_num: use the first ``data_num`` samples of ``calibrated_data`` (None: all).
        verbose: show a progress bar over the nodes.
        interested_nodes: only these ops (names, float names or fake quant paths).
        mode: ``"only_this_quantized"`` (only this quantizer on) or ``"only_this_float"``
            (only this one off).
        eval_fn: ``eval_fn(model) -> number``, e.g. the accuracy on your test data (higher is
            better unless the function has ``higher_is_better = False``); it then ranks the
            nodes and gets its own column (named after the function).
        save_dir: write ``sensitivity_<node_type>.csv`` / ``.txt`` there.
        device: run on this device (a copy of the model); None: where the model is.
        incremental: run only what follows each changed op (False: full runs, same numbers).
        input_fn: ``batch -> model input`` when batches hold more than the inputs.

    Returns:
        a :class:`NodeSensitivity`: ``{node: {metric: value}}`` most sensitive first, with
        ``.table`` (the DataFrame), ``.float_scores`` and ``.quantized_scores``.

    Raises:
        ValueError: an unknown node name (the closest are listed), node_type, mode or metric;
            a model in CALIBRATION state or never calibrated; data that does not fit.
        TypeError: ``eval_fn`` returned something that is not a number.

    Example::

        >>> node_message = get_sensitivity_of_nodes(
        ...     model_or_file=calib_model, metrics="cosine-similarity", calibrated_data=data,
        ...     output_node=None, node_type="weight", data_num=None, verbose=True,
        ...     interested_nodes=None)
        >>> nodes = list(node_message.keys())          # most sensitive first
    """
    if node_type not in NODE_TYPES:
        raise ValueError(f"node_type={node_type!r}: choose one of {list(NODE_TYPES)}")
    if mode not in SENSITIVITY_MODES:
        raise ValueError(f"mode={mode!r}: choose one of {list(SENSITIVITY_MODES)}")
    mets = metric_list(metrics)
    _, work = private_model(model_or_file, device=device)
    quantizers = list_quantizers(work, node_type)
    if interested_nodes is not None:
        quantizers = resolve_quantizers(quantizers, interested_nodes,
                                        list_quantizers(work, "node"), "interested_nodes entry")
    if not quantizers:
        raise ValueError(f"the model has no {node_type} quantizer to analyse")
    batches = (collect_batches(work, calibrated_data, data_num, input_fn=input_fn)
               if calibrated_data is not None else [])
    ev = Evaluator(work, batches, mets, output_node, eval_fn, incremental)
    # a fake quant switched off in the model passed in stays off: it is not a quantizer here
    quantizers = [dataclasses.replace(q, fake_quants=ev.active(q.fake_quants))
                  for q in quantizers if ev.active(q.fake_quants)]
    if not quantizers:
        raise ValueError(f"every {node_type} fake quant of the model is switched off "
                         "(set_fake_quant_enabled): there is no quantizer to analyse")
    every = [n for q in list_quantizers(work, "node") for n in q.nodes]
    if mode == "only_this_quantized":
        float_scores = ev.set_reference(as_base=True)
        float_scores.update({m.name: m(ev.reference, ev.reference) for m in ev.metrics})
        quantized = ev.measure(every, enabled=ev.all(True))
    else:
        float_scores = ev.set_reference()
        float_scores.update({m.name: m(ev.reference, ev.reference) for m in ev.metrics})
        quantized = ev.set_base(ev.all(True))
    switch = mode == "only_this_quantized"
    scores: list[dict[str, float]] = []
    for q in tqdm(quantizers, desc=f"sensitivity ({node_type})", unit="node",
                  disable=not verbose, leave=False):
        scores.append(ev.measure(q.nodes, enabled=dict.fromkeys(q.fake_quants, switch)))
    key = ev.eval_key or mets[0].name
    order = _rank([s[key] for s in scores], ev.better(key), best_first=not switch)
    result = NodeSensitivity((quantizers[i].name, scores[i]) for i in order)
    result.quantizers = [quantizers[i] for i in order]
    result.table = _table(result.quantizers, [scores[i] for i in order])
    result.mode, result.node_type, result.key = mode, node_type, key
    result.float_scores, result.quantized_scores = float_scores, quantized
    result.incremental = ev.runner is not None and ev.runner.incremental
    title = (f"sensitivity of {node_type} quantizers ({mode}); float: "
             f"{_fmt(float_scores)}; all quantized: {_fmt(quantized)}")
    result.paths = write_table(result.table, save_dir, f"sensitivity_{node_type}", title)
    return result


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.6g}" for k, v in scores.items())


def _table(quantizers: Sequence[Quantizer], scores: Sequence[dict[str, float]]
           ) -> pd.DataFrame:
    rows = []
    for rank, (q, s) in enumerate(zip(quantizers, scores, strict=True)):
        rows.append({"Rank": rank, "Module Name": q.name, "Type": q.node_type, "Op Kind": q.kind,
                     "Fake Quants": ", ".join(q.fake_quants), "Dtype": q.dtype,
                     "Calls": len(q.nodes), "Float Name": q.float_name, **s})
    return pd.DataFrame(rows)
