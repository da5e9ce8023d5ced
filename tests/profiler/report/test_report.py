"""model_profiler: every tool on two models, the files it writes, and the errors it gives.

The model has known defects (a raw [0, 255] input, a shared ReLU, one conv whose activations are
~1000x the others), and the report must point at them: the findings name the layers, the
shared module is marked, and the per-layer similarity is worst at the defect.
"""

from __future__ import annotations

import copy
import warnings

import pandas as pd
import pytest
import qatkit
import torch
from qatkit.profiler import ProfilerReport, model_profiler
from qatkit.profiler.core.metrics import cosine
from torch import nn


class DefectNet(nn.Module):
    """conv1 -> relu -> conv2 (huge weights: a range ~1000x) -> relu (the same module) -> pool ->
    fc.  ``relu`` is shared: called after conv1 and after conv2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.conv2.weight[0] *= 1000.0  # one output channel with a huge range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def models(calibrate):
    torch.manual_seed(0)
    float_model = DefectNet().eval()
    x = torch.rand(4, 3, 16, 16) * 255.0  # raw pixels: not normalized
    calib = calibrate(float_model, x)
    return float_model, calib, qatkit.convert_fx(calib), x


@pytest.fixture(scope="module")
def fvsq(models, tmp_path_factory):
    float_model, calib, _, x = models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_profiler(float_model, calib, x, mode="FvsQ",
                              out_dir=tmp_path_factory.mktemp("float_calib"))


def test_fvsq_writes_every_table_the_page_and_the_graph(fvsq: ProfilerReport) -> None:
    expected = {"similarity_end_to_end", "similarity_per_layer", "statistics",
                "statistics_by_range", "outliers", "weights", "called_count", "unfused",
                "qconfig", "qconfig_warnings", "findings"}
    assert set(fvsq.tables) == expected
    for key in expected:  # the layer names: one column, one spelling, in every table
        assert "Module Name" in fvsq.tables[key].columns, key
        assert not {"Layer", "Node", "Weight Name", "Modules"} & set(fvsq.tables[key].columns)
        path = fvsq.paths[key]
        assert path.suffix == ".csv" and path.exists(), key
        assert len(pd.read_csv(path)) == len(fvsq.tables[key]), key
    html = fvsq.html.read_text(encoding="utf-8")
    assert fvsq.html.name == "profiler.html" and "<script src=" not in html  # self-contained
    assert "conv2" in html and "FvsQ" in html
    mmd = fvsq.paths["mermaid"].read_text(encoding="utf-8")
    assert mmd.startswith("flowchart") and "conv2" in mmd
    assert "ProfilerReport(mode='FvsQ'" in repr(fvsq) and "tensor(" not in repr(fvsq)


def test_verdict_is_the_final_output_cosine(models, fvsq: ProfilerReport) -> None:
    float_model, calib, _, x = models
    with torch.no_grad():
        expected = float(cosine(float_model(x).reshape(-1), calib(x).reshape(-1)))
    assert fvsq.verdict.final_similarity == pytest.approx(expected, abs=1e-6)
    assert fvsq.verdict.passed == (expected >= 0.98)


def test_report_points_at_the_defects(fvsq: ProfilerReport) -> None:
    findings = fvsq.findings
    problems = " ".join(findings["Problem"]).lower()
    layers = set(findings["Module Name"])
    assert "x_quant" in layers or any("conv1" in str(n) for n in layers), layers  # raw input
    assert "not normalized" in problems
    assert "relu" in layers, "the shared relu is a finding"  # shared module
    assert "conv2" in layers, "the outlier channel of conv2 is a finding"
    counts = fvsq.tables["called_count"].set_index("Module Name")["Called Count"]
    assert counts["relu"] == 2
    # the defect: conv2's huge channel gives the largest range and the worst own error
    stats = fvsq.tables["statistics"]
    out = stats[stats["Attr"] == "output"]
    widest = out.loc[out["Max"].abs().idxmax(), "Module Name"]
    assert str(widest).startswith("conv2"), widest
    weights = fvsq.tables["weights"]
    assert set(weights["Module Name"]) == {"conv1", "conv2", "fc"}
    # <= 0.5 step, except the channel maximum: amax/128 scales clamp it from 128 to 127 steps
    assert (weights["Error (N weight scale)"] <= 1.0 + 1e-5).all(), weights


def test_qvsq_against_the_integer_model(models, tmp_path) -> None:
    _, calib, integer, x = models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = model_profiler(calib, integer, x, mode="QvsQ", out_dir=tmp_path / "calib_int")
    assert "weights" not in report.tables and "unfused" not in report.tables
    sim = report.tables["similarity_end_to_end"]
    assert len(sim) > 0
    # exact evaluation: the integer model agrees with the fake-quant model to the bit
    assert (sim["Acc Error (N out_qscale)"].fillna(0) <= 1.0).all(), sim
    assert report.verdict.final_similarity == pytest.approx(1.0, abs=1e-6)
    assert (tmp_path / "calib_int" / "profiler.html").exists()


def test_models_are_not_changed(models, tmp_path) -> None:
    float_model, calib, _, x = models
    before = [copy.deepcopy(m.state_dict()) for m in (float_model, calib)]
    states = qatkit.get_fake_quant_state(calib)
    training = [m.training for m in calib.modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_profiler(float_model, calib, x, out_dir=tmp_path)
    for sd, m in zip(before, (float_model, calib), strict=True):
        after = m.state_dict()
        assert sd.keys() == after.keys()
        assert all(torch.equal(sd[k], after[k]) if isinstance(sd[k], torch.Tensor)
                   else sd[k] == after[k] for k in sd), type(m).__name__
    assert qatkit.get_fake_quant_state(calib) == states
    assert [m.training for m in calib.modules()] == training


def test_mode_mismatch_is_a_clear_error(models, tmp_path) -> None:
    float_model, calib, integer, x = models
    with pytest.raises(ValueError, match=r"model2 .*is a float model"):
        model_profiler(float_model, copy.deepcopy(float_model), x, mode="FvsQ", out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"model1 .*QvsQ|expects model1"):
        model_profiler(float_model, integer, x, mode="QvsQ", out_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown mode 'FvsF'"):
        model_profiler(float_model, calib, x, mode="FvsF", out_dir=tmp_path)
    assert not any(tmp_path.iterdir()), "nothing is written before the inputs are checked"


def test_kwargs_dict_reaches_the_tools(models, tmp_path) -> None:
    float_model, calib, _, x = models
    with pytest.raises(ValueError, match="valid keys"):
        model_profiler(float_model, calib, x, out_dir=tmp_path,
                       kwargs_dict={"featuremap_similarty": {}})
    with pytest.raises(ValueError, match="does not take"):
        model_profiler(float_model, calib, x, out_dir=tmp_path,
                       kwargs_dict={"featuremap_similarity": {"similarity": "SQNR"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = model_profiler(float_model, calib, x, out_dir=tmp_path / "sqnr",
                                kwargs_dict={"featuremap_similarity": {"similarity_func": "SQNR"}})
    sim = report.tables["similarity_end_to_end"]["Similarity"]
    assert (sim.dropna() > 1.0).any(), "SQNR is in dB, not a cosine"


def test_calibration_state_is_refused_with_the_fix(models, tmp_path) -> None:
    float_model, calib, _, x = models
    off = copy.deepcopy(calib)
    qatkit.set_fake_quant_state(off, "calibration")
    with pytest.raises(ValueError, match="VALIDATION"):
        model_profiler(float_model, off, x, out_dir=tmp_path)


def test_cvsq_calibrated_against_qat(models, tmp_path) -> None:
    _, calib, _, x = models
    qat = copy.deepcopy(calib)
    qatkit.set_fake_quant_state(qat, "qat")
    qat.train()
    opt = torch.optim.SGD(qat.parameters(), lr=1e-4)
    for _ in range(3):
        opt.zero_grad()
        qat(x / 255.0).square().mean().backward()
        opt.step()
    qat.eval()
    qatkit.set_fake_quant_state(qat, "validation")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = model_profiler(calib, qat, x, mode="CvsQ", out_dir=tmp_path)
    assert {"similarity_end_to_end", "qconfig", "findings"} <= set(report.tables)
    assert "weights" not in report.tables and "unfused" not in report.tables
    sim = report.tables["similarity_end_to_end"].set_index("Module Name")["Similarity"]
    assert "x_quant" in sim.index  # aligned by name through both models' provenance
    assert sim["conv1"] < 1.0, "QAT changed conv1's weights"
    with pytest.raises(ValueError, match="expects model2"):
        model_profiler(calib, models[2], x, mode="CvsQ", out_dir=tmp_path / "bad")


def test_model_kind_and_similarity_tables_agree_with_the_tools(models) -> None:
    from qatkit.profiler import featuremap_similarity
    from qatkit.profiler.core.metrics import get_metric
    from qatkit.profiler.core.similarity import similarity_tables
    from qatkit.profiler.report.model_report import model_kind

    float_model, calib, integer, x = models
    assert [model_kind(m) for m in models[:3]] == ["float", "fake_quant", "integer"]
    tables, (out1, out2) = similarity_tables(float_model, calib, (x,), get_metric("Cosine"))
    for method, table in tables.items():
        pd.testing.assert_frame_equal(table, featuremap_similarity(float_model, calib, x,
                                                                   method=method))
    with torch.no_grad():
        assert torch.equal(out1, float_model(x)) and torch.equal(out2, calib(x))


def test_one_capture_per_report(models, tmp_path) -> None:
    """model1 runs once, model2 twice (end to end, and with model1's values for the per-layer
    table); every other tool reads those runs."""
    float_model, calib, _, x = models
    calls = {"model1": 0, "model2": 0}
    hooks = [float_model.conv1.register_forward_pre_hook(
                 lambda *_: calls.update(model1=calls["model1"] + 1)),
             calib.conv1.register_forward_pre_hook(
                 lambda *_: calls.update(model2=calls["model2"] + 1))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = model_profiler(float_model, calib, x, out_dir=tmp_path)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"model1": 1, "model2": 2}, calls
    assert "capture_and_similarity" in report.seconds and "get_raw_features" not in report.seconds
    stats = report.tables["statistics"]
    assert {"Op Kind", "Source", "Source Kind"} <= set(stats.columns)
    assert set(stats.loc[stats["Module Name"] == "conv2", "Op Kind"]) == {"conv"}


class OtherNet(nn.Module):
    """DefectNet's layer names, another conv2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class WithHead(DefectNet):
    """DefectNet with one more layer model2 does not have."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(super().forward(x))


def test_fvsq_refuses_a_model_not_prepared_from_model1(models, calibrate, tmp_path) -> None:
    float_model, calib, _, x = models
    torch.manual_seed(1)
    other_weights = calibrate(DefectNet().eval(), x)        # same layers, other weights
    with pytest.raises(ValueError, match=r"layer 'conv1' has other weights .*mode='CvsQ'"):
        model_profiler(float_model, other_weights, x, out_dir=tmp_path / "w")
    other = OtherNet().eval()
    other.conv1.load_state_dict(float_model.conv1.state_dict())
    other_arch = calibrate(other, x)                          # conv1 the same; conv2: 16 ch
    with pytest.raises(ValueError, match=r"layer 'conv2' has weight shape \[16, 8, 3, 3\]"):
        model_profiler(float_model, other_arch, x, out_dir=tmp_path / "a")
    integer = qatkit.convert_fx(other_weights)                # FvsQ against an integer model
    with pytest.raises(ValueError, match=r"integer weight of 'conv1' is .* steps"):
        model_profiler(float_model, integer, x, out_dir=tmp_path / "i")
    assert not any(tmp_path.iterdir()), "the check runs before anything is written"
    # a QAT-trained model2 differs on purpose: the check can be skipped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = model_profiler(float_model, other_weights, x, out_dir=tmp_path / "skip",
                                kwargs_dict={"check_weight_correspondence": {"rtol": None}})
    assert report.verdict.final_similarity is not None


def test_fvsq_warns_about_model1_layers_model2_lacks(models, tmp_path) -> None:
    float_model, calib, _, x = models
    with_head = WithHead().eval()
    with_head.load_state_dict(float_model.state_dict(), strict=False)
    with pytest.warns(RuntimeWarning, match=r"1 weighted layer\(s\) with no counterpart in "
                                            r"model2 .*: head\."):
        model_profiler(with_head, calib, x, out_dir=tmp_path)
