"""The quantizers of a prepared model, read from its quantization annotation.

A *quantizer* is what sensitivity analysis switches on and off: the output fake quant of an op
(``"activation"``; a division by an activation also owns the fake quant of ``1 / divisor``),
its weight fake quant (``"weight"``), or both (``"node"``).  Each is named by the op's module
path, the name a ``qconfig_dict`` ``"module_name"`` entry takes (``layer1.0.conv1``,
``layer1.0.add``), and knows the FX nodes that call its module (where a change takes effect:
everything before them computes what it computed before).  A module called at several places
(a shared module) is one quantizer with several nodes: its calls share one fake quant.

Names are resolved here too, for every sensitivity tool: a quantizer name, a fake quant path
(``conv1.weight_fake_quant``) or the float name an op reproduces (``relu1`` for a fused
``conv1``); an unknown name is an error listing the closest names.

Example::

    >>> [(q.name, q.fake_quants) for q in list_quantizers(calib_model, "weight")][:1]
    [('conv1', ('conv1.weight_fake_quant',))]
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Iterable, Sequence

from qatkit.annotation import get_annotations
from qatkit.fake_quantize import FakeQuantize
from torch import fx, nn

__all__ = ["Quantizer", "NODE_TYPES", "list_quantizers", "resolve_quantizers",
           "fake_quant_paths"]

#: what a quantizer covers: the weight fake quant, the output (activation) fake quant, or both
NODE_TYPES = ("weight", "activation", "node")


@dataclasses.dataclass(frozen=True)
class Quantizer:
    """One switchable quantizer of a prepared model.

    Attributes:
        name: the op's module path (a ``qconfig_dict`` ``"module_name"`` key).
        node_type: ``"weight"``, ``"activation"`` or ``"node"`` (both).
        fake_quants: module paths of the fake quants it covers.
        nodes: FX node names of the calls of its module, in graph order.
        kind: the op kind (``"conv"``, ``"cat"``...).
        dtype: the dtype of its first fake quant (``"qint8"``...).
        float_name: the float op the module's (first) call reproduces.
        inserted: a QuantStub that prepare inserted (``x_quant``): it has no name of its own
            in ``qconfig_dict`` (it takes the qconfig of the op it feeds).

    Example::

        >>> q = list_quantizers(calib_model, "activation")[1]
        >>> q.name, q.fake_quants
        ('conv1', ('conv1.activation_post_process',))
    """

    name: str
    node_type: str
    fake_quants: tuple[str, ...]
    nodes: tuple[str, ...]
    kind: str = ""
    dtype: str = ""
    float_name: str = ""
    inserted: bool = False

    @property
    def shared(self) -> bool:
        """True for a module called at several places (one fake quant for all calls)."""
        return len(self.nodes) > 1


def _is_fq(model: nn.Module, path: str | None) -> bool:
    if not path:
        return False
    try:
        return isinstance(model.get_submodule(path), FakeQuantize)
    except AttributeError:
        return False


def fake_quant_paths(model: nn.Module) -> list[str]:
    """The module paths of every :class:`~qatkit.FakeQuantize` of ``model``, in module order.

    Example::

        >>> fake_quant_paths(calib_model)[:2]
        ['quant.activation_post_process', 'conv1.weight_fake_quant']
    """
    return [n for n, m in model.named_modules() if isinstance(m, FakeQuantize)]


def list_quantizers(model: fx.GraphModule, node_type: str = "node") -> list[Quantizer]:
    """The quantizers of ``model`` of one ``node_type``, in execution order.

    Args:
        model: a prepared (calibrated / QAT) model, or a converted model whose ops kept in
            fake-quant form (``set_preserve_qat_mode``) are its quantizers.
        node_type: ``"weight"``, ``"activation"`` or ``"node"`` (every op with a weight or an
            activation fake quant, both switched together).

    Returns:
        the quantizers; fake quants the annotation does not name (a model changed by hand)
        are added as activation quantizers of their owning module.

    Raises:
        ValueError: an unknown ``node_type``, or a model without annotation.

    Example::

        >>> [q.name for q in list_quantizers(calib_model, "weight")]
        ['conv1', 'conv2', 'conv3', 'conv4', 'fc']
    """
    if node_type not in NODE_TYPES:
        raise ValueError(f"node_type={node_type!r}: choose one of {list(NODE_TYPES)} "
                         "('node' switches an op's weight and activation quantizers together)")
    anns = get_annotations(model)
    found: dict[str, dict] = {}
    for node, ann in anns.items():
        if ann.module is None or node.op != "call_module":
            continue
        entry = found.setdefault(ann.module, {"nodes": [], "ann": ann, "act": [], "w": []})
        entry["nodes"].append(node.name)
        if len(entry["nodes"]) > 1:
            continue
        if ann.output is not None and _is_fq(model, ann.output.module_path):
            entry["act"].append(ann.output.module_path)
        recip = f"{ann.module}.reciprocal_post_process"
        if _is_fq(model, recip):
            entry["act"].append(recip)
        if ann.weight is not None and _is_fq(model, ann.weight.module_path):
            entry["w"].append(ann.weight.module_path)
    covered = {p for e in found.values() for p in e["act"] + e["w"]}
    call_nodes: dict[str, list[str]] = {}
    for node in model.graph.nodes:
        if node.op == "call_module":
            call_nodes.setdefault(str(node.target), []).append(node.name)
    for path in fake_quant_paths(model):
        if path in covered:
            continue
        owner = path.rpartition(".")[0]
        while owner and owner not in call_nodes:
            owner = owner.rpartition(".")[0]
        if owner in found:
            found[owner]["act"].append(path)
        elif owner:
            found[owner] = {"nodes": call_nodes[owner], "ann": None, "act": [path], "w": []}
    order = {node.name: i for i, node in enumerate(model.graph.nodes)}
    out = []
    for module, e in sorted(found.items(), key=lambda kv: order[kv[1]["nodes"][0]]):
        paths = {"weight": e["w"], "activation": e["act"], "node": e["w"] + e["act"]}[node_type]
        if not paths:
            continue
        ann = e["ann"]
        fq = model.get_submodule(paths[0])
        out.append(Quantizer(
            name=module, node_type=node_type, fake_quants=tuple(paths), nodes=tuple(e["nodes"]),
            kind=ann.kind if ann is not None else type(model.get_submodule(module)).__name__,
            dtype=fq.dtype, float_name=ann.float_name if ann is not None else module,
            inserted=ann is not None and ann.kind == "quant_stub"
            and ann.float_name != module))
    return out


def resolve_quantizers(quantizers: Sequence[Quantizer], names: Iterable[str] | str,
                       all_quantizers: Sequence[Quantizer] = (), label: str = "node"
                       ) -> list[Quantizer]:
    """The quantizers ``names`` refer to, in the order given (duplicates dropped).

    A name is a quantizer's name (its module path), the float name its op reproduces, or a
    fake quant path; a fake quant path selects that fake quant alone (looked up among
    ``all_quantizers`` too, e.g. the weight fake quant of an op named in an activation sweep).

    Raises:
        ValueError: a name that is none of these (the closest names are listed).

    Example::

        >>> resolve_quantizers(list_quantizers(m, "node"), ["conv1", "fc.weight_fake_quant"])
    """
    if isinstance(names, str):
        names = [names]
    by_name: dict[str, Quantizer] = {}
    for q in list(all_quantizers) + list(quantizers):  # this sweep's own entries win
        by_name[q.name] = q
        by_name.setdefault(q.float_name, q)
    by_path: dict[str, Quantizer] = {}
    for q in list(quantizers) + list(all_quantizers):
        for path in q.fake_quants:
            by_path.setdefault(path, dataclasses.replace(
                q, fake_quants=(path,), node_type="weight" if path.endswith(
                    "weight_fake_quant") else "activation"))
    out: list[Quantizer] = []
    seen: set[tuple] = set()
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"{label} names must be strings (op names or fake quant paths), "
                             f"got {name!r}")
        q = by_name.get(name) or by_path.get(name)
        if q is None:
            known = sorted(set(by_name) | set(by_path))
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.4)
            raise ValueError(f"unknown {label} {name!r}: no quantized op or fake quant has this "
                             f"name. Closest names: {close or known[:5]}. Names are the ops' "
                             "module paths (as qconfig_dict's 'module_name' uses them) or fake "
                             "quant paths")
        key = (q.name, q.fake_quants)
        if key not in seen:
            seen.add(key)
            out.append(q)
    return out
