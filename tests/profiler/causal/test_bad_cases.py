"""find_bad_cases: the samples two models disagree on most (float vs calibrated, QAT vs
integer), saved so the tools can run again on exactly those inputs."""

from __future__ import annotations

import copy

import debug_walkthrough as dw  # noqa: E402  (tests/profiler/conftest.py: examples/)
import digits  # noqa: E402
import pytest
import qatkit
import qatkit.profiler as qp
import torch


@pytest.fixture(scope="module")
def setup(fault_models):
    faulty, calib = fault_models("shared_ranges")
    return faulty, calib, dw.trained()[0]


def test_worst_samples_float_vs_calibrated(setup, tmp_path):
    faulty, calib, data = setup
    x = data.test_x[:96]
    with digits.torch_threads(1):
        bad = qp.find_bad_cases(faulty, calib, [x[:48], x[48:]], metric=["L1", "cosine"],
                                num=4, save_dir=tmp_path, verbose=False)
        with torch.no_grad():
            per_sample = (faulty(x) - calib(x)).abs().mean(dim=1)
    l1 = bad.table[bad.table["Metric"] == "L1"]
    assert list(l1["Sample"]) == per_sample.argsort(descending=True)[:4].tolist()
    assert list(l1["Value"]) == pytest.approx(per_sample.sort(descending=True).values[:4]
                                              .tolist(), rel=1e-5)
    cos = bad.table[bad.table["Metric"] == "Cosine"]
    assert list(cos["Value"]) == sorted(cos["Value"]), "lowest cosine first"
    assert list(l1["Batch"]) == [int(s) // 48 for s in l1["Sample"]]
    assert bad.inputs.shape[0] == len(bad.samples)
    torch.testing.assert_close(bad.inputs[0], x[bad.samples[0]], atol=0, rtol=0)
    saved = tmp_path / "bad_cases" / "inputs.pt"
    assert saved in bad.paths and (tmp_path / "bad_cases.csv").exists()
    # the folder is data every tool takes: rerun the sensitivity on the worst samples
    res = qp.get_sensitivity_of_nodes(calib, "cosine", str(tmp_path / "bad_cases"),
                                      node_type="activation", verbose=False)
    assert list(res)[0] == "shared"


def test_qat_vs_integer_and_errors(setup):
    faulty, calib, data = setup
    x = data.test_x[:32]
    integer = qatkit.convert_fx(copy.deepcopy(calib))
    bad = qp.find_bad_cases(calib, integer, x, metric="L1", num=3, verbose=False)
    assert len(bad.table) == 3 and (bad.table["Value"] >= 0).all()
    assert bad.table["Value"].max() < 1e-3, "the integer model matches fake quant"
    with pytest.raises(ValueError, match="num="):
        qp.find_bad_cases(faulty, calib, x, num=0, verbose=False)
    with pytest.raises(ValueError, match="does not fit model1"):
        qp.find_bad_cases(faulty, calib, torch.randn(2, 3, 16, 16), verbose=False)
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 4))
    with pytest.raises(ValueError, match="outputs differ"):
        qp.find_bad_cases(faulty, other, x, verbose=False)
