"""prepare_qat_fx (qatkit.fx.prepare / fuse / naming): structure and numbers of the prepared
model — fusion, named op modules, data-moving ops, quant stubs, provenance, QAT, state_dict."""

from __future__ import annotations

import copy
import inspect
import operator
import warnings

import pytest
import qatkit
import torch
import torch.nn.functional as F
from qatkit.nn import qat
from torch import fx, nn

Q8 = qatkit.default_qat_8bit_fake_quant_qconfig
Q16 = qatkit.default_qat_8bit_weight_16bit_act_fake_quant_qconfig
Q32 = qatkit.default_qat_8bit_weight_32bit_out_fake_quant_qconfig
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# -- helpers ---------------------------------------------------------------------------------
def _prepare(model: nn.Module, qconfig_dict: dict | None = None, **kwargs,
             ) -> tuple[fx.GraphModule, list[str]]:
    """prepare_qat_fx, returning the warnings' messages too."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = qatkit.prepare_qat_fx(model, qconfig_dict or {"": Q8}, **kwargs)
    return gm, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that folding is tested."""
    for m in model.modules():
        if isinstance(m, BN_TYPES):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _assert_close_rel(out, ref, rel: float = 1e-5) -> None:
    """``out`` equals ``ref`` within ``rel`` of ``ref``'s largest magnitude."""
    if isinstance(ref, dict):
        assert out.keys() == ref.keys()
        for k in ref:
            _assert_close_rel(out[k], ref[k], rel)
        return
    if isinstance(ref, (tuple, list)):
        assert len(out) == len(ref)
        for o, r in zip(out, ref, strict=True):
            _assert_close_rel(o, r, rel)
        return
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item()
    assert err <= rel * max(scale, 1e-12), f"max error {err:.3g} vs {rel} * {scale:.3g}"


def _calibration_output(gm: fx.GraphModule, *args, **kwargs):
    gm.eval()
    qatkit.set_fake_quant_state(gm, "calibration")
    with torch.no_grad():
        return gm(*args, **kwargs)


def _calibrate_then_validate(gm: fx.GraphModule, batches) -> fx.GraphModule:
    gm.eval()
    qatkit.set_fake_quant_state(gm, "calibration")
    with torch.no_grad():
        for b in batches:
            gm(*b)
    qatkit.set_fake_quant_state(gm, "validation")
    return gm


def _on_grid(y: torch.Tensor, fq: qatkit.FakeQuantize) -> bool:
    """``y`` is a multiple of ``fq``'s (per-tensor) scale, inside its integer range."""
    q = y.detach() / fq.scale
    return bool(torch.allclose(q, q.round(), atol=1e-3)
                and q.min() >= fq.quant_min - 1e-3 and q.max() <= fq.quant_max + 1e-3)


def _fake_quants(gm: nn.Module) -> list[str]:
    return sorted(n for n, m in gm.named_modules() if isinstance(m, qatkit.FakeQuantize))


def _standalone_bn(gm: fx.GraphModule) -> list[str]:
    """BatchNorms that are not the folded ``bn`` child of a fused QAT conv/linear."""
    fused_bns = {id(m.bn) for m in gm.modules() if hasattr(m, "fused_name") and m.bn is not None}
    return [n for n, m in gm.named_modules() if isinstance(m, BN_TYPES) and id(m) not in fused_bns]


# -- call signature, no mutation -------------------------------------------------------------
class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.lin = nn.Linear(5, 4)

    def forward(self, x, z, scale=2.0):
        y = F.relu(self.bn(self.conv(x))) * scale
        return {"y": y, "w": self.lin(z) + y.mean((2, 3))}


@pytest.mark.parametrize("with_examples", [False, True])
def test_graph_module_with_the_model_call_signature(with_examples):
    torch.manual_seed(0)
    model = _randomize_bn(TwoInputs()).eval()
    x, z = torch.randn(2, 3, 8, 8), torch.randn(2, 5)
    gm, _ = _prepare(model, example_inputs=(x, z) if with_examples else None)
    assert isinstance(gm, fx.GraphModule)
    params = inspect.signature(gm.forward).parameters
    assert list(params) == ["x", "z", "scale"] and params["scale"].default == 2.0
    # a non-tensor argument is not quantized, tensor arguments are
    assert "scale_quant" not in dict(gm.named_modules())
    assert isinstance(gm.x_quant, qat.QuantStub) and isinstance(gm.z_quant, qat.QuantStub)
    for args, kwargs in [((x, z), {}), ((x,), {"z": z, "scale": 3.0}),
                         ((), {"x": x, "z": z}), ((x, z, 0.5), {})]:
        out = _calibration_output(gm, *args, **kwargs)
        _assert_close_rel(out, model(*args, **kwargs))


