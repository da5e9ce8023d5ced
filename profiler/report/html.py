"""Render the profiler's tables into one self-contained HTML page (``profiler.html``).

The page opens with a verdict (final-output cosine similarity against the usual 0.98 rule, the
worst layers, the top findings with advice), then a per-layer similarity chart drawn here as
inline SVG, then one sortable, filterable, paginated table per profiler table.  Everything is
inline (CSS, JS, images): the file works from ``file://`` with no network.

Safety: every model-provided string reaches the page either through jinja2 autoescaping or as
JSON inside a ``<script type="application/json">`` block with ``<``, ``>`` and ``&`` escaped as
``\\u003c``/``\\u003e``/``\\u0026``; the page's JavaScript writes cells with ``textContent``
only, so a module named ``<script>alert(1)</script>`` shows up as text.

Size: table rows travel as compact JSON and the browser shows 100 rows per page (with a "show
all" toggle), so a 500-layer model's page stays well under a megabyte.

Example::

    >>> from qatkit.profiler.report.html import render_html
    >>> render_html({"similarity_end_to_end": e2e, "findings": findings}, "out/profiler.html")
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from markupsafe import Markup, escape

from ..core.metrics import FINAL_SIMILARITY_THRESHOLD
from .mermaid import GOOD_SIMILARITY, OK_SIMILARITY

__all__ = [
    "FINAL_SIMILARITY_THRESHOLD", "REPORT_SECTIONS", "OPTIONAL_SECTIONS", "Finding",
    "LayerScore", "Verdict", "build_verdict", "render_html",
]

#: table key -> (section title, one-line help), in page order; other keys follow, titled by key
REPORT_SECTIONS: dict[str, tuple[str, str]] = {
    "similarity_end_to_end": (
        "Similarity: end to end",
        "Model 2 run on its own: each layer's output vs model 1's. Error accumulates along the "
        "network, so late layers are lower; look for sudden drops."),
    "similarity_per_layer": (
        "Similarity: per layer (same input)",
        "Each layer of model 2 fed with model 1's input to that layer: the op's own error. "
        "Low rows here are the layers to fix."),
    "statistics": (
        "Feature-map statistics",
        "Min / max / mean / var of every op's inputs and outputs, with the op kind, where each "
        "input comes from, the quantization scale, saturation ratio and range in quantization "
        "steps."),
    "outliers": (
        "Outlier channels",
        "Channels whose max is 2^k times below the tensor max: per-tensor scales dominated by a "
        "few channels (Level>=k columns count channels)."),
    "weights": (
        "Weights",
        "Float vs quantized weights: similarity, max abs error and error in weight-scale steps."),
    "called_count": (
        "Call counts",
        "How often each module is called per forward pass: a count above 1 is a shared module "
        "(one scale for several call sites, fusion fails)."),
    "unfused": (
        "Unfused operations",
        "Fusable groups (conv+bn+relu, ...) left separate, with the reason and the fix."),
    "qconfig": (
        "Qconfig per layer",
        "Input / output / weight dtypes, weight channel axis and fixed scales of every layer."),
    "qconfig_warnings": ("Qconfig warnings", "Suspicious qconfig choices, layer by layer."),
    "findings": (
        "Findings",
        "Everything the advisor found, most severe first, with evidence and advice."),
}

#: sections a report has only when asked for (model_profiler's sensitivity section), placed
#: after :data:`REPORT_SECTIONS`, in this order
OPTIONAL_SECTIONS: dict[str, tuple[str, str]] = {
    "sensitivity": (
        "Sensitivity: which quantizer hurts",
        "A causal test: each quantizer switched on alone (or off alone), the output compared "
        "with the float data flow. Most sensitive first: leave these float or raise them to "
        "int16 (suggest_mixed_precision returns the qconfig)."),
    "acc_error_quantize": (
        "Cumulative error: weights vs activations",
        "Each quantized op's output vs float with only the weights, or only the activations, "
        "quantized: which kind of quantizer dominates, and where the error appears."),
    "acc_error_non_quantize": (
        "Partial un-quantization",
        "The output vs float with the most sensitive nodes left float (row 0: everything "
        "quantized): how much accuracy comes back."),
}

_TEMPLATE = "profiler.html.j2"
_SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}
#: the column every profiler table names its layers in (several, comma-separated, in a group),
#: checked against the shared-module set
_NAME_COLUMN = "Module Name"
_CALL_SUFFIX = re.compile(r"\(\d+\)$")
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                ".svg": "image/svg+xml", ".gif": "image/gif"}


@dataclass(frozen=True)
class LayerScore:
    """One layer's similarity, as listed among the worst layers of the verdict."""

    name: str
    module_type: str
    similarity: float


