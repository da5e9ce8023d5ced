"""The accuracy advisor: turn the profiler's tables into findings an engineer can act on.

:func:`advise` reads any of the tables the profiler makes (statistics, outlier channels,
end-to-end and per-layer similarity, module call counts, unfused groups, qconfig warnings)
and returns one row per finding: severity, the layer, what is wrong, the numbers that show
it, and what to do (naming the layer, with the exact ``qconfig_dict`` snippet where a
qconfig change is the fix).  Every threshold is a named constant below, with its reason
(the final-output rule is :data:`~qatkit.profiler.core.metrics.FINAL_SIMILARITY_THRESHOLD`, shared
with the report's verdict).

Ops are recognised by the tables' "Op Kind" and "Source Kind" columns, which come from the
quantization annotation (:mod:`qatkit.annotation`; for a float model, the annotate pass's kinds
of its trace): a multi-input op is an ``add``/``sub``/``cat``/``stack``, a model input is a
tensor whose source (through data-moving ops) is a graph input, never a guess from the
"Module Type" string.
"""

from __future__ import annotations

import math
from typing import Iterable

import pandas as pd

from ..core.metrics import FINAL_SIMILARITY_THRESHOLD
from ..core.tables import qconfig_key

__all__ = ["advise", "ADVICE_COLUMNS"]

ADVICE_COLUMNS = ["Severity", "Module Name", "Problem", "Evidence", "Advice"]
SEVERITIES = ("error", "warning", "info")

# -- thresholds ------------------------------------------------------------------------------
#: a normalized input lies in about [-3, 3] (mean/std) or [-1, 1]; raw pixels reach 255
INPUT_MAX_ABS_NORMALIZED = 8.0
#: an input whose minimum is above -10% of its maximum is one-sided: symmetric int8 leaves
#: its negative half (one bit) unused
INPUT_ONE_SIDED_RATIO = 0.1
#: fewer int8 steps than this per standard deviation (max|x| > 32 std): most values fall on
#: a handful of levels, so the range is too large for int8
MIN_STD_STEPS = 4.0
#: below one step per standard deviation most values round to 0 or +-1
MIN_STD_STEPS_ERROR = 1.0
#: MSE/KL/percentile calibration clips well under 1% of the values on purpose; more means
#: the scale does not cover the data
SATURATION_WARNING = 0.01
SATURATION_ERROR = 0.05
#: inputs of an add/cat whose max |x| differ by more than this: the large one sets the shared
#: output scale and the small one keeps fewer than 128 / 10 ~ 12 int8 levels
MULTI_INPUT_RANGE_RATIO = 10.0
#: op kinds (the quantization annotation's) whose inputs share one output scale
MULTI_INPUT_KINDS = ("add", "sub", "cat", "stack")
#: width of the region where each non-linear function changes (sigmoid goes 0.02 -> 0.98 over
#: [-4, 4]), by op kind; fewer than MIN_LEVELS_IN_ACTIVE_REGION input levels there and each
#: input step jumps by more than one output step
NONLINEAR_ACTIVE_WIDTH = {"sigmoid": 8.0, "tanh": 4.0, "silu": 8.0, "gelu": 6.0,
                          "hardswish": 6.0, "hardsigmoid": 6.0, "mish": 8.0, "elu": 4.0,
                          "softplus": 8.0}
MIN_LEVELS_IN_ACTIVE_REGION = 32
#: exp-like op kinds (softmax runs exp(x - max)): an input step s changes the output by
#: e^s - 1 relative; 1/16 keeps that near 6%
EXP_LIKE = ("exp", "softmax", "log_softmax")
EXP_MAX_STEP = 1.0 / 16
#: ops infinitely steep at 0 (1/x, sqrt, log): an input within a few steps of 0 is
#: represented with a relative error of 1 / (those steps)
STEEP_AT_ZERO = ("reciprocal", "sqrt", "rsqrt", "log")
STEEP_MIN_STEPS = 4.0
#: outlier channels: a finding when at least this fraction of channels sits k powers of two
#: below the tensor's max (k bits of the int8 range lost)
OUTLIER_CHANNEL_FRACTION = 0.5
OUTLIER_LEVELS = ((6, "error"), (4, "warning"), (3, "info"))
#: a single op (fed the float input) below this cosine loses accuracy by itself
PER_LAYER_COSINE_MIN = 0.99
#: how many of the worst per-layer ops to report
WORST_LAYERS_TOP_K = 5
#: stateless activations: prepare fuses each call site into the layer before it
_STATELESS_SHARED = {"ReLU", "ReLU6"}
#: op kinds whose input channels meet a weight row each (SmoothQuant can move their outliers)
_MATMUL_KINDS = ("linear", "matmul", "conv")
#: source kinds that are no op: a model input, a constant / buffer
_NO_PRODUCER = ("input", "get_attr")
_INT16_QCONFIG = "qatkit.default_qat_8bit_weight_16bit_act_fake_quant_qconfig"


