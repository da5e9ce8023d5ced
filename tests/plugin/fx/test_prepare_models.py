"""prepare_qat_fx on torchvision's classification models at random weights.

For every model: prepare; CALIBRATION in eval mode reproduces the float model (fusion must not
change the math); calibrate then VALIDATION stays close to float; one QAT forward + backward
gives finite gradients.  CI runs a representative subset; ``pytest -m slow`` runs them all.
"""

from __future__ import annotations

import warnings

import pytest
import qatkit
import torch
import torchvision

CI_MODELS = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
             "shufflenet_v2_x0_5", "regnet_x_400mf", "vit_b_16"]
ALL_MODELS = torchvision.models.list_models(module=torchvision.models)
SLOW_MODELS = [m for m in ALL_MODELS if m not in CI_MODELS]


def _build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    kwargs: dict = {}
    size = 64
    if name.startswith("vit"):
        kwargs["image_size"] = 28 if name.endswith("14") else 32
        size = kwargs["image_size"]
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
        size = 75 if name == "inception_v3" else 64
    if name.startswith("maxvit"):
        size = 224
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    x = torch.randn(2, 3, size, size)
    for mod in model.modules():  # torchvision zero-initializes some heads (ViT)
        if isinstance(mod, torch.nn.Linear) and not mod.weight.any():
            torch.nn.init.normal_(mod.weight, std=0.02)
    _settle_batchnorm(model, x)
    return model.eval(), x


def _settle_batchnorm(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Give a random-weight model the BN statistics of its own activations, as a trained
    model has; otherwise activations shrink layer after layer below any int8 scale."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


def check_model(name: str) -> None:
    model, x = _build(name)
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(model, {"": qatkit.default_qat_8bit_fake_quant_qconfig},
                                   example_inputs=(x,))
    assert isinstance(qm, torch.fx.GraphModule)
    qm.eval()
    qatkit.set_fake_quant_state(qm, qatkit.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        out = qm(x)
    rel = _rel(ref, out)
    assert rel <= 1e-5, f"{name}: CALIBRATION output differs from float by {rel:.2e}"
    qatkit.set_fake_quant_state(qm, qatkit.FakeQuantState.VALIDATION)
    with torch.no_grad():
        val = qm(x)
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), val.flatten(), dim=0)
    assert torch.isfinite(val).all(), f"{name}: non-finite VALIDATION output"
    assert cos > 0.5, f"{name}: VALIDATION output cosine {cos:.3f} vs float"
    qm.train()
    qatkit.set_fake_quant_state(qm, qatkit.FakeQuantState.QAT)
    qm(x).sum().backward()
    grads = [p.grad for p in qm.parameters() if p.requires_grad]
    assert any(g is not None for g in grads), f"{name}: no gradient reached the parameters"
    assert all(torch.isfinite(g).all() for g in grads if g is not None), f"{name}: NaN grads"


@pytest.mark.parametrize("name", CI_MODELS)
def test_prepare_ci_models(name: str) -> None:
    check_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_MODELS)
def test_prepare_all_models(name: str) -> None:
    check_model(name)
