"""Issue 12's model set: models that do not trace whole prepare in one call (partial tracing).

For each model (random weights, small inputs, tests/zoo_models.py): prepare in one call,
>= 90% of the conv / linear multiply-adds quantized, CALIBRATION equal to float (every
region's output and the model's, 1e-5 relative), a QAT forward + backward with finite
gradients wherever the float model has them, convert_fx equal to VALIDATION, model_profiler
FvsQ runs.  CI runs one detector, one Hugging Face model and two timm models; the rest is
``pytest -m slow``.  ``python tests/plugin/fx/test_zoo.py [names]`` prints the table of
docs/partial_tracing.md.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/zoo_models.py

pytest.importorskip("torchvision")
pytest.importorskip("timm")
pytest.importorskip("transformers")

import zoo_models  # noqa: E402
from qatkit import (  # noqa: E402
    FakeQuantState,
    convert_fx,
    default_qat_8bit_fake_quant_qconfig,
    prepare_qat_fx,
    set_fake_quant_state,
)
from qatkit.fx.partial import partial_trace_of  # noqa: E402

#: one detector, one Hugging Face model, two timm models: the CI subset
CI = ["fasterrcnn_mobilenet_v3_large_320_fpn", "BertModel", "mobilevitv2_050",
      "tf_efficientnetv2_b0"]
ISSUE = zoo_models.TORCHVISION + zoo_models.TRANSFORMERS + zoo_models.TIMM
#: a broad timm sample, one small model per family (slow)
TIMM_FAMILIES = ["resnet10t", "efficientnet_b0", "mobilenetv3_small_050", "convnext_atto",
                 "regnetx_002", "ghostnet_100", "levit_128s", "vit_tiny_patch16_224",
                 "efficientformer_l1", "mobileone_s0", "repvgg_a0", "edgenext_xx_small",
                 "fastvit_t8", "poolformer_s12", "coat_lite_tiny", "mobilevitv2_050"]
DETECTORS = ("ssdlite", "retinanet", "fcos", "fasterrcnn", "maskrcnn", "keypointrcnn")


def _floats(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):  # a Hugging Face ModelOutput
        out = out.to_tuple()
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _rel(a: Any, b: Any) -> float:
    """Largest relative difference of the float tensors of two outputs (vs ``b``)."""
    fa, fb = _floats(a), _floats(b)
    assert len(fa) == len(fb) and fa, f"outputs differ in structure: {len(fa)} vs {len(fb)}"
    worst = 0.0
    for x, y in zip(fa, fb, strict=True):
        assert x.shape == y.shape, f"output shapes differ: {x.shape} vs {y.shape}"
        if x.numel():
            worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)))
    return worst


def _region_outputs(model: nn.Module, paths: list[str], inputs: tuple) -> dict[str, Any]:
    """The output of the first call of the module at each path in one eval run."""
    found: dict[str, Any] = {}
    handles = []
    for path in paths:
        def hook(m: nn.Module, args: tuple, out: Any, path: str = path) -> None:
            found.setdefault(path, out)
        handles.append((model.get_submodule(path) if path else model).register_forward_hook(
            hook))
    try:
        with torch.no_grad():
            found["(output)"] = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return found


def measure(name: str, profile: bool = True, out_dir: Path | None = None) -> dict[str, Any]:
    """Run every check of issue 12 on ``name``; a dict of the measured values."""
    model, inputs = zoo_models.build(name)
    row: dict[str, Any] = {"model": name}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = prepare_qat_fx(model, {"": default_qat_8bit_fake_quant_qconfig},
                             example_inputs=inputs)
    row["prepare_s"] = time.perf_counter() - t0
    plan = partial_trace_of(qat)
    row["share"] = 1.0 if plan is None else plan.quantized_share
    row["regions"] = 0 if plan is None else len(plan.regions)
    row["float_parts"] = [] if plan is None else [
        (p.path or "(root)", p.reason) for p in plan.parts if p.status == "float"]
    paths = [] if plan is None else [r.path for r in plan.regions]
    qat.eval()
    set_fake_quant_state(qat, FakeQuantState.CALIBRATION)
    ref = _region_outputs(model, paths, inputs)
    got = _region_outputs(qat, paths, inputs)
    row["calibration_rel"] = max(_rel(got[p], ref[p]) for p in ref)
    set_fake_quant_state(qat, FakeQuantState.VALIDATION)
    with torch.no_grad():
        val = qat(*inputs)
    int_model = convert_fx(qat)
    with torch.no_grad():
        row["convert_rel"] = _rel(int_model(*inputs), val)
    if profile:
        from qatkit.profiler import model_profiler

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = model_profiler(model, qat, inputs, mode="FvsQ",
                                    out_dir=out_dir or Path("/tmp") / f"qatkit_zoo_{name}")
        row["profiler"] = report.verdict.final_similarity
    # QAT: forward + backward (detection models in eval mode: training needs targets)
    detector = name.startswith(DETECTORS)
    set_fake_quant_state(qat, FakeQuantState.QAT)
    qat.train(not detector)
    model.train(not detector)
    for m, which in ((model, "float"), (qat, "qat")):
        loss = sum(t.float().square().mean() for t in _floats(m(*inputs)))
        loss.backward()
        row[f"grads_{which}"] = {n: p.grad for n, p in m.named_parameters()
                                 if p.requires_grad and p.grad is not None}
    return row


def check(row: dict[str, Any]) -> None:
    name = row["model"]
    assert row["share"] >= 0.9, f"{name}: only {row['share']:.1%} of conv/linear MACs quantized"
    assert row["calibration_rel"] <= 1e-5, \
        f"{name}: CALIBRATION differs from float by {row['calibration_rel']:.3g} (relative)"
    assert row["convert_rel"] <= 1e-5, \
        f"{name}: convert_fx differs from VALIDATION by {row['convert_rel']:.3g} (relative)"
    grads = row["grads_qat"]
    assert all(torch.isfinite(g).all() for g in grads.values()), f"{name}: non-finite grads"
    assert len(grads) >= len(row["grads_float"]), \
        f"{name}: {len(row['grads_float'])} float parameters get gradients, QAT only {len(grads)}"


@pytest.mark.parametrize("name", CI)
def test_zoo_ci_subset(name: str, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    check(measure(name, profile=name in ("BertModel", "mobilevitv2_050", "tf_efficientnetv2_b0"),
                  out_dir=tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ISSUE if n not in CI])
def test_zoo_issue_models(name: str, tmp_path: Path) -> None:
    check(measure(name, out_dir=tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in TIMM_FAMILIES if n not in CI])
def test_zoo_timm_families(name: str, tmp_path: Path) -> None:
    check(measure(name, profile=False, out_dir=tmp_path))


def _table_row(row: dict[str, Any]) -> str:
    ok = {"calib": row["calibration_rel"] <= 1e-5, "convert": row["convert_rel"] <= 1e-5,
          "grads": all(torch.isfinite(g).all() for g in row["grads_qat"].values())
          and len(row["grads_qat"]) >= len(row["grads_float"])}
    floats = "; ".join(f"`{p}`: {r.split('/')[-1]}" for p, r in row["float_parts"][:3])
    more = f" (+{len(row['float_parts']) - 3})" if len(row["float_parts"]) > 3 else ""
    prof = "n/a" if "profiler" not in row else (
        "runs" if row["profiler"] is None else f"runs ({row['profiler']:.4f})")
    return (f"| {row['model']} | {row['share']:.1%} | {row['regions']} | {floats or '-'}{more} "
            f"| {'pass' if ok['calib'] else 'FAIL'} ({row['calibration_rel']:.0e}) "
            f"| {'pass' if ok['convert'] else 'FAIL'} ({row['convert_rel']:.0e}) "
            f"| {'pass' if ok['grads'] else 'FAIL'} | {prof} | {row['prepare_s']:.1f} s |")


if __name__ == "__main__":  # [--no-profile] [names]
    args = [a for a in sys.argv[1:] if a != "--no-profile"]
    for model_name in args or ISSUE:
        try:
            print(_table_row(measure(model_name, "--no-profile" not in sys.argv)), flush=True)
        except Exception as e:  # noqa: BLE001 - one row per model
            print(f"| {model_name} | ERROR {type(e).__name__}: {str(e)[:200]} |", flush=True)
