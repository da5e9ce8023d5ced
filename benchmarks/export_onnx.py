"""Exactness of qatkit.export_onnx: onnxruntime (CPU) running the exported QDQ file vs
qatkit's integer model (convert_fx), in units of each output's scale, in both onnxruntime
modes (graph optimizations disabled: float kernels between Q/DQ; ORT_ENABLE_ALL: QDQ patterns
fused into integer kernels).

Models: the digits CNN (trained, examples/digits.py) in int8 and with int16 activations;
resnet18, mobilenet_v2 and efficientnet_b0 (torchvision, random weights, BatchNorm statistics
settled on the calibration data, 64x64); a transformer block (linear, matmul, softmax,
layer_norm, gelu) in int8, in int8 with a fixed softmax output scale 1/128, and with int16
activations.  Evaluation data are fresh (not the calibration data).

Columns:
  output exact %   output values with the same integer as the integer model
  max LSB          the largest difference at the output
  argmax %         rows whose argmax (class) agrees
  per-op exact %   every quantized op exported alone and fed the integer model's own inputs:
                   its own arithmetic, without propagation (all op outputs pooled)
  worst op         the op with the fewest equal values (% and max LSB)
  kernels          the integer kernels onnxruntime fused (ORT_ENABLE_ALL)

On a CPU whose onnxruntime int8 kernels saturate (x86 without VNNI), ORT_ENABLE_ALL is also
measured with onnxruntime's exact U8U8 kernels (session.x64quantprecision: mode "all+u8u8").

    python benchmarks/export_onnx.py [--models digits,resnet18,...] [--threads 2] [--no-per-op]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import qatkit
import torch
import torchvision
from qatkit.export.check import (
    compare_with_onnxruntime,
    fused_kernels,
    onnxruntime_int8_exact,
    op_agreement,
    run_onnxruntime,
)
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import digits  # noqa: E402
from _common import settle_batchnorm  # noqa: E402

MODELS = ("digits", "digits_int16", "resnet18", "mobilenet_v2", "efficientnet_b0",
          "transformer_int8", "transformer_int8_softmax128", "transformer_int16")


class TransformerBlock(nn.Module):
    """Pre-norm attention + MLP: linear, matmul, softmax, layer_norm, gelu, residual adds."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q, k, v = self._split(q), self._split(k), self._split(v)
        att = self.softmax(torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim)))
        o = torch.matmul(att, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        x = x + self.proj(o)
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


def _prepare(model: nn.Module, x: torch.Tensor, qconfig_dict: dict,
             calib: list[torch.Tensor]) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(model, qconfig_dict, example_inputs=(x,)).eval()
    qatkit.set_fake_quant_state(qm, "calibration")
    with torch.no_grad():
        for b in calib:
            qm(b)
    qatkit.set_fake_quant_state(qm, "validation")
    return qm


def build(name: str) -> tuple[torch.fx.GraphModule, torch.Tensor, torch.Tensor]:
    """``(calibrated model, calibration batch, evaluation batch)``."""
    q8 = {"": qatkit.default_qat_8bit_fake_quant_qconfig}
    q16 = {"": qatkit.default_qat_8bit_weight_16bit_act_fake_quant_qconfig}
    if name.startswith("digits"):
        data = digits.load_digits_data()
        torch.manual_seed(digits.SEED)
        model = digits.train_float(digits.DigitsNet(), data)
        calib = [data.train_x[i:i + 256] for i in range(0, 1024, 256)]
        qm = _prepare(model, calib[0], q16 if name.endswith("int16") else q8, calib)
        return qm, calib[0], data.test_x
    torch.manual_seed(0)
    if name.startswith("transformer"):
        model = TransformerBlock().eval()
        x, xt = torch.randn(16, 8, 32), torch.randn(32, 8, 32)
        qconfig_dict = q16 if name.endswith("int16") else dict(q8)
        if name.endswith("softmax128"):  # softmax outputs lie in [0, 1]: a fixed scale 1/128
            fixed = qatkit.QConfig(
                activation=qatkit.FakeQuantize.with_args(observer=qatkit.FixedScaleObserver,
                                                         scale=1 / 128),
                weight=None)
            qconfig_dict["module_name"] = [("softmax", fixed)]
        return _prepare(model, x, qconfig_dict, [x]), x, xt
    model = torchvision.models.get_model(name, weights=None)
    x, xt = torch.randn(8, 3, 64, 64), torch.randn(8, 3, 64, 64)
    settle_batchnorm(model, [x])
    return _prepare(model, x, q8, [x]), x, xt


def measure(name: str, per_op: bool, csv_dir: str | None = None) -> list[dict]:
    qm, x, xt = build(name)
    int_model = qatkit.convert_fx(qm)
    with torch.no_grad():
        ref = int_model(xt)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = qatkit.export_onnx(qm, (x,), os.path.join(tmp, f"{name}.onnx"),
                                  dynamic_axes={"x": {0: "batch"}})
        export_s = time.perf_counter() - t
        kernels = fused_kernels(path)
        modes = [("disable", False), ("all", False)]
        if not onnxruntime_int8_exact():  # saturating U8S8 kernels: also the exact U8U8 ones
            modes.append(("all", True))
        for level, u8u8 in modes:
            with warnings.catch_warnings():  # the saturation warning: the table says it
                warnings.simplefilter("ignore")
                [agree] = compare_with_onnxruntime(int_model, path, (xt,), level,
                                                   x64_quant_precision=u8u8)
            [y] = run_onnxruntime(path, (xt,), level, x64_quant_precision=u8u8)
            flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
            argmax = float((flat(torch.from_numpy(y)).argmax(-1) ==
                            flat(ref).argmax(-1)).float().mean())
            row = dict(model=name, mode=level + ("+u8u8" if u8u8 else ""), exact=agree.exact,
                       max_lsb=agree.max_lsb,
                       argmax=argmax, export_s=export_s,
                       kernels=", ".join(f"{k} {v}" for k, v in kernels.items()) if level ==
                       "all" else "-")
            if per_op:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    df = op_agreement(qm, (xt,), level, x64_quant_precision=u8u8)
                if csv_dir:
                    df.to_csv(os.path.join(csv_dir, f"{name}_{row['mode']}.csv"), index=False)
                row["op_exact"] = float((df.exact * df.numel).sum() / df.numel.sum())
                worst = df.sort_values(["exact", "max_lsb"], ascending=[True, False]).iloc[0]
                row["worst"] = "-" if worst.exact == 1 else \
                    f"{worst.op} {100 * worst.exact:.4f}%/{worst.max_lsb:g}"
                row["op_max_lsb"] = float(df.max_lsb.max())
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-per-op", action="store_true", help="skip the per-op columns")
    ap.add_argument("--per-op-csv", default=None, help="folder for each per-op table (CSV)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, {args.threads} threads; int8 kernels "
          f"{'exact' if onnxruntime_int8_exact() else 'saturate (x86 without VNNI)'}")
    header = (f"{'model':<28}{'ORT mode':<10}{'output exact %':>15}{'max LSB':>8}"
              f"{'argmax %':>9}{'per-op exact %':>15}  {'worst op (exact %/max LSB)':<42}kernels")
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        for r in measure(name, not args.no_per_op, args.per_op_csv):
            op = f"{100 * r['op_exact']:>15.5f}" if "op_exact" in r else f"{'-':>15}"
            print(f"{r['model']:<28}{r['mode']:<10}{100 * r['exact']:>15.4f}{r['max_lsb']:>8g}"
                  f"{100 * r['argmax']:>9.2f}{op}  {r.get('worst', '-'):<42}{r['kernels']}",
                  flush=True)


if __name__ == "__main__":
    main()
