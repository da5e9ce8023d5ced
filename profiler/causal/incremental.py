"""Score a private copy of a calibrated model under fake-quant switches, running only what
follows each change: what sensitivity analysis, the partial un-quantization sweep and the
mixed-precision search share.

An :class:`Evaluator` holds the copy, the batches of the data and the comparison metrics.  The
reference is the float data flow (every fake quant passes its tensor through); a *base*
configuration (every fake quant on, or every one off) is run once and recorded, and each change
made from it is scored by running only what follows the changed ops.  An
``eval_fn(model) -> number`` (a task metric on the user's data) is called on the switched copy
as it stands.  Fake quants are switched through their ``enabled`` flag only (state, scale and
observer are left alone), on the copy: the caller's model is never touched.

:class:`IncrementalRunner` is the engine (an FX Interpreter started from cached environments).
Sensitivity analysis switches one quantizer at a time and runs the model again, hundreds of
times.  Everything before the op whose quantizer changed computes what it computed before, so
the runner records one run of every batch (the *base*: every node's value) and then runs, per
change, only the nodes downstream of the changed ops (and upstream of the output scored),
reading every other value from the base.  On resnet18 a change runs half the graph on average.

The graph allows it unless an op changes a tensor in place that another op reads: the base run
records each value's version counter, and a model whose values change after they are made (an
in-place op outside the quantized ops) is run in full for every change instead (the result is
the same, only slower; :attr:`IncrementalRunner.incremental` says which).

Example::

    >>> ev = Evaluator(work, batches, metric_list("cosine"))
    >>> ev.set_reference(); ev.set_base(ev.all(True))
    >>> ev.measure(quantizer.nodes, enabled={p: False for p in quantizer.fake_quants})
    {'Cosine': 0.9991}
"""

from __future__ import annotations

import contextlib
import difflib
import numbers
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from qatkit.annotation import get_annotations
from qatkit.fake_quantize import FakeQuantize
from torch import Tensor, fx
from torch.utils._pytree import tree_flatten

from ..core.metrics import Metric, get_metric
from ..core.running import check_fits

__all__ = ["Evaluator", "IncrementalRunner", "metric_list", "eval_name", "as_score",
           "flat_output", "find_node"]


