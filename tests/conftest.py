"""Fixtures shared by the whole suite."""

from __future__ import annotations

import warnings
from typing import Callable

import pytest
import qatkit
import torch
from torch import fx, nn


def _calibrate(model: nn.Module, x: torch.Tensor, qconfig: qatkit.QConfig | None = None,
               settle_batchnorm: bool = True) -> fx.GraphModule:
    if settle_batchnorm:  # BatchNorm statistics of this data, so activations stay in range
        for bn in model.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.reset_running_stats()
                bn.momentum = None
        model.train()
        with torch.no_grad():
            model(x)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calib = qatkit.prepare_qat_fx(
            model, {"": qconfig or qatkit.default_qat_8bit_fake_quant_qconfig},
            example_inputs=(x,)).eval()
    qatkit.set_fake_quantize(calib, "calibration")
    with torch.no_grad():
        calib(x)
    qatkit.set_fake_quantize(calib, "validation")
    return calib


@pytest.fixture
def calibrate() -> Callable[..., fx.GraphModule]:
    """``calibrate(model, x, qconfig=None, settle_batchnorm=True)``: the model (its BatchNorm
    statistics first set from ``x``, in place) prepared, calibrated on ``x`` and in VALIDATION
    state, in eval mode."""
    return _calibrate
