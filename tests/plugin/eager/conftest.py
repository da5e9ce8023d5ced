"""Fixtures of the eager-mode tests."""

from __future__ import annotations

import pytest
import torch
from eager_models import digits_example


@pytest.fixture(scope="session")
def digits_trained():
    """(the digits module, its data, a trained DigitsNet) -- 4 epochs, one thread."""
    d = digits_example
    data = d.load_digits_data()
    torch.manual_seed(d.SEED)
    with d.torch_threads(1):
        model = d.train_float(d.DigitsNet(), data, epochs=4)
    return d, data, model
