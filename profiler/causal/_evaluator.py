"""Score a private copy of a calibrated model under fake-quant switches: what sensitivity
analysis, the partial un-quantization sweep and the mixed-precision search share.

An :class:`Evaluator` holds the copy, the batches of the data and the comparison metrics.  The
reference is the float data flow (every fake quant passes its tensor through); a *base*
configuration (every fake quant on, or every one off) is run once and recorded, and each change
made from it is scored by running only what follows the changed ops
(:class:`~qatkit.profiler.causal.incremental.IncrementalRunner`).  An ``eval_fn(model) -> number``
(a task metric on the user's data) is called on the switched copy as it stands.

Fake quants are switched through their ``enabled`` flag only (state, scale and observer are
left alone), on the copy: the caller's model is never touched.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from qatkit.fake_quantize import FakeQuantize
from torch import Tensor, fx

from ..core.metrics import Metric, get_metric
from ._debug_inputs import as_score, check_fits
from .incremental import IncrementalRunner, find_node, flat_output

__all__ = ["Evaluator", "metric_list", "eval_name"]


def metric_list(metrics: Any) -> list[Metric]:
    """``metrics`` (a name, a callable, a Metric, or a list of them) as Metric objects.

    Example::

        >>> [m.name for m in metric_list(["cosine-similarity", "mse"])]
        ['Cosine', 'MSE']
    """
    if metrics is None:
        return []
    if isinstance(metrics, (str, Metric)) or callable(metrics):
        metrics = [metrics]
    out = [get_metric(m) for m in metrics]
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ValueError(f"metrics {names} name the same metric twice")
    return out


def eval_name(eval_fn: Callable | None) -> str:
    """The column an ``eval_fn`` gets: its function name (``accuracy``), else ``"eval_fn"``.

    Example::

        >>> eval_name(lambda m: 1.0)
        'eval_fn'
    """
    name = getattr(eval_fn, "__name__", "")
    return name if name.isidentifier() else "eval_fn"


class Evaluator:
    """See the module docstring.

    Args:
        work: the private copy (see :func:`~qatkit.profiler.causal._debug_inputs.private_model`).
        batches: positional inputs per batch (empty: only ``eval_fn`` scores).
        metrics: comparison metrics of the output against the float reference.
        output_node: which output is scored: None (all output tensors), an int (the k-th
            output tensor) or a node / op name (that op's output).
        eval_fn: ``eval_fn(model) -> number``; higher is better unless it has an attribute
            ``higher_is_better = False``.
        incremental: run only what follows a change (False: full runs, same numbers).
        label: how messages call the model.

    Example::

        >>> ev = Evaluator(work, batches, metric_list("cosine"))
        >>> ev.set_reference(); ev.set_base(ev.all(True))
    """

    def __init__(self, work: fx.GraphModule, batches: Sequence[tuple], metrics: list[Metric],
                 output_node: Any = None, eval_fn: Callable[[Any], Any] | None = None,
                 incremental: bool = True, label: str = "model_or_file") -> None:
        if not batches and eval_fn is None:
            raise ValueError("pass calibrated_data (scored with a metric against the float "
                             "outputs) or eval_fn(model) -> number (a task metric), or both")
        if eval_fn is not None and not callable(eval_fn):
            raise ValueError(f"eval_fn must be a callable eval_fn(model) -> number, got "
                             f"{type(eval_fn).__name__}")
        self.work = work
        self.label = label
        self.metrics = metrics if batches else []
        self.eval_fn = eval_fn
        self.eval_key = eval_name(eval_fn) if eval_fn is not None else None
        self.eval_higher = bool(getattr(eval_fn, "higher_is_better", True))
        self.fqs = {n: m for n, m in work.named_modules() if isinstance(m, FakeQuantize)}
        #: the flags as given: a fake quant the caller switched off stays off when "every
        #: fake quant" is switched on
        self.given = {n: bool(m.enabled) for n, m in self.fqs.items()}
        self.leaf = output_node if isinstance(output_node, int) and not isinstance(
            output_node, bool) else None
        target = None
        if isinstance(output_node, str):
            target = find_node(work, output_node)
        elif output_node is not None and self.leaf is None:
            raise ValueError(f"output_node={output_node!r}: pass None (every output), an int "
                             "(the k-th output tensor) or an op name")
        self.runner = IncrementalRunner(work, batches, target, incremental) if batches else None
        self.reference: Tensor | None = None
        self.reference_batches: list[Tensor] = []  # the float outputs, flattened, per batch
        self.evaluations = 0  # eval_fn calls
        self.trials = 0  # metric measurements of a change

    # -- switches ----------------------------------------------------------------------------
    def all(self, enabled: bool) -> dict[str, bool]:
        """``{path: flag}`` for every fake quant: off, or on as given (the quantized model
        as it was passed in)."""
        return dict(self.given) if enabled else dict.fromkeys(self.fqs, False)

    def active(self, paths: Sequence[str]) -> tuple[str, ...]:
        """The fake quants of ``paths`` that are on in the model as given."""
        return tuple(p for p in paths if self.given[p])

    @contextlib.contextmanager
    def flags(self, enabled: Mapping[str, bool]) -> Iterator[None]:
        """The fake quants ``enabled`` names switched inside the block, restored after."""
        saved = {p: self.fqs[p].enabled for p in enabled}
        try:
            for p, value in enabled.items():
                self.fqs[p].enabled = bool(value)
            yield
        finally:
            for p, value in saved.items():
                self.fqs[p].enabled = value

    def set_flags(self, enabled: Mapping[str, bool]) -> None:
        """Switch the fake quants ``enabled`` names (no restore)."""
        for p, value in enabled.items():
            self.fqs[p].enabled = bool(value)

    # -- runs ----------------------------------------------------------------------------------
    def _flats(self, outs: list[Any]) -> list[Tensor]:
        return [flat_output(o, self.leaf).float() for o in outs]

    def _flat(self, outs: list[Any]) -> Tensor:
        flats = self._flats(outs)
        return flats[0] if len(flats) == 1 else torch.cat([f.to(flats[0].device)
                                                           for f in flats])

    def set_reference(self, as_base: bool = False) -> dict[str, float]:
        """Run the float data flow (every fake quant off) and keep its output as the
        reference; ``as_base`` also records it as the base of later changes (the fake quants
        stay off).  Returns the eval_fn's score of the float flow (if any)."""
        scores: dict[str, float] = {}
        if as_base:
            self.set_flags(self.all(False))
        with contextlib.nullcontext() if as_base else self.flags(self.all(False)):
            if self.runner is not None:
                run = self.runner.set_base if as_base else self.runner.run_full
                outs = check_fits(run, self.label)
                self.reference_batches = self._flats(outs)
                self.reference = self._flat(outs)
            if self.eval_fn is not None:
                scores[self.eval_key] = self._eval()
        return scores

    def set_base(self, enabled: Mapping[str, bool]) -> dict[str, float]:
        """Switch the fake quants to ``enabled`` for good, record a full run of every batch
        as the base of later changes, and return its scores."""
        self.set_flags(enabled)
        out: dict[str, float] = {}
        if self.runner is not None:
            out.update(self.score(check_fits(self.runner.set_base, self.label)))
        if self.eval_fn is not None:
            out[self.eval_key] = self._eval()
        return out

    def score(self, outs: list[Any]) -> dict[str, float]:
        """Each metric of ``outs`` (the target's values per batch) against the reference."""
        flat = self._flat(outs)
        ref = self.reference
        if flat.shape != ref.shape:
            raise ValueError(f"the scored output has {flat.numel()} values, the float "
                             f"reference {ref.numel()}: the model's output changed shape "
                             "when fake quants were switched")
        return {m.name: m(ref, flat.to(ref.device)) for m in self.metrics}

    def _eval(self) -> float:
        self.evaluations += 1
        return as_score(self.eval_fn(self.work))

    def measure(self, starts: Sequence[str], change: Callable[[], Any] | None = None,
                enabled: Mapping[str, bool] | None = None, metrics: bool = True,
                evaluate: bool = True) -> dict[str, float]:
        """Scores after a change from the base: the fake quants ``enabled`` names switched
        and / or ``change()`` entered (a context manager), the modules called at ``starts``
        (FX node names) being the ones changed; everything is restored afterwards.
        ``metrics`` / ``evaluate`` False leave the metrics / the eval_fn out."""
        with contextlib.ExitStack() as stack:
            if enabled:
                stack.enter_context(self.flags(enabled))
            if change is not None:
                stack.enter_context(change())
            out: dict[str, float] = {}
            if self.runner is not None and metrics:
                out.update(self.score(self.runner.run_from(starts)))
                self.trials += 1
            if self.eval_fn is not None and evaluate:
                out[self.eval_key] = self._eval()
        return out

    def better(self, key: str) -> bool:
        """Whether a higher value of score ``key`` is better."""
        if key == self.eval_key:
            return self.eval_higher
        return next(m for m in self.metrics if m.name == key).higher_is_better
