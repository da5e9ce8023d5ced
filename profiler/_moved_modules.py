"""The module paths of qatkit 0.1's flat profiler, kept for one release with a warning.

qatkit 0.1 kept every profiler module in ``qatkit.profiler`` itself; they live in ``core/``,
``report/`` and ``causal/`` now.  :class:`MovedModules`, a finder the package puts on
``sys.meta_path``, imports an old path (:data:`MOVED_MODULES`) as a view of the module it moved
to (the same objects), with a ``DeprecationWarning`` naming the new path.  Names that left a
namespace are served by :func:`qatkit._deprecation.deprecated_aliases`, as everywhere in qatkit.
Delete this module, and its ``install()`` in the package, in the next release.

Example::

    >>> import qatkit.profiler.metrics     # DeprecationWarning: ... qatkit.profiler.core.metrics
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from typing import Any

__all__ = ["MOVED_MODULES", "MovedModules", "install"]

#: module of qatkit 0.1 -> the module it is now
MOVED_MODULES: dict[str, str] = {
    **{f"qatkit.profiler.{m}": f"qatkit.profiler.core.{m}" for m in (
        "alignment", "capture", "running", "metrics", "similarity", "statistics", "weights",
        "dumps", "tables")},
    **{f"qatkit.profiler.{m}": f"qatkit.profiler.report.{m}" for m in (
        "checks", "qconfig_check", "advisor", "html", "mermaid")},
    **{f"qatkit.profiler.{m}": f"qatkit.profiler.causal.{m}" for m in (
        "sensitivity", "incremental", "distribution", "bad_cases", "mixed_precision")},
    "qatkit.profiler.plots": "qatkit.profiler.causal.acc_error",
    "qatkit.profiler.quantizers": "qatkit.profiler.causal.switches",
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a module of :data:`MOVED_MODULES` as a view of the module it moved to: its
    public names are the same objects, anything else is read from there.

    Example::

        >>> sys.meta_path.append(MovedModules())
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # a plain new module, filled by exec_module

    def exec_module(self, module: types.ModuleType) -> None:
        new = MOVED_MODULES[module.__name__]
        warnings.warn(f"{module.__name__} is deprecated and will be removed in the next "
                      f"release: use {new}", DeprecationWarning, stacklevel=2)
        target = importlib.import_module(new)
        module.__dict__.update({k: v for k, v in vars(target).items()
                                if not k.startswith("__")})
        module.__doc__ = target.__doc__
        module.__getattr__ = target.__dict__.get("__getattr__", lambda name: getattr(
            target, name))  # the renamed names of the module it moved to, with their warning


def install() -> None:
    """Put one :class:`MovedModules` finder on ``sys.meta_path`` (never a second one).

    Example::

        >>> install()
    """
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())