def test_example_inputs_that_do_not_fit_the_model():
    with pytest.raises(RuntimeError, match="example_inputs.*forward"):
        qatkit.prepare_qat_fx(TwoInputs(), {"": Q8}, example_inputs=(torch.randn(2, 3, 8, 8),))


def test_the_float_model_is_never_modified():
    torch.manual_seed(0)
    model = _randomize_bn(TwoInputs()).train()
    x, z = torch.randn(4, 3, 8, 8), torch.randn(4, 5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    model.eval()
    ref = model(x, z)
    model.train()
    gm, _ = _prepare(model, example_inputs=(x, z))
    # use the prepared model hard: calibrate, train a QAT step, validate
    _calibrate_then_validate(gm, [(x, z)])
    gm.train()
    qatkit.set_fake_quant_state(gm, "qat")
    out = gm(x, z)
    (out["y"].sum() + out["w"].sum()).backward()
    torch.optim.SGD(gm.parameters(), lr=0.5).step()
    assert model.training and all(m.training for m in model.modules())
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"prepare or the QAT model changed {k}"
    assert all(p.grad is None for p in model.parameters())
    assert not any(hasattr(m, "activation_post_process") for m in model.modules())
    model.eval()
    _assert_close_rel(model(x, z), ref, 0)


# -- fusion ----------------------------------------------------------------------------------
class Chain(nn.Module):
    """weighted -> [bn] -> [+ other] -> [activation], written many ways."""

    def __init__(self, weighted, bn=None, act=None, add=None) -> None:
        super().__init__()
        self.weighted = weighted
        self.bn = bn
        self.act = act if isinstance(act, nn.Module) else None
        self.act_fn = None if isinstance(act, nn.Module) else act
        self.add = add

    def forward(self, x):
        y = self.weighted(x)
        if self.bn is not None:
            y = self.bn(y)
        if self.add == "+":
            y = y + x
        elif self.add == "torch.add":
            y = torch.add(x, y)
        elif self.add == "+=":
            y += x
        if self.act is not None:
            y = self.act(y)
        elif self.act_fn is not None:
            y = self.act_fn(y)
        return y


def _conv():
    return nn.Conv2d(4, 4, 3, padding=1)


FUSION_CASES = {
    # name: (model factory, input shape, expected fused_name, float name of the chain's end)
    "conv1d_bn_relu": (lambda: Chain(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU()),
                       (2, 3, 16), "ConvBnReLU1d", "act"),
    "conv2d_bn_relu_inplace": (lambda: Chain(_conv(), nn.BatchNorm2d(4), nn.ReLU(inplace=True)),
                               (2, 4, 16, 16), "ConvBnReLU2d", "act"),
    "conv2d_bn_relu6": (lambda: Chain(_conv(), nn.BatchNorm2d(4), nn.ReLU6()),
                        (2, 4, 16, 16), "ConvBnReLU62d", "act"),
    "conv2d_bn_F_relu": (lambda: Chain(_conv(), nn.BatchNorm2d(4), F.relu),
                         (2, 4, 16, 16), "ConvBnReLU2d", "relu"),
    "conv2d_bn_F_relu_inplace": (
        lambda: Chain(_conv(), nn.BatchNorm2d(4), lambda y: F.relu(y, inplace=True)),
        (2, 4, 16, 16), "ConvBnReLU2d", "relu"),
    "conv2d_bn_torch_relu": (lambda: Chain(_conv(), nn.BatchNorm2d(4), torch.relu),
                             (2, 4, 16, 16), "ConvBnReLU2d", "relu"),
    "conv2d_bn_relu_method": (lambda: Chain(_conv(), nn.BatchNorm2d(4), lambda y: y.relu_()),
                              (2, 4, 16, 16), "ConvBnReLU2d", "relu"),
    "conv2d_bn": (lambda: Chain(_conv(), nn.BatchNorm2d(4)), (2, 4, 16, 16), "ConvBn2d", "bn"),
    "conv2d_relu": (lambda: Chain(_conv(), None, nn.ReLU()), (2, 4, 16, 16), "ConvReLU2d",
                    "act"),
    "convT2d_bn_relu": (lambda: Chain(nn.ConvTranspose2d(3, 4, 2, stride=2), nn.BatchNorm2d(4),
                                      nn.ReLU()), (2, 3, 8, 8), "ConvTransposeBnReLU2d", "act"),
    "conv2d_bn_add_relu": (lambda: Chain(_conv(), nn.BatchNorm2d(4), nn.ReLU(), "+"),
                           (2, 4, 16, 16), "ConvBnAddReLU2d", "act"),
    "conv2d_bn_torch_add_relu": (lambda: Chain(_conv(), nn.BatchNorm2d(4), F.relu, "torch.add"),
                                 (2, 4, 16, 16), "ConvBnAddReLU2d", "relu"),
    "conv2d_bn_iadd_relu": (lambda: Chain(_conv(), nn.BatchNorm2d(4), nn.ReLU(True), "+="),
                            (2, 4, 16, 16), "ConvBnAddReLU2d", "act"),
    "conv2d_add_relu": (lambda: Chain(_conv(), None, nn.ReLU(), "+"), (2, 4, 16, 16),
                        "ConvAddReLU2d", "act"),
    "conv2d_bn_add": (lambda: Chain(_conv(), nn.BatchNorm2d(4), None, "+"), (2, 4, 16, 16),
                      "ConvBnAdd2d", "add"),
    "linear_bn1d": (lambda: Chain(nn.Linear(6, 5), nn.BatchNorm1d(5)), (8, 6), "LinearBn1d",
                    "bn"),
    "linear_bn1d_relu": (lambda: Chain(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU()), (8, 6),
                         "LinearBnReLU1d", "act"),
    "linear_relu": (lambda: Chain(nn.Linear(6, 5), None, nn.ReLU()), (8, 6), "LinearReLU",
                    "act"),
    "linear_F_relu": (lambda: Chain(nn.Linear(6, 5), None, F.relu), (8, 6), "LinearReLU",
                      "relu"),
}


@pytest.mark.parametrize("case", list(FUSION_CASES))
def test_fusion_structure_and_calibration_numbers(case):
    make, shape, fused_name, last = FUSION_CASES[case]
    torch.manual_seed(0)
    model = _randomize_bn(make()).eval()
    x = torch.randn(shape)
    ref = model(x.clone())
    gm, warned = _prepare(model)
    assert not warned, warned
    assert gm.weighted.fused_name == fused_name, gm.weighted
    assert isinstance(gm.weighted, qat.FLOAT_TO_QAT[type(model.weighted)])
    assert gm.weighted.weight_fake_quant is not None
    assert gm.weighted.activation_post_process is not None
    # the whole chain is one module call; no BatchNorm is left outside the fused module
    calls = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert [n.target for n in calls] == ["x_quant", "weighted"], gm.code
    assert _standalone_bn(gm) == []
    assert not any(isinstance(gm.get_submodule(str(n.target)), BN_TYPES)
                   for n in gm.graph.nodes if n.op == "call_module")
    _assert_close_rel(_calibration_output(gm, x.clone()), ref)
    assert qatkit.get_provenance(gm)["weighted"] == last, "the float op it reproduces"


def test_conv_transpose_output_size_is_kept():
    torch.manual_seed(0)

    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.up(x, output_size=[16, 16]))

    model = _randomize_bn(Up()).eval()
    gm, _ = _prepare(model)
    assert gm.up.fused_name == "ConvTransposeBn2d"
    x = torch.randn(2, 3, 8, 8)
    out = _calibration_output(gm, x)
    assert out.shape == (2, 4, 16, 16)
    _assert_close_rel(out, model(x))


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv(F.relu(self.bn1(self.conv(x)))))


