"""Trained digits-scale models for the post-training algorithm tests (examples/ptq.py builds
the problem each algorithm fixes)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import qatkit
import torch

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
digits = importlib.import_module("digits")
ptq = importlib.import_module("ptq")


def _train(model: torch.nn.Module, data, epochs: int) -> torch.nn.Module:
    torch.manual_seed(digits.SEED)
    with digits.torch_threads(1):
        return digits.train_float(model, data, epochs=epochs)


@pytest.fixture(autouse=True)
def one_thread():
    """The models are tiny: one thread is as fast, and does not stall when other processes
    keep the cores busy."""
    with digits.torch_threads(1):
        yield


@pytest.fixture(scope="session")
def data():
    return digits.load_digits_data()


@pytest.fixture(scope="session")
def calib(data):
    """256 training images in two batches."""
    return list(data.train_x[:256].split(128))


@pytest.fixture(scope="session")
def accuracy(data):
    def acc(model: torch.nn.Module) -> float:
        with digits.torch_threads(1):
            return digits.evaluate(model, (data.test_x, data.test_y))
    return acc


@pytest.fixture(scope="session")
def digits_float(data):
    torch.manual_seed(digits.SEED)
    return _train(digits.DigitsNet(), data, epochs=6)


@pytest.fixture(scope="session")
def separable_float(data):
    torch.manual_seed(digits.SEED)
    return _train(ptq.SeparableNet(), data, epochs=6)


@pytest.fixture(scope="session")
def token_float(data):
    torch.manual_seed(digits.SEED)
    return _train(ptq.TokenNet(), data, epochs=6)


@pytest.fixture(scope="session")
def make_calibrated(data, calib):
    """``make_calibrated(float_model, weight_bits=8, qconfig=...)``: prepared, calibrated on
    ``calib`` (MSE activations), weights emulated at ``weight_bits``."""
    def make(float_model, weight_bits: int = 8,
             qconfig=qatkit.default_calib_8bit_fake_quant_qconfig):
        with digits.torch_threads(1):
            return ptq.calibrated(float_model, data, qconfig=qconfig, weight_bits=weight_bits,
                                  batches=calib)
    return make


@pytest.fixture(scope="session")
def digits_qat(digits_float, make_calibrated):
    return make_calibrated(digits_float)
