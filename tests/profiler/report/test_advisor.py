"""qatkit.profiler.report.advisor: each finding points at exactly the right layer, with the
evidence in numbers and advice that works (the qconfig_dict snippet is run through prepare);
nothing is reported on clean tables or a clean model."""

from __future__ import annotations

import math
import re
import warnings

import pandas as pd
import pytest
import qatkit
import torch
from qatkit.profiler.report import advisor
from qatkit.profiler.report.advisor import ADVICE_COLUMNS, advise
from torch import nn

NAN = math.nan


def _stat(name, mtype, attr, mn, mx, mean=0.0, var=None, arg=0, scale=NAN, dtype="float32",
          sat=NAN, steps=NAN, nans=0, infs=0, kind="", source=None, source_kind=None) -> dict:
    if var is None:  # a spread that int8 holds well: std = max|x| / 4
        var = (max(abs(mn), abs(mx)) / 4) ** 2
    return {"Module Name": name, "Module Type": mtype, "Op Kind": kind, "Attr": attr,
            "Arg": arg, "Source": source, "Source Kind": source_kind, "Min": mn, "Max": mx,
            "Mean": mean, "Var": var, "Scale": scale, "Dtype": dtype, "Saturation Ratio": sat,
            "Range (steps)": steps, "NaN": nans, "Inf": infs}


def _io(name, mtype, mn, mx, source=None, source_kind=None, **kw) -> list[dict]:
    """An op's input and output rows, same statistics."""
    return [_stat(name, mtype, "input", mn, mx, source=source, source_kind=source_kind, **kw),
            _stat(name, mtype, "output", mn, mx, **kw)]


def _clean_rows() -> list[dict]:
    return (_io("x_quant", "QuantStub", -1.0, 1.0, kind="quant_stub", source="x",
                source_kind="input")
            + _io("conv", "ConvBnReLU2d", 0.0, 3.0, kind="conv", source="x_quant",
                  source_kind="quant_stub")
            + _io("sigmoid", "FunctionalOp[sigmoid]", -4.0, 4.0, kind="sigmoid")
            + [_stat("add", "FunctionalOp[add]", "input", -2, 2, kind="add"),
               _stat("add", "FunctionalOp[add]", "input", -1, 1, arg=1, kind="add"),
               _stat("add", "FunctionalOp[add]", "output", -3, 3, kind="add")])


def _layers(df: pd.DataFrame, severity: str | None = None) -> list[str]:
    if severity is not None:
        df = df[df["Severity"] == severity]
    return df["Module Name"].tolist()


# -- statistics ------------------------------------------------------------------------------
def test_clean_tables_give_no_findings() -> None:
    df = advise(statistics=pd.DataFrame(_clean_rows()))
    assert list(df.columns) == ADVICE_COLUMNS
    assert df.empty, df.to_string()
    assert advise().empty


def test_input_not_normalized_and_one_sided() -> None:
    rows = _io("x_quant", "QuantStub", 0.0, 255.0, mean=127.5, kind="quant_stub", source="x",
               source_kind="input") + _clean_rows()[2:]
    df = advise(statistics=pd.DataFrame(rows))
    assert _layers(df) == ["x_quant"]
    assert "not normalized" in df["Problem"][0] and "not symmetric" in df["Problem"][0]
    assert "[0, 255]" in df["Evidence"][0] and "QuantStub(scale=1/128)" in df["Advice"][0]
    # float model statistics (no QuantStub): the first input row is the model input
    float_rows = [_stat("conv", "Conv2d", "input", -300.0, 290.0, kind="conv", source="x",
                        source_kind="input"),
                  _stat("conv", "Conv2d", "output", -1.0, 1.0, kind="conv")]
    df = advise(statistics=pd.DataFrame(float_rows))
    assert _layers(df) == ["conv"] and "not symmetric" not in df["Problem"][0]


def test_a_quant_stub_after_a_float_op_is_not_a_model_input() -> None:
    # div_quant re-quantizes the output of a float op (x / buffer): not the model's input
    rows = _clean_rows() + _io("div_quant", "QuantStub", 0.0, 255.0, mean=127.5,
                               kind="quant_stub", source="div", source_kind="div")
    assert advise(statistics=pd.DataFrame(rows)).empty
    # through data-moving ops a stub still takes the model input: the capture's Source Kind
    rows = _clean_rows()[2:] + _io("x_quant", "QuantStub", 0.0, 255.0, kind="quant_stub",
                                   source="x", source_kind="input")
    assert _layers(advise(statistics=pd.DataFrame(rows))) == ["x_quant"]