def _int16_snippet(layer: str) -> str:
    return (f'qconfig_dict={{"": qatkit.default_qat_8bit_fake_quant_qconfig, "module_name": '
            f'[("{qconfig_key(layer)}", {_INT16_QCONFIG})]}}')


def _num(value: object) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return v


def _amax(row: pd.Series) -> float:
    return max(abs(_num(row["Min"])), abs(_num(row["Max"])))


def _step(row: pd.Series) -> float:
    """The tensor's quantization step: its scale, or int8's ``max|x| / 128`` for a float one."""
    scale = _num(row.get("Scale"))
    if scale > 0:
        return scale
    bits = 16 if str(row.get("Dtype")) == "qint16" else 8
    return _amax(row) / 2 ** (bits - 1)


def _finding(severity: str, layer: object, problem: str, evidence: str, advice: str) -> dict:
    return {"Severity": severity, "Module Name": str(layer), "Problem": problem,
            "Evidence": evidence, "Advice": advice}


# -- statistics ------------------------------------------------------------------------------
def _input_rows(stats: pd.DataFrame) -> pd.DataFrame:
    """Rows of the tensors entering the model: the inputs of QuantStubs (an integer model's
    Quantize) that come from a model input, possibly through data-moving ops ("Source Kind"
    ``input``); for a float model (no QuantStub), the first op input that is a model input.  A
    QuantStub that re-quantizes the output of a float op in the middle of the graph
    (``div_quant`` after ``x / buffer``) is not a model input."""
    from_input = (stats["Attr"] == "input") & (stats["Source Kind"] == "input")
    stubs = stats["Op Kind"] == "quant_stub"
    if stubs.any():
        return stats[from_input & stubs]
    return stats[from_input].head(1)


def _check_inputs(stats: pd.DataFrame) -> Iterable[dict]:
    for _, row in _input_rows(stats).iterrows():
        lo, hi, amax = _num(row["Min"]), _num(row["Max"]), _amax(row)
        if not math.isfinite(amax) or amax == 0:
            continue
        problems = []
        if amax > INPUT_MAX_ABS_NORMALIZED:
            problems.append(f"not normalized (max |x| {amax:.4g} > {INPUT_MAX_ABS_NORMALIZED:g})")
        if hi > 0 and lo >= -INPUT_ONE_SIDED_RATIO * hi:
            problems.append("not symmetric around 0 (one-sided: symmetric int8 wastes its "
                            "negative half, one bit)")
        if not problems:
            continue
        yield _finding(
            "warning", row["Module Name"], "model input " + " and ".join(problems),
            f"input range [{lo:.4g}, {hi:.4g}], mean {_num(row['Mean']):.4g}",
            "normalize the input to [-1, 1] in the float model (for images in [0, 255]: "
            "x = (x - 127.5) / 127.5), retrain or fine-tune it that way, and fix the input "
            "scale with qatkit.QuantStub(scale=1/128) as the model's first op "
            f"(it then replaces '{row['Module Name']}')")