def test_shared_conv_is_not_fused_and_warned_once():
    torch.manual_seed(0)
    model = _randomize_bn(SharedConv()).eval()
    gm, warned = _prepare(model)
    shared = [w for w in warned if "'conv'" in w]
    assert len(shared) == 1 and "called 2 times" in shared[0] and "not fused" in shared[0], warned
    assert gm.conv.fused_name == "Conv2d", "weights shared by two calls cannot fold a BatchNorm"
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv"]
    assert len(calls) == 2, "both calls run the one QAT module"
    assert isinstance(gm.bn1, qat.OutputQuantMixin) and isinstance(gm.bn2, nn.BatchNorm2d)
    prov = qatkit.get_provenance(gm)
    assert prov["conv(0)"] == "conv(0)" and prov["conv(1)"] == "conv(1)"
    x = torch.randn(2, 4, 8, 8)
    _assert_close_rel(_calibration_output(gm, x), model(x))


class SharedReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + x)


def test_shared_relu_is_fused_per_call_site_with_one_warning():
    torch.manual_seed(0)
    model = _randomize_bn(SharedReLU()).eval()
    gm, warned = _prepare(model)
    assert len(warned) == 1 and "'relu'" in warned[0] and "2 of 2 calls" in warned[0], warned
    assert gm.conv1.fused_name == "ConvBnReLU2d" and gm.conv2.fused_name == "ConvBnAddReLU2d"
    assert gm.conv1.activation_post_process is not gm.conv2.activation_post_process
    assert "relu" not in dict(gm.named_modules()), "the relu module is fully fused away"
    prov = qatkit.get_provenance(gm)
    assert prov["conv1"] == "relu(0)" and prov["conv2"] == "relu(1)"
    x = torch.randn(2, 4, 8, 8)
    _assert_close_rel(_calibration_output(gm, x.clone()), model(x.clone()))


class SharedSigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.Sigmoid()

    def forward(self, x, y):
        return self.act(x + y) * self.act(x - y)


def test_shared_unfused_activation_shares_one_scale_with_a_warning():
    gm, warned = _prepare(SharedSigmoid())
    assert len(warned) == 1 and "['act']" in warned[0] and "share one output scale" in warned[0]
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "act"]
    assert len(calls) == 2 and isinstance(gm.act, qat.OutputQuantMixin)
    prov = qatkit.get_provenance(gm)
    assert prov["act(0)"] == "act(0)" and prov["act(1)"] == "act(1)"


# -- functional ops become named modules -----------------------------------------------------
class BinaryOp(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x, y):
        return self.fn(x, y)


# name: (fn(x, y) with x, y of shape [2, 4, 8, 8], float node name, op kind)
OPS = {
    "add": (lambda x, y: x + y, "add", "add"),
    "torch.add": (lambda x, y: torch.add(x, y), "add", "add"),
    "sub": (lambda x, y: x - y, "sub", "sub"),
    "mul": (lambda x, y: x * y, "mul", "mul"),
    "torch.cat": (lambda x, y: torch.cat([x, y], 1), "cat", "cat"),
    "matmul": (lambda x, y: torch.matmul(x, y.transpose(-1, -2)), "matmul", "matmul"),
    "@": (lambda x, y: x @ y, "matmul", "matmul"),
    "sigmoid": (lambda x, y: torch.sigmoid(x), "sigmoid", "sigmoid"),
    "tanh": (lambda x, y: torch.tanh(x), "tanh", "tanh"),
    "softmax": (lambda x, y: F.softmax(x, dim=-1), "softmax", "softmax"),
    "mean": (lambda x, y: x.mean(dim=1, keepdim=True), "mean", "mean"),
    "torch.mean": (lambda x, y: torch.mean(x, (2, 3)), "mean", "mean"),
    "avg_pool": (lambda x, y: F.avg_pool2d(x, 2), "avg_pool2d", "avg_pool"),
    "interpolate": (lambda x, y: F.interpolate(x, scale_factor=2.0, mode="bilinear"),
                    "interpolate", "interpolate"),
    "hardswish": (lambda x, y: F.hardswish(x), "hardswish", "hardswish"),
    "silu": (lambda x, y: F.silu(x), "silu", "silu"),
    "gelu": (lambda x, y: F.gelu(x), "gelu", "gelu"),
    "layer_norm": (lambda x, y: F.layer_norm(x, (8,)), "layer_norm", "layer_norm"),
}


