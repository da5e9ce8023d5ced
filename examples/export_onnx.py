"""Export the digits CNN as QDQ ONNX and check the file in onnxruntime.

train in float -> prepare_qat_fx -> calibrate -> export_onnx -> run the file in onnxruntime
(graph optimizations off, and ORT_ENABLE_ALL, where QDQ patterns become integer kernels) ->
compare with qatkit's integer model (convert_fx), value by value in units of the output
scale, and the predicted classes on the whole test set.

On x86 CPUs without VNNI, onnxruntime's default int8 kernels saturate (docs/export.md): the
check runs with its exact U8U8 kernels (``x64_quant_precision=True``, a no-op elsewhere).

    python examples/export_onnx.py [out_dir]
"""

from __future__ import annotations

import sys
from pathlib import Path

import qatkit
import torch
from digits import SEED, DigitsNet, batches, load_digits_data, torch_threads, train_float
from qatkit.export.check import (
    compare_with_onnxruntime,
    fused_kernels,
    onnxruntime_int8_exact,
    run_onnxruntime,
)


def main(out_dir: str | Path = ".", epochs: int = 12) -> dict:
    """Run the example; returns the path written and the measured agreement."""
    data = load_digits_data()
    torch.manual_seed(SEED)
    with torch_threads(1):
        model = train_float(DigitsNet(), data, epochs=epochs)

    example = data.train_x[:8]
    qat = qatkit.prepare_qat_fx(model, {"": qatkit.default_qat_8bit_fake_quant_qconfig},
                                example_inputs=(example,))
    qat.eval()
    qatkit.set_fake_quant_state(qat, "calibration")
    with torch.no_grad():
        for x, _ in batches(data.train_x[:1024], data.train_y[:1024], batch_size=256):
            qat(x)
    qatkit.set_fake_quant_state(qat, "validation")

    path = qatkit.export_onnx(qat, (example,), Path(out_dir) / "digits_int8.onnx",
                              dynamic_axes={"x": {0: "batch"}})
    print(f"wrote {path}")

    int_model = qatkit.convert_fx(qat)  # the reference: qatkit's bit-exact integer model
    with torch.no_grad():
        ref_class = int_model(data.test_x).argmax(1)
    result: dict = {"path": path, "exact": {}, "max_lsb": {}, "argmax_agreement": {},
                    "accuracy": {}, "int8_kernels_exact": onnxruntime_int8_exact()}
    if not result["int8_kernels_exact"]:
        print("onnxruntime's int8 kernels saturate on this CPU (x86 without VNNI): "
              "ORT_ENABLE_ALL runs with x64_quant_precision=True (exact U8U8 kernels)")
    for mode in ("disable", "all"):
        [agree] = compare_with_onnxruntime(int_model, path, (data.test_x,), mode,
                                           x64_quant_precision=True)
        [logits] = run_onnxruntime(path, (data.test_x,), mode, x64_quant_precision=True)
        ort_class = torch.from_numpy(logits).argmax(1)
        result["exact"][mode] = agree.exact
        result["max_lsb"][mode] = agree.max_lsb
        result["argmax_agreement"][mode] = float((ort_class == ref_class).float().mean())
        result["accuracy"][mode] = float((ort_class == data.test_y).float().mean())
        print(f"onnxruntime ({mode:>7}): {100 * agree.exact:.2f}% of {agree.numel} logits equal "
              f"to the integer model's, max {agree.max_lsb:g} LSB; same class for "
              f"{100 * result['argmax_agreement'][mode]:.1f}% of the test set; accuracy "
              f"{100 * result['accuracy'][mode]:.1f}%")
    print(f"integer kernels onnxruntime fused: {fused_kernels(path)}")
    return result


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