@dataclass(frozen=True)
class Finding:
    """One advisor finding (a row of the advisor table)."""

    severity: str
    layer: str
    problem: str
    evidence: str
    advice: str


@dataclass(frozen=True)
class Verdict:
    """What the page says first: is the quantized model healthy, and where to look.

    Attributes:
        final_similarity: cosine similarity of the final output (None when unknown).
        threshold: the health rule (pass when ``final_similarity >= threshold``).
        worst_end_to_end: lowest end-to-end similarities, worst first.
        worst_per_layer: lowest per-layer (own error) similarities, worst first.
        top_findings: the most severe findings, most severe first.
        severity_counts: ``(severity, count)`` of all findings, errors first.
    """

    final_similarity: float | None = None
    threshold: float = FINAL_SIMILARITY_THRESHOLD
    worst_end_to_end: tuple[LayerScore, ...] = ()
    worst_per_layer: tuple[LayerScore, ...] = ()
    top_findings: tuple[Finding, ...] = ()
    severity_counts: tuple[tuple[str, int], ...] = field(default=())

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"Verdict.threshold={self.threshold} is not a cosine similarity; "
                             f"use a value in [-1, 1] such as {FINAL_SIMILARITY_THRESHOLD}")

    @property
    def passed(self) -> bool | None:
        """True/False against the threshold, None when the final similarity is unknown."""
        if self.final_similarity is None or math.isnan(self.final_similarity):
            return None
        return self.final_similarity >= self.threshold


def _usable(df: pd.DataFrame | None, *columns: str) -> bool:
    return isinstance(df, pd.DataFrame) and len(df) > 0 and all(c in df.columns for c in columns)


def _worst(df: pd.DataFrame | None, n: int) -> tuple[LayerScore, ...]:
    if not _usable(df, "Module Name", "Similarity") or n <= 0:
        return ()
    sim = pd.to_numeric(df["Similarity"], errors="coerce").astype(float)
    # NaN similarity (e.g. a NaN output) is the worst of all: sort it first
    rows = df.assign(_sim=sim, _key=sim.fillna(-math.inf)).sort_values("_key", kind="stable")
    rows = rows.head(n)
    types = rows["Module Type"] if "Module Type" in rows.columns else [""] * len(rows)
    return tuple(LayerScore(str(name), str(mtype), float(s)) for name, mtype, s
                 in zip(rows["Module Name"], types, rows["_sim"], strict=True))