def test_range_too_large_for_int8_names_layer_with_snippet() -> None:
    rows = _clean_rows() + _io("layer3.1.conv2", "ConvBn2d", -20.0, 20.0, var=0.05 ** 2,
                               scale=20 / 128, dtype="qint8")
    rows += _io("wide16", "ConvBn2d", -20.0, 20.0, var=0.05 ** 2, scale=20 / 32768,
                dtype="qint16")
    rows += _io("relu(1)", "ReLU", -20.0, 20.0, var=0.5 ** 2)  # float model, shared module
    df = advise(statistics=pd.DataFrame(rows))
    assert _layers(df, "error") == ["layer3.1.conv2"]  # std 0.32 steps: < 1
    assert _layers(df, "warning") == ["relu(1)"]  # 3.2 steps at int8 max|x|/128
    assert "0.32 steps" in df["Evidence"][0]
    assert ('qconfig_dict={"": qatkit.default_qat_8bit_fake_quant_qconfig, "module_name": '
            '[("layer3.1.conv2", qatkit.default_qat_8bit_weight_16bit_act_fake_quant_qconfig)]}'
            ) in df["Advice"][0]
    assert '("relu", ' in df["Advice"][1]  # qconfig_dict takes the module, not the call site


def test_saturation_only_when_data_lies_beyond_the_grid() -> None:
    rows = _clean_rows()
    rows += _io("clip", "ConvBn2d", -3.0, 3.0, scale=1 / 128, dtype="qint8", sat=0.03,
                steps=384.0)
    rows += _io("clip_hard", "ConvBn2d", -3.0, 3.0, scale=1 / 128, dtype="qint8", sat=0.2,
                steps=384.0)
    rows += _io("relu6", "ConvBnReLU62d", 0.0, 6.0, scale=6 / 128, dtype="qint8", sat=0.2,
                steps=128.0)  # values at 6 sit at the end of the grid: not clipped
    df = advise(statistics=pd.DataFrame(rows))
    sat = df[df["Problem"].str.contains("saturation")]
    assert sat[["Severity", "Module Name"]].values.tolist() == [["error", "clip_hard"],
                                                          ["warning", "clip"]]
    assert "3.00% of values clipped" in sat["Evidence"].iloc[1]
    assert "+-0.9922" in sat["Evidence"].iloc[1]


def test_multi_input_ranges_large_eats_small() -> None:
    rows = _clean_rows() + [
        _stat("cat", "FunctionalOp[cat]", "input", -1.0, 1.0, kind="cat"),
        _stat("cat", "FunctionalOp[cat]", "input", -1000.0, 1000.0, arg=1, kind="cat"),
        _stat("cat", "FunctionalOp[cat]", "output", -1000.0, 1000.0, kind="cat"),
        # a product: ranges may differ
        _stat("mul", "FunctionalOp[mul]", "input", -1.0, 1.0, kind="mul"),
        _stat("mul", "FunctionalOp[mul]", "input", -1000.0, 1000.0, arg=1, kind="mul")]
    df = advise(statistics=pd.DataFrame(rows))
    multi = df[df["Problem"].str.contains("large numbers eat small numbers")]
    assert multi["Module Name"].tolist() == ["cat"]
    assert "(1000x)" in multi["Evidence"].iloc[0] and "~0.1 int8 levels" in multi[
        "Evidence"].iloc[0]


def test_nonlinear_steep_region() -> None:
    rows = _clean_rows() + _io("fc", "Linear", -64.0, 64.0, scale=0.5, dtype="qint8",
                               kind="linear")
    rows += [_stat("sig", "FunctionalOp[sigmoid]", "input", -64.0, 64.0, scale=0.5,
                   dtype="qint8", kind="sigmoid", source="fc",
                   source_kind="linear"),  # 16 levels in [-4, 4]
             _stat("soft", "Softmax", "input", -10.0, 10.0,
                   kind="softmax"),  # step 10/128 > 1/16
             _stat("inv", "reciprocal", "input", 0.001, 12.8,
                   kind="reciprocal"),  # min 0.01 steps from 0
             _stat("root", "sqrt", "input", 2.0, 12.8, kind="sqrt")]  # 20 steps from 0: fine
    df = advise(statistics=pd.DataFrame(rows))
    nl = df[df["Problem"].str.startswith("non-linear")]
    assert nl["Module Name"].tolist() == ["sig", "soft", "inv"]
    sig = nl.iloc[0]
    assert "only 16 input levels" in sig["Evidence"]
    assert "('fc')" in sig["Advice"] and '[("fc", ' in sig["Advice"]  # the producer: Source