def _check_resolution(row: pd.Series) -> Iterable[dict]:
    layer, dtype = row["Module Name"], str(row.get("Dtype"))
    amax, var, step = _amax(row), _num(row["Var"]), _step(row)
    if dtype == "qint16" or not (amax > 0 and step > 0 and var >= 0):
        return
    std_steps = math.sqrt(var) / step
    if std_steps >= MIN_STD_STEPS:
        return
    severity = "error" if std_steps < MIN_STD_STEPS_ERROR else "warning"
    yield _finding(
        severity, layer, "range too large for int8: most values fall on a few int8 levels",
        f"std {math.sqrt(var):.4g} = {std_steps:.2f} steps of {step:.4g} (max |x| {amax:.4g}, "
        f"{amax / max(math.sqrt(var), 1e-30):.0f}x the std)",
        f"use int16 for '{qconfig_key(layer)}': {_int16_snippet(layer)}; or bound its range "
        "(ReLU6 / clamp / BatchNorm, weight decay) so int8 holds it")


def _check_saturation(row: pd.Series) -> Iterable[dict]:
    sat, steps = _num(row.get("Saturation Ratio")), _num(row.get("Range (steps)"))
    dtype = str(row.get("Dtype"))
    levels = 2 ** 15 if dtype == "qint16" else 2 ** 7
    # values exactly at the end of the range (a ReLU6 at 6) are not clipped: require data
    # that really lies beyond the grid
    if not (sat > SATURATION_WARNING and steps > levels + 0.5):
        return
    layer, scale = row["Module Name"], _num(row.get("Scale"))
    severity = "error" if sat > SATURATION_ERROR else "warning"
    yield _finding(
        severity, layer, "scale does not cover the data (saturation)",
        f"{sat:.2%} of values clipped; scale {scale:.4g} covers +-{scale * (levels - 1):.4g}, "
        f"data in "
        f"[{_num(row['Min']):.4g}, {_num(row['Max']):.4g}] ({steps:.0f} steps)",
        f"recalibrate '{qconfig_key(layer)}' with data like the inference data and a "
        "range-keeping observer (activation_observer='min_max' or 'percentile' with "
        "percentile=99.99); if the scale is fixed, widen it; or use int16: "
        f"{_int16_snippet(layer)}")


def _check_multi_input(stats: pd.DataFrame) -> Iterable[dict]:
    inputs = stats[(stats["Attr"] == "input") & stats["Op Kind"].isin(MULTI_INPUT_KINDS)]
    for layer, rows in inputs.groupby("Module Name", sort=False):
        if rows["Arg"].nunique() < 2:
            continue
        amax = {int(r["Arg"]): _amax(r) for _, r in rows.iterrows()}
        live = {k: v for k, v in amax.items() if v > 0 and math.isfinite(v)}
        if len(live) < 2:
            continue
        big, small = max(live, key=live.get), min(live, key=live.get)
        ratio = live[big] / live[small]
        if ratio <= MULTI_INPUT_RANGE_RATIO:
            continue
        out_step = live[big] / 128
        levels = live[small] / out_step
        yield _finding(
            "warning", layer, "inputs of a multi-input op differ in range: large numbers eat "
            "small numbers",
            f"input {big} max |x| {live[big]:.4g} vs input {small} max |x| {live[small]:.4g} "
            f"({ratio:.0f}x): at the shared output scale input {small} keeps ~{levels:.1f} "
            "int8 levels",
            f"bound the large input of '{layer}' (clamp / BatchNorm / ReLU6), rescale the "
            "branches to comparable ranges before the op, or use int16 for "
            f"'{qconfig_key(layer)}': {_int16_snippet(layer)}")


def _producer(row: pd.Series) -> str | None:
    """The op that produced an input row's tensor (through data-moving ops), None for a model
    input or a constant."""
    src, kind = row.get("Source"), row.get("Source Kind")
    if not isinstance(src, str) or not src or kind in _NO_PRODUCER:
        return None
    return src


