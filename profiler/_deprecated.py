"""Old import paths of ``qatkit.profiler``, kept for one release with a ``DeprecationWarning``.

qatkit 0.1 exported internals from the package's top level and kept every module flat in
``qatkit.profiler``.  Both still work until qatkit 0.2, and each use says where the name lives
now:

* :data:`MOVED_NAMES` -- names that left ``qatkit.profiler.__all__`` (internals of the report,
  the metrics and the causal tools), and the metric functions renamed after their keys
  (:data:`qatkit.profiler.core.metrics.RENAMED`), reached through the package's
  ``__getattr__`` (:func:`moved_name`);
* :data:`MOVED_MODULES` -- the flat modules, now in ``core/``, ``report/`` and ``causal/``,
  reached through a meta path finder that the package installs (:class:`MovedModules`):
  ``import qatkit.profiler.metrics`` gives a module that reads ``qatkit.profiler.core.metrics``;
* :data:`MOVED_REPORT_NAMES` -- ``qatkit.profiler.report`` was the module of
  ``model_profiler``; it is the report's package now, and its old names are read from
  :mod:`qatkit.profiler.report.model_report`.

Delete this module and the two ``__getattr__`` hooks that call it in qatkit 0.2.

Example::

    >>> from qatkit.profiler import render_html   # DeprecationWarning: ... report.html
    >>> import qatkit.profiler.metrics             # DeprecationWarning: ... core.metrics
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from typing import Any, Sequence

from .core import metrics

__all__ = ["MOVED_NAMES", "MOVED_MODULES", "MOVED_REPORT_NAMES", "moved_name", "MovedModules",
           "install"]

#: the release that drops the old paths
REMOVED_IN = "qatkit 0.2"

#: name once exported by ``qatkit.profiler`` -> the module it is imported from now
MOVED_NAMES: dict[str, str] = {
    "METRICS": "qatkit.profiler.core.metrics",
    "BatchMetric": "qatkit.profiler.core.metrics",
    "FINAL_SIMILARITY_THRESHOLD": "qatkit.profiler.core.metrics",
    "ADVICE_COLUMNS": "qatkit.profiler.report.advisor",
    "render_html": "qatkit.profiler.report.html",
    "build_verdict": "qatkit.profiler.report.html",
    "Verdict": "qatkit.profiler.report.html",
    "REPORT_SECTIONS": "qatkit.profiler.report.html",
    "MODES": "qatkit.profiler.report.model_report",
    "model_kind": "qatkit.profiler.report.model_report",
    "IncrementalRunner": "qatkit.profiler.causal.incremental",
}

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

#: what ``qatkit.profiler.report`` (then a module) held, now in ``report.model_report``
MOVED_REPORT_NAMES = ("model_profiler", "ProfilerReport", "MODES", "model_kind", "TOOLS",
                      "SENSITIVITY_TOOLS", "SENSITIVITY_SWEEP")

def _warn(old: str, new: str, stacklevel: int) -> None:
    warnings.warn(f"{old} is deprecated and goes in {REMOVED_IN}: {new}", DeprecationWarning,
                  stacklevel=stacklevel + 1)




def moved_name(package: str, name: str, table: Any = None) -> Any:
    """The object an old top-level name refers to, with a DeprecationWarning naming its new
    import path; AttributeError for a name that never was.

    Args:
        package: the module whose ``__getattr__`` asks (``"qatkit.profiler"``).
        name: the attribute asked for.
        table: ``{name: new module}`` (default :data:`MOVED_NAMES`), or a sequence of names
            all moved to ``qatkit.profiler.report.model_report`` (:data:`MOVED_REPORT_NAMES`).

    Example::

        >>> moved_name("qatkit.profiler", "render_html")     # warns
        <function render_html at ...>
    """
    if table is None:
        if name in metrics.RENAMED:
            return metrics.renamed_function(package, name, stacklevel=3)
        table = MOVED_NAMES
    if isinstance(table, Sequence):
        table = dict.fromkeys(table, "qatkit.profiler.report.model_report")
    if name not in table:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    _warn(f"{package}.{name}", f"use `from {table[name]} import {name}`", stacklevel=3)
    return getattr(importlib.import_module(table[name]), name)


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a module of :data:`MOVED_MODULES` as a view of the module it moved to (every
    attribute read from there), with a DeprecationWarning.

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
        _warn(f"the module {module.__name__}", f"it is {new} now", stacklevel=2)
        target = importlib.import_module(new)
        module.__dict__.update({k: v for k, v in vars(target).items()
                                if not k.startswith("__")})
        module.__doc__ = target.__doc__
        module.__getattr__ = functools.partial(_forward, module.__name__, target)


def _forward(old: str, target: types.ModuleType, name: str) -> Any:
    """A moved module's attribute that was not copied: a renamed metric function (warned
    here, where the caller's frame is known), or anything set on ``target`` later."""
    if target is metrics and name in metrics.RENAMED:
        return metrics.renamed_function(old, name, stacklevel=2)
    return getattr(target, name)


def install() -> None:
    """Put one :class:`MovedModules` finder on ``sys.meta_path`` (again: no second one).

    Example::

        >>> install()
    """
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())
