"""Old names kept for one release: a module ``__getattr__`` that warns once and names the new
home.

A public name that was renamed or left a namespace's ``__all__`` stays reachable under its old
spelling for one release: ``module.__getattr__ = deprecated_aliases(__name__, {old: new})``,
where ``new`` is the dotted path of the object now (``"qatkit.set_fake_quant_state"``).  The
first access to each old name warns with a ``DeprecationWarning`` naming the new path; the old
name is never in ``__all__`` and never defined in the module itself (``__getattr__`` only runs
for names the module lacks).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Mapping

__all__ = ["deprecated_aliases", "DEPRECATED_ALIASES"]

#: every deprecated alias: (module, old name) -> the new dotted path
DEPRECATED_ALIASES: dict[tuple[str, str], str] = {}
_WARNED: set[tuple[str, str]] = set()


def _resolve(path: str) -> Any:
    """The object at dotted ``path``, whose module part is already imported."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None:
            obj: Any = module
            for part in parts[i:]:
                obj = getattr(obj, part)
            return obj
    raise RuntimeError(f"qatkit: {path} is not imported")  # pragma: no cover - a wrong table


def deprecated_aliases(module: str, aliases: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving the old names of ``aliases`` (old name -> new dotted
    path), each with a ``DeprecationWarning`` the first time it is read.

    Example::

        >>> __getattr__ = deprecated_aliases(__name__, {
        ...     "set_fake_quantize": "qatkit.fake_quantize.set_fake_quant_state"})
    """
    for old, new in aliases.items():
        DEPRECATED_ALIASES[(module, old)] = new

    def __getattr__(name: str) -> Any:
        new = aliases.get(name)
        if new is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        if (module, name) not in _WARNED:
            _WARNED.add((module, name))
            warnings.warn(f"{module}.{name} is deprecated and will be removed in the next "
                          f"release: use {new}", DeprecationWarning, stacklevel=2)
        return _resolve(new)

    return __getattr__