def build_verdict(tables: Mapping[str, pd.DataFrame | None], *,
                  final_similarity: float | None = None,
                  threshold: float = FINAL_SIMILARITY_THRESHOLD,
                  n_worst: int = 5, n_findings: int = 5) -> Verdict:
    """Derive the page's verdict from the tables.

    The final-output similarity defaults to the last row (in execution order) of the end-to-end
    similarity table; pass it explicitly when the model's output is not the last op recorded.

    Args:
        tables: the report tables, keyed as in :data:`REPORT_SECTIONS`.
        final_similarity: cosine similarity of the model's final output, if known.
        threshold: the health rule for the final similarity (0.98 by default).
        n_worst: how many worst layers to list per similarity table.
        n_findings: how many findings to list (most severe first).

    Returns:
        The :class:`Verdict`.

    Example::

        >>> v = build_verdict({"similarity_end_to_end": e2e, "findings": findings})
        >>> v.passed, [w.name for w in v.worst_end_to_end]
        (False, ['fc', 'layer4.1.conv2'])
    """
    e2e = tables.get("similarity_end_to_end")
    if final_similarity is None and _usable(e2e, "Similarity"):
        last = pd.to_numeric(e2e["Similarity"], errors="coerce").iloc[-1]
        final_similarity = float(last)
    findings = tables.get("findings")
    top: tuple[Finding, ...] = ()
    counts: tuple[tuple[str, int], ...] = ()
    if _usable(findings, "Severity"):
        sev = findings["Severity"].astype(str).str.lower()
        rank = sev.map(lambda s: _SEVERITY_RANK.get(s, len(_SEVERITY_RANK)))
        ordered = findings.assign(_rank=rank).sort_values("_rank", kind="stable")
        cols = ("Severity", _NAME_COLUMN, "Problem", "Evidence", "Advice")
        top = tuple(
            Finding(*(_cell_text(row.get(c, "")) for c in cols))
            for _, row in ordered.head(max(n_findings, 0)).iterrows())
        tally = sev.value_counts()
        counts = tuple((s, int(tally[s])) for s in sorted(tally.index, key=lambda s: (
            _SEVERITY_RANK.get(s, len(_SEVERITY_RANK)), s)))
    return Verdict(final_similarity=final_similarity, threshold=threshold,
                   worst_end_to_end=_worst(e2e, n_worst),
                   worst_per_layer=_worst(tables.get("similarity_per_layer"), n_worst),
                   top_findings=top, severity_counts=counts)


# ----------------------------------------------------------------------------- table data


def _cell_text(value: Any) -> str:
    """A non-numeric cell as display text (lists joined, missing values empty)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(_cell_text(v) for v in value)
    return str(value)


def _column_kind(name: str, series: pd.Series) -> str:
    """How the browser formats and sorts a column: sim, int, num, severity or text."""
    if name == "Severity":
        return "severity"
    if pd.api.types.is_bool_dtype(series.dtype):
        return "text"
    if pd.api.types.is_numeric_dtype(series.dtype):
        numeric = series.astype(float)
    else:
        values = [v for v in series.tolist() if v is not None and v is not pd.NA]
        if not values or not all(pd.api.types.is_number(v) and not pd.api.types.is_bool(v)
                                 for v in values):
            return "text"
        numeric = pd.to_numeric(series, errors="coerce").astype(float)
    if "similarity" in name.lower():
        return "sim"
    finite = numeric[numeric.map(math.isfinite)]
    if pd.api.types.is_integer_dtype(series.dtype) or (
            len(finite) and bool((finite == finite.round()).all())):
        return "int"
    return "num"


def _json_number(value: Any) -> float | int | str | None:
    """A numeric cell for JSON: NaN/missing -> null, infinities -> 'inf' / '-inf'."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if math.isnan(number):
        return None
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    if isinstance(value, int) or (hasattr(value, "dtype") and
                                  pd.api.types.is_integer_dtype(getattr(value, "dtype", None))):
        return int(value)
    return number


def _base_names(value: Any) -> list[str]:
    """The module names a cell refers to, with call suffixes "(k)" stripped."""
    return [_CALL_SUFFIX.sub("", part) for part in _cell_text(value).split(", ") if part]


def _shared_rows(df: pd.DataFrame, shared: frozenset[str]) -> list[int]:
    if not shared:
        return []
    columns = [str(c) for c in df.columns]
    if _NAME_COLUMN not in columns:
        return []
    values = df.iloc[:, columns.index(_NAME_COLUMN)].tolist()
    return [i for i, value in enumerate(values) if any(n in shared for n in _base_names(value))]


def _shared_from_counts(df: pd.DataFrame | None) -> frozenset[str]:
    if not _usable(df, "Module Name", "Called Count"):
        return frozenset()
    counts = pd.to_numeric(df["Called Count"], errors="coerce")
    return frozenset(str(n) for n in df.loc[counts > 1, "Module Name"])


