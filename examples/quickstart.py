"""qatkit quickstart: prepare a small CNN, calibrate it four ways, QAT it, convert it to integers.

Run it with ``make demo`` (or ``.venv/bin/python examples/quickstart.py``).  It

1. trains ``DigitsNet`` (see ``examples/digits.py``) in float on scikit-learn's handwritten
   digits, which takes a few seconds on a laptop CPU;
2. for each calibration method (min_max, percentile, mse, kl), prepares a QAT copy with
   ``qatkit.prepare_qat_fx`` (conv+bn+relu and conv+bn+add+relu fused, per-channel int8
   weights, per-tensor int8 activations, the input scale fixed at 1/128 by the model's
   ``QuantStub``, a 32-bit output for the linear head), calibrates it on 256 training images
   (CALIBRATION state), freezes its scales (VALIDATION state) and measures its test accuracy;
3. fine-tunes the min_max-calibrated model with quantization-aware training for two epochs
   (QAT state, SGD, small learning rate) and measures it again;
4. converts the QAT model with ``qatkit.convert_fx`` into the integer model an NPU runs (int8
   weights, int32 bias, fixed-point requantization, in plain torch ops) and measures it;
5. prints float vs calibrated vs QAT vs integer accuracy, and how often the integer model's
   prediction equals the fake-quant model's;
6. writes two profiler reports with ``qatkit.profiler.model_profiler`` and prints their paths:
   float vs calibrated (``FvsQ``) and QAT vs integer (``QvsQ``). Open ``profiler.html`` in a
   browser: a verdict, a per-layer similarity chart, statistics, checks and advice.

The float model is never modified: prepare works on a copy.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from pathlib import Path

import qatkit
import torch
import torch.nn.functional as F
from digits import (
    SEED,
    DigitsData,
    DigitsNet,
    batches,
    evaluate,
    load_digits_data,
    torch_threads,
    train_float,
)
from qatkit.profiler import model_profiler
from torch import nn

CALIBRATION_METHODS = ("min_max", "percentile", "mse", "kl")
CALIBRATION_BATCHES = 4  # 4 x 64 training images
QAT_EPOCHS = 2
REPORT_DIR = Path("qatkit_profiler")  # relative to where it runs (git-ignored)
PROFILE_IMAGES = 64  # test images the reports are computed on (one batch)


def prepare(float_model: nn.Module, method: str, data: DigitsData) -> torch.fx.GraphModule:
    """A QAT copy of ``float_model``: ``method`` observes the activations, the head keeps a
    32-bit output (the usual advice for a model's last layer)."""
    qconfig = qatkit.get_default_qconfig(activation_observer=method)
    qconfig_dict = {
        "": qconfig,
        "module_name": [("fc", qatkit.default_qat_8bit_weight_32bit_out_fake_quant_qconfig)],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DigitsNet has nothing to warn about; keep output tidy
        return qatkit.prepare_qat_fx(float_model, qconfig_dict,
                                     example_inputs=(data.train_x[:2],))


@torch.no_grad()
def calibrate(model: nn.Module, data: DigitsData) -> None:
    """Record activation statistics on training images, then freeze the scales."""
    model.eval()
    qatkit.set_fake_quant_state(model, qatkit.FakeQuantState.CALIBRATION)  # observe, stay float
    calibration_data = batches(data.train_x, data.train_y, batch_size=64, shuffle=True)
    for x, _ in itertools.islice(calibration_data, CALIBRATION_BATCHES):
        model(x)
    qatkit.set_fake_quant_state(model, qatkit.FakeQuantState.VALIDATION)  # scales fixed, quant on


def qat_finetune(model: nn.Module, data: DigitsData, epochs: int = QAT_EPOCHS) -> None:
    """Quantization-aware fine-tuning: the float recipe with SGD and a small learning rate."""
    qatkit.set_fake_quant_state(model, qatkit.FakeQuantState.QAT)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for epoch in range(epochs):
        for x, y in batches(data.train_x, data.train_y, 64, shuffle=True, seed=SEED + 100 + epoch):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()  # BatchNorm on its running statistics, as folded into the integer model
    qatkit.set_fake_quant_state(model, qatkit.FakeQuantState.VALIDATION)


def write_reports(float_model: nn.Module, calibrated: nn.Module, qat_model: nn.Module,
                  int_model: nn.Module, images: torch.Tensor, report_dir: Path) -> dict:
    """The two reports users run first: float vs calibrated, then QAT vs integer."""
    reports = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reports["FvsQ"] = model_profiler(float_model, calibrated, images, mode="FvsQ",
                                         out_dir=report_dir / "float_calib")
        reports["QvsQ"] = model_profiler(qat_model, int_model, images, mode="QvsQ",
                                         out_dir=report_dir / "qat_integer")
    return reports


def main(epochs: int = 12, verbose: bool = True,
         report_dir: Path | None = REPORT_DIR) -> dict[str, float]:
    """Train, calibrate with every method, fine-tune with QAT, convert, profile; return test
    accuracies.

    Args:
        epochs: float training epochs.
        verbose: print the accuracy table and the report paths.
        report_dir: where the profiler reports go (None: no reports).

    Returns:
        ``{"float": acc, "min_max": acc, "percentile": acc, "mse": acc, "kl": acc, "qat": acc,
        "integer": acc}``.
    """
    data = load_digits_data()
    test_set = (data.test_x, data.test_y)
    with torch_threads(1):  # a tiny model: as fast, and the same numbers on any core count
        torch.manual_seed(SEED)
        float_model = train_float(DigitsNet(), data, epochs=epochs)
        accuracy = {"float": evaluate(float_model, test_set)}
        models = {}
        for method in CALIBRATION_METHODS:
            models[method] = prepare(float_model, method, data)
            calibrate(models[method], data)
            accuracy[method] = evaluate(models[method], test_set)
        qat_model = models["min_max"]
        calibrated = copy.deepcopy(qat_model)  # compare float with calibrated, not with QAT
        qat_finetune(qat_model, data)
        accuracy["qat"] = evaluate(qat_model, test_set)
        int_model = qatkit.convert_fx(qat_model)
        accuracy["integer"] = evaluate(int_model, test_set)
        with torch.no_grad():
            same = qat_model(data.test_x).argmax(1) == int_model(data.test_x).argmax(1)
        agreement = float(same.float().mean())
        reports = {} if report_dir is None else write_reports(
            float_model, calibrated, qat_model, int_model, data.test_x[:PROFILE_IMAGES],
            Path(report_dir))
    if verbose:
        print(f"DigitsNet, {len(data.test_y)} test images: int8 fake quant (per-channel weights)")
        print(f"{'model':<28}{'accuracy':>9}{'vs float':>10}")
        for name, acc in accuracy.items():
            label = {"float": "float", "qat": f"QAT ({QAT_EPOCHS} epochs from min_max)",
                     "integer": "integer model (convert_fx)"}.get(name, f"calibrated, {name}")
            delta = "" if name == "float" else f"{100 * (acc - accuracy['float']):+.2f}"
            print(f"{label:<28}{100 * acc:>8.2f}%{delta:>10}".rstrip())
        print(f"integer vs fake-quant QAT model: same prediction on {100 * agreement:.2f}% "
              "of the test images")
        for mode, report in reports.items():
            final = report.verdict.final_similarity
            errors = int((report.findings["Severity"] == "error").sum())
            print(f"{mode} report: {report.html}  (final-output cosine {final:.6f}, "
                  f"{len(report.findings)} findings, {errors} errors)")
    return accuracy


if __name__ == "__main__":
    main()
