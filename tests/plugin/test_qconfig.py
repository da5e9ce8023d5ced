"""QConfig, get_default_qconfig and every named default qconfig exported by qatkit."""

from __future__ import annotations

import dataclasses
import doctest
import math
import pickle

import pytest
import qatkit
import qatkit.qconfig as qconfig_module
import torch
from qatkit import FakeQuantize, LSQFakeQuantize, QConfig, get_default_qconfig
from qatkit.observers import (
    OBSERVERS,
    FixedScaleObserver,
    KLObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
)

MA = MovingAverageMinMaxObserver
# name: (activation fake quant, activation dtype, activation observer,
#        weight fake quant, weight dtype)   weights: per channel 0, current range (MA, c=1)
NAMED = {
    "default_qat_8bit_fake_quant_qconfig": (FakeQuantize, "qint8", MA, FakeQuantize, "qint8"),
    "default_qat_8bit_out_fake_quant_qconfig": (FakeQuantize, "qint8", MA, FakeQuantize, "qint8"),
    "default_calib_8bit_fake_quant_qconfig": (FakeQuantize, "qint8", MSEObserver, FakeQuantize,
                                              "qint8"),
    "default_calib_8bit_out_fake_quant_qconfig": (FakeQuantize, "qint8", MSEObserver,
                                                  FakeQuantize, "qint8"),
    "default_qat_8bit_lsq_quant_qconfig": (LSQFakeQuantize, "qint8", MA, LSQFakeQuantize,
                                           "qint8"),
    "default_qat_8bit_weight_32bit_out_fake_quant_qconfig": (None, None, None, FakeQuantize,
                                                             "qint8"),
    "default_calib_8bit_weight_32bit_out_fake_quant_qconfig": (None, None, None, FakeQuantize,
                                                               "qint8"),
    "default_qat_8bit_weight_16bit_act_fake_quant_qconfig": (FakeQuantize, "qint16", MA,
                                                             FakeQuantize, "qint8"),
    "default_calib_8bit_weight_16bit_act_fake_quant_qconfig": (FakeQuantize, "qint16",
                                                               MSEObserver, FakeQuantize, "qint8"),
    "default_qat_16bit_fake_quant_qconfig": (FakeQuantize, "qint16", MA, FakeQuantize, "qint16"),
    "default_calib_16bit_fake_quant_qconfig": (FakeQuantize, "qint16", MSEObserver, FakeQuantize,
                                               "qint16"),
    "default_qat_4bit_weight_8bit_act_fake_quant_qconfig": (FakeQuantize, "qint8", MA,
                                                            FakeQuantize, "qint4"),
    "default_calib_4bit_weight_8bit_act_fake_quant_qconfig": (FakeQuantize, "qint8",
                                                              MSEObserver, FakeQuantize, "qint4"),
}


def test_every_exported_default_qconfig_is_checked_here():
    exported = {n for n in qatkit.__all__ if n.startswith("default_") and n.endswith("qconfig")}
    assert exported == set(NAMED)


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_default_qconfig_builds_the_documented_fake_quants(name):
    act_cls, act_dtype, act_obs, w_cls, w_dtype = NAMED[name]
    qc = getattr(qatkit, name)
    assert isinstance(qc, QConfig)
    if act_cls is None:
        assert qc.activation is None, "32-bit out: the output is not quantized"
    else:
        act = qc.activation()
        assert type(act) is act_cls and type(act.observer) is act_obs
        assert act.dtype == act_dtype and act.observer.bits == act.bits
        assert act.ch_axis is None and act.observer.ch_axis is None
        assert act.state is qatkit.FakeQuantState.QAT and not act.has_scale
    w = qc.weight()
    assert type(w) is w_cls and w.dtype == w_dtype
    assert w.ch_axis == 0 and w.observer.ch_axis == 0
    assert type(w.observer) is MA and w.observer.averaging_constant == 1.0
    weight = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    w(weight)
    w(weight * 2)
    if w_cls is LSQFakeQuantize:  # learned, initialized per channel from the first weight
        expected = 2 * weight.abs().mean(dim=(1, 2, 3)) / math.sqrt(2 ** (w.bits - 1) - 1)
        torch.testing.assert_close(w.scale.detach(), expected, rtol=1e-6, atol=0)
    else:  # the weight scale follows the current weight, per output channel, exactly
        expected = (weight * 2).abs().amax(dim=(1, 2, 3)) / 2 ** (w.bits - 1)
        torch.testing.assert_close(w.scale.detach(), expected, atol=0, rtol=0)