def _check_nonlinear(stats: pd.DataFrame) -> Iterable[dict]:
    inputs = stats[(stats["Attr"] == "input") & (stats["Arg"] == 0)]
    for _, row in inputs.iterrows():
        kind = str(row["Op Kind"])
        layer, step, amax = row["Module Name"], _step(row), _amax(row)
        if not (step > 0 and math.isfinite(amax)):
            continue
        if kind in NONLINEAR_ACTIVE_WIDTH:
            levels = NONLINEAR_ACTIVE_WIDTH[kind] / step
            if levels >= MIN_LEVELS_IN_ACTIVE_REGION:
                continue
            half = NONLINEAR_ACTIVE_WIDTH[kind] / 2
            evidence = (f"input step {step:.4g} (max |x| {amax:.4g}): only {levels:.0f} input "
                        f"levels where {kind} changes ([-{half:g}, {half:g}])")
            fix = (f"clamp the input of '{layer}' to about [-{2 * half:g}, {2 * half:g}] "
                   f"(torch.clamp before the {kind}: outside it {kind} is flat)")
        elif kind in EXP_LIKE:
            if step <= EXP_MAX_STEP:
                continue
            evidence = (f"input step {step:.4g} (max |x| {amax:.4g}): each step changes "
                        f"exp by {math.expm1(step):.0%}")
            fix = (f"reduce the input range of '{layer}' (scale logits / temperature, clamp "
                   "to [-16, 16] before the op)")
        elif kind in STEEP_AT_ZERO:
            lo = _num(row["Min"])
            near = lo / step if lo > 0 else 0.0
            if near >= STEEP_MIN_STEPS:
                continue
            evidence = (f"input min {lo:.4g} is {near:.1f} steps of {step:.4g} from 0, where "
                        f"{kind} is steepest" if lo > 0 else
                        f"input reaches {lo:.4g} (<= 0), where {kind} is infinite or undefined")
            fix = (f"keep the input of '{layer}' away from 0 (add an epsilon / clamp_min before "
                   "it)")
        else:
            continue
        src = _producer(row)
        yield _finding(
            "warning", layer, f"non-linear op ({kind}) evaluated in a steep region with a "
            "coarse input step", evidence,
            f"{fix}, or give its input finer steps with int16 on the op producing it"
            + (f" ('{qconfig_key(src)}'): {_int16_snippet(src)}" if src else
               f": a qconfig_dict 'module_name' entry ({_INT16_QCONFIG}) for the producer "
               f"of '{layer}'"))


def _check_nonfinite(stats: pd.DataFrame) -> Iterable[dict]:
    bad = stats[(stats["NaN"].fillna(0) > 0) | (stats["Inf"].fillna(0) > 0)]
    if bad.empty:
        return
    first = bad.iloc[0]
    yield _finding(
        "error", first["Module Name"], "NaN/inf values (first occurrence in execution order)",
        f"{int(first['NaN'])} NaN, {int(first['Inf'])} inf at '{first['Module Name']}' "
        f"({first['Attr']}); {len(bad) - 1} later tensor(s) also affected",
        f"check the float model and the data reaching '{first['Module Name']}' (division by "
        "zero, log/sqrt of <= 0, overflow); in QAT lower the learning rate, warm up, clip "
        "gradients")


# -- outliers, similarity, structure ---------------------------------------------------------
def _check_outliers(outliers: pd.DataFrame) -> Iterable[dict]:
    for _, row in outliers.iterrows():
        channels = int(_num(row["Channels"]) or 0)
        consumer = row["Attr"] == "input"
        if channels < 2 or (consumer and row["Op Kind"] not in _MATMUL_KINDS):
            continue
        hit = next(((k, sev) for k, sev in OUTLIER_LEVELS
                    if _num(row[f"Level>={k}"]) >= OUTLIER_CHANNEL_FRACTION * channels), None)
        if hit is None:
            continue
        k, severity = hit
        layer = row["Module Name"]
        n = int(_num(row[f"Level>={k}"]))
        where = f"the input of '{layer}'" if consumer else f"the output of '{layer}'"
        yield _finding(
            severity, layer, "outlier channels: a few channels set the per-tensor scale",
            f"{n} of {channels} channels of {where} have max |x| at least {2 ** k}x below the "
            f"tensor's max (they keep <= {128 // 2 ** k} int8 levels); max level "
            f"{_num(row['Max Level']):.1f}",
            f"SmoothQuant: divide the outlier channels of {where} by a per-channel factor and "
            "multiply the matching weight rows of the next linear/conv by it; or per-channel "
            f"activation scales if the NPU has them; or int16 for '{qconfig_key(layer)}': "
            f"{_int16_snippet(layer)}")