def test_nan_reported_once_at_first_occurrence() -> None:
    rows = _clean_rows() + _io("log", "log", -1.0, 1.0, nans=3) + _io("fc", "Linear", 0, 1,
                                                                        nans=5)
    df = advise(statistics=pd.DataFrame(rows))
    assert _layers(df, "error") == ["log"]
    assert "3 NaN, 0 inf" in df["Evidence"][0] and "3 later tensor(s)" in df["Evidence"][0]


# -- outliers, similarity, structure ---------------------------------------------------------
def _outlier(name, mtype, kind, attr, channels, l3, l4, l5, l6) -> dict:
    return {"Module Name": name, "Module Type": mtype, "Op Kind": kind, "Attr": attr,
            "Channels": channels,
            "Level>=3": l3, "Level>=4": l4, "Level>=5": l5, "Level>=6": l6,
            "Max Level": 6.6 if l6 else 4.2}


def test_outlier_levels_and_consumers() -> None:
    table = pd.DataFrame([
        _outlier("ln", "LayerNorm", "layer_norm", "output", 8, 7, 7, 7, 7),
        _outlier("fc1", "Linear", "linear", "input", 8, 7, 7, 7, 7),  # SmoothQuant target
        _outlier("act", "GELU", "gelu", "input", 8, 7, 7, 7, 7),  # a non-linear's input: skipped
        _outlier("mid", "Conv2d", "conv", "output", 8, 6, 5, 0, 0),
        _outlier("few", "Conv2d", "conv", "output", 8, 1, 1, 1, 1),  # one dwarfed channel: fine
    ])
    df = advise(outliers=table)
    assert df[["Severity", "Module Name"]].values.tolist() == [["error", "ln"], ["error", "fc1"],
                                                         ["warning", "mid"]]
    assert "7 of 8 channels" in df["Evidence"][0] and "64x" in df["Evidence"][0]
    assert "SmoothQuant" in df["Advice"][1] and "input of 'fc1'" in df["Advice"][1]


def _sim(values: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"Index": range(len(values)),
                         "Module Name": [f"op{i}" for i in range(len(values))],
                         "Module Type": ["Conv2d"] * len(values), "Similarity": values})


def test_final_cosine_and_worst_per_layer() -> None:
    df = advise(similarity=_sim([0.9999, 0.999, 0.96, 0.955, 0.95]))
    assert _layers(df, "error") == ["op4"]
    assert "0.9500" in df["Evidence"][0] and "largest single drop at 'op2'" in df["Evidence"][0]
    assert advise(similarity=_sim([0.9999, 0.99])).empty
    per = advise(per_layer_similarity=_sim([0.999, 0.97, 0.5, 0.98] + [0.9] * 6))
    assert _layers(per) == ["op2", "op4", "op5", "op6", "op7"]  # worst first, top 5
    assert '[("op2", None)]' in per["Advice"][0]


def test_called_count_unfused_and_qconfig_warnings() -> None:
    called = pd.DataFrame({"Module Name": ["layer1.0.relu", "head.conv", "unused", "ok"],
                           "Module Type": ["ReLU", "Conv2d", "Linear", "Conv2d"],
                           "Called Count": [2, 3, 0, 1]})
    unfused = pd.DataFrame({"Module Name": ["conv, reshape, bn"],
                            "Pattern": ["Conv2d + reshape + BatchNorm2d"],
                            "Reason": ["split"], "Fix": ["apply 'bn' before"]})
    warns = pd.DataFrame({"Module Name": ["quant", "fc"], "Warning": [
        "fixed output scale 0.0078 (covers [-1, 1]). Fix: normalize",
        "32-bit (unquantized) output on a layer that is not the last: x. Fix: 8-bit"]})
    df = advise(called_count=called, unfused=unfused, qconfig_warnings=warns)
    got = df[["Severity", "Module Name"]].values.tolist()
    assert got == [["warning", "head.conv"], ["warning", "conv, reshape, bn"],
                   ["warning", "fc"], ["info", "layer1.0.relu"], ["info", "unused"],
                   ["info", "quant"]]
    assert "copy.deepcopy(self.conv) in 'head'" in df["Advice"][0]
    assert df["Advice"][2] == "8-bit" and df["Advice"][1] == "apply 'bn' before"