def test_factories_build_independent_modules():
    qc = qatkit.default_qat_8bit_fake_quant_qconfig
    a, b = qc.activation(), qc.activation()
    assert a is not b and a.observer is not b.observer
    a(torch.tensor([2.0]))
    assert a.has_scale and not b.has_scale
    again = pickle.loads(pickle.dumps(qc.weight))()  # factories are picklable (multiprocessing)
    assert type(again) is FakeQuantize and again.ch_axis == 0


def test_get_default_qconfig_defaults():
    qc = get_default_qconfig()
    act, w = qc.activation(), qc.weight()
    assert type(act) is FakeQuantize and type(act.observer) is MinMaxObserver
    assert act.bits == 8 and act.ch_axis is None
    assert type(w.observer) is MA and w.observer.averaging_constant == 1.0 and w.ch_axis == 0


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_every_activation_observer_name(name):
    kwargs = {"scale": 0.25} if name == "fixed_scale" else {}
    qc = get_default_qconfig(activation_observer=name, activation_qkwargs=kwargs)
    act = qc.activation()
    assert type(act.observer) is OBSERVERS[name]
    if name == "fixed_scale":
        assert act.scale.tolist() == [0.25]


def test_observer_arguments_reach_the_observer():
    qc = get_default_qconfig(activation_observer="percentile",
                             activation_qkwargs={"percentile": 99.9, "bins": 256,
                                                 "dtype": "qint16"},
                             weight_observer="mse", weight_qkwargs={"num_candidates": 50})
    act, w = qc.activation(), qc.weight()
    assert type(act.observer) is PercentileObserver
    assert (act.observer.percentile, act.observer.bins, act.bits) == (99.9, 256, 16)
    assert type(w.observer) is MSEObserver and w.observer.num_candidates == 50
    assert w.ch_axis == 0
    lsq = get_default_qconfig(activation_fake_quant="lsq", weight_fake_quant=None)
    assert type(lsq.activation()) is LSQFakeQuantize and lsq.weight is None


@pytest.mark.parametrize("kwargs, match", [
    ({"activation_observer": "minmax"}, r"unknown activation_observer 'minmax': choose one of "
                                        r"\['fixed_scale', 'kl', 'min_max'"),
    ({"weight_observer": "histogram"}, "unknown weight_observer 'histogram': choose one of"),
    ({"activation_fake_quant": "pact"}, r"unknown activation_fake_quant 'pact'.*'fake_quant', "
                                        r"'lsq'"),
    ({"activation_qkwargs": {"dtype": "qint3"}}, "choose 'qint8' or 'qint16'"),
    ({"weight_qkwargs": {"dtype": 32}}, "choose 'qint8' or 'qint16'"),
    ({"activation_observer": "percentile", "activation_qkwargs": {"percentile": -1.0}},
     r"percentile must be in \(0, 100\]"),
    ({"activation_observer": "fixed_scale"}, "bad activation_qkwargs.*FixedScaleObserver"),
    ({"activation_qkwargs": {"averaging": 0.1}}, "bad activation_qkwargs.*MinMaxObserver"),
    ({"weight_observer": "kl"}, "per-tensor only"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_default_qconfig(**kwargs)


def test_kl_works_for_activations():
    act = get_default_qconfig(activation_observer="kl").activation()
    assert type(act.observer) is KLObserver


def test_qconfig_dataclass_validates_itself():
    qc = QConfig(activation=FakeQuantize.with_args(dtype="qint16"), weight=None)
    assert qc.activation().bits == 16 and qc.weight is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        qc.weight = FakeQuantize.with_args()
    with pytest.raises(ValueError, match="QConfig.activation got a FakeQuantize instance.*"
                                         "with_args"):
        QConfig(activation=FakeQuantize(), weight=None)
    with pytest.raises(ValueError, match="QConfig.weight must be a factory"):
        QConfig(activation=None, weight="fake_quant")
    fixed = QConfig(activation=FakeQuantize.with_args(observer=FixedScaleObserver, scale=0.5),
                    weight=None)
    assert fixed.activation().scale.tolist() == [0.5]


def test_docstring_examples_are_true():
    globs = dict(vars(qconfig_module), torch=torch)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(verbose=False)
    tests = [t for t in finder.find(qconfig_module, globs=globs) if t.examples]
    assert {t.name.rsplit(".", 1)[-1] for t in tests} >= {"QConfig", "get_default_qconfig"}
    for t in tests:
        runner.run(t, clear_globs=False)
    assert runner.summarize(verbose=False).failed == 0
    for t in tests:  # both examples build a working QConfig
        assert isinstance(t.globs["qc"], QConfig), t.name
        assert t.globs["qc"].activation().bits in (8, 16)