class _Runner(fx.Interpreter):
    """An Interpreter that runs a given list of nodes on a given environment."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)

    def run_list(self, env: dict[fx.Node, Any], nodes: Sequence[fx.Node],
                 free: dict[fx.Node, list[fx.Node]] | None = None,
                 versions: dict[fx.Node, int] | None = None) -> dict[fx.Node, Any]:
        self.env = env
        for node in nodes:
            try:
                value = self.run_node(node)
            except Exception as e:
                raise RuntimeError(f"running node {node.format_node()} failed: "
                                   f"{type(e).__name__}: {e}") from e
            env[node] = value
            if versions is not None and isinstance(value, Tensor):
                versions[node] = value._version
            if free is not None:
                for dead in free.get(node, ()):
                    env.pop(dead, None)
        return env


def find_node(gm: fx.GraphModule, name: str | None, label: str = "output_node") -> fx.Node:
    """The node called ``name``: an FX node name, an op name of the annotation
    (``layer1.0.conv1``, ``relu(1)``) or a module path (its first call); None: the output.

    Raises:
        ValueError: no such node (the closest names are listed).

    Example::

        >>> find_node(calib_model, "conv4").op
        'call_module'
    """
    nodes = list(gm.graph.nodes)
    if name is None:
        return next(n for n in reversed(nodes) if n.op == "output")
    table: dict[str, fx.Node] = {}
    try:
        anns = get_annotations(gm)
    except ValueError:
        anns = {}
    for node in nodes:
        ann = anns.get(node)
        if ann is not None:
            table.setdefault(ann.name, node)
            if ann.module is not None:
                table.setdefault(ann.module, node)
        table.setdefault(node.name, node)
    if name in table:
        return table[name]
    close = difflib.get_close_matches(str(name), list(table), n=5, cutoff=0.4)
    raise ValueError(f"{label}={name!r} names no node of the model; closest: "
                     f"{close or list(table)[:5]}. Use an op name (e.g. 'layer1.0.conv1'), an "
                     "FX node name, an int (the k-th output tensor), or None (every output)")


def flat_output(value: Any, leaf: int | None = None, label: str = "output_node") -> Tensor:
    """The floating tensors of ``value`` (a model output) flattened and concatenated, or only
    the ``leaf``-th of them.

    Raises:
        ValueError: ``leaf`` out of range, or no floating tensor.

    Example::

        >>> flat_output((torch.ones(2, 3), torch.zeros(2)), leaf=1).shape
        torch.Size([2])
    """
    leaves = [t for t in tree_flatten(value)[0]
              if isinstance(t, Tensor) and t.is_floating_point()]
    if leaf is not None:
        if not -len(leaves) <= leaf < len(leaves):
            raise ValueError(f"{label}={leaf}: the output has {len(leaves)} floating tensor(s)")
        leaves = [leaves[leaf]]
    if not leaves:
        raise ValueError(f"{label}: the value scored holds no floating-point tensor")
    if len(leaves) == 1:
        return leaves[0].detach().reshape(-1)
    return torch.cat([t.detach().reshape(-1).to(leaves[0].device) for t in leaves])


class IncrementalRunner:
    """Runs ``gm`` on fixed batches; after :meth:`set_base`, :meth:`run_from` recomputes only
    the nodes downstream of a change (see the module docstring).

    The caller changes the model (fake quant flags, dtypes) between runs; ``run_from(nodes)``
    must name the call nodes of every module it changed since :meth:`set_base`.

    Args:
        gm: the GraphModule (a private copy: callers switch its fake quants).
        batches: the positional inputs of each batch (on ``gm``'s device).
        target: the node whose value is returned (None: the graph's output).
        incremental: False runs every change in full (for comparisons and benchmarks).

    Attributes:
        incremental: whether changes run only what follows them (False after an in-place op
            was seen changing a recorded value).
        nodes_run: how many node executions the runs took (a full run counts every node).

    Example::

        >>> runner = IncrementalRunner(work, batches)
        >>> base = runner.set_base()            # outputs of every batch
    """

    def __init__(self, gm: fx.GraphModule, batches: Sequence[tuple], target: fx.Node | None = None,
                 incremental: bool = True) -> None:
        self.gm = gm
        self.batches = list(batches)
        self.runner = _Runner(gm)
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.target = target if target is not None else next(
            n for n in reversed(self.nodes) if n.op == "output")
        self.needed = self._ancestors(self.target)
        self.compute = [n for n in self.nodes if n.op != "placeholder" and n in self.needed]
        self.free = self._last_uses(self.compute)
        self.incremental = incremental
        self.base: list[dict[fx.Node, Any]] | None = None
        self.base_outputs: list[Any] = []
        self._plans: dict[frozenset[str], list[fx.Node]] = {}
        self.by_name = {n.name: n for n in self.nodes}
        self.nodes_run = 0

    # -- graph -------------------------------------------------------------------------------
    def _ancestors(self, node: fx.Node) -> set[fx.Node]:
        seen, stack = {node}, [node]
        while stack:
            for inp in stack.pop().all_input_nodes:
                if inp not in seen:
                    seen.add(inp)
                    stack.append(inp)
        return seen

    def _last_uses(self, nodes: Sequence[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
        """user -> the values whose last use it is (never the target's own value)."""
        last: dict[fx.Node, fx.Node] = {}
        for node in reversed(nodes):
            for inp in node.all_input_nodes:
                last.setdefault(inp, node)
        out: dict[fx.Node, list[fx.Node]] = {}
        for value, user in last.items():
            if value is not self.target:
                out.setdefault(user, []).append(value)
        return out

    def plan(self, starts: Iterable[str]) -> list[fx.Node]:
        """The nodes a change at ``starts`` (FX node names) makes run, in graph order."""
        key = frozenset(starts)
        if key not in self._plans:
            unknown = [s for s in key if s not in self.by_name]
            if unknown:
                raise ValueError(f"IncrementalRunner: no node named {unknown[0]!r}")
            seen: set[fx.Node] = set()
            stack = [self.by_name[s] for s in key]
            while stack:
                node = stack.pop()
                if node in seen:
                    continue
                seen.add(node)
                stack.extend(node.users)
            self._plans[key] = sorted((n for n in seen if n in self.needed and
                                       n.op != "placeholder"), key=self.index.__getitem__)
        return self._plans[key]

    # -- runs --------------------------------------------------------------------------------
    def _env(self, b: int) -> dict[fx.Node, Any]:
        return dict(zip(self.placeholders, self.batches[b], strict=False))

    @torch.no_grad()
    def run_full(self) -> list[Any]:
        """The target's value for every batch, every node run (nothing recorded)."""
        outs = []
        for b in range(len(self.batches)):
            env = self.runner.run_list(self._env(b), self.compute, self.free)
            outs.append(env[self.target])
            self.nodes_run += len(self.compute)
        return outs

    @torch.no_grad()
    def set_base(self) -> list[Any]:
        """Run every batch in full and record every value (the base of later changes);
        return the target's values."""
        self.base, self.base_outputs = None, []
        envs = []
        clean = True
        for b in range(len(self.batches)):
            versions: dict[fx.Node, int] = {}
            env = self.runner.run_list(self._env(b), self.compute, None, versions)
            self.nodes_run += len(self.compute)
            clean = clean and all(env[n]._version == v for n, v in versions.items())
            self.base_outputs.append(env[self.target])
            envs.append(env)
        if not clean:
            self.incremental = False  # an in-place op changed a recorded value: full runs
        if self.incremental:
            self.base = envs
            self._versions = [{n: v._version for n, v in env.items() if isinstance(v, Tensor)}
                              for env in envs]
        return self.base_outputs

    @torch.no_grad()
    def run_from(self, starts: Iterable[str]) -> list[Any]:
        """The target's value for every batch after a change at the nodes ``starts`` (the
        calls of the changed modules): only the nodes downstream of them run."""
        if self.base is None:
            return self.run_full()
        nodes = self.plan(starts)
        outs = []
        for base in self.base:
            env = self.runner.run_list(dict(base), nodes, self.free)
            self.nodes_run += len(nodes)
            outs.append(env[self.target])
        if any(v._version != self._versions[b][n] for b, env in enumerate(self.base)
               for n, v in env.items() if isinstance(v, Tensor) and n in self._versions[b]):
            self.incremental = False  # a recorded value was changed in place: start over
            self.base = None
            return self.run_full()
        return outs

    def release(self) -> None:
        """Drop the recorded values."""
        self.base = None
        self._plans.clear()


# -- scoring a switched copy -----------------------------------------------------------
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
        work: the private copy (see :func:`~qatkit.profiler.core.running.private_model`).
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


def as_score(value: Any, label: str = "eval_fn") -> float:
    """An ``eval_fn``'s result as a python float.

    Raises:
        TypeError: not a real number (or a one-element tensor): a bool, None, a dict...

    Example::

        >>> as_score(torch.tensor(0.97))
        0.97...
    """
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{label} must return a number (e.g. the accuracy as a float), got "
                    f"{type(value).__name__} {value!r:.80}. Fix: return float(metric)")
