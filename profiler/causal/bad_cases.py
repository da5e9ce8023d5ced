"""find_bad_cases: the input samples on which two models disagree most.

A model pair that agrees on average (float vs calibrated, calibrated vs QAT, QAT vs integer)
can still fail on a few inputs: a bright image that saturates a layer, a rare class that uses a
channel the calibration never saw.  ``find_bad_cases`` runs both models over the data, scores
every sample of every output by each metric, and returns the worst ``num`` per output and
metric -- saved as a batch (``bad_cases/inputs.pt``) that ``model_profiler`` and every
sensitivity tool take directly, so the analysis can be rerun on exactly those inputs.

Example::

    >>> bad = find_bad_cases(float_model, calib_model, test_loader, metric="L1", num=8,
    ...                      save_dir="out")
    >>> bad.table.head()          # Output, Metric, Rank, Sample, Value
    >>> model_profiler(float_model, calib_model, bad.inputs, out_dir="out/worst")
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten
from tqdm.auto import tqdm

from ..core.running import (
    analysis_model,
    check_fits,
    collect_batches,
    load_model,
    model_device,
    to_device,
)
from ..core.tables import write_table
from .incremental import metric_list

__all__ = ["find_bad_cases", "BadCases"]


@dataclasses.dataclass(frozen=True, repr=False)
class BadCases:
    """The samples two models disagree on most.

    Attributes:
        table: Output, Metric, Rank, Sample (index over the data), Batch, Index In Batch,
            Value -- the worst ``num`` per output and metric, worst first.
        samples: the distinct sample indices of the table, in table order.
        inputs: those samples' model inputs, stacked as one batch (a tensor, or a tuple for a
            model with several inputs).
        paths: files written (``save_dir``): the table and ``bad_cases/inputs.pt``.

    Example::

        >>> bad.samples[:3], bad.inputs.shape
        ([17, 203, 4], torch.Size([8, 1, 16, 16]))
    """

    table: pd.DataFrame
    samples: list[int]
    inputs: Any
    paths: list[Path]

    def __repr__(self) -> str:
        return f"BadCases({len(self.samples)} samples, {len(self.table)} rows)"


def _leaves(out: Any) -> list[Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()]


def find_bad_cases(model1: Any, model2: Any, data: Any, metric: Any = "L1", num: int = 10,
                   save_dir: str | os.PathLike | None = None, data_num: int | None = None,
                   device: Any = None, verbose: bool = True,
                   input_fn: Callable[[Any], Any] | None = None) -> BadCases:
    """The samples of ``data`` on which ``model1`` and ``model2`` differ most.

    Args:
        model1: the reference (float, calibrated / QAT, or a path saved with torch.save).
        model2: the model compared (calibrated / QAT, integer from ``convert_fx``...).  Fake
            quants must be in VALIDATION state (QAT state: a copy runs); neither model is
            changed.
        data: a tensor, a tuple of tensors (one batch), a list / DataLoader of batches, or a
            folder of ``.pt`` / ``.npy`` files.
        metric: a metric name (``"L1"``, ``"cosine-similarity"``, ``"mse"``, ...), a callable,
            or a list of them; each sample is scored per output tensor.
        num: how many samples per output and metric.
        save_dir: write ``bad_cases.csv`` / ``.txt`` and ``bad_cases/inputs.pt`` there.
        data_num: use the first ``data_num`` samples.
        device: run both models on this device (copies); None: where each model is.
        verbose: progress bar over the batches.
        input_fn: ``batch -> model input`` when batches hold more than the inputs.

    Returns:
        a :class:`BadCases` (table, sample indices, their inputs as one batch).

    Raises:
        ValueError: a bad ``num``, a model in CALIBRATION state, data that does not fit, or
            models whose outputs differ in number or shape.

    Example::

        >>> bad = find_bad_cases(calib_model, int_model, data, metric="L1", num=5)
    """
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num={num!r}: pass a positive number of samples")
    mets = metric_list(metric)
    m1, m2 = load_model(model1, "model1"), load_model(model2, "model2")
    scores: dict[tuple[int, str], list[float]] = {}
    where: list[tuple[int, int]] = []
    with contextlib.ExitStack() as stack:
        gm1 = stack.enter_context(analysis_model(m1, "model1", device, "raise"))
        gm2 = stack.enter_context(analysis_model(m2, "model2", device, "raise"))
        batches = collect_batches(gm1, data, data_num, label="data", input_fn=input_fn)
        dev2 = model_device(gm2)
        n_out = None
        for b, args in enumerate(tqdm(batches, desc="bad cases", unit="batch",
                                      disable=not verbose, leave=False)):
            with torch.no_grad():
                out1 = _leaves(check_fits(lambda a=args: gm1(*a), "model1", "data", b))
                out2 = _leaves(check_fits(lambda a=args: gm2(*to_device(a, dev2)), "model2",
                                          "data", b))
            if len(out1) != len(out2) or any(a.shape != c.shape for a, c in zip(out1, out2,
                                                                                 strict=False)):
                raise ValueError(f"find_bad_cases: the models' outputs differ: model1 gives "
                                 f"{[list(t.shape) for t in out1]}, model2 "
                                 f"{[list(t.shape) for t in out2]}. Pass models that "
                                 "correspond (float vs calibrated, QAT vs integer)")
            size = next((int(a.shape[0]) for a in args if isinstance(a, Tensor) and a.dim()), 1)
            n_out = len(out1)
            for i in range(size):
                where.append((b, i))
            for k, (a, c) in enumerate(zip(out1, out2, strict=True)):
                per_sample = a.dim() > 0 and a.shape[0] == size
                for m in mets:
                    vals = scores.setdefault((k, m.name), [])
                    if per_sample:
                        vals += [m(a[i], c[i].to(a.device)) for i in range(size)]
                    else:  # an output without the batch dimension: one value for the batch
                        vals += [m(a, c.to(a.device))] * size
    rows = []
    for (k, name), vals in scores.items():
        m = next(x for x in mets if x.name == name)
        for rank, idx in enumerate(m.worst_first(vals)[:num]):
            b, i = where[idx]
            rows.append({"Output": "output" if n_out == 1 else f"output[{k}]", "Metric": name,
                         "Rank": rank, "Sample": idx, "Batch": b, "Index In Batch": i,
                         "Value": vals[idx]})
    table = pd.DataFrame(rows)
    samples = list(dict.fromkeys(int(s) for s in table["Sample"]))
    inputs = _gather(batches, [where[s] for s in samples])
    paths = [Path(p) for p in write_table(table, save_dir, "bad_cases",
                                          "samples the two models disagree on most")]
    if save_dir is not None:
        folder = Path(save_dir) / "bad_cases"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(_cpu(inputs), folder / "inputs.pt")
        paths.append(folder / "inputs.pt")
    return BadCases(table, samples, inputs, paths)


def _gather(batches: list[tuple], picks: list[tuple[int, int]]) -> Any:
    """The inputs of samples ``picks`` ((batch, index) pairs) stacked as one batch."""
    n_args = len(batches[0])
    out = []
    for j in range(n_args):
        first = batches[0][j]
        if isinstance(first, Tensor) and first.dim():
            out.append(torch.stack([batches[b][j][i] for b, i in picks]))
        else:
            out.append(first)
    while out and out[-1] is None:
        out.pop()
    return out[0] if len(out) == 1 else tuple(out)


def _cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, tuple):
        return tuple(_cpu(v) for v in value)
    return value
