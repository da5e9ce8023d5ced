"""convert_fx: the integer model agrees with the fake-quant model at every quantized tensor.

Acceptance (the issue): on every quantized tensor, integer model vs fake-quant model in
VALIDATION state, same input: >= 99% of elements exactly equal and 100% within 1 LSB.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import qatkit
import torch
import torchvision
from qatkit.fx import op_kind
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _record(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, list[tuple]]:
    """Each named module's (inputs, output) per call, for one forward of ``model``."""
    rec: dict[str, list[tuple]] = {n: [] for n in names}

    def hook(m, args, kwargs, out, n):
        rec[n].append((args, kwargs, out.detach().clone()))

    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, k, o, n=n: hook(m, a, k, o, n), with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return rec


def exactness(qat_model: nn.Module, int_model: nn.Module, x: torch.Tensor,
              per_op: bool = True) -> dict[str, tuple]:
    """Per quantized op: (fraction of elements with equal integers, max |difference| in LSB).

    ``per_op=True`` feeds each integer module the inputs its fake-quant twin saw, so each op's
    own error is measured; ``per_op=False`` compares the two models run end to end, where
    every rare 1-LSB tie flip also propagates to everything after it.
    """
    names = [n for n, m in qat_model.named_modules()
             if op_kind(m) is not None and getattr(m, "activation_post_process", None) is not None]
    fq_rec = _record(qat_model, x, names)
    int_rec = None if per_op else _record(int_model, x, names)
    result = {}
    for n in names:
        scale = qat_model.get_submodule(n).activation_post_process.scale
        for k, (args, kwargs, a) in enumerate(fq_rec[n]):
            if per_op:
                with torch.no_grad():
                    b = int_model.get_submodule(n)(*args, **kwargs)
            else:
                b = int_rec[n][k][2]
            qa, qb = torch.round(a / scale), torch.round(b / scale)
            diff = (qa - qb).abs()
            key = n if len(fq_rec[n]) == 1 else f"{n}({k})"
            result[key] = (float((diff == 0).float().mean()), float(diff.max()))
    return result


def assert_exact_enough(qat_model: nn.Module, int_model: nn.Module, x: torch.Tensor,
                        per_op: bool = True) -> dict:
    res = exactness(qat_model, int_model, x, per_op=per_op)
    assert res, "no quantized op compared"
    worst_exact = min(res.items(), key=lambda kv: kv[1][0])
    worst_lsb = max(res.items(), key=lambda kv: kv[1][1])
    assert worst_exact[1][0] >= 0.99, f"only {worst_exact[1][0]:.4f} exact at {worst_exact[0]}"
    assert worst_lsb[1][1] <= 1, f"{worst_lsb[1][1]} LSB at {worst_lsb[0]}"
    return res


class TransformerBlock(nn.Module):
    """linear, matmul, softmax, layer_norm, gelu, residual adds."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q, k, v = self._split(q), self._split(k), self._split(v)
        att = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        att = att.softmax(dim=-1)
        o = torch.matmul(att, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        x = x + self.proj(o)
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small",
                                  "efficientnet_b0"])
def test_torchvision_integer_model_matches_fake_quant(calibrate, name: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    x = torch.randn(2, 3, 64, 64)
    qm = calibrate(model, x, settle_batchnorm=True)
    im = qatkit.convert_fx(qm)
    assert_exact_enough(qm, im, x)
    assert not any(isinstance(m, qatkit.FakeQuantize) for m in im.modules())
    # end to end too: VALIDATION's exact evaluation rounds where the integer model does, so
    # no float32 near-tie flips an integer and propagates (it used to, from mobilenet_v2 on)
    res = assert_exact_enough(qm, im, x, per_op=False)
    assert min(v[0] for v in res.values()) == 1.0, "exact ops should agree to the bit"


def test_transformer_block_integer_model_matches_fake_quant(calibrate) -> None:
    torch.manual_seed(0)
    model = TransformerBlock().eval()
    x = torch.randn(2, 8, 32)
    qm = calibrate(model, x)
    im = qatkit.convert_fx(qm)
    res = assert_exact_enough(qm, im, x)
    assert_exact_enough(qm, im, x, per_op=False)
    kinds = {op_kind(qm.get_submodule(n)) for n in res}
    assert {"linear", "matmul", "softmax", "layer_norm", "gelu"} <= kinds, kinds


def test_int16_activations_match(calibrate) -> None:
    torch.manual_seed(0)
    model = TransformerBlock().eval()
    x = torch.randn(2, 8, 32)
    qm = calibrate(model, x, qatkit.default_qat_8bit_weight_16bit_act_fake_quant_qconfig)
    im = qatkit.convert_fx(qm)
    assert_exact_enough(qm, im, x)
    res = assert_exact_enough(qm, im, x, per_op=False)
    # only softmax's integer decomposition (and what follows it) may differ, by 1 LSB
    linear_ops = [k for k in res if op_kind(qm.get_submodule(k)) in ("linear", "add")]
    assert all(res[k][0] >= 0.99 for k in linear_ops)


def test_exact_evaluation_only_in_validation_without_gradients(calibrate) -> None:
    """QAT and CALIBRATION run float32 (training speed); VALIDATION under no_grad evaluates
    exactly; VALIDATION with gradients enabled stays float32 so gradients flow."""
    from qatkit.fake_quantize import evaluates_exactly

    torch.manual_seed(0)
    qm = calibrate(TransformerBlock().eval(), torch.randn(2, 8, 32))
    fq = qm.get_submodule("fc1").activation_post_process
    with torch.no_grad():
        assert evaluates_exactly(fq)
    assert not evaluates_exactly(fq), "gradients enabled: float32, straight-through"
    x = torch.randn(2, 8, 32, requires_grad=True)
    qm(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert qm.get_submodule("fc1").weight.grad is not None
    qatkit.set_fake_quant_state(qm, "qat")
    with torch.no_grad():
        assert not evaluates_exactly(fq)
    # prepare linked the fake quants that made each input of the exact ops
    for name in ("matmul", "proj"):  # q @ k^T through chunk/reshape/transpose; linear + add
        links = qm.get_submodule(name).exact_links()
        assert set(links) == {"input", "other"}, (name, links)


class NormNet(nn.Module):
    """GroupNorm, a BatchNorm that cannot be folded (after an add), LayerNorm (module and
    functional): the normalizations evaluate exactly too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.conv2, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.ln = nn.LayerNorm(8)
        self.w = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.gn(self.conv1(x)))
        x = self.bn(x + self.conv2(x))
        t = self.ln(x.mean(dim=(2, 3)))
        return torch.nn.functional.layer_norm(t, (8,), self.w, None, 1e-5)