def _check_end_to_end(sim: pd.DataFrame) -> Iterable[dict]:
    sims = pd.to_numeric(sim["Similarity"], errors="coerce")
    if sims.dropna().empty:
        return
    last = sim.loc[sims.last_valid_index()]
    final = _num(last["Similarity"])
    if final >= FINAL_SIMILARITY_THRESHOLD:
        return
    drops = (sims.shift(1) - sims).fillna(1.0 - sims)
    worst = sim.loc[drops.idxmax()]
    yield _finding(
        "error", last["Module Name"],
        f"final-output cosine similarity below {FINAL_SIMILARITY_THRESHOLD}",
        f"cosine {final:.4f} at the last op '{last['Module Name']}'; largest single drop at "
        f"'{worst['Module Name']}' ({drops.max():.4f})",
        f"start at '{worst['Module Name']}': compare with method='PerLayer' to separate its "
        "own error from accumulated error, then apply the fixes listed for the worst layers "
        "(int16, range bounding), another calibration method, or QAT")


def _check_per_layer(sim: pd.DataFrame) -> Iterable[dict]:
    sims = pd.to_numeric(sim["Similarity"], errors="coerce")
    bad = sim.assign(_s=sims)[sims < PER_LAYER_COSINE_MIN].sort_values("_s", kind="stable")
    for _, row in bad.head(WORST_LAYERS_TOP_K).iterrows():
        layer = row["Module Name"]
        key = qconfig_key(layer)
        yield _finding(
            "warning", layer, "large error of the op itself (fed the float model's input)",
            f"cosine {row['_s']:.4f} < {PER_LAYER_COSINE_MIN} ({row.get('Module Type', '')})",
            f"confirm by keeping '{key}' float (qconfig_dict={{..., \"module_name\": "
            f"[(\"{key}\", None)]}}), then fix it with int16: {_int16_snippet(layer)}")


def _check_called_count(called: pd.DataFrame) -> Iterable[dict]:
    for _, row in called.iterrows():
        n, name, mtype = int(row["Called Count"]), row["Module Name"], str(row["Module Type"])
        if n > 1:
            stateless = mtype in _STATELESS_SHARED
            yield _finding(
                "info" if stateless else "warning", name, f"shared module called {n} times",
                f"'{name}' ({mtype}) runs at {n} call sites"
                + ("; prepare fuses a shared ReLU into each preceding conv, but any call left "
                   "unfused shares one output scale" if stateless else
                   ": not fused, and all calls share one output scale"),
                f"give each call site its own module (e.g. self.{name.rsplit('.', 1)[-1]}_2 = "
                f"copy.deepcopy(self.{name.rsplit('.', 1)[-1]}) in '{name.rsplit('.', 1)[0]}')"
                if "." in name else f"give each call site its own module instead of '{name}'")
        elif n == 0:
            yield _finding("info", name, "unused module (never called)",
                           f"'{name}' ({mtype}) is not called in the forward pass",
                           f"remove '{name}' if it is dead code; its parameters still count in "
                           "the state_dict")


def _check_unfused(unfused: pd.DataFrame) -> Iterable[dict]:
    for _, row in unfused.iterrows():
        yield _finding("warning", row["Module Name"], f"unfused {row['Pattern']}", row["Reason"],
                       row["Fix"])


def _check_qconfig_warnings(warns: pd.DataFrame) -> Iterable[dict]:
    for _, row in warns.iterrows():
        text = str(row["Warning"])
        problem, _, fix = text.partition(" Fix: ")
        severity = "info" if text.startswith("fixed output scale") and "saturates" not in text \
            else "warning"
        yield _finding(severity, row["Module Name"], problem.split(":")[0],
                       problem, fix or f"review the qconfig of '{row['Module Name']}'")


def _rows(table: pd.DataFrame | None, columns: Iterable[str], label: str) -> pd.DataFrame | None:
    if table is None:
        return None
    if isinstance(table, tuple):  # FeatureProfile(table, by_range)
        table = table[0]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"advise: the {label} table lacks columns {missing}; pass the "
                         f"DataFrame made by qatkit.profiler for it (columns: "
                         f"{list(table.columns)[:8]})")
    return table.reset_index(drop=True)


