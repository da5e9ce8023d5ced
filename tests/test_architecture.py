"""The import graph of qatkit has floors and no circles (docs: ARCHITECTURE.md, "Floors, no
circles").

Every module of ``plugin/`` (``qatkit``) and ``profiler/`` (``qatkit.profiler``) is parsed with
``ast`` (nothing is imported), and its imports are read in two sets: the module-level ones
(run when the module is imported; ``if TYPE_CHECKING:`` blocks aside) and the ones inside
functions.  The tests assert:

* no circle among modules (module-level imports; ``from pkg import name`` is an edge to
  ``pkg`` -- its ``__init__`` runs -- and to ``pkg.name`` when that is a module);
* no function-level import of a qatkit module, and function-level imports of other packages
  only from :data:`LAZY_IMPORTS` (optional or heavy dependencies, each with its reason);
* no import goes up a floor (:data:`FLOORS`): numerics at the bottom, the record above them,
  the nn modules (float helpers, QAT and integer modules), the passes (``qatkit.fx``), eager
  mode, export and the algorithms above the passes, the public face (``qatkit/__init__.py``)
  on top, the profiler beside, reading the face and the record;
* integer modules (``qatkit.quantized``) do not derive from QAT modules (``qatkit.nn.qat``).

Run it as a script to print the graph's numbers: ``.venv/bin/python tests/test_architecture.py``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: source tree -> import name, as in setup.cfg's package_dir
SOURCE_TREES = {"plugin": "qatkit", "profiler": "qatkit.profiler"}

#: the floor of each part of qatkit, lowest first: a module's floor is that of the longest
#: name below that is the module itself or a package holding it ("qatkit" alone is the
#: package's __init__, the public face, and holds nothing else)
FLOORS: dict[str, int] = {
    # 0 numerics: observers, fake quant and its states, qconfigs, calibration, the process
    # groups observers reduce over, and the plumbing under them
    "qatkit._version": 0,
    "qatkit._deprecation": 0,
    "qatkit._modules": 0,
    "qatkit._exact": 0,
    "qatkit._ranks": 0,
    "qatkit.data": 0,
    "qatkit.observers": 0,
    "qatkit.fake_quantize": 0,
    "qatkit.distributed": 0,
    "qatkit.qconfig": 0,
    "qatkit.calibration": 0,
    "qatkit.grid_sample_rule": 0,
    # 1 the record: the quantization annotation, and the annotated graph of any prepared model
    "qatkit.annotation": 1,
    "qatkit.model_graph": 1,
    # 2 nn modules: float helpers, QAT modules, integer modules
    "qatkit.nn": 2,
    "qatkit.quantized": 2,
    # 3 the passes
    "qatkit.fx": 3,
    # 4 above the passes: eager mode (reads the FX pass), export, post-training algorithms
    "qatkit.eager": 4,
    "qatkit.export": 4,
    "qatkit.algorithms": 4,
    # 5 the public face
    "qatkit": 5,
    # 6 the profiler, beside: reads the face and the record
    "qatkit.profiler": 6,
}
FLOOR_NAMES = ("numerics", "record", "nn modules", "passes", "eager/export/algorithms",
               "public face", "profiler")

#: packages a function may import (top-level name -> why it is not imported with the module);
#: every other import is at module level
LAZY_IMPORTS: dict[str, str] = {
    # optional: only in the dev extras; export.check runs an exported file with it
    "onnxruntime": "optional dependency (dev extra)",
    # heavy to import, and only the profiler's figures draw
    "matplotlib": "heavy; only figures need it",
}


@dataclasses.dataclass(frozen=True)
class Import:
    """One import of a qatkit module, as written at ``path:line``."""

    source: str  # the importing module
    target: str  # the imported module (qatkit) or top-level package (third party)
    line: int
    level: str  # "module", "function" or "typing" (under ``if TYPE_CHECKING:``)

    def where(self) -> str:
        return f"{_modules()[self.source][0].relative_to(ROOT)}:{self.line}"


@cache
def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module: its import name -> (path, is a package)."""
    found = {}
    for tree, name in SOURCE_TREES.items():
        for path in sorted((ROOT / tree).rglob("*.py")):
            parts = list(path.relative_to(ROOT / tree).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found[".".join([name, *parts])] = (path, is_package)
    return found


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules one import statement imports (qatkit modules by their full name, other
    packages by their top-level name)."""
    mods = _modules()
    if isinstance(node, ast.Import):
        return [a.name if a.name.startswith("qatkit") else a.name.split(".")[0]
                for a in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if not source.startswith("qatkit"):
        return [source.split(".")[0]]
    # ``from pkg import sub``: the submodule (and pkg's __init__, unless pkg is a package
    # holding the importer: that one is already being imported); ``from pkg import name``: pkg
    inside = module.startswith(source + ".")
    subs = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in mods]
    names = len(subs) < len(node.names)
    return ([source] if source != module and (names or not inside) else []) + subs


class _Walker(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.module, self.is_package = module, is_package
        self.imports: list[Import] = []
        self.level = "module"

    def _nested(self, node: ast.AST, level: str) -> None:
        outer, self.level = self.level, level if self.level == "module" else self.level
        self.generic_visit(node)
        self.level = outer

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._nested(node, "function")

    visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            self._nested(node, "typing")
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        for target in _targets(self.module, self.is_package, node):
            self.imports.append(Import(self.module, target, node.lineno, self.level))

    visit_ImportFrom = visit_Import  # noqa: N815


@cache
def imports() -> tuple[Import, ...]:
    """Every import of every module of qatkit."""
    out: list[Import] = []
    for module, (path, is_package) in _modules().items():
        walker = _Walker(module, is_package)
        walker.visit(ast.parse(path.read_text(), filename=str(path)))
        out += walker.imports
    return tuple(out)


def _is_qatkit(name: str) -> bool:
    return name == "qatkit" or name.startswith("qatkit.")


def module_graph(levels: tuple[str, ...] = ("module",)) -> dict[str, set[str]]:
    """Module -> the qatkit modules it imports at ``levels`` (module-level imports: when it
    is imported)."""
    graph: dict[str, set[str]] = {m: set() for m in _modules()}
    for imp in imports():
        if imp.level in levels and _is_qatkit(imp.target) and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def floor_of(module: str) -> int | None:
    """The floor of ``module`` (None: it is in no part of :data:`FLOORS`)."""
    if module == "qatkit":
        return FLOORS["qatkit"]
    parts = module.split(".")
    for i in range(len(parts), 1, -1):
        floor = FLOORS.get(".".join(parts[:i]))
        if floor is not None:
            return floor
    return None


def upward_imports() -> list[Import]:
    """Imports of a module on a higher floor than the importer's (typing-only ones included)."""
    out = []
    for imp in imports():
        if not _is_qatkit(imp.target):
            continue
        src, dst = floor_of(imp.source), floor_of(imp.target)
        if src is not None and dst is not None and dst > src:
            out.append(imp)
    return out


def lazy_qatkit_imports() -> list[Import]:
    return [i for i in imports() if i.level == "function" and _is_qatkit(i.target)]


def lazy_other_imports() -> list[Import]:
    return [i for i in imports() if i.level == "function" and not _is_qatkit(i.target)]


def _describe(imps: list[Import]) -> str:
    return "\n".join(f"  {i.where()}: {i.source} imports {i.target}" for i in imps)


# -- the tests ---------------------------------------------------------------------------------
def test_the_parser_sees_every_kind_of_import():
    # the walker on a made-up module: the test would pass vacuously if it missed imports
    src = ("from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
           "from .observers import X\nimport qatkit.fx\n"
           "if TYPE_CHECKING:\n    from .fx import Y\n"
           "class A:\n    def f(self):\n        from .eager import Z\n        import onnx\n")
    walker = _Walker("qatkit.annotation", False)
    walker.visit(ast.parse(src))
    seen = {(i.target, i.level) for i in walker.imports}
    assert seen == {("__future__", "module"), ("typing", "module"),
                    ("qatkit.observers", "module"), ("qatkit.fx", "module"),
                    ("qatkit.fx", "typing"), ("qatkit.eager", "function"),
                    ("onnx", "function")}, seen
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert floor_of("qatkit.fx.partial.plan") == FLOORS["qatkit.fx"]
    assert floor_of("qatkit.profiler.report") == FLOORS["qatkit.profiler"]


def test_every_module_has_a_floor():
    unplaced = sorted(m for m in _modules() if floor_of(m) is None)
    assert not unplaced, (f"modules in no floor of FLOORS: {unplaced}; add them to FLOORS in "
                          f"{Path(__file__).name}, on the floor of what they are")
    stale = sorted(p for p in FLOORS if p not in _modules())
    assert not stale, f"FLOORS names modules that do not exist: {stale}"


def test_no_import_circles():
    # function-level imports count: a circle they hide is still a circle
    found = cycles(module_graph(("module", "function")))
    details = []
    for component in found:
        members = set(component)
        details.append(f"  {component}:\n" + _describe(
            [i for i in imports() if i.level != "typing" and i.source in members
             and i.target in members]))
    assert not found, "import circles among qatkit modules:\n" + "\n".join(details)


def test_functions_import_no_qatkit_module():
    found = lazy_qatkit_imports()
    assert not found, (
        "imports of qatkit modules inside functions (they hide circles; import at module "
        "level, and move what both sides need down a floor):\n" + _describe(found))


def test_functions_import_only_optional_or_heavy_packages():
    found = lazy_other_imports()
    odd = [i for i in found if i.target not in LAZY_IMPORTS]
    assert not odd, ("imports inside functions of packages that are neither optional nor "
                     "heavy (import them at module level, or add them with the reason to "
                     "LAZY_IMPORTS):\n" + _describe(odd))
    unused = sorted(set(LAZY_IMPORTS) - {i.target for i in found})
    assert not unused, f"LAZY_IMPORTS lists packages no function imports: {unused}"


def test_no_import_goes_up_a_floor():
    found = upward_imports()
    assert not found, "imports of a higher floor (see FLOORS):\n" + "\n".join(
        f"  {i.where()}: {i.source} ({FLOOR_NAMES[floor_of(i.source)]}) imports {i.target} "
        f"({FLOOR_NAMES[floor_of(i.target)]})" for i in found)


def test_integer_modules_do_not_derive_from_qat_modules():
    qat_classes = set()
    integer_classes = set()
    for module in _modules():
        if module.startswith(("qatkit.nn.qat", "qatkit.quantized")):
            mod = importlib.import_module(module)
            for _, cls in inspect.getmembers(mod, inspect.isclass):
                if cls.__module__ == module:
                    (qat_classes if module.startswith("qatkit.nn.qat")
                     else integer_classes).add(cls)
    assert qat_classes and integer_classes
    derived = sorted(f"{c.__module__}.{c.__qualname__}({b.__module__}.{b.__qualname__})"
                     for c in integer_classes for b in c.__mro__ if b in qat_classes)
    assert not derived, f"integer modules deriving from QAT modules: {derived}"


def summary() -> str:
    found = cycles(module_graph(("module", "function")))
    lines = [f"modules: {len(_modules())}",
             f"cycles among module-level imports: {len(cycles(module_graph()))}",
             f"cycles counting function-level imports: {len(found)} "
             f"({', '.join(str(len(c)) for c in found) or 'no'} modules)",
             f"function-level imports of qatkit modules: {len(lazy_qatkit_imports())} "
             f"({len({(i.source, i.line) for i in lazy_qatkit_imports()})} statements)",
             f"function-level imports of other packages: {len(lazy_other_imports())}",
             f"upward imports: {len(upward_imports())}"]
    for component in found:
        lines.append(f"  cycle: {component}")
    lines += [f"  lazy: {i.where()} {i.target}" for i in lazy_qatkit_imports()]
    lines += [f"  lazy (other): {i.where()} {i.target}" for i in lazy_other_imports()]
    lines += [f"  upward: {i.where()} {i.source} -> {i.target}" for i in upward_imports()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(summary())