BINARY = {"add", "torch.add", "sub", "mul", "torch.cat", "matmul", "@"}


@pytest.mark.parametrize("op", list(OPS))
def test_functional_op_becomes_a_named_module_with_output_fake_quant(op):
    fn, name, kind = OPS[op]
    torch.manual_seed(0)
    model = BinaryOp(fn)
    x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    gm, warned = _prepare(model)
    assert not warned, warned
    mod = gm.get_submodule(name)
    assert isinstance(mod, qat.FunctionalOp) and mod.op == kind
    assert isinstance(mod.activation_post_process, qatkit.FakeQuantize)
    inputs = ["x", "y"] if op in BINARY else ["x"]  # y unused: no stub
    assert _fake_quants(gm) == sorted([f"{name}.activation_post_process"]
                                      + [f"{i}_quant.activation_post_process" for i in inputs])
    assert qatkit.get_provenance(gm)[name] == name
    torch.testing.assert_close(_calibration_output(gm, x, y), fn(x, y), rtol=0, atol=0)
    _calibrate_then_validate(gm, [(x, y)])
    assert _on_grid(gm(x, y), mod.activation_post_process), "output is not fake-quantized"


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.add = nn.Identity()  # a module takes the name "add"

    def forward(self, x):
        y = self.add(self.conv(x)).sigmoid()
        return torch.cat([y + x, y * x + x], 1).mean(1, keepdim=True) * y


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(Inner(), Inner())

    def forward(self, x):
        return self.layer1(x) + x


def test_op_names_follow_the_enclosing_module():
    gm, warned = _prepare(Outer())
    assert not warned, warned
    ops = {n: m.op for n, m in gm.named_modules() if isinstance(m, qat.FunctionalOp)}
    for blk in ("layer1.0", "layer1.1"):
        assert ops[f"{blk}.sigmoid"] == "sigmoid"
        assert ops[f"{blk}.add_1"] == "add" and ops[f"{blk}.add_2"] == "add", \
            "'add' is taken by a module: the ops are numbered on"
        assert ops[f"{blk}.mul"] == "mul" and ops[f"{blk}.cat"] == "cat"
        assert ops[f"{blk}.mean"] == "mean"
        assert isinstance(gm.get_submodule(f"{blk}.add"), nn.Identity)
    assert ops["add"] == "add"
    names = qatkit.fx.float_node_names(qatkit.fx.symbolic_trace(Outer()))
    assert set(ops) <= set(names.values()), "modules are named after the float nodes"