def advise(statistics: pd.DataFrame | None = None, similarity: pd.DataFrame | None = None,
           per_layer_similarity: pd.DataFrame | None = None,
           outliers: pd.DataFrame | None = None, called_count: pd.DataFrame | None = None,
           unfused: pd.DataFrame | None = None,
           qconfig_warnings: pd.DataFrame | None = None) -> pd.DataFrame:
    """Turn profiler tables into findings: layer, problem, evidence, advice.

    Any table may be None (its checks are skipped). What is found, with the thresholds named
    in this module: model input not normalized / not symmetric (only the tensors a
    QuantStub takes from a model input, or a float model's inputs); range too large for int8;
    scale not covering the data (saturation); add/cat inputs whose ranges differ > 10x;
    non-linear ops (sigmoid, tanh, exp, softmax, silu, gelu, hardswish, reciprocal, sqrt...)
    evaluated with a coarse input step where they are steep; outlier channels; NaN/inf; final
    cosine below ``FINAL_SIMILARITY_THRESHOLD`` (0.98) and the worst per-layer ops;
    shared/unused modules; unfused groups; qconfig warnings.  The statistics and outlier
    tables need their "Op Kind" (and "Source", "Source Kind") columns.

    Args:
        statistics: :func:`profile_featuremap`'s table (or the FeatureProfile it returns).
        similarity: :func:`featuremap_similarity` end to end (rows in execution order).
        per_layer_similarity: :func:`featuremap_similarity` with ``method="PerLayer"``.
        outliers: :func:`outlier_channels`'s table.
        called_count: :func:`get_module_called_count`'s table.
        unfused: :func:`check_unfused_operations`'s table.
        qconfig_warnings: the second table of :func:`check_qconfig`.

    Returns:
        DataFrame with columns "Severity" ("error"/"warning"/"info"), "Module Name", "Problem",
        "Evidence", "Advice"; errors first, then warnings, then infos, each group in the
        order the checks found them.

    Raises:
        ValueError: a table lacks the columns its check reads.

    Example::

        >>> findings = advise(statistics=profile_featuremap(records).table,
        ...                   called_count=get_module_called_count(model, x, print_tabulate=False))
        >>> findings[findings.Severity == "error"][["Module Name", "Advice"]]
    """
    found: list[dict] = []
    stats = _rows(statistics, ["Module Name", "Module Type", "Op Kind", "Attr", "Arg", "Source",
                               "Source Kind", "Min", "Max", "Mean", "Var", "NaN", "Inf"],
                  "statistics")
    if stats is not None and len(stats):
        found += _check_nonfinite(stats)
        found += _check_inputs(stats)
        for _, row in stats[stats["Attr"] == "output"].iterrows():
            found += _check_saturation(row)
            found += _check_resolution(row)
        found += _check_multi_input(stats)
        found += _check_nonlinear(stats)
    checks = [
        (outliers, ["Module Name", "Module Type", "Op Kind", "Attr", "Channels", "Level>=3",
                    "Level>=4", "Level>=5", "Level>=6", "Max Level"], "outliers",
         _check_outliers),
        (similarity, ["Module Name", "Similarity"], "similarity", _check_end_to_end),
        (per_layer_similarity, ["Module Name", "Similarity"], "per_layer_similarity",
         _check_per_layer),
        (called_count, ["Module Name", "Module Type", "Called Count"], "called_count",
         _check_called_count),
        (unfused, ["Module Name", "Pattern", "Reason", "Fix"], "unfused", _check_unfused),
        (qconfig_warnings, ["Module Name", "Warning"], "qconfig_warnings",
         _check_qconfig_warnings),
    ]
    for table, columns, label, check in checks:
        rows = _rows(table, columns, label)
        if rows is not None and len(rows):
            found += check(rows)
    df = pd.DataFrame(found, columns=ADVICE_COLUMNS)
    order = df["Severity"].map({s: i for i, s in enumerate(SEVERITIES)})
    return df.iloc[order.argsort(kind="stable").to_numpy()].reset_index(drop=True)
