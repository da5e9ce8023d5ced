"""Every figure of the causal tools: matplotlib without a display or global state.

Figures are built with matplotlib's object API on an Agg canvas (``matplotlib.figure.Figure``):
no pyplot, no backend switch, no window -- safe on servers and in tests.  Each figure is
written as PNG and SVG; file names are made safe from model-provided names.  The tools compute
their tables; the drawing of each lives here (:func:`cumulative_error_figure` and
:func:`sweep_figure` for :func:`~.acc_error.plot_acc_error`, :func:`distribution_figure` for
:func:`~.distribution.plot_distribution`).

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

import pandas as pd
import torch
from torch import Tensor

from ..core.metrics import Metric

__all__ = ["new_figure", "save_figure", "safe_stem", "tick_labels", "cumulative_error_figure",
           "sweep_figure", "distribution_figure", "BOX_CHANNELS"]

#: channels a distribution box plot draws (the widest ranges first beyond this)
BOX_CHANNELS = 64


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


# -- plot_acc_error 
def cumulative_error_figure(table: pd.DataFrame, labels: list[str], metric: Metric,
                            save_dir: str | os.PathLike) -> tuple[Path, Path]:
    """:func:`~.acc_error.plot_acc_error`'s cumulative error curves (one per label, a column of
    ``table`` along its "Index"), written as ``acc_error_quantize.png`` / ``.svg``.

    Example::

        >>> cumulative_error_figure(table, ["only weights quantized"], get_metric("cosine"), "out")
    """
    fig, ax = new_figure(max(8.0, min(24.0, 0.22 * len(table) + 4)), 4.8)
    for label in labels:
        ax.plot(table["Index"], table[label], marker="o", markersize=3, label=label)
    ax.set_ylabel(f"{metric.name} vs float")
    ax.set_title(f"Cumulative error along the model ({metric.name}, "
                 f"{'higher' if metric.higher_is_better else 'lower'} is better)")
    tick_labels(ax, [str(n) for n in table["Module Name"]])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, save_dir, "acc_error_quantize")


def sweep_figure(table: pd.DataFrame, metric: Metric, save_dir: str | os.PathLike
                 ) -> tuple[Path, Path]:
    """:func:`~.acc_error.plot_acc_error`'s partial un-quantization sweep (the metric per set of
    nodes left float, the baseline first), written as ``acc_error_non_quantize.png`` / ``.svg``.

    Example::

        >>> sweep_figure(table, get_metric("cosine"), "out")
    """
    fig, ax = new_figure(max(6.0, min(20.0, 0.5 * len(table) + 4)), 4.2)
    values = table[metric.name].astype(float)
    ax.plot(table["Set"], values, marker="o", color="#2563eb")
    ax.axhline(float(values.iloc[0]), color="#c62828", linestyle="--", linewidth=1,
               label="all quantized")
    labels = ["none"] + [_short(str(names)) for names in table["Left Float"].iloc[1:]]
    ax.set_xticks(list(table["Set"]))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric.name} of the output vs float")
    ax.set_title("Partial un-quantization: nodes left float")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, save_dir, "acc_error_non_quantize")


def _short(names: str, width: int = 28) -> str:
    """A sweep set's tick label: its names, cut to ``width`` characters."""
    return names if len(names) <= width else "..." + names[-(width - 3):]


# -- plot_distribution
def distribution_figure(name: str, path: str, hist: Tensor, lo: float, hi: float, modes: int,
                        channels: Tensor | None, absmax: Tensor | None, spread: float,
                        risk: bool) -> Any:
    """:func:`~.distribution.plot_distribution`'s figure of one fake quant's values: the
    histogram ``hist`` over ``[lo, hi]`` (log counts) and a box plot per channel (the
    :data:`BOX_CHANNELS` widest when there are more), the verdicts in the titles.

    Example::

        >>> fig = distribution_figure("conv1", "conv1.weight_fake_quant", hist, -1.0, 1.0, 1,
        ...                           None, None, float("nan"), False)
    """
    from matplotlib.ticker import LogFormatter, NullFormatter

    fig, axes = new_figure(12, 4, cols=2)
    ax = axes[0]
    edges = torch.linspace(lo, hi if hi > lo else lo + 1e-12, hist.numel() + 1)
    ax.stairs(hist.numpy(), edges.numpy(), fill=True, baseline=0.8, color="#2563eb")
    ax.set_yscale("log")
    ax.set_ylim(0.8, max(float(hist.max()), 1.0) * 1.5)
    # plain-text log labels: mathtext ones take seconds to draw
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title(f"{name}: {'unimodal' if modes <= 1 else f'{modes} modes'}", fontsize=10)
    ax.set_xlabel(path, fontsize=8)
    ax.set_ylabel("count (log)")
    ax = axes[1]
    if channels is not None and absmax is not None:
        order = torch.arange(channels.shape[0])
        if channels.shape[0] > BOX_CHANNELS:
            order = torch.argsort(absmax, descending=True)[:BOX_CHANNELS].sort().values
        ax.boxplot([channels[i].numpy() for i in order.tolist()], whis=(0, 100),
                   showfliers=False, widths=0.6)
        ax.set_xticks(range(1, len(order) + 1))
        ax.set_xticklabels([str(i) for i in order.tolist()], fontsize=6, rotation=90)
        verdict = "per-tensor at risk" if risk else "ok"
        ax.set_title(f"per channel: range spread 2^{spread:.1f} ({verdict})", fontsize=10,
                     color="#c62828" if risk else "black")
        ax.set_xlabel("channel")
    else:
        ax.text(0.5, 0.5, "no channel axis", ha="center", va="center")
        ax.set_axis_off()
    return fig
