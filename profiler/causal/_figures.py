"""Figures for the accuracy-debugging tools: matplotlib without a display or global state.

Figures are built with matplotlib's object API on an Agg canvas (``matplotlib.figure.Figure``):
no pyplot, no backend switch, no window -- safe on servers and in tests.  Each figure is
written as PNG and SVG; file names are made safe from model-provided names.

Example::

    >>> fig, ax = new_figure(8, 4)
    >>> ax.plot([1, 2, 3])
    >>> save_figure(fig, "out", "curve")
    (PosixPath('out/curve.png'), PosixPath('out/curve.svg'))
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

__all__ = ["new_figure", "save_figure", "safe_stem", "tick_labels"]


def new_figure(width: float, height: float, rows: int = 1, cols: int = 1) -> tuple[Any, Any]:
    """``(figure, axes)`` on an Agg canvas (axes: one, or an array for several).

    Example::

        >>> fig, (ax1, ax2) = new_figure(10, 4, cols=2)
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=True)
    return fig, axes


def safe_stem(name: str) -> str:
    """A file-name-safe version of a model-provided name.

    Example::

        >>> safe_stem("layer1.0.relu(1)/x")
        'layer1.0.relu_1__x'
    """
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))[:120] or "node"


def save_figure(fig: Any, out_dir: str | os.PathLike, stem: str) -> tuple[Path, Path]:
    """Write ``fig`` to ``out_dir/stem.png`` and ``.svg`` (folder created); return the paths.

    Example::

        >>> png, svg = save_figure(fig, "out", "acc_error")
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, svg = out / f"{stem}.png", out / f"{stem}.svg"
    fig.tight_layout()
    fig.savefig(png, format="png")
    fig.savefig(svg, format="svg", metadata={"Date": None})
    return png, svg


def tick_labels(ax: Any, labels: list[str], max_labels: int = 60) -> None:
    """Label the x axis with ``labels`` (rotated; at most ``max_labels`` of them shown).

    Example::

        >>> tick_labels(ax, ["conv1", "conv2", "fc"])
    """
    step = max(1, -(-len(labels) // max_labels))
    ticks = list(range(0, len(labels), step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([labels[i] for i in ticks], rotation=75, ha="right", fontsize=7)
