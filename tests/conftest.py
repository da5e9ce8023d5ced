"""Fixtures shared by the whole suite."""

from __future__ import annotations

import warnings
from typing import Callable

import pytest
import qatkit
import torch
from qatkit import _deprecation
from torch import fx, nn


def _calibrate(model: nn.Module, x: torch.Tensor, qconfig: qatkit.QConfig | None = None,
               settle_batchnorm: bool = False) -> fx.GraphModule:
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
    qatkit.set_fake_quant_state(calib, "calibration")
    with torch.no_grad():
        calib(x)
    qatkit.set_fake_quant_state(calib, "validation")
    return calib


@pytest.fixture(scope="session")
def calibrate() -> Callable[..., fx.GraphModule]:
    """``calibrate(model, x, qconfig=None, settle_batchnorm=False)``: ``model`` prepared (with
    ``qconfig``, default int8 QAT, warnings silenced), calibrated on ``x``, in VALIDATION state
    and eval mode.  ``settle_batchnorm=True`` first sets the float model's BatchNorm statistics
    from ``x`` (in place) and puts it in eval mode."""
    return _calibrate


@pytest.fixture
def fresh_warnings():
    """Each old name warns once per process: forget which ones warned, for this test."""
    saved = set(_deprecation._WARNED)
    _deprecation._WARNED.clear()
    yield
    _deprecation._WARNED.clear()
    _deprecation._WARNED.update(saved)
