"""docs/api.md lists every public name of qatkit's namespaces with its signature and the first
line of its docstring, and nothing else: it is generated from ``__all__``.

Regenerate it after changing a public API::

    .venv/bin/python tests/test_api_doc.py
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
#: the namespaces documented, in this order
NAMESPACES = ("qatkit", "qatkit.fx", "qatkit.eager", "qatkit.nn", "qatkit.nn.qat",
              "qatkit.quantized", "qatkit.export", "qatkit.profiler")

HEADER = """# API reference

Every public name of qatkit, by namespace: its signature and the first line of its docstring
(each docstring has the details and an example). Generated from `__all__` by
`tests/test_api_doc.py` (`python tests/test_api_doc.py` rewrites this page; the test fails when
it is out of date). The guide is [user_guide.md](user_guide.md).
"""


def _summary(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    line = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
    return line.replace("|", "\\|")


def _signature(name: str, obj: object) -> str:
    import enum

    if inspect.isclass(obj) and issubclass(obj, enum.Enum):
        return f"`enum {name}` ({', '.join(m.name for m in obj)})"
    if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismethod(obj) or (
            callable(obj) and not isinstance(obj, (dict, tuple, list))):
        try:
            sig = str(inspect.signature(obj))
        except (TypeError, ValueError):
            sig = "(...)"
        sig = sig.replace("|", "\\|")
        prefix = "class " if inspect.isclass(obj) else ""
        return f"`{prefix}{name}{sig}`"
    return f"`{name}` ({type(obj).__name__})"


def render() -> str:
    parts = [HEADER]
    for namespace in NAMESPACES:
        module = importlib.import_module(namespace)
        names = list(getattr(module, "__all__", []))
        parts.append(f"\n## `{namespace}`\n\n| name | purpose |\n|---|---|")
        for name in names:
            obj = getattr(module, name)
            summary = _summary(obj) if callable(obj) or inspect.isclass(obj) else ""
            if not summary and not callable(obj):
                summary = {"dict": "a table (dict)", "tuple": "a tuple of names",
                           "frozenset": "a set of names"}.get(type(obj).__name__, "")
            parts.append(f"| {_signature(name, obj)} | {summary} |")
    return "\n".join(parts) + "\n"


def test_api_doc_is_up_to_date():
    assert API_DOC.exists(), f"run `python {Path(__file__).name}` to write {API_DOC}"
    expected = render()
    assert API_DOC.read_text() == expected, (
        "docs/api.md is out of date with the namespaces' __all__: regenerate it with "
        "`.venv/bin/python tests/test_api_doc.py`")


def test_every_public_callable_has_a_docstring():
    missing = []
    for namespace in NAMESPACES:
        module = importlib.import_module(namespace)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not inspect.getdoc(obj):
                missing.append(f"{namespace}.{name}")
    assert not missing, f"public names without a docstring: {missing}"


if __name__ == "__main__":
    sys.path.insert(0, str(API_DOC.parents[1]))
    API_DOC.write_text(render())
    print(f"wrote {API_DOC}")
