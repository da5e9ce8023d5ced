"""model_profiler: every profiler tool on two models, one folder of tables and one HTML page.

The report NPU engineers open first when a quantized model loses accuracy. For two models that
correspond (float vs calibrated/QAT, calibrated/QAT vs integer, calibrated vs QAT) it runs the
featuremap similarity end to end and per layer, the feature statistics and outlier channels of
the quantized model, the weight comparison, call counts, the unfused-pattern check, the
qconfig check and the advisor; it writes each table as .csv, ``profiler.html`` (one
self-contained page: verdict, similarity chart, sortable tables) and ``similarity.mmd`` (the
graph coloured by similarity), and returns a :class:`ProfilerReport` holding the tables.

One capture per report: each model is recorded once (:mod:`.capture`) and every tool reads
the captures instead of running the models again.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
import torch
from qatkit.fake_quantize import FakeQuantize
from qatkit.fx.partial import is_partially_traced, region_pairs
from qatkit.quantized import QuantizedModule
from torch import fx, nn

from ..causal.acc_error import plot_acc_error
from ..causal.sensitivity import get_sensitivity_of_nodes
from ..core.alignment import shared_traces
from ..core.capture import get_raw_features
from ..core.metrics import cosine, get_metric
from ..core.running import device_pair, model_device
from ..core.similarity import compare_models, featuremap_similarity
from ..core.statistics import outlier_channels, profile_featuremap
from ..core.weights import check_weight_correspondence, compare_weights
from .advisor import advise
from .checks import check_unfused_operations, get_module_called_count
from .html import Verdict, build_verdict, render_html
from .mermaid import write_similarity_mermaid
from .qconfig_check import check_qconfig

__all__ = ["model_profiler", "ProfilerReport", "MODES", "model_kind"]

#: mode -> (what model1 may be, what model2 may be); kinds from :func:`model_kind`
MODES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "FvsQ": (("float",), ("fake_quant", "integer")),  # float vs calibrated / QAT (or integer)
    "QvsQ": (("fake_quant",), ("integer",)),  # calibrated / QAT vs convert_fx's integer model
    "CvsQ": (("fake_quant",), ("fake_quant",)),  # calibrated vs QAT
}

_KIND_TEXT = {"float": "a float model (no fake quants)",
              "fake_quant": "a calibrated / QAT model (made by prepare_qat_fx)",
              "integer": "an integer model (made by convert_fx)"}

#: the tools model_profiler runs, by the names ``kwargs_dict`` uses
TOOLS: dict[str, Callable[..., Any]] = {
    "featuremap_similarity": featuremap_similarity,
    "get_raw_features": get_raw_features,
    "profile_featuremap": profile_featuremap,
    "outlier_channels": outlier_channels,
    "compare_weights": compare_weights,
    "get_module_called_count": get_module_called_count,
    "check_unfused_operations": check_unfused_operations,
    "check_qconfig": check_qconfig,
    "check_weight_correspondence": check_weight_correspondence,
    "advise": advise,
    "render_html": render_html,
    # the optional sensitivity section: runs only when kwargs_dict names one of them
    "get_sensitivity_of_nodes": get_sensitivity_of_nodes,
    "plot_acc_error": plot_acc_error,
}

#: the tools of the optional sensitivity section (see :func:`model_profiler`)
SENSITIVITY_TOOLS = ("get_sensitivity_of_nodes", "plot_acc_error")
#: how many of the most sensitive nodes the section's partial un-quantization sweep leaves
#: float (1, 2, ... this many)
SENSITIVITY_SWEEP = 3

#: arguments model_profiler sets itself (a kwargs_dict entry cannot override them)
_OWN_ARGS = {"model", "model1", "model2", "float_model", "qat_model", "inputs", "example_inputs",
             "features", "out_dir", "method", "print_tabulate", "tables", "path", "verdict",
             "statistics", "similarity", "per_layer_similarity", "outliers", "called_count",
             "unfused", "qconfig_warnings", "shared", "capture", "model_or_file", "save_dir"}


def model_kind(model: nn.Module) -> str:
    """``"integer"`` (has qatkit integer modules), ``"fake_quant"`` (has fake quants), or
    ``"float"``.

    Example::

        >>> model_kind(torchvision.models.resnet18())
        'float'
    """
    mods = list(model.modules())
    if any(isinstance(m, QuantizedModule) for m in mods):
        return "integer"
    if any(isinstance(m, FakeQuantize) for m in mods):
        return "fake_quant"
    return "float"


@dataclass(frozen=True)
class ProfilerReport:
    """What :func:`model_profiler` found and wrote.

    Attributes:
        mode: ``"FvsQ"``, ``"QvsQ"`` or ``"CvsQ"``.
        out_dir: the folder written.
        tables: the DataFrames by report key (``similarity_end_to_end``,
            ``similarity_per_layer``, ``statistics``, ``statistics_by_range``, ``outliers``,
            ``weights``, ``called_count``, ``unfused``, ``qconfig``, ``qconfig_warnings``,
            ``findings``; with the sensitivity section: ``sensitivity``,
            ``acc_error_quantize``, ``acc_error_non_quantize``); a tool that does not apply
            to the mode is absent.
        paths: what was written, by key (the tables' .csv, ``"html"``, ``"mermaid"``).
        verdict: the page's verdict (final-output cosine similarity, worst layers, findings).
        seconds: time per tool.
    """

    mode: str
    out_dir: Path
    tables: dict[str, pd.DataFrame]
    paths: dict[str, Path]
    verdict: Verdict
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def html(self) -> Path:
        """The path of ``profiler.html``."""
        return self.paths["html"]

    @property
    def findings(self) -> pd.DataFrame:
        """The advisor's findings (Severity, Module Name, Problem, Evidence, Advice)."""
        return self.tables["findings"]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}: {len(v)} rows" for k, v in self.tables.items())
        final = self.verdict.final_similarity
        final_s = "unknown" if final is None else f"{final:.6f}"
        return (f"ProfilerReport(mode={self.mode!r}, out_dir='{self.out_dir}', "
                f"final_similarity={final_s}, passed={self.verdict.passed}, {sizes})")


