"""How the profiler shows its tables: written to a folder, printed, and the names in them.

Every profiler tool returns pandas DataFrames; these helpers are the one place that writes them
(``.csv`` plus a readable ``.txt``), prints them, and spells the two kinds of names the tables
use: an op's call name (``relu(1)``, the second call of the shared module ``relu``) and its
qconfig key (``relu``, the name a ``qconfig_dict`` entry takes).

Example::

    >>> write_table(table, "out", "featuremap_similarity", "float vs calibrated")
    ['out/featuremap_similarity.csv', 'out/featuremap_similarity.txt']
    >>> qconfig_key("layer1.0.relu(1)")
    'layer1.0.relu'
"""

from __future__ import annotations

import math
import os
import re
from typing import Sequence

import pandas as pd

__all__ = ["write_table", "print_table", "qconfig_key"]

_CALL_SUFFIX = re.compile(r"\(\d+\)$")


def write_table(table: pd.DataFrame, out_dir: str | os.PathLike | None, file_name: str,
                title: str = "", extra: Sequence[tuple[str, pd.DataFrame]] = ()) -> list[str]:
    """Write ``table`` to ``out_dir/file_name.csv`` and a readable ``file_name.txt``.

    ``extra`` tables (``(title, table)`` pairs) are appended to the .txt only.  Nothing is
    written when ``out_dir`` is None.

    Returns:
        the paths written.

    Example::

        >>> write_table(table, "out", "featuremap_similarity", "float vs calibrated")
        ['out/featuremap_similarity.csv', 'out/featuremap_similarity.txt']
    """
    if out_dir is None:
        return []
    os.makedirs(out_dir, exist_ok=True)
    csv = os.path.join(os.fspath(out_dir), f"{file_name}.csv")
    txt = os.path.join(os.fspath(out_dir), f"{file_name}.txt")
    table.to_csv(csv, index=False)
    parts = []
    for t_title, t in [(title, table), *extra]:
        body = t.to_string(index=False, float_format=_fmt) if len(t) else "(no rows)"
        parts.append((f"{t_title}\n{'=' * len(t_title)}\n" if t_title else "") + body)
    with open(txt, "w", encoding="utf-8") as f:
        f.write("\n\n".join(parts) + "\n")
    return [csv, txt]


def _fmt(v: float) -> str:
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
        return f"{v:.4e}"
    return f"{v:.6g}"


def print_table(title: str, df: pd.DataFrame, notes: list[str] | None = None) -> None:
    """Print ``df`` under ``== title ==`` (``notes``: one extra unnamed column, e.g. markers).

    Example::

        >>> print_table("module called count", df, ["<-- shared", ""])
        == module called count ==
        ...
    """
    shown = df.copy()
    if notes is not None:
        shown[""] = notes
    print(f"== {title} ==")
    print(shown.to_string(index=False) if len(shown) else "(none)")


def qconfig_key(name: object) -> str:
    """The qconfig_dict name of an op: ``relu(1)`` (one call of a shared module) -> ``relu``.

    Example::

        >>> qconfig_key("layer1.0.relu(1)"), qconfig_key("layer1.0.add")
        ('layer1.0.relu', 'layer1.0.add')
    """
    return _CALL_SUFFIX.sub("", str(name))
