"""Tracing for prepare_qat_fx (qatkit.fx.tracer): leaf modules, wrapped functions,
concrete_args, and TraceFailure messages that name the module, the source line and the fix."""

from __future__ import annotations

import inspect
import warnings

import pytest
import qatkit
import torch
from qatkit.fx import TraceFailure
from qatkit.fx import tracer as tracer_mod
from torch import fx, nn

QC = qatkit.default_qat_8bit_fake_quant_qconfig


@pytest.fixture(autouse=True)
def _restore_registries():
    """register_leaf_module / wrap fill global registries: undo them after each test."""
    leaves = set(tracer_mod._LEAF_MODULE_TYPES)
    wrapped = list(tracer_mod._WRAPPED_FUNCTIONS)
    yield
    tracer_mod._LEAF_MODULE_TYPES.clear()
    tracer_mod._LEAF_MODULE_TYPES.update(leaves)
    tracer_mod._WRAPPED_FUNCTIONS[:] = wrapped


def _line_of(obj, text: str) -> int:
    """The line number in this file of the line of ``obj``'s source containing ``text``."""
    lines, start = inspect.getsourcelines(obj)
    for i, line in enumerate(lines):
        if text in line:
            return start + i
    raise AssertionError(f"{text!r} not in the source of {obj}")