def test_normalizations_agree_to_the_bit_end_to_end(calibrate) -> None:
    torch.manual_seed(0)
    model = NormNet()
    x = torch.randn(4, 3, 12, 12)
    qm = calibrate(model, x, settle_batchnorm=True)
    im = qatkit.convert_fx(qm)
    res = assert_exact_enough(qm, im, x, per_op=False)
    kinds = {op_kind(qm.get_submodule(k.split("(")[0])) for k in res}
    assert {"group_norm", "batch_norm", "layer_norm"} <= kinds, kinds
    assert min(v[0] for v in res.values()) == 1.0, res


def test_exact_evaluation_follows_weight_updates(calibrate) -> None:
    """The integer weights exact evaluation caches are rebuilt when a weight, a BatchNorm or a
    scale changes in place (optimizer step, load_state_dict)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    qm = calibrate(model, x, settle_batchnorm=True)
    with torch.no_grad():
        qm(x)  # fills the caches
        conv = qm.get_submodule("layer1.0.conv1")
        conv.weight.mul_(0.5)
        conv.bn.running_var.mul_(2.0)
        out = qm(x)
    res = assert_exact_enough(qm, qatkit.convert_fx(qm), x, per_op=False)
    assert min(v[0] for v in res.values()) == 1.0
    other = calibrate(model, x)
    with torch.no_grad():
        assert not torch.equal(other(x), out)  # its caches hold the old weights
        other.load_state_dict(qm.state_dict())
        assert torch.equal(other(x), out)


@pytest.fixture(scope="module")
def digits():
    sys.path.insert(0, str(EXAMPLES))
    import digits as d

    data = d.load_digits_data()
    torch.manual_seed(d.SEED)
    with d.torch_threads(1):
        model = d.train_float(d.DigitsNet(), data, epochs=6)
    return d, data, model


def test_digits_integer_model_agrees_with_fake_quant(calibrate, digits) -> None:
    d, data, model = digits
    qm = calibrate(model, data.train_x[:256])
    im = qatkit.convert_fx(qm)
    assert_exact_enough(qm, im, data.test_x)
    assert_exact_enough(qm, im, data.test_x, per_op=False)
    with torch.no_grad():
        agree = (qm(data.test_x).argmax(1) == im(data.test_x).argmax(1)).float().mean()
    assert agree >= 0.995, f"argmax agreement {float(agree):.4f}"
    assert d.evaluate(im, (data.test_x, data.test_y)) >= 0.95


def test_state_dict_round_trip_weights_only(calibrate, tmp_path) -> None:
    torch.manual_seed(0)
    model = TransformerBlock().eval()
    x = torch.randn(2, 8, 32)
    qm = calibrate(model, x)
    im = qatkit.convert_fx(qm)
    path = tmp_path / "int_model.pt"
    torch.save(im.state_dict(), path)
    # a second integer model from a differently calibrated copy, then loaded
    qm2 = calibrate(model, torch.randn(2, 8, 32) * 3)
    im2 = qatkit.convert_fx(qm2)
    im2.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(im2(x), im(x), rtol=0, atol=0)


def test_preserve_qat_mode_keeps_fake_quant_form(calibrate) -> None:
    torch.manual_seed(0)
    model = TransformerBlock().eval()
    x = torch.randn(2, 8, 32)
    qm = calibrate(model, x)
    marked = qatkit.set_preserve_qat_mode(qm, prefixes=["fc1"], types=["softmax"])
    assert "fc1" in marked and "softmax" in marked
    with pytest.raises(ValueError, match="Softmax"):  # the block uses the functional softmax
        qatkit.set_preserve_qat_mode(qm, types=[nn.Softmax])
    im = qatkit.convert_fx(qm)
    assert isinstance(im.get_submodule("fc1"), qatkit.nn.qat.Linear)
    assert_exact_enough(qm, im, x)
    with pytest.raises(ValueError, match="nothere"):
        qatkit.set_preserve_qat_mode(qm, prefixes=["nothere"])


def test_convert_does_not_modify_the_qat_model_and_names_are_kept(calibrate) -> None:
    torch.manual_seed(0)
    model = TransformerBlock().eval()
    x = torch.randn(2, 8, 32)
    qm = calibrate(model, x)
    with torch.no_grad():
        before = qm(x)
    im = qatkit.convert_fx(qm)
    with torch.no_grad():
        torch.testing.assert_close(qm(x), before, rtol=0, atol=0)
    qat_names = {n for n, m in qm.named_modules() if op_kind(m)}
    assert qat_names <= {n for n, _ in im.named_modules()}
    assert qatkit.get_provenance(im) == qatkit.get_provenance(qm)


def test_uncalibrated_model_is_a_clear_error() -> None:
    model = TransformerBlock().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(model, {"": qatkit.default_qat_8bit_fake_quant_qconfig})
    with pytest.raises(ValueError, match="Calibrate first"):
        qatkit.convert_fx(qm)
    with pytest.raises(ValueError, match="prepare_qat_fx"):
        qatkit.convert_fx(model)


def test_op_without_integer_implementation_names_it(calibrate) -> None:
    from qatkit.quantized import CONVERTERS

    qm = calibrate(TransformerBlock().eval(), torch.randn(2, 8, 32))
    saved = CONVERTERS.pop("layer_norm")
    try:
        with pytest.raises(NotImplementedError, match="ln1.*set_preserve_qat_mode"):
            qatkit.convert_fx(qm)
    finally:
        CONVERTERS["layer_norm"] = saved


def test_register_converter_dispatches_by_op_kind(calibrate) -> None:
    from qatkit.quantized import CONVERTERS, register_converter

    qm = calibrate(TransformerBlock().eval(), torch.randn(2, 8, 32))
    seen = []

    class Marker(qatkit.quantized.QuantizedModule):
        op = "gelu"

        def forward(self, x):
            return torch.zeros_like(x)

    saved = CONVERTERS["gelu"]
    try:
        @register_converter("gelu")
        def convert_gelu(qat_module, call, out_qparams):
            bits = [(n, a.qparams.bits) for n, a in call.tensors()]
            seen.append((qat_module.qatkit_op_kind, bits, out_qparams.bits))
            return Marker()

        im = qatkit.convert_fx(qm)
    finally:
        CONVERTERS["gelu"] = saved
    assert seen == [("gelu", [("input", 8)], 8)]
    assert isinstance(im.get_submodule("act"), Marker)


class SharedConv(nn.Module):
    """One conv called on two tensors of different ranges (a pattern the profiler flags)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        a = self.conv(x)
        b = self.conv(self.act(a) * 4.0)  # the second call's input has another scale
        return a + b


