"""Shared by the sensitivity / mixed-precision / distribution / bad-case tests: the trained
FaultNet of examples/debug_walkthrough.py with each injected fault, calibrated once per
session (each test gets its own copies, so no test sees another's changes)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Callable

import pytest
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:  # debug_walkthrough.py and digits.py
    sys.path.insert(0, str(EXAMPLES))

import debug_walkthrough as dw  # noqa: E402
import digits  # noqa: E402


@pytest.fixture
def one_thread():
    """The models are tiny: one thread is as fast, and does not stall on a busy machine."""
    with digits.torch_threads(1):
        yield


@pytest.fixture(scope="session")
def fault_models() -> Callable[[str], tuple[nn.Module, nn.Module]]:
    """``fault -> (float model with the fault, its calibrated model)``, fresh copies on every
    call of models built once per session."""
    data, float_model = dw.trained()
    cache: dict[str, tuple[nn.Module, nn.Module]] = {}

    def get(fault: str) -> tuple[nn.Module, nn.Module]:
        if fault not in cache:
            model = dw.with_fault(float_model, fault)
            with digits.torch_threads(1):
                cache[fault] = (model, dw.calibrated(model, data))
        return copy.deepcopy(cache[fault])
    return get
