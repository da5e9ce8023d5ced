"""One vocabulary of layer names across float, QAT and integer models.

Every node of a traced float model gets a *float name*:

* a module call: the module's qualified name (``layer1.0.conv1``); a module called several
  times gets ``name(0)``, ``name(1)``, ... per call site;
* a functional op (``x + y``, ``torch.cat``, ``x.mean()``): the enclosing module's name and
  the op, numbered within that module: ``layer1.0.add``, ``layer1.0.add_1``; at the root
  just ``add``.  A name already taken by a module gets the next number.

prepare names the modules it creates for functional ops with these names, and records for
every QAT module the float name of the node whose output it reproduces (provenance), so the
profiler aligns models by name and never guesses.
"""

from __future__ import annotations

import operator
from collections import Counter, defaultdict

from torch import fx

__all__ = ["float_node_names", "op_base_name", "node_scope"]

_RENAMES = {
    "iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "div", "truediv": "div",
    "floordiv": "div", "imatmul": "matmul", "concat": "cat", "concatenate": "cat",
}


def op_base_name(node: fx.Node) -> str:
    """The op part of a functional node's name: ``add`` for ``operator.add``/``x.add_``."""
    target = node.target
    if node.op == "call_method":
        name = str(target)
    elif target is operator.getitem:
        name = "getitem"
    else:
        name = getattr(target, "__name__", None) or str(target)
    name = name.strip("_")
    if name.endswith("_") and name[:-1]:
        name = name.rstrip("_")  # in-place variants: relu_ -> relu
    return _RENAMES.get(name, name) or "op"


def node_scope(node: fx.Node) -> str:
    """Qualified name of the module whose forward created ``node`` ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def float_node_names(gm: fx.GraphModule, taken: set[str] | None = None) -> dict[fx.Node, str]:
    """Name every node of a traced float model (see the module docstring).

    Args:
        gm: the symbolically traced float model.
        taken: names that functional ops must avoid (defaults to ``gm``'s module names).

    Example::

        >>> names = float_node_names(qatkit.fx.symbolic_trace(resnet18()))
        >>> sorted(n for n in names.values() if n.startswith("layer1.0."))[:3]
        ['layer1.0.add', 'layer1.0.bn1', 'layer1.0.bn2']
    """
    if taken is None:
        taken = {name for name, _ in gm.named_modules()}
    taken = set(taken)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    seen_calls: Counter = Counter()
    per_scope: dict[tuple[str, str], int] = defaultdict(int)
    names: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            target = str(node.target)
            if calls[node.target] > 1:
                names[node] = f"{target}({seen_calls[node.target]})"
                seen_calls[node.target] += 1
            else:
                names[node] = target
        elif node.op in ("call_function", "call_method"):
            scope = node_scope(node)
            base = op_base_name(node)
            while True:
                k = per_scope[(scope, base)]
                per_scope[(scope, base)] += 1
                leaf = base if k == 0 else f"{base}_{k}"
                name = f"{scope}.{leaf}" if scope else leaf
                if name not in taken:
                    break
            taken.add(name)
            names[node] = name
        else:  # placeholder, get_attr, output
            names[node] = str(node.target) if node.op == "get_attr" else node.name
    return names