def test_each_call_site_of_a_shared_module_gets_its_own_integer_module(calibrate) -> None:
    """convert_fx gives every call site its own integer module (same integer weights, its own
    requantization), named like the call sites in reports, and the integer model equals the
    fake-quant model."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    qm = calibrate(SharedConv().eval(), x)
    im = qatkit.convert_fx(qm)
    calls = [n for n in im.graph.nodes if n.op == "call_module" and "conv" in str(n.target)]
    assert [str(n.target) for n in calls] == ["conv(0)", "conv(1)"]
    assert not hasattr(im, "conv"), "the shared module is replaced by its call sites"
    c0, c1 = im.get_submodule("conv(0)"), im.get_submodule("conv(1)")
    assert torch.equal(c0.weight, c1.weight) and not torch.equal(c0.input_scale, c1.input_scale)
    assert qatkit.get_provenance(im)["conv(1)"] == qatkit.get_provenance(qm)["conv(1)"]
    with torch.no_grad():
        torch.testing.assert_close(im(x), qm(x), atol=0, rtol=0)
    assert isinstance(qm.get_submodule("conv"), qatkit.nn.qat.Conv2d), "qat model unchanged"


def test_set_preserve_qat_mode_takes_a_bare_string(calibrate) -> None:
    """The NPU guides write set_preserve_qat_mode(net, ("conv1"), ()): ("conv1") is a str."""
    torch.manual_seed(0)
    qm = calibrate(SharedConv().eval(), torch.randn(2, 3, 8, 8))
    assert qatkit.set_preserve_qat_mode(qm, ("conv"), ()) == ["conv"]
    assert qatkit.set_preserve_qat_mode(qm, (), "add") == ["add"]
    with pytest.raises(ValueError, match=r"\['co'\] match no quantized module"):
        qatkit.set_preserve_qat_mode(qm, "co")
