"""qatkit.profiler's face: what it exports, where everything else lives, the old paths of
qatkit 0.1 (each warns and names the new one), and the rooms' one-way imports."""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest
import qatkit.profiler as qp
from qatkit.profiler import _deprecated
from qatkit.profiler.core import metrics

PROFILER = Path(qp.__file__).resolve().parent
ROOMS = ("core", "causal", "report")
#: which rooms a room's modules may import (besides itself and qatkit's plugin)
MAY_IMPORT = {"core": set(), "causal": {"core"}, "report": {"core", "causal"}}


def test_every_export_is_defined_in_a_room_and_no_internal_is_exported():
    for name in qp.__all__:
        obj = getattr(qp, name)
        home = getattr(obj, "__module__", "")
        assert home.split(".")[2:3] and home.split(".")[2] in ROOMS, (name, home)
    internals = set(_deprecated.MOVED_NAMES) | set(metrics.RENAMED)
    assert not internals & set(qp.__all__), internals & set(qp.__all__)
    assert len(qp.__all__) == len(set(qp.__all__)) == 47


@pytest.mark.parametrize("name", sorted(_deprecated.MOVED_NAMES))
def test_a_name_that_left_the_top_level_warns_with_its_new_path(name):
    new = _deprecated.MOVED_NAMES[name]
    with pytest.warns(DeprecationWarning, match=rf"qatkit\.profiler\.{name} .*from {new} import"):
        got = getattr(qp, name)
    assert got is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("old,new", sorted(metrics.RENAMED.items()))
def test_renamed_metric_functions_warn_and_are_the_new_ones(old, new):
    for where in (qp, metrics):
        with pytest.warns(DeprecationWarning, match=rf"{where.__name__}\.{old} .*use {new}"):
            assert getattr(where, old) is getattr(qp, new)
    assert metrics.get_metric(new).fn is getattr(qp, new)


@pytest.mark.parametrize("old", sorted(_deprecated.MOVED_MODULES))
def test_a_moved_module_imports_with_a_warning_and_reads_the_new_one(old, monkeypatch):
    new = importlib.import_module(_deprecated.MOVED_MODULES[old])
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=rf"module {old} .*{new.__name__}"):
        module = importlib.import_module(old)
    public = [n for n in getattr(new, "__all__", []) if n not in metrics.RENAMED]
    assert public and all(getattr(module, n) is getattr(new, n) for n in public)


def test_old_spellings_through_a_moved_module():
    sys.modules.pop("qatkit.profiler.metrics", None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        from qatkit.profiler.metrics import max_abs_error
    assert max_abs_error is qp.max_abs
    messages = [str(w.message) for w in seen]
    assert any("qatkit.profiler.metrics is deprecated" in m for m in messages), messages
    assert any("qatkit.profiler.metrics.max_abs_error is deprecated" in m for m in messages)
    assert all(w.filename == __file__ for w in seen), "warnings point at the import line"


def test_model_profiler_module_of_0_1():
    from qatkit.profiler.report import model_report

    for name in _deprecated.MOVED_REPORT_NAMES:
        with pytest.warns(DeprecationWarning, match=rf"report\.model_report import {name}"):
            assert getattr(qp.report, name) is getattr(model_report, name)


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'plot_everything'"):
        qp.plot_everything  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        metrics.nothing  # noqa: B018
    with pytest.raises(ImportError):
        importlib.import_module("qatkit.profiler.nothing")


def _profiler_imports(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every import in ``path``: level 0 for absolute ones."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
        elif isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
    return found


@pytest.mark.parametrize("room", ROOMS)
def test_rooms_import_one_way_and_relatively(room):
    for path in sorted((PROFILER / room).glob("*.py")):
        for level, module in _profiler_imports(path):
            assert not module.startswith("qatkit.profiler"), (
                f"{path.name}: imports inside the profiler are relative ({module})")
            if level == 2 and module:  # from ..<room>.x import (not the package's _deprecated)
                other = module.split(".")[0]
                assert other in MAY_IMPORT[room], f"{room}/{path.name} imports {other}"
            assert level <= 2, f"{room}/{path.name}: qatkit itself is imported as qatkit.*"
