"""Post-training algorithms on digits-scale models built to show the problem each one fixes.

Run it with ``.venv/bin/python examples/ptq.py`` (about four minutes on one CPU core; ``--quick``
runs fewer optimization steps).  It trains the float models below on scikit-learn's digits,
quantizes each one with plain calibration, applies the algorithm made for its problem, and
prints float vs calibrated vs after-the-algorithm test accuracy: the table of docs/ptq.md.

The models and how the problem is built:

* ``TokenNet`` + :func:`with_outlier_channels` -- a LayerNorm -> Linear token mixer (rows of
  the image as tokens).  One LayerNorm channel's gamma and beta are multiplied by 256 and the
  next Linear's matching input column divided by 256: the float function is unchanged, the
  activation has one channel 256x larger than the rest -- the structure of the outlier
  features of large transformers (Dettmers et al. 2022; Xiao et al. 2023).  For SmoothQuant.
* ``SeparableNet`` + :func:`with_unequal_ranges` -- a depthwise-separable CNN (MobileNet-like);
  each depthwise channel's BatchNorm gamma and beta are multiplied by a factor between 2^-5
  and 2^5 and the next pointwise conv's input channel divided by it: same float function,
  depthwise outputs whose channel ranges differ by 1000x (what DFQ observed in MobileNetV2).
  For cross-layer equalization, next to torch.ao's ``_equalize.equalize`` on the float model.
* low-bit weights: int4 with qatkit's ``qint4`` weight qconfig
  (``default_calib_4bit_weight_8bit_act_fake_quant_qconfig``: int4 values in int8 storage,
  INT4 in ONNX); 3 bits by :func:`emulate_weight_bits` (the weight fake quants of a calibrated
  model get a 3-bit integer range).  For AdaRound, BRECQ, EasyQuant, bias correction and BN
  re-estimation.
* ``DigitsNet`` + :func:`with_dead_channel` -- one output channel of a conv has all-zero
  weights and a large BatchNorm beta (a pruned channel, the head's bias compensating its
  constant): its weight scale is ``float32.eps`` and its bias saturates int32.  For
  ``refine_weight_range``'s floor.

Example::

    >>> rows = main(quick=True)
    >>> [r for r in rows if r.algorithm == "smooth_quant"][0].after >= 0.96
    True
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
import warnings
from typing import Any, Callable

import qatkit
import torch
from digits import (
    SEED,
    DigitsData,
    DigitsNet,
    evaluate,
    load_digits_data,
    torch_threads,
    train_float,
)
from torch import Tensor, nn

__all__ = ["TokenNet", "SeparableNet", "with_outlier_channels", "with_unequal_ranges",
           "with_dead_channel", "emulate_weight_bits", "calibrated", "Row", "main"]

#: calibration set: 512 training images in batches of 128
CALIBRATION_IMAGES, CALIBRATION_BATCH = 512, 128


class TokenNet(nn.Module):
    """A transformer-like token mixer: the 16 image rows are tokens of 16 features.

    quant -> embed (Linear 16 -> dim) -> LayerNorm -> fc1 (Linear) -> ReLU -> fc2 (Linear)
    -> flatten -> head (Linear) -> dequant.

    Example::

        >>> TokenNet()(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.quant = qatkit.QuantStub(scale=1 / 128)
        self.embed = nn.Linear(16, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(16 * dim, 10)
        self.dequant = qatkit.DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        x = self.quant(x)
        t = self.norm(self.embed(x.reshape(x.shape[0], 16, 16)))
        t = self.fc2(self.relu(self.fc1(t)))
        return self.dequant(self.head(t.flatten(1)))


def _cbr(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class SeparableNet(nn.Module):
    """A depthwise-separable CNN: stem, (depthwise 3x3, pointwise 1x1) twice, pool, linear.

    Example::

        >>> SeparableNet()(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.quant = qatkit.QuantStub(scale=1 / 128)
        self.stem = _cbr(1, w, 3)
        self.dw1 = _cbr(w, w, 3, groups=w)
        self.pw1 = _cbr(w, 2 * w, 1)
        self.dw2 = _cbr(2 * w, 2 * w, 3, stride=2, groups=2 * w)
        self.pw2 = _cbr(2 * w, 2 * w, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, 10)
        self.dequant = qatkit.DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        x = self.quant(x)
        x = self.pw2(self.dw2(self.pw1(self.dw1(self.stem(x)))))
        return self.dequant(self.fc(torch.flatten(self.pool(x), 1)))


@torch.no_grad()
def with_outlier_channels(model: TokenNet, channels: tuple[int, ...] = (3,),
                          factor: float = 256.0) -> TokenNet:
    """A copy of ``model`` whose LayerNorm output channels ``channels`` are ``factor`` times
    larger, the next Linear compensating: the same float function."""
    model = copy.deepcopy(model)
    for c in channels:
        model.norm.weight[c] *= factor
        model.norm.bias[c] *= factor
        model.fc1.weight[:, c] /= factor
    return model


@torch.no_grad()
def with_unequal_ranges(model: SeparableNet, spread: float = 5.0,
                        seed: int = SEED) -> SeparableNet:
    """A copy of ``model`` whose depthwise output channels are scaled by ``2**u``, ``u``
    uniform in ``[-spread, spread]``, the next pointwise conv compensating: the same float
    function."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for dw, pw in ((model.dw1, model.pw1), (model.dw2, model.pw2)):
        bn = dw[1]
        c = 2.0 ** ((torch.rand(bn.num_features, generator=gen) * 2 - 1) * spread)
        bn.weight.mul_(c)
        bn.bias.mul_(c)
        pw[0].weight.div_(c.view(1, -1, 1, 1))
    return model


@torch.no_grad()
def with_dead_channel(model: DigitsNet, channel: int = 0, beta: float = 30.0) -> DigitsNet:
    """A copy of ``model`` whose ``conv4`` output channel ``channel`` is pruned: zero weights
    and a BatchNorm beta of ``beta``, so it outputs the constant ``beta``; the head's bias
    takes the constant back out (the model then computes what it computes with the channel
    at 0)."""
    model = copy.deepcopy(model)
    model.conv4.weight[channel] = 0.0
    model.bn4.bias[channel] = beta
    model.fc.bias -= model.fc.weight[:, channel] * beta
    return model


@torch.no_grad()
def emulate_weight_bits(qat_model: nn.Module, bits: int) -> nn.Module:
    """Put every weight of a calibrated int8 model on a ``bits``-bit grid, in place: each
    weight fake quant gets the integer range ``[-2**(bits-1), 2**(bits-1) - 1]`` and its
    observer ``bits``, and its scale is recomputed (``max|w| / 2**(bits-1)``).  The integers
    stay in int8 storage; the bias keeps its int32 grid.  For widths qatkit has no dtype for
    (3 bits); 4 bits is the ``qint4`` weight qconfig.

    Example::

        >>> emulate_weight_bits(qat_model, 4).conv1.weight_fake_quant.quant_max
        7
    """
    for mod in qat_model.modules():
        fq = getattr(mod, "weight_fake_quant", None)
        if isinstance(fq, qatkit.FakeQuantize):
            fq.quant_min, fq.quant_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            fq.observer.bits = bits
            fq.calculate_scale()
    return qat_model


def calibrated(float_model: nn.Module, data: DigitsData,
               qconfig: qatkit.QConfig = qatkit.default_calib_8bit_fake_quant_qconfig,
               weight_bits: int = 8, batches: list[Tensor] | None = None
               ) -> torch.fx.GraphModule:
    """``float_model`` prepared with ``qconfig``, calibrated on ``batches`` (default: the
    first :data:`CALIBRATION_IMAGES` training images), weights at ``weight_bits`` (4: qint4;
    other widths below 8 emulated)."""
    if weight_bits == 4:
        qconfig = qatkit.QConfig(
            activation=qconfig.activation,
            weight=qatkit.default_calib_4bit_weight_8bit_act_fake_quant_qconfig.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(float_model, {"": qconfig},
                                   example_inputs=(data.train_x[:8],)).eval()
    qatkit.calibrate(qm, batches or calibration_batches(data), progress=False)
    if weight_bits not in (4, 8):
        emulate_weight_bits(qm, weight_bits)
    return qm


def calibration_batches(data: DigitsData) -> list[Tensor]:
    return list(data.train_x[:CALIBRATION_IMAGES].split(CALIBRATION_BATCH))


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: a model built to show a problem, and one algorithm on it."""

    model: str
    problem: str
    float_acc: float
    calibrated: float
    algorithm: str
    after: float
    seconds: float

    @property
    def of_float(self) -> float:
        return self.after / self.float_acc


def _torch_ao_equalized(float_model: SeparableNet) -> SeparableNet:
    """torch.ao's cross-layer equalization (``torch.ao.quantization._equalize``) of the
    depthwise -> pointwise pairs, on the float model with its BatchNorms folded
    (``fuse_modules``); it cannot pair a conv with a depthwise conv after it."""
    from torch.ao.quantization import fuse_modules
    from torch.ao.quantization._equalize import equalize

    ref = copy.deepcopy(float_model).eval()
    fuse_modules(ref, [[f"{n}.0", f"{n}.1"] for n in ("stem", "dw1", "pw1", "dw2", "pw2")],
                 inplace=True)
    return equalize(ref, [["dw1.0", "pw1.0"], ["dw2.0", "pw2.0"]], 1e-4, inplace=True)


def main(quick: bool = False, print_table: bool = True) -> list[Row]:
    """Train, quantize, apply each algorithm, print the table; return its rows."""
    data = load_digits_data()
    calib = calibration_batches(data)
    test = (data.test_x, data.test_y)
    steps = 100 if quick else 500
    recon = dict(finetune_epochs=steps, finetune_batch_size=32, progress=False)
    rows: list[Row] = []

    def acc(model: nn.Module) -> float:
        return evaluate(model, test)

    def run(name: str, problem: str, fmodel: nn.Module, qm: torch.fx.GraphModule,
            algorithms: list[tuple[str, Callable[[], Any]]]) -> None:
        f, c = acc(fmodel), acc(qm)
        for algo, fn in algorithms:
            t = time.perf_counter()
            out = fn()
            after = acc(out)
            rows.append(Row(name, problem, f, c, algo, after, time.perf_counter() - t))

    with torch_threads(1):
        torch.manual_seed(SEED)
        token = with_outlier_channels(train_float(TokenNet(), data, epochs=8))
        torch.manual_seed(SEED)
        separable = train_float(SeparableNet(), data)
        torch.manual_seed(SEED)
        digitsnet = train_float(DigitsNet(), data)

        qm = calibrated(token, data)
        int16 = qatkit.default_calib_8bit_weight_16bit_act_fake_quant_qconfig
        q16 = qatkit.prepare_qat_fx(token, {
            "": qatkit.default_calib_8bit_fake_quant_qconfig,
            "module_name": [("norm", int16)]}, example_inputs=(data.train_x[:8],)).eval()
        qatkit.calibrate(q16, calib, progress=False)
        run("TokenNet", "1 LayerNorm channel 256x (int8)", token, qm, [
            ("smooth_quant", lambda: qatkit.smooth_quant(qm, calib, progress=False)),
            ("(int16 LayerNorm output)", lambda: q16)])

        unequal = with_unequal_ranges(separable)
        qm = calibrated(unequal, data)
        run("SeparableNet", "depthwise ranges 2^-5..2^5 (int8)", unequal, qm, [
            ("cross_layer_equalization",
             lambda: qatkit.cross_layer_equalization(qm, calib, progress=False)),
            ("(torch.ao equalize, float model)",
             lambda: calibrated(_torch_ao_equalized(unequal), data))])

        dead = with_dead_channel(digitsnet)
        qm = calibrated(dead, data)
        run("DigitsNet", "pruned channel, beta 30 (int8)", dead, qm, [
            ("refine_weight_range",
             lambda: qatkit.refine_weight_range(qm, calib, progress=False))])

        for name, fmodel, bits in (("SeparableNet", separable, 8), ("SeparableNet", separable, 4),
                                   ("DigitsNet", digitsnet, 3)):
            qm = calibrated(fmodel, data, weight_bits=bits)
            problem = ("W8A8 (nothing to fix)" if bits == 8 else "W4A8 (qint4)" if bits == 4
                       else f"W{bits}A8 (emulated)")
            run(name, problem, fmodel, qm, [
                ("adaround", lambda qm=qm: qatkit.adaround(qm, calib, **recon)),
                ("brecq", lambda qm=qm: qatkit.brecq(qm, calib, **recon)),
                ("easy_quant", lambda qm=qm: qatkit.easy_quant(
                    qm, calib, search_steps=20 if quick else 50, progress=False)),
                ("bias_correction",
                 lambda qm=qm: qatkit.bias_correction(qm, calib, progress=False)),
                ("bn_reestimation",
                 lambda qm=qm: qatkit.bn_reestimation(qm, calib, progress=False)),
                ("adaround, then bias_correction", lambda qm=qm: qatkit.bias_correction(
                    qatkit.adaround(qm, calib, **recon), calib, progress=False))])
    if print_table:
        print(format_table(rows))
    return rows


def format_table(rows: list[Row]) -> str:
    """The rows as the markdown table of docs/ptq.md."""
    lines = ["| model | problem | float | calibrated | algorithm | after | % of float | time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.problem} | {100 * r.float_acc:.1f} | "
                     f"{100 * r.calibrated:.1f} | {r.algorithm} | {100 * r.after:.1f} | "
                     f"{100 * r.of_float:.1f} | {r.seconds:.1f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer optimization steps")
    main(quick=parser.parse_args().quick)