def _prepare_quietly(model: nn.Module, **kwargs) -> tuple[fx.GraphModule, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = qatkit.prepare_qat_fx(model, {"": QC}, **kwargs)
    return gm, [str(w.message) for w in caught]


# -- models that do not trace as they are ----------------------------------------------------
def sign_of_sum(x):
    if x.sum() > 0:  # control flow on a tensor, in a module-level function
        return x
    return -x


@qatkit.fx.wrap
def wrapped_sign_of_sum(x):
    if x.sum() > 0:
        return x
    return -x


class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # control flow on a tensor, in a submodule
            return x
        return x * 0.5


class IterRows(nn.Module):
    def forward(self, x):
        out = x
        for row in x:  # iterating over a Proxy, in a submodule
            out = out + row
        return out


class WithGate(nn.Module):
    def __init__(self, gate: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.gate = gate if gate is not None else Gate()
        self.conv2 = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv2(self.gate(self.conv(x)))


class CallsFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.conv2 = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv2(sign_of_sum(self.conv(x)))


class CallsWrapped(CallsFunction):
    def forward(self, x):
        return self.conv2(wrapped_sign_of_sum(self.conv(x)))


class FlagModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, y=None, mode="double"):
        z = self.conv(x)
        if y is not None:
            z = z + y
        if mode == "double":  # control flow on a keyword argument
            z = z * 2
        return z


class RootLoop(nn.Module):
    def forward(self, x):
        out = x
        for row in x:  # iterating over a Proxy, in the root's forward
            out = out + row
        return out


# -- TraceFailure messages -------------------------------------------------------------------
def test_control_flow_in_submodule_says_register_leaf():
    with pytest.raises(TraceFailure) as info:
        qatkit.prepare_qat_fx(WithGate(), {"": QC})
    msg = str(info.value)
    assert "'gate' (Gate)" in msg, msg
    assert f"test_tracer.py:{_line_of(Gate.forward, 'if x.mean() > 0')}" in msg, msg
    assert "`if x.mean() > 0:" in msg, msg
    assert "control flow" in msg
    assert "qatkit.fx.register_leaf_module(Gate)" in msg, msg
    assert "'leaf_module_names': ['gate']" in msg, msg
    assert "wrap" not in msg and "concrete_args" not in msg, "one fix, not three: " + msg
    assert isinstance(info.value.__cause__, Exception), "the torch.fx error must be chained"


def test_iteration_over_proxy_in_submodule_says_register_leaf():
    with pytest.raises(TraceFailure) as info:
        qatkit.prepare_qat_fx(WithGate(IterRows()), {"": QC})
    msg = str(info.value)
    assert "'gate' (IterRows)" in msg, msg
    assert f"test_tracer.py:{_line_of(IterRows.forward, 'for row in x')}" in msg, msg
    assert "iterat" in msg, msg
    assert "qatkit.fx.register_leaf_module(IterRows)" in msg, msg
    assert "concrete_args" not in msg, msg


def test_control_flow_in_function_says_wrap():
    with pytest.raises(TraceFailure) as info:
        qatkit.prepare_qat_fx(CallsFunction(), {"": QC})
    msg = str(info.value)
    assert "CallsFunction" in msg
    assert f"test_tracer.py:{_line_of(sign_of_sum, 'if x.sum() > 0')}" in msg, msg
    assert "in sign_of_sum()" in msg, msg
    assert "wrap the function `sign_of_sum`" in msg and "@qatkit.fx.wrap" in msg, msg
    assert "register_leaf_module" not in msg and "concrete_args" not in msg, msg


def test_control_flow_on_keyword_argument_says_concrete_args():
    with pytest.raises(TraceFailure) as info:
        qatkit.prepare_qat_fx(FlagModel(), {"": QC})
    msg = str(info.value)
    assert "root module (FlagModel)" in msg, msg
    assert f"test_tracer.py:{_line_of(FlagModel.forward, 'if mode ==')}" in msg, msg
    assert "concrete_args': {'mode': 'double'}" in msg, msg
    assert "register_leaf_module" not in msg and "wrap" not in msg, msg


def test_iteration_in_root_forward_says_wrap():
    with pytest.raises(TraceFailure) as info:
        qatkit.prepare_qat_fx(RootLoop(), {"": QC})
    msg = str(info.value)
    assert "root module (RootLoop)" in msg
    assert f"test_tracer.py:{_line_of(RootLoop.forward, 'for row in x')}" in msg, msg
    assert "@qatkit.fx.wrap" in msg, msg
    assert "concrete_args" not in msg, msg


# -- the three fixes work --------------------------------------------------------------------
def _assert_same_as_float(gm: fx.GraphModule, model: nn.Module, *args, **kwargs) -> None:
    qatkit.set_fake_quant_state(gm, "calibration")
    gm.eval()
    model.eval()
    torch.testing.assert_close(gm(*args, **kwargs), model(*args, **kwargs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["register", "custom_config"])
def test_leaf_module_is_one_float_node(how):
    torch.manual_seed(0)
    model = WithGate()
    if how == "register":
        assert qatkit.fx.register_leaf_module(Gate) is Gate  # usable as a class decorator
        assert Gate in qatkit.fx.list_leaf_modules()
        gm, warned = _prepare_quietly(model)
    else:
        gm, warned = _prepare_quietly(
            model, prepare_custom_config_dict={"leaf_module_names": ["gate"]})
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "gate"]
    assert len(calls) == 1, gm.code
    assert type(gm.gate) is Gate, "a leaf module qatkit does not know stays float"
    assert not hasattr(gm.gate, "activation_post_process")
    assert any("Gate: gate" in w for w in warned), warned
    # its float output is quantized again before conv2
    assert gm.gate_quant.activation_post_process is not None
    x = torch.randn(2, 3, 8, 8)
    _assert_same_as_float(gm, model, x)
    _assert_same_as_float(gm, model, -x.abs())  # the other branch of Gate


def test_leaf_module_types_in_custom_config():
    gm, _ = _prepare_quietly(WithGate(), prepare_custom_config_dict={"leaf_module_types": [Gate]})
    assert type(gm.gate) is Gate
    assert Gate not in qatkit.fx.list_leaf_modules(), "a per-call leaf type is not global"


def test_register_leaf_module_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        qatkit.fx.register_leaf_module(sign_of_sum)
    with pytest.raises(TypeError, match="wrap takes a function"):
        qatkit.fx.wrap(3)


def test_underscore_functions_cannot_be_wrapped():
    """torch.fx skips names starting with '_': wrapping one would silently do nothing."""
    def _private(x):
        return x

    with pytest.raises(ValueError, match="'_private'.*Rename it"):
        qatkit.fx.wrap(_private)
    assert _private not in qatkit.fx.list_wrapped_functions()
    with pytest.raises(ValueError, match="cannot wrap '_private'"):
        qatkit.fx.symbolic_trace(nn.Identity(), wrapped_functions=[_private])
    with pytest.raises(qatkit.fx.TraceFailure, match="rename it without the leading '_'"):
        qatkit.fx.symbolic_trace(_CallsPrivate())


def _branchy(x):
    return torch.relu(x) if x.sum() > 0 else x


class _CallsPrivate(nn.Module):
    def forward(self, x):
        return _branchy(x)


def test_wrapped_function_is_one_float_node():
    torch.manual_seed(0)
    model = CallsWrapped()
    assert wrapped_sign_of_sum in qatkit.fx.list_wrapped_functions()
    gm, warned = _prepare_quietly(model)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [wrapped_sign_of_sum], gm.code
    assert any("wrapped_sign_of_sum: wrapped_sign_of_sum" in w for w in warned), warned
    x = torch.randn(2, 3, 8, 8)
    _assert_same_as_float(gm, model, x)


def test_wrapped_functions_in_custom_config():
    gm, _ = _prepare_quietly(CallsFunction(),
                             prepare_custom_config_dict={"wrapped_functions": [sign_of_sum]})
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [sign_of_sum]
    assert sign_of_sum not in qatkit.fx.list_wrapped_functions()


def test_concrete_args_keep_the_keyword_signature():
    torch.manual_seed(0)
    model = FlagModel().eval()
    gm, warned = _prepare_quietly(
        model, prepare_custom_config_dict={"concrete_args": {"y": None, "mode": "double"}})
    assert not warned, f"no op should be reported for the concrete_args checks: {warned}"
    assert list(inspect.signature(gm.forward).parameters) == ["x", "y", "mode"]
    assert inspect.signature(gm.forward).parameters["mode"].default == "double"
    x = torch.randn(2, 3, 8, 8)
    _assert_same_as_float(gm, model, x)
    _assert_same_as_float(gm, model, x, mode="double")
    _assert_same_as_float(gm, model, x, None, "double")
    with pytest.raises(AssertionError, match="mode has been specialized"):
        gm(x, mode="single")


def test_concrete_args_for_some_arguments_only():
    torch.manual_seed(0)
    model = FlagModel().eval()
    gm, _ = _prepare_quietly(model, prepare_custom_config_dict={"concrete_args": {"mode": "x"}})
    assert list(inspect.signature(gm.forward).parameters) == ["x", "y", "mode"]
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8)
    _assert_same_as_float(gm, model, x, y=y, mode="x")
    assert isinstance(gm.y_quant, qatkit.nn.qat.QuantStub), "tensor input y is quantized"


def test_symbolic_trace_leaves_the_model_alone():
    torch.manual_seed(0)
    model = WithGate()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = qatkit.fx.symbolic_trace(model, leaf_modules=[Gate])
    assert isinstance(gm, fx.GraphModule) and type(gm).__name__ == "WithGate"
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "gate",
                                                                           "conv2"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_unknown_custom_config_key():
    with pytest.raises(ValueError, match="unknown prepare_custom_config_dict keys.*leaf_modules"):
        qatkit.prepare_qat_fx(WithGate(), {"": QC},
                              prepare_custom_config_dict={"leaf_modules": [Gate]})
