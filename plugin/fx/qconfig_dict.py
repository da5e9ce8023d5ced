"""Resolve a ``qconfig_dict`` to the QConfig of every node of a traced model.

Keys (priority from low to high):

* ``""``: the global qconfig;
* ``"module_type"``: ``[(type_or_function_or_op_name, qconfig), ...]`` — a module class
  (``nn.Conv2d``), a function (``torch.cat``, ``operator.add``) or an op kind (``"add"``);
  a container class (``BasicBlock``) covers everything inside its instances unless an op
  matches a type entry itself;
* ``"module_name"``: ``[(name, qconfig), ...]`` — a float name (``layer1.0.conv1``,
  ``layer1.0.add``) or a prefix of names (``layer1`` covers everything inside it);
  the longest matching name wins;
* a module's own ``.qconfig`` attribute, which also covers everything inside that module.

``qconfig=None`` keeps the op float.  A name or type that matches nothing is an error that
lists the closest existing names.

Hybrid (step) quantization: ``prepare_qat_fx(model, qconfig_dict, hybrid=True,
hybrid_dict={"module_name": [...], "module_type": [...]})`` keeps the listed modules (and
everything inside them) float during QAT -- float islands, checked by
:func:`check_hybrid_args` and resolved here as ``qconfig=None`` for those names / types, with a
priority above every qconfig_dict entry and module ``.qconfig`` attribute.  prepare then
quantizes again wherever an island's float output feeds a quantized op (a ``QuantStub`` named
``<op>_quant``) and the island itself computes on the dequantized values, so users can bisect
which layer breaks QAT accuracy: quantize everything, then move layers in and out of
``hybrid_dict`` and watch the metric.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable

from torch import fx, nn

from ..qconfig import QConfig

__all__ = ["QConfigResolver", "UNSET", "check_keys", "present_types", "check_hybrid_args"]

UNSET: Any = object()


def _check_qconfig(key: str, qc: Any) -> None:
    if qc is not None and not isinstance(qc, QConfig):
        raise ValueError(
            f"qconfig_dict entry {key!r} maps to {qc!r}; expected a qatkit.QConfig (e.g. "
            "qatkit.default_qat_8bit_fake_quant_qconfig) or None to keep it float"
        )


def _pairs(qconfig_dict: dict, key: str) -> list[tuple[Any, Any]]:
    entries = qconfig_dict.get(key, [])
    if isinstance(entries, dict):
        entries = list(entries.items())
    out = []
    for item in entries:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"qconfig_dict[{key!r}] must be a list of (key, qconfig) pairs, "
                             f"got {item!r}")
        _check_qconfig(f"{key}: {item[0]!r}", item[1])
        out.append((item[0], item[1]))
    return out


def check_hybrid_args(hybrid: bool, hybrid_dict: dict | None) -> dict | None:
    """Validate ``hybrid``/``hybrid_dict`` and return the float-island overrides (or None).

    Raises:
        ValueError: ``hybrid_dict`` given without ``hybrid=True``, or not a dict of lists.

    Example::

        >>> check_hybrid_args(True, {"module_name": ["conv1"]})
        {'module_name': ['conv1'], 'module_type': []}
    """
    if not hybrid:
        if hybrid_dict:
            raise ValueError("hybrid_dict is given but hybrid=False: pass hybrid=True to keep "
                             "those modules float during QAT")
        return None
    if not hybrid_dict:
        raise ValueError("hybrid=True needs hybrid_dict={'module_name': [...], "
                         "'module_type': [...]} naming the modules to keep float")
    if not isinstance(hybrid_dict, dict):
        raise ValueError(f"hybrid_dict must be a dict, got {type(hybrid_dict).__name__}")
    out = {}
    for key in ("module_name", "module_type"):
        value = hybrid_dict.get(key, [])
        if isinstance(value, (str, type)):
            value = [value]
        out[key] = list(value)
    bad = set(hybrid_dict) - set(out)
    if bad:
        raise ValueError(f"unknown hybrid_dict keys {sorted(bad)}: use 'module_name' and "
                         "'module_type'")
    return out


class QConfigResolver:
    """Answer "which qconfig does this node get?" for one traced model.

    Args:
        qconfig_dict: see the module docstring.
        gm: the traced float model.
        names: float names of its nodes (:func:`qatkit.fx.naming.float_node_names`).
        op_kinds: the op kind of each functional node (``"add"``...), for type keys.
        float_overrides: extra ``module_name``/``module_type`` entries forced to float
            (hybrid mode), checked like the others; they win over everything else.
        root: the float model ``gm`` was traced from: its container modules (and their
            types and ``.qconfig`` attributes), which ``gm`` does not keep.
    """

    def __init__(self, qconfig_dict: dict, gm: fx.GraphModule, names: dict[fx.Node, str],
                 op_kinds: dict[fx.Node, str], float_overrides: dict | None = None,
                 float_overrides_label: str = "hybrid_dict", root: nn.Module | None = None,
                 prefix: str = "", check: bool = True) -> None:
        if not isinstance(qconfig_dict, dict):
            raise ValueError(f"qconfig_dict must be a dict such as {{'': qconfig}}, got "
                             f"{type(qconfig_dict).__name__}")
        unknown = set(qconfig_dict) - {"", "module_type", "module_name"}
        if unknown:
            raise ValueError(f"unknown qconfig_dict keys {sorted(unknown)}: use '', "
                             "'module_type' and 'module_name'")
        self.prefix = prefix
        self.global_qconfig = qconfig_dict.get("", None)
        _check_qconfig("''", self.global_qconfig)
        self.by_type = _pairs(qconfig_dict, "module_type")
        self.by_name = _pairs(qconfig_dict, "module_name")
        self.modules = {_join(prefix, n): m for n, m in gm.named_modules()}
        if root is not None:  # the containers gm replaced by plain nn.Module()
            self.modules.update(root.named_modules())
        self.float_names = sorted(set(self._all_names(names)))
        if float_overrides:
            bad = set(float_overrides) - {"module_name", "module_type"}
            if bad:
                raise ValueError(f"unknown {float_overrides_label} keys {sorted(bad)}: use "
                                 "'module_name' and 'module_type'")
            fnames = list(float_overrides.get("module_name", []))
            ftypes = list(float_overrides.get("module_type", []))
            self._float_names, self._float_types = set(fnames), list(ftypes)
        else:
            self._float_names, self._float_types = set(), []
        if check:
            check_keys(qconfig_dict, float_overrides, float_overrides_label, self.float_names,
                       present_types(self.modules.values(), gm, op_kinds))

    def _all_names(self, names: dict[fx.Node, str]) -> Iterable[str]:
        yield from (n for n in self.modules if n)
        for node, name in names.items():
            if node.op in ("call_function", "call_method"):
                yield _join(self.prefix, name)

    def resolve(self, name: str, scope: str, module: nn.Module | None, type_keys: tuple) -> Any:
        """The QConfig (or None) of the op called ``name`` inside module ``scope``.

        ``type_keys`` are what a ``module_type`` entry may match (the module class, the
        function, the op kind).
        """
        name = _join(self.prefix, name)
        scope = _join(self.prefix, scope)
        path = name if module is not None else scope
        containers = self._container_types(path, include_self=module is None)
        if any(name == k or name.startswith(k + ".") for k in self._float_names) or any(
                _matches(key, keys) for key in self._float_types
                for keys in (type_keys, *containers)):
            return None  # a float island
        qc = self.global_qconfig
        for keys in (type_keys, *containers):  # the op's own type, then its containers'
            matched = [value for key, value in self.by_type if _matches(key, keys)]
            if matched:
                qc = matched[-1]
                break
        best = -1
        for key, value in self.by_name:
            if (name == key or name.startswith(key + ".")) and len(key) > best:
                best, qc = len(key), value
        own = self._own_qconfig(path, include_self=True)
        return qc if own is UNSET else own

    def _container_types(self, path: str, include_self: bool) -> list[tuple[type]]:
        """Types of the modules enclosing module ``path`` (``path`` itself if
        ``include_self``), innermost first, the root last."""
        parts = path.split(".") if path else []
        out = []
        for i in range(len(parts) if include_self else len(parts) - 1, -1, -1):
            mod = self.modules.get(".".join(parts[:i]))
            if mod is not None:
                out.append((type(mod),))
        return out

    def _own_qconfig(self, path: str, include_self: bool) -> Any:
        parts = path.split(".") if path else []
        for i in range(len(parts), -1, -1):
            mod = self.modules.get(".".join(parts[:i]))
            if mod is not None and "qconfig" in mod.__dict__:
                return mod.__dict__["qconfig"]
        return UNSET


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def present_types(modules: Iterable[nn.Module], gm: fx.GraphModule | None,
                  op_kinds: dict[fx.Node, str]) -> set[Any]:
    """What a ``module_type`` key may name in a model: its module classes, the functions its
    graph calls, its op kinds.

    Example::

        >>> nn.Conv2d in present_types(model.modules(), gm, {})
        True
    """
    present: set[Any] = {type(m) for m in modules}
    if gm is not None:
        present |= {n.target for n in gm.graph.nodes if n.op == "call_function"}
    present |= set(op_kinds.values())
    return present


def check_keys(qconfig_dict: dict, float_overrides: dict | None, float_overrides_label: str,
               names: Iterable[str], present: set[Any]) -> None:
    """Raise a ValueError for a ``module_name`` key that names nothing in ``names`` (module
    names and functional op names of the model, from its root) or a ``module_type`` key not in
    ``present``; the message lists the closest names.

    Example::

        >>> check_keys({"module_name": [("layer9", None)]}, None, "hybrid_dict", names, types)
        ValueError: qconfig_dict['module_name']: no module or op is named 'layer9'. ...
    """
    names = sorted(set(names))
    _check_names("qconfig_dict['module_name']", [k for k, _ in _pairs(qconfig_dict,
                                                                     "module_name")], names)
    _check_types("qconfig_dict['module_type']", [k for k, _ in _pairs(qconfig_dict,
                                                                     "module_type")], present)
    if float_overrides:
        _check_names(f"{float_overrides_label}['module_name']",
                     list(float_overrides.get("module_name", [])), names)
        _check_types(f"{float_overrides_label}['module_type']",
                     list(float_overrides.get("module_type", [])), present)


def _check_names(label: str, keys: list[str], names: list[str]) -> None:
    for key in keys:
        if not isinstance(key, str):
            raise ValueError(f"{label} entries must be module names (str), got {key!r}")
        if any(n == key or n.startswith(key + ".") for n in names):
            continue
        close = difflib.get_close_matches(key, names, n=5, cutoff=0.5)
        raise ValueError(f"{label}: no module or op is named {key!r}. Closest names: "
                         f"{close or names[:5]}")


def _check_types(label: str, keys: list[Any], present: set[Any]) -> None:
    for key in keys:
        if key in present:
            continue
        shown = sorted({getattr(p, "__name__", str(p)) for p in present
                        if isinstance(p, (type, str))})
        raise ValueError(f"{label}: {getattr(key, '__name__', key)!r} occurs nowhere in the "
                         f"model. Types and ops present include: {shown[:15]}")


def _matches(key: Any, type_keys: tuple) -> bool:
    return any(key is t or key == t for t in type_keys)
