"""examples/qat_recipe.py (calibrate -> checkpoint -> fixed-scale QAT -> convert -> export) and
examples/ddp_qat.py (torchrun, 2 processes) do what they print."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))


def test_qat_recipe_runs_every_stage_and_the_integer_model_and_onnx_agree(tmp_path):
    recipe = importlib.import_module("qat_recipe")
    acc = recipe.main(out=tmp_path, epochs=4, verbose=False)
    assert list(acc) == ["float", "calibrated (MSE)", "QAT model, loaded",
                         f"QAT ({recipe.QAT_EPOCHS} epochs)", "integer model",
                         "ONNX (onnxruntime)"]
    assert acc["QAT model, loaded"] == acc["calibrated (MSE)"], "the checkpoint's scales"
    assert acc["integer model"] == acc[f"QAT ({recipe.QAT_EPOCHS} epochs)"]
    assert acc["ONNX (onnxruntime)"] == acc["integer model"]
    assert acc[f"QAT ({recipe.QAT_EPOCHS} epochs)"] >= 0.99 * acc["float"]
    assert {p.name for p in tmp_path.iterdir()} >= {"calibrated.pt", "qat.pt",
                                                    "digits_qdq.onnx"}


def test_ddp_example_keeps_scales_identical_on_every_rank():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(EXAMPLES_DIR / "ddp_qat.py"), "--float-epochs", "3", "--qat-epochs", "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                          cwd=EXAMPLES_DIR)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "world size 2" in done.stdout
    assert "after calibration True, after QAT True" in done.stdout, done.stdout
