"""qatkit.calibrate, the data forms it takes, and checkpoints: a calibrated state dict loads
strictly into a model prepared with another observer (the guide's fixed activation scales)
and resuming QAT restores scales, states and BN-freeze flags."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import qatkit
import torch
from qatkit.data import as_batches, model_inputs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.relu(self.bn(self.conv(x))).mean((2, 3)))


def _prepared(qconfig: qatkit.QConfig = qatkit.default_calib_8bit_fake_quant_qconfig,
              seed: int = 0) -> torch.fx.GraphModule:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qatkit.prepare_qat_fx(Net().eval(), {"": qconfig}).eval()


def _scales(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.scale.clone() for n, m in model.named_modules()
            if isinstance(m, qatkit.FakeQuantize)}


def test_calibrate_runs_every_form_of_data_to_the_same_scales(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(3)]
    ref = _prepared()
    summary = qatkit.calibrate(ref, xs, progress=False)
    assert (summary.batches, summary.samples, summary.unobserved, summary.nonfinite) == (
        3, 12, (), 0)
    assert summary.state is qatkit.FakeQuantState.VALIDATION
    assert qatkit.get_fake_quant_state(ref) == {qatkit.FakeQuantState.VALIDATION: 6}
    loader = DataLoader(TensorDataset(torch.cat(xs), torch.zeros(12)), batch_size=4)
    for i, x in enumerate(xs):  # a folder of files, one batch each, in name order
        if i % 2:
            np.save(tmp_path / f"b{i}.npy", x.numpy())
        else:
            torch.save(x, tmp_path / f"b{i}.pt")
    for data in (loader, tmp_path, iter(xs)):  # (images, labels) batches feed the images
        model = _prepared()
        assert qatkit.calibrate(model, data, progress=False).batches == 3
        for name, s in _scales(model).items():
            torch.testing.assert_close(s, _scales(ref)[name], atol=0, rtol=0, msg=name)
    model = _prepared()
    summary = qatkit.calibrate(model, xs, num_batches=1, progress=False,
                               state=qatkit.FakeQuantState.QAT)
    assert summary.batches == 1 and summary.state is qatkit.FakeQuantState.QAT


def test_calibrate_reports_unobserved_fake_quants_and_bad_data() -> None:
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x), self.b(x[:0])  # b only ever sees empty batches

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(Branchy(), {"": qatkit.default_qat_8bit_fake_quant_qconfig})
    with pytest.warns(RuntimeWarning, match="saw no data"):
        summary = qatkit.calibrate(qm, torch.randn(2, 4), progress=False)
    assert summary.unobserved == ("b.activation_post_process",
                                  "getitem_quant.activation_post_process"), summary
    qm = _prepared()
    with pytest.raises(ValueError, match="batch 0 .*failed.*input_fn"):
        qatkit.calibrate(qm, torch.randn(2, 5, 8, 8), progress=False)
    assert qatkit.get_fake_quant_state(qm) == {qatkit.FakeQuantState.CALIBRATION: 6}, \
        "a failed calibration is not switched to VALIDATION"
    with pytest.raises(ValueError, match="tuple of 2 tensors is one batch of 2 inputs"):
        qatkit.calibrate(_prepared(), torch.randn(8, 3, 8, 8).split(4), progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        as_batches("/no/such/folder")
    with pytest.raises(ValueError, match="cannot use a int as data"):
        as_batches(3)
    with pytest.raises(ValueError, match="no FakeQuantize"):
        qatkit.calibrate(Net(), torch.randn(1, 3, 8, 8), progress=False)
    assert model_inputs(Net(), {"x": 1}) == ((), {"x": 1})


def test_calibrated_state_loads_strictly_into_a_fixed_scale_qat_model() -> None:
    """Calibrate with MSE (histograms), save; prepare for QAT with averaging_constant=0 (the
    guide's fixed activation scale), load strictly: the calibrated scales stay through QAT
    steps, and the state is the one the user sets."""
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    calib = _prepared(qatkit.default_calib_8bit_fake_quant_qconfig)
    qatkit.calibrate(calib, [x, x * 0.5], progress=False)
    state = calib.state_dict()
    assert any(k.endswith("observer.histogram") for k in state)
    fixed = qatkit.get_default_qconfig(activation_observer="moving_average",
                                       activation_qkwargs={"averaging_constant": 0.0})
    qat = _prepared(fixed, seed=1)  # other initial weights: the state dict brings them
    qat.load_state_dict(state, strict=True)
    qatkit.set_fake_quant_state(qat, "qat")
    qat.train()
    opt = torch.optim.SGD(qat.parameters(), lr=0.01)
    acts = {n: s for n, s in _scales(calib).items() if "weight" not in n}
    for _ in range(3):
        opt.zero_grad()
        qat(x * 3).sum().backward()  # larger data: a moving scale would follow it
        opt.step()
    for name, s in acts.items():
        torch.testing.assert_close(qat.get_submodule(name).scale, s, atol=0, rtol=0, msg=name)
    # and the other way round: a moving-average state dict into an MSE-prepared model
    back = _prepared(qatkit.default_calib_8bit_fake_quant_qconfig)
    back.load_state_dict(qat.state_dict(), strict=True)


def test_resuming_qat_restores_scales_states_and_bn_freeze(tmp_path) -> None:
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    model = _prepared(qatkit.default_qat_8bit_fake_quant_qconfig)
    qatkit.calibrate(model, x, progress=False, state="qat")
    assert qatkit.freeze_bn_stats(model) == 1
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    fresh = _prepared(qatkit.default_qat_8bit_fake_quant_qconfig, seed=3)
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True), strict=True)
    assert fresh.get_submodule("conv").freeze_bn
    assert qatkit.get_fake_quant_state(fresh) == {qatkit.FakeQuantState.QAT: 6}
    for name, s in _scales(model).items():
        torch.testing.assert_close(fresh.get_submodule(name).scale, s, atol=0, rtol=0)