def _check_mode(mode: str, model1: nn.Module, model2: nn.Module) -> tuple[str, str]:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {sorted(MODES)} (FvsQ: float vs "
                         "calibrated/QAT, QvsQ: calibrated/QAT vs integer, CvsQ: calibrated vs "
                         "QAT)")
    kinds = (model_kind(model1), model_kind(model2))
    for i, (kind, allowed) in enumerate(zip(kinds, MODES[mode], strict=True)):
        if kind not in allowed:
            want = " or ".join(_KIND_TEXT[k] for k in allowed)
            raise ValueError(
                f"mode={mode!r} expects model{i + 1} to be {want}, but model{i + 1} "
                f"({type((model1, model2)[i]).__name__}) is {_KIND_TEXT[kind]}. Pass the models "
                f"in the mode's order, or pick the mode that fits: "
                + ", ".join(f"{m} = {MODES[m][0][0]} vs {'/'.join(MODES[m][1])}" for m in MODES))
    return kinds


def _check_kwargs(kwargs_dict: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for tool, kwargs in (kwargs_dict or {}).items():
        if tool not in TOOLS:
            raise ValueError(f"kwargs_dict key {tool!r} is not a model_profiler tool; valid "
                             f"keys: {sorted(TOOLS)}")
        params = inspect.signature(TOOLS[tool]).parameters
        for arg in kwargs:
            if arg not in params:
                usable = [p for p in params if p not in _OWN_ARGS]
                raise ValueError(f"kwargs_dict[{tool!r}] has {arg!r}, which {tool} does not "
                                 f"take; its arguments: {usable}")
            if arg in _OWN_ARGS:
                raise ValueError(f"kwargs_dict[{tool!r}][{arg!r}]: model_profiler sets {arg!r} "
                                 "itself; call the tool directly to choose it")
        out[tool] = dict(kwargs)
    return out


def _flat_outputs(out: Any) -> torch.Tensor:
    """Every floating tensor of a model output, flattened and concatenated (on the CPU)."""
    leaves: list[torch.Tensor] = []

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            if o.is_floating_point():
                leaves.append(o.detach().float().reshape(-1).cpu())
        elif isinstance(o, Mapping):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(out)
    return torch.cat(leaves) if leaves else torch.zeros(0)


def _final_similarity(out1: Any, out2: Any) -> float | None:
    """Cosine similarity of the two models' final outputs (all output tensors together)."""
    a, b = _flat_outputs(out1), _flat_outputs(out2)
    if a.numel() == 0 or a.shape != b.shape:
        return None
    return float(cosine(a, b))


def _same_device(a: Any, b: Any) -> bool:
    """True when two device arguments (None: where the model is) name the same device."""
    if a is None or b is None:
        return a is None and b is None
    return torch.device(a) == torch.device(b)


def _shared_names(*tables: pd.DataFrame | None) -> set[str]:
    names: set[str] = set()
    for t in tables:
        if t is not None and len(t):
            names.update(t.loc[t["Called Count"] > 1, "Module Name"].astype(str))
    return names


def model_profiler(model1: nn.Module, model2: nn.Module, example_inputs: Any,
                   mode: str = "FvsQ", out_dir: str | os.PathLike = "./qatkit_profiler",
                   kwargs_dict: Mapping[str, Mapping[str, Any]] | None = None,
                   devices: Any = None) -> ProfilerReport:
    """Run every profiler tool on two models; write the tables, profiler.html, similarity.mmd.

    Each model is captured once (:class:`~qatkit.profiler.core.capture.Capture`): model1 runs once,
    model2 once end to end (compared with model1 and recorded for the statistics) and once
    with model1's values handed on (the per-layer table); every tool reads those runs, and
    each model is traced once.  In ``"FvsQ"`` the models must correspond: before anything
    runs, :func:`~qatkit.profiler.core.weights.check_weight_correspondence` checks that model2's
    float weights are model1's.  Neither model is changed. Fake-quant models should be in
    VALIDATION state (a model in CALIBRATION state is an error whose message gives the fix).

    Args:
        model1: the reference: the float model (``"FvsQ"``), the calibrated / QAT model
            (``"QvsQ"``), the calibrated model (``"CvsQ"``).
        model2: the model analysed: calibrated / QAT (``"FvsQ"``, ``"CvsQ"``) or the integer
            model from ``convert_fx`` (``"QvsQ"``).
        example_inputs: one batch: the models' input or a tuple of inputs.
        mode: ``"FvsQ"``, ``"QvsQ"`` or ``"CvsQ"`` (:data:`MODES`).
        out_dir: the folder to write (created; existing report files are overwritten, other
            files are left alone).
        kwargs_dict: extra arguments per tool, by tool name (:data:`TOOLS`), e.g.
            ``{"featuremap_similarity": {"similarity_func": "SQNR"}}``.  The sensitivity
            section is off by default; a ``"get_sensitivity_of_nodes"`` or
            ``"plot_acc_error"`` entry (``{}`` for the defaults) turns it on: the quantizers
            of the calibrated / QAT model ranked on ``example_inputs`` (or the entry's
            ``calibrated_data``; ``node_type`` ``"node"`` unless given), the cumulative
            error curves of weights vs activations and the output with the top 1, 2, 3
            nodes left float -- tables in the page, figures inline and in
            ``out_dir/sensitivity/``.
        devices: as in :func:`featuremap_similarity` (one device or a pair).

    Returns:
        a :class:`ProfilerReport` (tables, paths, verdict).

    Raises:
        ValueError: the models do not fit the mode, an unknown kwargs_dict key or argument,
            model2 was not prepared from model1 (``"FvsQ"``: the first layer whose weights
            differ is named; ``kwargs_dict={"check_weight_correspondence": {"rtol": None}}``
            skips the check for a QAT-trained model2), or anything the tools reject (inputs
            that do not fit, models that do not correspond; the message names the model and
            layer).

    Example::

        >>> report = model_profiler(float_model, calib_model, x, mode="FvsQ",
        ...                         out_dir="float_calib")
        >>> report.html                   # open in a browser
        PosixPath('float_calib/profiler.html')
        >>> report.findings.head()        # Severity, Module Name, Problem, Evidence, Advice
    """
    if is_partially_traced(model2) or is_partially_traced(model1):
        return _profile_regions(model1, model2, example_inputs, mode, out_dir, kwargs_dict,
                                devices)
    with shared_traces():  # each model is traced once for all the tools
        return _model_profiler(model1, model2, example_inputs, mode, out_dir, kwargs_dict,
                               devices)


def _profile_regions(model1: nn.Module, model2: nn.Module, example_inputs: Any, mode: str,
                     out_dir: str | os.PathLike,
                     kwargs_dict: Mapping[str, Mapping[str, Any]] | None,
                     devices: Any) -> ProfilerReport:
    """A partially traced model: each region profiled against the same part of model1, on
    the inputs model1's run gives it (``out_dir/regions/<path>``); the tables joined, op
    names from the root, with a ``Region`` column."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    second = model2 if is_partially_traced(model2) else model1
    first = model1 if second is model2 else model2
    out = Path(out_dir)
    parts: dict[str, list[pd.DataFrame]] = {}
    seconds: dict[str, float] = {}
    pairs = region_pairs(first, second, inputs)
    for spec, part1, part2, x in pairs:
        pair = (part1, part2) if second is model2 else (part2, part1)
        kw = {k: dict(v) for k, v in (kwargs_dict or {}).items()}
        if any(s.path.startswith(f"{spec.path}.") or (not spec.path and s.path)
               for s, *_ in pairs):  # the regions inside it are checked on their own
            kw.setdefault("check_weight_correspondence", {})["rtol"] = None
        if spec.trace.get("leaf_module_names") or spec.trace.get("leaf_modules"):
            kw.setdefault("check_unfused_operations", {}).setdefault(
                "prepare_custom_config_dict", {
                    "leaf_module_names": list(spec.trace.get("leaf_module_names", ())),
                    "leaf_module_types": list(spec.trace.get("leaf_modules", ()))})
        report = model_profiler(*pair, x, mode, out / "regions" / (spec.path or "root"),
                                kw, devices)
        for key, table in report.tables.items():
            table = table.copy()
            if "Module Name" in table.columns:  # a group of names: "conv, bn"
                table["Module Name"] = [", ".join(spec.name(n) for n in str(v).split(", "))
                                        for v in table["Module Name"]]
            table.insert(0, "Region", spec.path or "(root)")
            parts.setdefault(key, []).append(table)
        for key, t in report.seconds.items():
            seconds[key] = seconds.get(key, 0.0) + t
    tables = {k: pd.concat(v, ignore_index=True) for k, v in parts.items()}
    flags = [(m, m.training) for m in (*model1.modules(), *model2.modules())]
    try:
        model1.eval()
        model2.eval()
        with torch.no_grad():
            final = _final_similarity(model1(*inputs), model2(*inputs))
    finally:
        for m, training in flags:
            m.training = training
    verdict = build_verdict(tables, final_similarity=final)
    paths: dict[str, Path] = {}
    for key, table in tables.items():
        paths[key] = out / f"{key}.csv"
        table.to_csv(paths[key], index=False)
    meta = {"mode": mode, "model1": type(model1).__name__, "model2": type(model2).__name__,
            "partial tracing": f"{len(parts.get('findings', []))} regions profiled one by one "
                               "(see regions/), float glue between them not compared"}
    page = {k: v for k, v in tables.items() if k != "statistics_by_range"}
    paths["html"] = render_html(page, out / "profiler.html", title=f"qatkit profiler — {mode}",
                                verdict=verdict, shared=set(), meta=meta)
    return ProfilerReport(mode=mode, out_dir=out, tables=tables, paths=paths, verdict=verdict,
                          seconds=seconds)


def _model_profiler(model1: nn.Module, model2: nn.Module, example_inputs: Any, mode: str,
                    out_dir: str | os.PathLike,
                    kwargs_dict: Mapping[str, Mapping[str, Any]] | None,
                    devices: Any) -> ProfilerReport:
    kinds = _check_mode(mode, model1, model2)
    kw = _check_kwargs(kwargs_dict)
    sensitivity_model = None
    if any(t in kw for t in SENSITIVITY_TOOLS):  # the section analyses the fake-quant model
        sensitivity_model = next((m for m, k in ((model2, kinds[1]), (model1, kinds[0]))
                                  if k == "fake_quant"), None)
        if sensitivity_model is None:
            raise ValueError("kwargs_dict asks for the sensitivity section, which switches the "
                             "quantizers of a calibrated / QAT model, but neither model is one "
                             f"(model1 is {_KIND_TEXT[kinds[0]]}, model2 {_KIND_TEXT[kinds[1]]})"
                             ". Profile the calibrated / QAT model (mode 'FvsQ' or 'QvsQ')")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    tables: dict[str, pd.DataFrame] = {}
    seconds: dict[str, float] = {}

    def timed(key: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
        return result

    if kinds[0] == "float":  # before anything runs or is written
        timed("check_weight_correspondence", check_weight_correspondence, model1, model2,
              **kw.get("check_weight_correspondence", {}))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sim_kw = {"similarity_func": "Cosine", "devices": devices, "threshold": None,
              **kw.get("featuremap_similarity", {})}
    metric = get_metric(sim_kw["similarity_func"])
    # statistics of the quantized side (its scales are what the NPU will use), recorded by
    # model2's end-to-end run unless they must run on another device
    raw_kw = dict(kw.get("get_raw_features", {}))
    sim_dev2 = device_pair(sim_kw["devices"])[1]
    raw_device = raw_kw.pop("device", sim_dev2)
    here = model_device(model2)
    shared_run = _same_device(raw_device or here, sim_dev2 or here)
    # one capture of each model: model1's keeps the outputs model2 is compared with; model2's
    # end-to-end run compares them and records the statistics; every tool below reads them
    cmp = timed("capture_and_similarity", compare_models, model1, model2, inputs, metric,
                sim_kw["devices"], records2=raw_kw if shared_run else None)
    cap1, cap2 = cmp.capture1, cmp.capture2
    for key, method in (("similarity_end_to_end", "EndToEnd"),
                        ("similarity_per_layer", "PerLayer")):
        table = cmp.tables[method]
        if sim_kw["threshold"] is not None:  # as featuremap_similarity(threshold=...) does
            worse = [metric.is_worse(float(v), sim_kw["threshold"]) for v in table["Similarity"]]
            table = table[worse].reset_index(drop=True)
        tables[key] = table
    if shared_run:
        features = cap2.records
    else:
        features = timed("get_raw_features", get_raw_features, model2, inputs,
                         device=raw_device, **raw_kw)
    profile = timed("profile_featuremap", profile_featuremap, features,
                    **kw.get("profile_featuremap", {}))
    tables["statistics"], tables["statistics_by_range"] = profile.table, profile.by_range
    tables["outliers"] = timed("outlier_channels", outlier_channels, features,
                               **kw.get("outlier_channels", {}))
    del features  # one batch of feature maps, no longer needed
    cap2.records = []
    if kinds[0] == "float":
        tables["weights"] = timed("compare_weights", compare_weights, model1, model2,
                                  **kw.get("compare_weights", {}))
    counts = [timed("get_module_called_count", get_module_called_count, m, None,
                    print_tabulate=False, capture=cap, **kw.get("get_module_called_count", {}))
              for m, cap in ((model1, cap1), (model2, cap2))]
    tables["called_count"] = counts[0]
    if kinds[0] == "float":
        tables["unfused"] = timed("check_unfused_operations", check_unfused_operations, model1,
                                  inputs, print_tabulate=False,
                                  **kw.get("check_unfused_operations", {}))
    fq_model, fq_cap = (model2, cap2) if kinds[1] == "fake_quant" else (model1, cap1)
    if isinstance(fq_model, fx.GraphModule):
        tables["qconfig"], tables["qconfig_warnings"] = timed(
            "check_qconfig", check_qconfig, fq_model, None, print_tabulate=False,
            capture=fq_cap, **kw.get("check_qconfig", {}))
    tables["findings"] = timed(
        "advise", advise, statistics=tables["statistics"],
        similarity=tables["similarity_end_to_end"],
        per_layer_similarity=tables["similarity_per_layer"], outliers=tables["outliers"],
        called_count=tables["called_count"], unfused=tables.get("unfused"),
        qconfig_warnings=tables.get("qconfig_warnings"), **kw.get("advise", {}))
    images: dict[str, Path] = {}
    if sensitivity_model is not None:
        images = timed("sensitivity", _sensitivity_section, sensitivity_model, inputs, kw,
                       out / "sensitivity", tables)
    outputs = (cap1.output, cap2.output)
    final = _final_similarity(*outputs)
    verdict = build_verdict(tables, final_similarity=final)

    paths: dict[str, Path] = {}
    for key, table in tables.items():
        paths[key] = out / f"{key}.csv"
        table.to_csv(paths[key], index=False)
    shared = _shared_names(*counts)
    if isinstance(model2, fx.GraphModule):
        paths["mermaid"] = out / "similarity.mmd"
        timed("mermaid", write_similarity_mermaid, model2, tables["similarity_end_to_end"],
              paths["mermaid"])
    meta = {"mode": mode, "model1": f"{type(model1).__name__} ({_KIND_TEXT[kinds[0]]})",
            "model2": f"{type(model2).__name__} ({_KIND_TEXT[kinds[1]]})",
            "inputs": ", ".join(str(tuple(t.shape)) for t in inputs
                                if isinstance(t, torch.Tensor))}
    page = {k: v for k, v in tables.items() if k != "statistics_by_range"}
    html_kw = dict(kw.get("render_html", {}))
    html_kw["images"] = {**images, **(html_kw.get("images") or {})}
    for caption, png in images.items():
        paths[f"figure: {caption}"] = png
    paths["html"] = timed("render_html", render_html, page, out / "profiler.html",
                          title=f"qatkit profiler — {mode}", verdict=verdict, shared=shared,
                          meta=meta, **html_kw)
    return ProfilerReport(mode=mode, out_dir=out, tables=tables, paths=paths, verdict=verdict,
                          seconds=seconds)


def _sensitivity_section(model: nn.Module, inputs: tuple, kw: Mapping[str, dict], folder: Path,
                         tables: dict[str, pd.DataFrame]) -> dict[str, Path]:
    """Rank the quantizers of ``model``, draw the error curves and the partial
    un-quantization of the top nodes; add the tables, return ``{caption: png}``."""
    sens_kw = {"calibrated_data": inputs, "metrics": "cosine-similarity", "node_type": "node",
               "verbose": False, **kw.get("get_sensitivity_of_nodes", {})}
    ranking = get_sensitivity_of_nodes(model, save_dir=folder, **sens_kw)
    nodes = list(ranking)
    metric = sens_kw["metrics"]
    if isinstance(metric, (list, tuple)):
        metric = metric[0] if metric else "cosine-similarity"
    acc_kw = {"calibrated_data": sens_kw["calibrated_data"],
              "quantize_node": ["weight", "activation"],
              "non_quantize_node": [nodes[:k] for k in range(1, min(SENSITIVITY_SWEEP,
                                                                     len(nodes)) + 1)],
              "metric": metric or "cosine-similarity", "node_type": ranking.node_type,
              "verbose": False, **kw.get("plot_acc_error", {})}
    for key in ("output_node", "data_num", "device", "input_fn"):
        if key in sens_kw and key in inspect.signature(plot_acc_error).parameters:
            acc_kw.setdefault(key, sens_kw[key])
    curves = plot_acc_error(save_dir=folder, model_or_file=model, **acc_kw)
    tables["sensitivity"] = ranking.table
    captions = {"quantize": f"Cumulative error along the model ({curves.metric}): only weights "
                            "vs only activations quantized",
                "non_quantize": f"Output {curves.metric} with the most sensitive nodes left "
                                "float"}
    images = {}
    for key, table in curves.tables.items():
        tables[f"acc_error_{key}"] = table
        images[captions[key]] = curves.figures[key][0]
    return images
