"""The runnable examples (``make demo``) and the code in the docs do what they say.

The quickstart trains DigitsNet in float, prepares it with prepare_qat_fx, calibrates four
copies and fine-tunes one with QAT; the tests check the accuracies it reports (calibrated
>= 99% of float, QAT >= 99.5%), that it never mutates the float model, and that the prepared
model is the one documented (fused conv+bn(+add)+relu, per-channel int8 weights of the folded
weight, int8 activations, input scale 1/128, a 32-bit head).
Every ```python block of README.md and docs/*.md is run.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import operator
import re
import sys
from pathlib import Path

import pytest
import qatkit
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = ROOT / "examples"
# the examples import each other the way `python examples/quickstart.py` does
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))
digits = importlib.import_module("digits")
quickstart = importlib.import_module("quickstart")


@pytest.fixture(scope="module")
def data():
    return digits.load_digits_data()


@pytest.fixture(scope="module")
def float_model(data):
    torch.manual_seed(digits.SEED)
    with digits.torch_threads(1):
        return digits.train_float(digits.DigitsNet(), data, epochs=4)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """Run the quickstart once: (returned accuracies, printed text); reports in a temp dir."""
    out = io.StringIO()
    report_dir = tmp_path_factory.mktemp("quickstart_reports")
    with contextlib.redirect_stdout(out):
        accuracy = quickstart.main(report_dir=report_dir)
    return accuracy, out.getvalue()


# -- examples/digits.py ------------------------------------------------------------------------
def test_digits_data_is_normalized_split_and_deterministic(data):
    assert data.train_x.shape == (1437, 1, 16, 16)
    assert data.test_x.shape == (360, 1, 16, 16)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    for x in (data.train_x, data.test_x):
        assert float(x.min()) == -1.0 and float(x.max()) == 1.0, "inputs must span [-1, 1]"
    # stratified: every class has 35..37 of the 360 test images
    counts = torch.bincount(data.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37, counts
    again = digits.load_digits_data()
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)


def test_torch_threads_restores_the_thread_count():
    before = torch.get_num_threads()
    with digits.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_batches_cover_every_sample_once_and_shuffle_by_seed():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    plain = [yb.tolist() for _, yb in digits.batches(x, y, batch_size=4)]
    assert plain == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    shuffled = torch.cat([yb for _, yb in digits.batches(x, y, 4, shuffle=True, seed=3)])
    assert sorted(shuffled.tolist()) == list(range(10))
    again = torch.cat([yb for _, yb in digits.batches(x, y, 4, shuffle=True, seed=3)])
    assert torch.equal(shuffled, again)
    assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in digits.batches(x, y, 3, True))


def test_digitsnet_has_a_residual_add_and_one_module_per_call_site():
    model = digits.DigitsNet()
    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        if name and not list(module.children()):
            module.register_forward_hook(
                lambda m, a, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
    assert calls == {name: 1 for name in leaves}, f"shared or unused modules: {calls}"
    graph = torch.fx.symbolic_trace(model).graph
    adds = [n for n in graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert len(adds) == 1, "DigitsNet must have exactly one functional residual add"


def test_evaluate_accepts_tensors_and_batches_and_restores_mode(data, float_model):
    test = (data.test_x, data.test_y)
    acc = digits.evaluate(float_model, test)
    assert acc == digits.evaluate(float_model, digits.batches(*test, batch_size=50))
    assert acc >= 0.9, f"4 epochs of float training should reach 90%, got {acc:.3f}"
    float_model.train()
    digits.evaluate(float_model, test)
    assert float_model.training, "evaluate must restore train mode"
    float_model.eval()
    with pytest.raises(ValueError, match="no samples"):
        digits.evaluate(float_model, [])


# -- examples/quickstart.py --------------------------------------------------------------------
def test_quickstart_reports_float_every_method_and_qat(quickstart_run):
    accuracy, printed = quickstart_run
    assert list(accuracy) == ["float", *quickstart.CALIBRATION_METHODS, "qat", "integer"]
    assert accuracy["float"] >= 0.95, f"float accuracy {accuracy['float']:.4f} < 0.95"
    assert f"{100 * accuracy['float']:.2f}%" in printed
    for method in quickstart.CALIBRATION_METHODS:
        assert f"calibrated, {method}" in printed
    assert "QAT" in printed and "integer model" in printed


def test_quickstart_integer_model_keeps_the_qat_accuracy(quickstart_run):
    accuracy, printed = quickstart_run
    assert abs(accuracy["integer"] - accuracy["qat"]) <= 0.005, accuracy
    agreement = float(printed.split("same prediction on ")[1].split("%")[0])
    assert agreement >= 99.5, f"integer vs fake-quant argmax agreement {agreement}%"


def test_quickstart_writes_both_profiler_reports(quickstart_run):
    _, printed = quickstart_run
    for mode, folder in (("FvsQ", "float_calib"), ("QvsQ", "qat_integer")):
        line = next(ln for ln in printed.splitlines() if ln.startswith(f"{mode} report: "))
        html = Path(line.split(": ", 1)[1].split("  (")[0])
        assert html.name == "profiler.html" and html.parent.name == folder and html.exists()
        assert (html.parent / "findings.csv").exists() and (html.parent / "similarity.mmd").exists()
        cosine = float(line.split("final-output cosine ")[1].split(",")[0])
        assert cosine >= 0.98, line
        if mode == "QvsQ":  # exact evaluation: the integer model is the QAT model, to the bit
            assert cosine == 1.0, line


@pytest.mark.parametrize("method", quickstart.CALIBRATION_METHODS)
def test_quickstart_calibrated_accuracy_is_close_to_float(quickstart_run, method):
    accuracy, _ = quickstart_run
    assert accuracy[method] >= 0.99 * accuracy["float"], (
        f"{method} calibration: {accuracy[method]:.4f} < 99% of float {accuracy['float']:.4f}")


def test_quickstart_qat_accuracy_is_close_to_float(quickstart_run):
    accuracy, _ = quickstart_run
    assert accuracy["qat"] >= 0.995 * accuracy["float"], (
        f"QAT: {accuracy['qat']:.4f} < 99.5% of float {accuracy['float']:.4f}")


def test_prepare_leaves_the_float_model_untouched(data, float_model):
    before = copy.deepcopy(float_model.state_dict())
    x = torch.linspace(-1, 1, 2 * 256).reshape(2, 1, 16, 16)
    float_out = float_model(x)
    prepared = quickstart.prepare(float_model, "mse", data)
    assert prepared is not float_model
    after = float_model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before), "float weights changed"
    assert not any(isinstance(m, qatkit.FakeQuantize) for m in float_model.modules())
    torch.testing.assert_close(float_model(x), float_out, atol=0, rtol=0)


def test_prepared_digitsnet_is_fused_and_calibrated(data, float_model):
    model = quickstart.prepare(float_model, "percentile", data)
    assert {name: m.fused_name for name, m in model.named_modules() if hasattr(m, "fused_name")
            } == {"conv1": "ConvBnReLU2d", "conv2": "ConvBnReLU2d", "conv3": "ConvBnAddReLU2d",
                  "conv4": "ConvBnReLU2d", "fc": "Linear"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.children())
    assert model.fc.activation_post_process is None, "the head keeps a 32-bit output"
    quickstart.calibrate(model, data)
    states = qatkit.get_fake_quant_state(model)
    assert list(states) == [qatkit.FakeQuantState.VALIDATION]
    assert model.quant.activation_post_process.scale.tolist() == [1 / 128]
    fake_quants = [m for m in model.modules() if isinstance(m, qatkit.FakeQuantize)]
    assert all(fq.has_scale and fq.dtype == "qint8" for fq in fake_quants)
    per_channel = [fq for fq in fake_quants if fq.is_per_channel]
    assert len(per_channel) == 5 and all(fq.ch_axis == 0 for fq in per_channel)
    # DOMAIN.md's quick health check: final-output cosine similarity > 0.98
    x = data.test_x[:128]
    cosine = nn.functional.cosine_similarity(model(x), float_model(x), dim=1).mean()
    assert cosine > 0.98, f"float vs fake-quant output cosine {float(cosine):.4f}"


def test_weights_are_per_channel_int8_of_the_folded_weight(data, float_model):
    model = quickstart.prepare(float_model, "min_max", data)
    quickstart.calibrate(model, data)
    for name in ("conv1", "conv2", "conv3", "conv4", "fc"):
        module = getattr(model, name)
        w = module.folded_weight_bias()[0].detach()
        amax = w.abs().flatten(1).amax(dim=1)
        scale = amax / 128
        shape = (-1,) + (1,) * (w.dim() - 1)
        q = torch.round(w / scale.reshape(shape)).clamp(-128, 127)
        expected = q * scale.reshape(shape)
        got = module.weight_fake_quant(w)
        torch.testing.assert_close(got, expected, atol=0, rtol=0, msg=f"{name}.weight")
        assert q.abs().amax(dim=tuple(range(1, w.dim()))).min() >= 127, "unused int8 range"


# -- code in the docs --------------------------------------------------------------------------
DOCS = ["README.md", "docs/index.md", "docs/quantization_core.md", "docs/accuracy_debugging.md",
        "docs/eager.md"]
CODE_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


@pytest.mark.parametrize("doc", DOCS)
def test_python_blocks_in_docs_run(doc, tmp_path, monkeypatch):
    """Each ```python block runs, in order, in one namespace per file (like a notebook), in a
    temporary working directory (the blocks write reports)."""
    monkeypatch.chdir(tmp_path)
    text = (ROOT / doc).read_text()
    blocks = CODE_BLOCK.findall(text)
    assert blocks, f"{doc} has no ```python block"
    namespace: dict = {"__name__": f"docs_{Path(doc).stem}"}
    for i, block in enumerate(blocks):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(block, f"{doc}[block {i}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{doc}: python block {i} failed:\n{block}") from e
