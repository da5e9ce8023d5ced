"""get_raw_features: names per call, multi-input ops, preserve_int, filters, no mutation."""

from __future__ import annotations

import copy

import pytest
import qatkit
import torch
from qatkit.profiler import FeatureRecord, get_raw_features
from torch import nn


class TwoBranch(nn.Module):
    """A shared Sigmoid called twice, a functional add and a cat of the two branches."""

    def __init__(self, shared: bool = True) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.act = nn.Sigmoid()
        self.act2 = self.act if shared else nn.Sigmoid()   # convert_fx needs one per call
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv1(x))
        b = self.act2(self.conv2(a))
        return torch.cat([a + b, self.relu(b - 0.5)], 1)


@pytest.fixture(scope="module")
def models(calibrate):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    m = TwoBranch().eval()
    qm = calibrate(m, x)
    unshared = TwoBranch(shared=False).eval()
    unshared.load_state_dict(m.state_dict())
    return m, qm, qatkit.convert_fx(calibrate(unshared, x)), x


def _by(records: list[FeatureRecord], name: str, attr: str = "output", arg: int = 0):
    hits = [r for r in records if r.name == name and r.attr == attr and r.arg == arg]
    assert len(hits) == 1, f"{name}/{attr}/{arg}: {hits}"
    return hits[0]


def test_float_model_records_every_op_in_order(models) -> None:
    m, _, _, x = models
    recs = get_raw_features(m, x)
    outputs = [r.name for r in recs if r.attr == "output"]
    assert outputs == ["conv1", "act(0)", "conv2", "act(1)", "add", "sub", "relu", "cat"]
    with torch.no_grad():
        a = torch.sigmoid(m.conv1(x))
        b = torch.sigmoid(m.conv2(a))
    assert torch.equal(_by(recs, "act(0)").data, a)
    assert torch.equal(_by(recs, "act(1)").data, b)
    # the shared module: one record per call, named per call
    assert torch.equal(_by(recs, "act(1)", "input").data, m.conv2(a).detach())
    # multi-input ops: one input record per tensor argument, Arg 0 / 1
    assert torch.equal(_by(recs, "add", "input", 0).data, a)
    assert torch.equal(_by(recs, "add", "input", 1).data, b)
    assert torch.equal(_by(recs, "cat", "input", 0).data, a + b)
    assert torch.equal(_by(recs, "cat", "input", 1).data, torch.relu(b - 0.5))
    r = _by(recs, "cat")
    assert (r.module_type, r.scale, r.dtype, r.is_int) == ("cat", None, "float32", False)
    assert "shape=[2, 8, 8, 8]" in repr(r)


def test_inplace_ops_do_not_rewrite_records(models) -> None:
    m, _, _, x = models
    recs = get_raw_features(m, x)
    sub_out = _by(recs, "sub").data       # relu(inplace=True) then runs on this very tensor
    assert (sub_out < 0).any(), "the record was overwritten by the in-place relu"
    assert torch.equal(_by(recs, "relu", "input").data, sub_out)
    assert (_by(recs, "relu").data >= 0).all()


def test_calibrated_model_records_scales(models) -> None:
    _, qm, _, x = models
    recs = get_raw_features(qm, x)
    outputs = [r.name for r in recs if r.attr == "output"]
    assert outputs[:5] == ["x_quant", "conv1", "act(0)", "conv2", "act(1)"]
    act1 = _by(recs, "act(1)")
    assert act1.module_type == "Sigmoid" and act1.dtype == "qint8"
    assert act1.scale == pytest.approx(float(qm.act.activation_post_process.scale))
    # an input carries its producer's scale
    assert _by(recs, "act(1)", "input").scale == pytest.approx(
        float(qm.conv2.activation_post_process.scale))
    # two-input FunctionalOps
    add_in = [r for r in recs if r.name == "add" and r.attr == "input"]
    assert [r.arg for r in add_in] == [0, 1] and _by(recs, "add").module_type == "FunctionalOp[add]"


def test_preserve_int_gives_the_integers(models) -> None:
    _, _, im, x = models
    floats = get_raw_features(im, x)
    ints = get_raw_features(im, x, preserve_int=True)
    assert len(floats) == len(ints)
    n_int = 0
    for f, q in zip(floats, ints, strict=True):
        assert (f.name, f.attr, f.arg, f.scale, f.dtype) == (q.name, q.attr, q.arg, q.scale,
                                                             q.dtype)
        if f.scale is None:
            assert torch.equal(f.data, q.data)
            continue
        n_int += 1
        assert q.is_int and q.data.dtype == torch.int32
        assert int(q.data.min()) >= -128 and int(q.data.max()) <= 127
        torch.testing.assert_close(q.data.float() * f.scale, f.data, atol=1e-6, rtol=0)
    assert n_int >= 10