# -- data-moving ops, cat, float ops ---------------------------------------------------------
class Moves(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.idn = nn.Identity()
        self.flat = nn.Flatten()

    def forward(self, x):
        y = self.idn(self.drop(self.pool(self.conv(x))))          # [2, 4, 4, 4]
        y = F.dropout(F.max_pool2d(y, 1), 0.5, training=False)
        y = self.flat(y).reshape(2, 4, 16).view(2, 64).flatten(1)
        y = y.reshape(2, 4, 4, 4).permute(0, 2, 3, 1).transpose(1, 2)
        a, b = y.chunk(2, dim=-1)
        c = torch.split(y, 2, dim=-1)[1]
        return a, b, c, y[:, 0], torch.max_pool2d(y, 2)


def test_data_moving_ops_get_no_fake_quant():
    torch.manual_seed(0)
    model = Moves().eval()
    x = torch.randn(2, 3, 8, 8)
    gm, warned = _prepare(model)
    assert not warned, warned
    assert _fake_quants(gm) == ["conv.activation_post_process", "conv.weight_fake_quant",
                                "x_quant.activation_post_process"]
    for name, cls in (("pool", nn.MaxPool2d), ("drop", nn.Dropout), ("idn", nn.Identity),
                      ("flat", nn.Flatten)):
        assert type(gm.get_submodule(name)) is cls, name
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert {"reshape", "view", "flatten", "permute", "transpose", "chunk", operator.getitem,
            torch.split, F.max_pool2d, F.dropout, torch.max_pool2d} <= set(targets)
    torch.testing.assert_close(_calibration_output(gm, x), model(x), rtol=0, atol=0)
    _calibrate_then_validate(gm, [(x,)])
    for out in gm(x):  # everything is still on the conv's output grid
        assert _on_grid(out, gm.conv.activation_post_process)


class CatTwoScales(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Conv2d(3, 4, 1)
        self.large = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.large.weight.mul_(10.0)

    def forward(self, x):
        return torch.cat([self.small(x), self.large(x)], 1)


def test_cat_rescales_its_inputs_to_its_output_scale():
    torch.manual_seed(0)
    gm, _ = _prepare(CatTwoScales())
    x = torch.randn(2, 3, 8, 8)
    _calibrate_then_validate(gm, [(x,)])
    inputs = {}
    gm.cat.register_forward_pre_hook(lambda m, args: inputs.setdefault("args", args))
    out = gm(x)
    s_small = gm.small.activation_post_process.scale
    s_large = gm.large.activation_post_process.scale
    s_cat = gm.cat.activation_post_process.scale
    assert s_large > 5 * s_small, "the two inputs have different scales"
    assert _on_grid(out, gm.cat.activation_post_process), "one output scale"
    parts = inputs["args"][0]
    assert _on_grid(parts[0], gm.small.activation_post_process)
    expected = gm.cat.activation_post_process(torch.cat(parts, 1))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert s_cat >= s_large * 0.99


class WithFloatOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv2(torch.erf(self.conv(x)))
        return torch.erf(y) + y.sum(), torch.atan(y)


def test_ops_without_quantized_implementation_stay_float_with_a_warning():
    torch.manual_seed(0)
    model = WithFloatOps().eval()
    x = torch.randn(2, 3, 8, 8)
    gm, warned = _prepare(model)
    assert len(warned) == 1, warned
    msg = warned[0]
    assert "4 op(s) have no quantized implementation" in msg, msg
    for listed in ("erf: erf, erf_1", "sum: sum", "atan: atan"):
        assert listed in msg, msg
    for name in ("erf", "erf_1", "sum", "atan"):
        assert name not in dict(gm.named_modules()), f"{name} must stay a float function"
    # a float output feeding a quantized op is quantized again
    assert isinstance(gm.erf_quant, qat.QuantStub)
    assert [str(u.target) for n in gm.graph.nodes if n.target == "erf_quant"
            for u in n.users] == ["conv2"]
    torch.testing.assert_close(_calibration_output(gm, x), model(x), rtol=1e-6, atol=1e-6)
    _calibrate_then_validate(gm, [(x,)])
    _, atan = gm(x)
    assert not _on_grid(atan, gm.conv2.activation_post_process), "graph output stays float"


# -- quant stubs, float outputs --------------------------------------------------------------
class WithStubs(nn.Module):
    def __init__(self, scale=1 / 128, dtype=None) -> None:
        super().__init__()
        self.quant = qatkit.QuantStub(scale=scale, dtype=dtype)
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        self.dequant = qatkit.DeQuantStub()

    def forward(self, x):
        y = self.relu(self.conv(self.quant(x))).mean((2, 3))
        return self.dequant(self.fc(y))


def test_explicit_quant_stub_with_fixed_scale_is_honoured():
    torch.manual_seed(0)
    gm, _ = _prepare(WithStubs())
    assert "x_quant" not in dict(gm.named_modules()), "the user's QuantStub is the input's"
    fq = gm.quant.activation_post_process
    assert isinstance(gm.quant, qat.QuantStub) and fq.scale.item() == 1 / 128
    x = torch.rand(2, 3, 8, 8) * 6 - 3  # beyond [-1, 1]: the scale must not move
    _calibrate_then_validate(gm, [(x,)])
    assert fq.scale.item() == 1 / 128 and fq.dtype == "qint8"
    y = gm.quant(x)
    assert y.max().item() == 127 / 128 and y.min().item() == -1.0
    assert _on_grid(y, fq)
    assert isinstance(gm.dequant, qatkit.DeQuantStub), "DeQuantStub: float output"


def test_explicit_quant_stub_dtype_and_calibrated_scale():
    gm, _ = _prepare(WithStubs(scale=None, dtype="qint16"))
    fq = gm.quant.activation_post_process
    assert fq.dtype == "qint16" and not fq.has_scale
    x = torch.rand(2, 3, 8, 8) * 4 - 2
    _calibrate_then_validate(gm, [(x,)])
    assert fq.scale.item() == pytest.approx(x.abs().max().item() / 32768, rel=1e-5)


def test_graph_inputs_are_quantized_without_a_stub():
    torch.manual_seed(0)
    model = Chain(_conv(), None, nn.ReLU())
    gm, _ = _prepare(model)
    first = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert first.target == "x_quant" and first.args[0].op == "placeholder"
    assert qatkit.get_provenance(gm)["x_quant"] == "x"
    x = torch.randn(2, 4, 8, 8)
    _calibrate_then_validate(gm, [(x,)])
    assert _on_grid(gm.x_quant(x), gm.x_quant.activation_post_process)


def test_32bit_out_qconfig_leaves_the_last_linear_unquantized():
    torch.manual_seed(0)
    model = WithStubs()
    gm, _ = _prepare(model, {"": Q8, "module_name": [("fc", Q32)]})
    assert gm.fc.fused_name == "Linear" and gm.fc.activation_post_process is None
    assert gm.fc.weight_fake_quant is not None
    assert gm.mean.activation_post_process is not None
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    _calibrate_then_validate(gm, [(x,)])
    seen = {}
    gm.fc.register_forward_pre_hook(lambda m, args: seen.setdefault("in", args[0]))
    out = gm(x)
    # the bias sits on the int32 accumulator grid s_in * s_w, as the integer model holds it
    s_acc = gm.mean.activation_post_process.scale.double() * gm.fc.weight_fake_quant.scale.double()
    bias = (torch.round(gm.fc.bias.double() / s_acc) * s_acc).float()
    assert not torch.equal(bias, gm.fc.bias)
    expected = F.linear(seen["in"], gm.fc.weight_fake_quant(gm.fc.weight), bias)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# -- provenance ------------------------------------------------------------------------------
def test_provenance_maps_prepared_ops_to_float_nodes_and_survives_deepcopy():
    torch.manual_seed(0)
    model = Outer()
    gm, _ = _prepare(Chain(_conv(), nn.BatchNorm2d(4), nn.ReLU(), "+"))
    prov = qatkit.get_provenance(gm)
    assert prov == {"x_quant": "x", "weighted": "act"}
    gm2, _ = _prepare(model)
    prov2 = qatkit.get_provenance(gm2)
    assert prov2["layer1.0.cat"] == "layer1.0.cat" and prov2["add"] == "add"
    assert prov2["layer1.0.conv"] == "layer1.0.conv"
    clone = copy.deepcopy(gm2)
    assert qatkit.get_provenance(clone) == prov2
    x = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(clone(x), gm2(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not made by qatkit.prepare_qat_fx"):
        qatkit.get_provenance(fx.symbolic_trace(model))


# -- QAT, calibration accuracy, state_dict ---------------------------------------------------
class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)) + y)
        y = torch.cat([y.mean((2, 3)), F.adaptive_avg_pool2d(torch.sigmoid(y), 1).flatten(1)], 1)
        return self.fc(y)


def _small_net(seed: int = 0) -> tuple[SmallNet, list[torch.Tensor]]:
    """A float SmallNet whose BatchNorm statistics match its data (well conditioned)."""
    torch.manual_seed(seed)
    model = SmallNet()
    data = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # exact averages
    model.train()
    with torch.no_grad():
        for x in data:
            model(x)
    return model.eval(), data


def test_calibration_then_validation_is_close_to_float():
    model, data = _small_net()
    gm, _ = _prepare(model)
    assert gm.conv1.fused_name == "ConvBnReLU2d" and gm.conv2.fused_name == "ConvBnAddReLU2d"
    assert _standalone_bn(gm) == []
    x = data[0]
    _assert_close_rel(_calibration_output(gm, x), model(x))
    _calibrate_then_validate(gm, [(b,) for b in data])
    out, ref = gm(x), model(x)
    cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.99, f"cosine {cos}"
    assert not torch.equal(out, ref), "validation must fake-quantize"


def test_one_qat_step_changes_weights_with_finite_gradients():
    model, data = _small_net()
    gm, _ = _prepare(model)
    _calibrate_then_validate(gm, [(b,) for b in data])
    gm.train()
    qatkit.set_fake_quant_state(gm, "qat")
    assert qatkit.get_fake_quant_state(gm) == {qatkit.FakeQuantState.QAT: 11}
    before = {k: v.detach().clone() for k, v in gm.named_parameters()}
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    loss = F.cross_entropy(gm(data[0]), torch.arange(8) % 4)
    assert torch.isfinite(loss)
    loss.backward()
    # a conv bias right before a BatchNorm in training mode gets no gradient (the batch mean
    # cancels it): the math, not a bug
    cancelled = {"conv1.bias", "conv2.bias"}
    for name, p in gm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name not in cancelled:
            assert p.grad.abs().sum() > 0, f"no gradient reached {name}"
    opt.step()
    for name, p in gm.named_parameters():
        if name not in cancelled:
            assert not torch.equal(p, before[name]), f"{name} did not change"
    assert not torch.equal(gm.conv1.bn.running_mean, model.bn1.running_mean), \
        "QAT in train mode updates the fused BatchNorm's statistics"


def test_state_dict_loads_into_another_prepared_copy():
    model, data = _small_net(0)
    gm, _ = _prepare(model)
    _calibrate_then_validate(gm, [(b,) for b in data])
    other, _ = _small_net(1)  # same architecture, other weights
    gm2, _ = _prepare(other)
    result = gm2.load_state_dict(gm.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    gm2.eval()
    assert qatkit.get_fake_quant_state(gm2) == {qatkit.FakeQuantState.VALIDATION: 11}
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(gm2(x), gm(x), rtol=0, atol=0)


# -- torchvision resnet18 --------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    gm, warned = _prepare(model)
    return model, gm, warned


def test_resnet18_structure_provenance_and_calibration_numbers(resnet18):
    model, gm, warned = resnet18
    assert len(warned) == 1, warned
    assert "shared activation module(s)" in warned[0] and "'layer1.0.relu' (2 of 2" in warned[0]
    fused = {n: m.fused_name for n, m in gm.named_modules() if hasattr(m, "fused_name")}
    assert fused["conv1"] == "ConvBnReLU2d"
    assert fused["layer1.0.conv1"] == "ConvBnReLU2d"
    assert fused["layer1.0.conv2"] == "ConvBnAddReLU2d"
    assert fused["layer2.0.downsample.0"] == "ConvBn2d"
    assert fused["fc"] == "Linear"
    assert len(fused) == 21
    assert _standalone_bn(gm) == []
    assert not any(isinstance(m, nn.ReLU) for m in gm.modules()), "every relu is fused"
    assert isinstance(gm.maxpool, nn.MaxPool2d) and not hasattr(gm.maxpool,
                                                                 "activation_post_process")
    assert isinstance(gm.avgpool, qat.OutputQuantMixin)
    prov = qatkit.get_provenance(gm)
    assert prov["layer1.0.conv1"] == "layer1.0.relu(0)"
    assert prov["layer1.0.conv2"] == "layer1.0.relu(1)"
    assert prov["conv1"] == "relu" and prov["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert prov["fc"] == "fc" and prov["x_quant"] == "x"
    x = torch.randn(2, 3, 32, 32)
    _assert_close_rel(_calibration_output(gm, x), model(x))


def test_tensors_made_from_parameters_are_not_annotated_as_non_tensor():
    """A class token expanded to the batch (ViT) and a tuple output holding a tensor and a None
    are tensors for the annotation (role float / passthrough), not sizes or flags."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = nn.Parameter(torch.randn(1, 1, 4))
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            tok = self.cls.expand(x.shape[0], -1, -1)
            pair = (self.fc(x), None)
            return torch.cat([tok, pair[0]], dim=1)

    x = torch.randn(2, 3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(Tokens(), {"": qatkit.default_qat_8bit_fake_quant_qconfig},
                                   example_inputs=(x,))
    roles = {a.name: a.role for a in qatkit.get_annotations(qm).values()}
    assert roles["expand"] == "passthrough" and roles["getattr"] == "non_tensor", roles
