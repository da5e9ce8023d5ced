"""The QAT recipe of the NPU guides, runnable: calibrate, save, QAT with fixed activation scales,
freeze BatchNorm, convert, export -- printing the accuracy at each stage.

    .venv/bin/python examples/qat_recipe.py [--out qat_recipe_out]

1. train ``DigitsNet`` in float (examples/digits.py);
2. **calibrate** with a calibration qconfig (MSE observers) on 256 training images
   (``qatkit.calibrate``) and save the calibrated state dict: the checkpoint QAT starts from;
3. **prepare the QAT model with fixed activation scales** (a moving average with
   ``averaging_constant=0``: the calibrated scales never move) and load the checkpoint
   strictly -- the observers' histograms are observer-private and do not get in the way;
4. **QAT**: SGD with momentum and a small learning rate (1/10 of the float recipe's), no
   augmentation, gradient clipping, and a NaN check on every loss (the guides' advice when QAT
   diverges: check the data, lower the learning rate, clip); BatchNorm statistics are frozen
   (``qatkit.freeze_bn_stats``) for the last epoch, so the network trains on the folded
   weights the NPU will run;
5. **convert** with ``qatkit.convert_fx`` (integer model: equal to the fake-quant model) and
   **export** QDQ ONNX with ``qatkit.export_onnx``, checked in onnxruntime.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import qatkit
import torch
import torch.nn.functional as F
from digits import SEED, DigitsNet, batches, evaluate, load_digits_data, torch_threads, train_float

QAT_EPOCHS = 3
FREEZE_BN_AFTER = 2  # epochs; the last one trains on frozen BatchNorm statistics
MAX_GRAD_NORM = 1.0
CALIBRATION_IMAGES = 256


def prepare(model: torch.nn.Module, activation_qconfig: qatkit.QConfig) -> torch.fx.GraphModule:
    head = qatkit.default_qat_8bit_weight_32bit_out_fake_quant_qconfig  # 32-bit logits
    qconfig_dict = {"": activation_qconfig, "module_name": [("fc", head)]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qatkit.prepare_qat_fx(model, qconfig_dict).eval()


def qat(model: torch.fx.GraphModule, data, epochs: int = QAT_EPOCHS) -> list[float]:
    """QAT with SGD, gradient clipping and a NaN check; BatchNorm frozen for the last epochs.
    Returns the mean loss of each epoch."""
    qatkit.set_fake_quant_state(model, qatkit.FakeQuantState.QAT)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=4e-5)
    losses = []
    for epoch in range(epochs):
        if epoch == FREEZE_BN_AFTER:
            qatkit.freeze_bn_stats(model)
        model.train()
        total, count = 0.0, 0
        for x, y in batches(data.train_x, data.train_y, 64, shuffle=True, seed=SEED + 7 + epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"QAT loss is {loss.item()} at epoch {epoch}: check the float model and the "
                    "data, lower the learning rate or warm it up, clip gradients")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            total, count = total + loss.item() * len(y), count + len(y)
        losses.append(total / count)
    model.eval()
    qatkit.set_fake_quant_state(model, qatkit.FakeQuantState.VALIDATION)
    return losses


def main(out: Path = Path("qat_recipe_out"), epochs: int = 12, verbose: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits_data()
    test = (data.test_x, data.test_y)
    acc: dict[str, float] = {}
    with torch_threads(1):
        torch.manual_seed(SEED)
        float_model = train_float(DigitsNet(), data, epochs=epochs)
        acc["float"] = evaluate(float_model, test)
        # 2. calibrate with MSE observers, save the checkpoint
        calib = prepare(float_model, qatkit.default_calib_8bit_fake_quant_qconfig)
        summary = qatkit.calibrate(calib, list(data.train_x[:CALIBRATION_IMAGES].split(64)),
                                   progress=False)
        acc["calibrated (MSE)"] = evaluate(calib, test)
        torch.save(calib.state_dict(), out / "calibrated.pt")
        # 3. the QAT model with fixed activation scales, from the checkpoint
        fixed = qatkit.get_default_qconfig(activation_observer="moving_average",
                                           activation_qkwargs={"averaging_constant": 0.0})
        qat_model = prepare(float_model, fixed)
        qat_model.load_state_dict(torch.load(out / "calibrated.pt", weights_only=True))
        acc["QAT model, loaded"] = evaluate(qat_model, test)
        # 4. QAT
        losses = qat(qat_model, data)
        acc[f"QAT ({QAT_EPOCHS} epochs)"] = evaluate(qat_model, test)
        torch.save(qat_model.state_dict(), out / "qat.pt")
        # 5. convert and export
        int_model = qatkit.convert_fx(qat_model)
        acc["integer model"] = evaluate(int_model, test)
        path = qatkit.export_onnx(qat_model, (data.test_x[:1],), out / "digits_qdq.onnx",
                                  dynamic_axes={"input": {0: "batch"}}, input_names=["input"])
        from qatkit.export.check import run_onnxruntime

        # x64_quant_precision: exact int8 kernels on x86 CPUs without VNNI too, whose default
        # kernels saturate (a no-op elsewhere; docs/export.md)
        logits = run_onnxruntime(str(path), (data.test_x,), x64_quant_precision=True)[0]
        correct = int((torch.as_tensor(logits).argmax(1) == data.test_y).sum())
        acc["ONNX (onnxruntime)"] = correct / len(data.test_y)
    if verbose:
        print(f"calibration: {summary}")
        print("QAT loss per epoch: " + ", ".join(f"{v:.4f}" for v in losses)
              + f" (BatchNorm frozen from epoch {FREEZE_BN_AFTER})")
        for stage, value in acc.items():
            print(f"  {stage:<24}{100 * value:6.2f}%")
        print(f"wrote {out / 'calibrated.pt'}, {out / 'qat.pt'}, {path}")
    return acc


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("qat_recipe_out"))
    main(ap.parse_args().out)