def test_prefix_and_type_filters(models) -> None:
    m, qm, _, x = models
    assert {r.name for r in get_raw_features(m, x, prefixes=["act"])} == {"act(0)", "act(1)"}
    assert {r.name for r in get_raw_features(m, x, types=[nn.Conv2d])} == {"conv1", "conv2"}
    assert {r.name for r in get_raw_features(m, x, types=[torch.cat])} == {"cat"}
    assert {r.name for r in get_raw_features(qm, x, types=["add"])} == {"add"}
    assert {r.name for r in get_raw_features(qm, x, types=["ConvReLU2d", "Conv2d"])} <= {
        "conv1", "conv2"}


def test_wrong_number_of_inputs(models) -> None:
    m, _, _, x = models
    with pytest.raises(ValueError, match=r"takes 1 input\(s\) \['x'\] but 0 were given"):
        get_raw_features(m, ())


def test_model_is_not_mutated_and_calibration_state_warns(models) -> None:
    m, qm, _, x = models
    train = copy.deepcopy(m).train()
    calib = copy.deepcopy(qm)
    qatkit.set_fake_quant_state(calib, "calibration")
    before = copy.deepcopy(calib.state_dict())  # tensors, and the fused modules' extra state
    get_raw_features(train, x)
    assert train.training and all(mod.training for mod in train.modules())
    with pytest.warns(RuntimeWarning, match="CALIBRATION state"):
        recs = get_raw_features(calib, x)
    after = calib.state_dict()
    assert all(torch.equal(before[k], after[k]) if isinstance(after[k], torch.Tensor)
               else before[k] == after[k] for k in before)
    assert qatkit.get_fake_quant_state(calib) == {qatkit.FakeQuantState.CALIBRATION: 10}
    # float data (fake quantization off) shown with the calibrated scales
    assert _by(recs, "conv1").scale == pytest.approx(
        float(qm.conv1.activation_post_process.scale))


def test_records_carry_kind_role_and_source_from_the_annotation(models) -> None:
    m, qm, im, x = models
    from qatkit.annotation import annotation_by_name

    for model in (qm, im):
        recs = get_raw_features(model, x)
        anns = annotation_by_name(model)
        for r in recs:
            assert (r.kind, r.role) == (anns[r.name].kind, anns[r.name].role), r
        stub_in = _by(recs, "x_quant", "input")
        assert (stub_in.kind, stub_in.source, stub_in.source_kind) == ("quant_stub", "x",
                                                                       "input")
        assert (_by(recs, "conv1", "input").source, _by(recs, "conv1").source) == ("x_quant",
                                                                                   None)
        assert _by(recs, "add").kind == "add" and _by(recs, "cat", "input", 1).source == "relu"
    # a float model: the annotate pass's kinds of its trace, no scales
    recs = get_raw_features(m, x)
    assert [_by(recs, n).kind for n in ("conv1", "act(0)", "add", "cat")] == [
        "conv", "sigmoid", "add", "cat"]
    assert _by(recs, "conv1", "input").source_kind == "input"


class Reshaped(nn.Module):
    """A data-moving op (flatten) between the conv and the linear, and a size read."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 2, 1), nn.Linear(2 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        return self.fc(torch.flatten(self.conv(x), 1).reshape(n, -1))


def test_capture_sources_through_data_moving_ops_tensors_and_calls(calibrate) -> None:
    from qatkit.profiler.core.capture import capture_model

    x = torch.randn(2, 3, 8, 8)
    qm = calibrate(Reshaped().eval(), x)
    cap = capture_model(qm, x, records=True, keep=["conv"])
    fc_in = _by(cap.records, "fc", "input")
    assert (fc_in.source, fc_in.source_kind) == ("conv", "conv")  # past flatten and reshape
    assert cap.tensors["size"] is False and cap.tensors["conv"] is True
    assert cap.calls["conv"] == 1 and cap.calls["fc"] == 1
    with torch.no_grad():
        assert torch.equal(cap.kept["conv"], qm.conv(qm.x_quant(x)))
        assert torch.equal(cap.output, qm(x))
    assert "Capture(model: Reshaped" in repr(cap) and "tensor(" not in repr(cap)