def _table_spec(key: str, df: pd.DataFrame, shared: frozenset[str]) -> dict[str, Any]:
    columns = [str(c) for c in df.columns]
    series = [df.iloc[:, j] for j in range(df.shape[1])]  # by position: names may repeat
    kinds = [_column_kind(c, sr) for c, sr in zip(columns, series, strict=True)]
    cols = [sr.tolist() for sr in series]
    rows = []
    for i in range(len(df)):
        rows.append([_cell_text(col[i]) if kind in ("text", "severity") else _json_number(col[i])
                     for col, kind in zip(cols, kinds, strict=True)])
    return {"id": f"sec-{_slug(key)}", "key": key, "columns": columns, "kinds": kinds,
            "rows": rows, "shared": _shared_rows(df, shared)}


def _slug(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-") or "table"


def _script_json(data: Any) -> Markup:
    """JSON that is safe inside <script>: no '<', '>', '&' (so no '</script>') and no U+2028/9."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for raw, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                     ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, esc)
    return Markup(text)  # noqa: S704 - escaped above for the <script> context


# ----------------------------------------------------------------------------- chart

_CHART_W, _CHART_H = 1100, 300
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 64, 16, 28, 40
_SERIES = (("similarity_end_to_end", "end to end", "#2563eb"),
           ("similarity_per_layer", "per layer (same input)", "#ea8a0c"))


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    span = max(hi - lo, 1e-12)
    raw = span / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + 1e-9 * span:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _similarity_chart(tables: Mapping[str, pd.DataFrame | None], shared: frozenset[str],
                      threshold: float) -> Markup | None:
    """Inline SVG of similarity vs layer index; each point's <title> names the layer."""
    series = []
    for key, label, colour in _SERIES:
        df = tables.get(key)
        if not _usable(df, "Module Name", "Similarity"):
            continue
        sim = pd.to_numeric(df["Similarity"], errors="coerce").astype(float).tolist()
        index = (pd.to_numeric(df["Index"], errors="coerce").tolist() if "Index" in df.columns
                 else list(range(len(df))))
        index = [i if isinstance(i, (int, float)) and math.isfinite(i) else k
                 for k, i in enumerate(index)]
        types = df["Module Type"].astype(str).tolist() if "Module Type" in df.columns \
            else [""] * len(df)
        series.append((key, label, colour, index, sim, df["Module Name"].astype(str).tolist(),
                       types))
    if not series:
        return None
    values = [s for *_, sims, _n, _t in series for s in sims if math.isfinite(s)]
    lo = min(values + [threshold])
    lo = max(-1.0, lo - 0.08 * (1.0 - lo) - 1e-4)
    hi = max(values + [1.0])
    xs = [x for *_, idx, _s, _n, _t in series for x in idx]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x1 = x0 + 1
    pw, ph = _CHART_W - _PAD_L - _PAD_R, _CHART_H - _PAD_T - _PAD_B

    def sx(x: float) -> float:
        return round(_PAD_L + (x - x0) / (x1 - x0) * pw, 1)

    def sy(y: float) -> float:
        return round(_PAD_T + (hi - y) / (hi - lo) * ph, 1)

    out = [f'<svg class="qk-chart" viewBox="0 0 {_CHART_W} {_CHART_H}" role="img" '
           f'aria-label="similarity per layer" xmlns="http://www.w3.org/2000/svg">']
    for t in _nice_ticks(lo, hi):
        out.append(f'<line class="grid" x1="{_PAD_L}" x2="{_CHART_W - _PAD_R}" y1="{sy(t)}" '
                   f'y2="{sy(t)}"/><text class="tick" x="{_PAD_L - 6}" y="{sy(t) + 4}" '
                   f'text-anchor="end">{t:g}</text>')
    for t in _nice_ticks(x0, x1, 10):
        if float(t).is_integer():
            out.append(f'<text class="tick" x="{sx(t)}" y="{_CHART_H - _PAD_B + 16}" '
                       f'text-anchor="middle">{int(t)}</text>')
    out.append(f'<text class="axis" x="{_PAD_L + pw / 2}" y="{_CHART_H - 6}" '
               f'text-anchor="middle">layer index (execution order)</text>')
    out.append(f'<text class="axis" transform="rotate(-90)" x="{-(_PAD_T + ph / 2)}" y="14" '
               f'text-anchor="middle">cosine similarity</text>')
    ty = sy(threshold)
    out.append(f'<line class="threshold" x1="{_PAD_L}" x2="{_CHART_W - _PAD_R}" y1="{ty}" '
               f'y2="{ty}"><title>final-output rule: {threshold:g}</title></line>')
    out.append(f'<text class="threshold-label" x="{_CHART_W - _PAD_R - 4}" y="{ty - 4}" '
               f'text-anchor="end">{threshold:g}</text>')
    for n, (key, label, colour, index, sims, names, types) in enumerate(series):
        path, pen_up = [], True
        for x, s in zip(index, sims, strict=True):
            if not math.isfinite(s):
                pen_up = True
                continue
            path.append(f"{'M' if pen_up else 'L'}{sx(x)} {sy(s)}")
            pen_up = False
        out.append(f'<path class="line" stroke="{colour}" d="{" ".join(path)}"/>')
        section = f"sec-{_slug(key)}"
        radius = 3 if len(sims) <= 150 else 2 if len(sims) <= 400 else 1.5
        out.append(f'<g fill="{colour}">')
        for x, s, name, mtype in zip(index, sims, names, types, strict=True):
            if not math.isfinite(s):
                continue
            red = _CALL_SUFFIX.sub("", name) in shared
            cls = "pt shared" if red else "pt"
            tip = f"#{x:g} {name} ({mtype})\n{label}: {s:.6f}" + ("\nshared op" if red else "")
            out.append(f'<circle class="{cls}" cx="{sx(x)}" cy="{sy(s)}" r="{radius}" '
                       f'data-table="{section}" data-name="{escape(name)}">'
                       f'<title>{escape(tip)}</title></circle>')
        out.append("</g>")
        lx = _PAD_L + 10 + n * 230
        out.append(f'<line x1="{lx}" x2="{lx + 24}" y1="12" y2="12" stroke="{colour}" '
                   f'stroke-width="2.5"/><text class="legend" x="{lx + 30}" y="16">'
                   f'{escape(label)}</text>')
    lx = _PAD_L + 10 + len(series) * 230
    out.append(f'<line class="threshold" x1="{lx}" x2="{lx + 24}" y1="12" y2="12"/>'
               f'<text class="legend" x="{lx + 30}" y="16">{threshold:g} rule</text>')
    if any(_CALL_SUFFIX.sub("", name) in shared for *_, names, _t in series for name in names):
        lx += 120
        out.append(f'<circle class="pt shared" cx="{lx + 4}" cy="12" r="4"/>'
                   f'<text class="legend" x="{lx + 14}" y="16">shared op</text>')
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 - every model string above went through escape()


# ----------------------------------------------------------------------------- page


def _image_uri(source: bytes | str | os.PathLike) -> str:
    if isinstance(source, bytes):
        data, mime = source, "image/svg+xml" if source.lstrip()[:5] in (b"<svg ", b"<?xml") \
            else "image/png"
    else:
        path = Path(source)
        mime = _IMAGE_TYPES.get(path.suffix.lower())
        if mime is None:
            raise ValueError(f"render_html: image {path} has an unsupported type; "
                             f"use one of {sorted(_IMAGE_TYPES)}")
        data = path.read_bytes()
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=True, trim_blocks=True, lstrip_blocks=True,
        undefined=jinja2.StrictUndefined)


