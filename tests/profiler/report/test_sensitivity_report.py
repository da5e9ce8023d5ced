"""model_profiler's optional sensitivity section: off by default, on through kwargs_dict; its
tables in the report, its figures inline in profiler.html (one self-contained file)."""

from __future__ import annotations

import copy
import re

import debug_walkthrough as dw  # noqa: E402  (tests/profiler/conftest.py: examples/)
import digits  # noqa: E402
import pytest
import qatkit
import qatkit.profiler as qp


@pytest.fixture(scope="module")
def setup(fault_models):
    faulty, calib = fault_models("cat_ranges")
    return faulty, calib, dw.trained()[0].train_x[:32]


def test_off_by_default(setup, tmp_path):
    faulty, calib, x = setup
    with digits.torch_threads(1):
        report = qp.model_profiler(faulty, calib, x, out_dir=tmp_path)
    assert "sensitivity" not in report.tables and not (tmp_path / "sensitivity").exists()
    assert "Sensitivity: which quantizer hurts" not in report.html.read_text()


def test_on_through_kwargs_dict(setup, tmp_path):
    faulty, calib, x = setup
    with digits.torch_threads(1):
        report = qp.model_profiler(faulty, calib, x, out_dir=tmp_path,
                                   kwargs_dict={"get_sensitivity_of_nodes": {}})
    ranking = report.tables["sensitivity"]
    assert list(ranking["Module Name"][:2]) == ["cat", "conv_h"], ranking.head()
    sweep = report.tables["acc_error_non_quantize"]
    assert list(sweep["Count"]) == [0, 1, 2, 3]
    assert sweep["Cosine"].iloc[2] > 0.99 > 0.5 > sweep["Cosine"].iloc[0]
    assert {"only weights quantized", "only activations quantized"} <= set(
        report.tables["acc_error_quantize"].columns)
    for key in ("sensitivity", "acc_error_quantize"):
        assert "Module Name" in report.tables[key].columns, key
    html = report.html.read_text()
    assert "Sensitivity: which quantizer hurts" in html and "Partial un-quantization" in html
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == 2, "inline figures"
    assert "src=\"http" not in html and "sensitivity/" not in html, "one self-contained file"
    folder = tmp_path / "sensitivity"
    assert {p.name for p in folder.iterdir()} >= {
        "sensitivity_node.csv", "acc_error_quantize.png", "acc_error_quantize.svg",
        "acc_error_non_quantize.png", "acc_error_non_quantize.svg"}
    assert (tmp_path / "sensitivity.csv").exists()


def test_section_arguments_and_modes(setup, tmp_path):
    faulty, calib, x = setup
    with digits.torch_threads(1):
        report = qp.model_profiler(
            faulty, calib, x, out_dir=tmp_path / "a",
            kwargs_dict={"get_sensitivity_of_nodes": {"node_type": "activation",
                                                      "metrics": ["mse", "cosine"]},
                         "plot_acc_error": {"quantize_node": ["node"]}})
        assert set(report.tables["sensitivity"]["Type"]) == {"activation"}
        assert report.tables["sensitivity"]["Module Name"].iloc[0] == "cat"
        assert "MSE" in report.tables["acc_error_non_quantize"]
        assert "everything quantized" in report.tables["acc_error_quantize"]
        # calibrated vs integer: the section analyses model1
        integer = qatkit.convert_fx(copy.deepcopy(calib))
        qvsq = qp.model_profiler(calib, integer, x, mode="QvsQ", out_dir=tmp_path / "b",
                                 kwargs_dict={"plot_acc_error": {}})
        assert qvsq.tables["sensitivity"]["Module Name"].iloc[0] == "cat"
        with pytest.raises(ValueError, match="neither model is one"):
            qp.model_profiler(faulty, integer, x, out_dir=tmp_path / "c",
                              kwargs_dict={"get_sensitivity_of_nodes": {}})
        with pytest.raises(ValueError, match="model_profiler sets 'save_dir' itself"):
            qp.model_profiler(faulty, calib, x, out_dir=tmp_path / "d",
                              kwargs_dict={"get_sensitivity_of_nodes": {"save_dir": "x"}})
