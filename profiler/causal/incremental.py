"""Run a model again after one change, computing only what follows the change (an FX
Interpreter started from cached environments).

Sensitivity analysis switches one quantizer at a time and runs the model again, hundreds of
times.  Everything before the op whose quantizer changed computes what it computed before, so
:class:`IncrementalRunner` records one run of every batch (the *base*: every node's value) and
then runs, per change, only the nodes downstream of the changed ops (and upstream of the output
scored), reading every other value from the base.  On resnet18 a change runs half the graph
on average.

The graph allows it unless an op changes a tensor in place that another op reads: the base run
records each value's version counter, and a model whose values change after they are made (an
in-place op outside the quantized ops) is run in full for every change instead (the result is
the same, only slower; :attr:`IncrementalRunner.incremental` says which).

Example::

    >>> runner = IncrementalRunner(work_model, batches)
    >>> runner.set_base()                              # one full run per batch, recorded
    >>> set_fake_quant_flags(...)                      # change the quantizer of "conv1"
    >>> outs = runner.run_from(quantizer.nodes)        # only what follows conv1
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Sequence

import torch
from qatkit.annotation import get_annotations
from torch import Tensor, fx
from torch.utils._pytree import tree_flatten

__all__ = ["IncrementalRunner", "flat_output", "find_node"]


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
