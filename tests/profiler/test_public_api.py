"""qatkit.profiler's face: what it exports, where everything else lives, the flat module paths
of qatkit 0.1 (each warns and names the new one; the old names are checked with every other
qatkit alias in tests/test_deprecated_names.py), and the rooms' one-way relative imports."""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest
import qatkit.profiler as qp
from qatkit import _deprecation
from qatkit.profiler import _moved_modules
from qatkit.profiler.core import metrics

PROFILER = Path(qp.__file__).resolve().parent
ROOMS = ("core", "causal", "report")
#: which rooms a room's modules may import (besides itself and qatkit's plugin)
MAY_IMPORT = {"core": set(), "causal": {"core"}, "report": {"core", "causal"}}


def test_every_export_is_defined_in_a_room_and_no_old_name_is_exported():
    for name in qp.__all__:
        home = getattr(getattr(qp, name), "__module__", "")
        assert home.split(".")[:2] == ["qatkit", "profiler"] and home.split(".")[2] in ROOMS, (
            name, home)
    old = {name for module, name in _deprecation.DEPRECATED_ALIASES if module == qp.__name__}
    assert old and not old & set(qp.__all__), old & set(qp.__all__)
    assert len(qp.__all__) == len(set(qp.__all__)) == 47


@pytest.mark.parametrize("old", sorted(_moved_modules.MOVED_MODULES))
def test_a_moved_module_imports_with_a_warning_and_reads_the_new_one(old, monkeypatch):
    new = importlib.import_module(_moved_modules.MOVED_MODULES[old])
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated .*use {new.__name__}"):
        module = importlib.import_module(old)
    public = list(getattr(new, "__all__", []))
    assert public and all(getattr(module, n) is getattr(new, n) for n in public)


def test_renamed_metrics_through_a_moved_module(fresh_warnings, monkeypatch):
    monkeypatch.delitem(sys.modules, "qatkit.profiler.metrics", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        from qatkit.profiler.metrics import max_abs_error
    assert max_abs_error is qp.max_abs is metrics.get_metric("MaxAbs").fn
    messages = [str(w.message) for w in seen]
    assert any("qatkit.profiler.metrics is deprecated" in m for m in messages), messages
    assert any("core.metrics.max_abs_error is deprecated" in m for m in messages), messages
    assert all(w.filename == __file__ for w in seen), "warnings point at the import line"


def test_unknown_names_raise():
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
            if level == 2:  # from ..<room>.x import
                other = module.split(".")[0]
                assert other in MAY_IMPORT[room], f"{room}/{path.name} imports {other}"
            assert level <= 2, f"{room}/{path.name}: qatkit itself is imported as qatkit.*"