def test_sorted_by_severity_and_bad_table() -> None:
    rows = _clean_rows() + _io("bad", "ConvBn2d", -1.0, 1.0, nans=1)
    called = pd.DataFrame({"Module Name": ["r"], "Module Type": ["ReLU"], "Called Count": [2]})
    df = advise(statistics=pd.DataFrame(rows), called_count=called,
                similarity=_sim([0.999, 0.9]))
    order = [advisor.SEVERITIES.index(s) for s in df["Severity"]]
    assert order == sorted(order), df.to_string()
    assert df["Severity"].tolist() == ["error", "error", "info"], df.to_string()
    with pytest.raises(ValueError, match="called_count table lacks columns"):
        advise(called_count=pd.DataFrame({"Module Name": ["r"]}))


# -- end to end: real statistics of models with known defects --------------------------------
class Defects(nn.Module):
    """Raw [0, 255] input; a cat of a tensor in [-1, 1] with one in [-1000, 1000]; an outlier
    channel on fc1's output (and so on fc2's input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)
        with torch.no_grad():
            self.fc1.weight[3] *= 200.0  # channel 3 of fc1's output: ~200x the others

    def forward(self, x, big):
        y = torch.tanh(self.conv(x).mean((2, 3)) / 100.0)  # in [-1, 1]
        y = torch.cat([y, big], dim=1)
        return self.fc2(self.fc1(y[:, :8]))


class Clean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _tables(model, inputs):
    from qatkit.profiler.core.capture import get_raw_features
    from qatkit.profiler.core.statistics import outlier_channels, profile_featuremap
    records = get_raw_features(model, inputs)
    return profile_featuremap(records).table, outlier_channels(records)


def test_end_to_end_defects_point_at_the_right_layers() -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8) * 255
    big = (torch.rand(4, 8) * 2 - 1) * 1000
    stats, outliers = _tables(Defects().eval(), (x, big))
    df = advise(statistics=stats, outliers=outliers)
    by_problem = {p: sorted(set(g["Module Name"])) for p, g in df.groupby(
        df["Problem"].str.extract(r"^(model input|inputs of a multi-input|outlier)")[0])}
    assert by_problem["model input"] == ["conv"]  # float model: its first input
    assert by_problem["inputs of a multi-input"] == ["cat"]
    assert by_problem["outlier"] == ["cat", "fc1", "fc2"]  # cat: 8 channels at 1000x the rest
    assert "output of 'fc1'" in df[df["Module Name"] == "fc1"]["Evidence"].iloc[0]
    assert "input of 'fc2'" in df[df["Module Name"] == "fc2"]["Evidence"].iloc[0]
    assert set(df["Module Name"]) == {"conv", "cat", "fc1", "fc2"}, df.to_string()


class MidStub(nn.Module):
    """A raw [0, 255] input, and abs (no quantized implementation) in the middle: prepare
    re-quantizes its output with a QuantStub, abs_quant, whose input is no model input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.conv2(torch.abs(self.conv1(torch.flatten(x, 2).reshape(x.shape))))


def test_end_to_end_only_real_model_inputs_are_inputs(calibrate) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8) * 255
    qm = calibrate(MidStub().eval(), x)
    stats, _ = _tables(qm, x)
    stubs = stats[(stats["Op Kind"] == "quant_stub") & (stats["Attr"] == "input")]
    assert set(stubs["Module Name"]) == {"x_quant", "abs_quant"}
    assert dict(zip(stubs["Module Name"], stubs["Source Kind"], strict=True)) == {
        "x_quant": "input", "abs_quant": "abs"}  # x_quant: through flatten and reshape
    df = advise(statistics=stats)
    inputs = df[df["Problem"].str.startswith("model input")]
    assert inputs["Module Name"].tolist() == ["x_quant"], df.to_string()
    assert "abs_quant" not in set(df["Module Name"])


def test_end_to_end_clean_model_and_working_snippet() -> None:
    torch.manual_seed(0)
    model = Clean().eval()
    x = torch.randn(4, 3, 8, 8).clamp(-1, 1)
    stats, outliers = _tables(model, x)
    df = advise(statistics=stats, outliers=outliers)
    assert df[df["Severity"] != "info"].empty, df.to_string()
    # the int16 snippet the advisor gives is a working qconfig_dict for prepare
    snippet = advisor._int16_snippet("conv")
    env = {"qatkit": qatkit}
    exec(snippet, env)  # noqa: S102 - our own generated text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(model, env["qconfig_dict"], example_inputs=(x,))
    assert qm.conv.activation_post_process.dtype == "qint16"
    assert qm.fc.activation_post_process.dtype == "qint8"
    assert re.fullmatch(r'qconfig_dict=\{.*\("conv", .*\)\]\}', snippet)