def _version() -> str:
    try:
        return version("qatkit")
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        return "dev"


def render_html(tables: Mapping[str, pd.DataFrame | None], path: str | os.PathLike, *,
                title: str = "qatkit profiler report", verdict: Verdict | None = None,
                shared: Iterable[str] | None = None,
                images: Mapping[str, bytes | str | os.PathLike] | None = None,
                meta: Mapping[str, Any] | None = None, page_size: int = 100) -> Path:
    """Write the self-contained HTML report page.

    Args:
        tables: report tables keyed as in :data:`REPORT_SECTIONS` (``similarity_end_to_end``,
            ``similarity_per_layer``, ``statistics``, ``outliers``, ``weights``,
            ``called_count``, ``unfused``, ``qconfig``, ``qconfig_warnings``, ``findings``);
            missing or None tables are left out, empty ones say "no rows", other keys are
            appended with the key as title.
        path: the HTML file to write (parent folders are created).
        title: page title.
        verdict: what the page opens with; default :func:`build_verdict` of ``tables``.
        shared: names of shared modules (called more than once), shown in red in every table;
            default: modules with ``Called Count > 1`` in ``tables["called_count"]``.
        images: caption -> PNG/SVG/JPEG bytes or file path, embedded as data URIs.
        meta: key -> value pairs shown under the title (models compared, inputs, ...).
        page_size: rows per table page in the browser (a "show all" box lifts it).

    Returns:
        The path written.

    Example::

        >>> render_html({"similarity_end_to_end": e2e, "called_count": counts},
        ...             "out/profiler.html", meta={"model 1": "float", "model 2": "int8"})
        PosixPath('out/profiler.html')
    """
    if page_size < 1:
        raise ValueError(f"render_html: page_size={page_size}; use a positive row count")
    for key, df in tables.items():
        if df is not None and not isinstance(df, pd.DataFrame):
            raise TypeError(f"render_html: table {key!r} is a {type(df).__name__}; "
                            "pass a pandas DataFrame or None")
    present = {k: v for k, v in tables.items() if v is not None}
    findings = present.get("findings")
    if _usable(findings, "Severity"):  # most severe first, as the section says
        rank = findings["Severity"].astype(str).str.lower().map(
            lambda s: _SEVERITY_RANK.get(s, len(_SEVERITY_RANK)))
        present["findings"] = findings.iloc[rank.argsort(kind="stable")]
    shared_set = frozenset(str(s) for s in shared) if shared is not None \
        else _shared_from_counts(present.get("called_count"))
    verdict = verdict or build_verdict(present)
    known = {**REPORT_SECTIONS, **OPTIONAL_SECTIONS}
    order = [k for k in known if k in present] + [k for k in present if k not in known]
    specs = [_table_spec(k, present[k], shared_set) for k in order]
    sections = [{"id": s["id"], "key": s["key"],
                 "title": known.get(s["key"], (s["key"], ""))[0],
                 "help": known.get(s["key"], ("", ""))[1],
                 "columns": list(zip(s["columns"], s["kinds"], strict=True)),
                 "n_rows": len(s["rows"]), "n_shared": len(s["shared"])} for s in specs]
    data = {"tables": specs, "pageSize": page_size, "good": GOOD_SIMILARITY,
            "ok": OK_SIMILARITY}
    link_table = {"e2e": "sec-similarity-end-to-end", "per": "sec-similarity-per-layer",
                  "findings": "sec-findings"}
    html = _environment().get_template(_TEMPLATE).render(
        title=title, verdict=verdict, sections=sections, data=_script_json(data),
        chart=_similarity_chart(present, shared_set, verdict.threshold),
        shared=sorted(shared_set), meta=[(str(k), str(v)) for k, v in (meta or {}).items()],
        images=[(str(c), _image_uri(src)) for c, src in (images or {}).items()],
        links={k: v for k, v in link_table.items() if any(s["id"] == v for s in specs)},
        is_shared=lambda name: _CALL_SUFFIX.sub("", str(name)) in shared_set,
        good=GOOD_SIMILARITY, ok=OK_SIMILARITY, version=_version(),
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out
