"""Accuracy debugging, end to end: find the quantizer that breaks a model, and fix it.

Run it with ``.venv/bin/python examples/debug_walkthrough.py`` (about a minute on one CPU
core).  It trains :class:`FaultNet` on scikit-learn's digits, injects one fault at a time
(each keeps the float function: a scale is moved from one layer to the next), calibrates, and
for each fault:

1. ranks the quantizers with :func:`qatkit.profiler.get_sensitivity_of_nodes` (the culprit
   comes first);
2. leaves the top 1, 2, 3 float with :func:`qatkit.profiler.plot_acc_error` (the output comes
   back);
3. asks :func:`qatkit.profiler.suggest_mixed_precision` for a configuration reaching 99% of
   the float accuracy, prepares the float model again with it, calibrates, and prints the
   accuracy before and after.

The faults (:data:`FAULTS`), each a real-world pattern:

* ``cat_ranges`` -- the two inputs of a ``torch.cat`` differ ~1000x in range (``branch_b``'s
  BatchNorm scaled by 1000, ``conv_h`` dividing it back): cat's one output scale squeezes
  ``branch_a`` to zero.  Culprit: the ``cat`` activation quantizer.
* ``outlier_channel`` -- one output channel of ``mid`` is 512x larger than the others (the
  next convs divide it back): per-tensor int8 leaves the other channels a few levels.
  Culprit: the ``mid`` activation quantizer.
* ``shared_ranges`` -- one conv module, ``shared``, called on two inputs whose ranges differ
  1000x (``conv_q`` scaled up, ``fc_b`` dividing back): the calls share one output scale, set
  by the larger one, which rounds the other call's outputs to zero.  Culprit: the ``shared``
  activation quantizer.
* ``weight_outlier`` -- ``conv2``'s weights reading one input channel are 1000x larger (that
  channel of ``conv1``'s output 1000x smaller): each output channel's weight scale is set by
  the outlier and its other weights round to zero.  Culprit: the ``conv2`` weight quantizer.

Example::

    >>> rows = main(print_report=False)
    >>> all(r.rank < 3 and r.after >= 0.99 * r.float_acc and r.layers <= 3 for r in rows)
    True
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import tempfile
import time
import warnings
from typing import Callable

import qatkit
import qatkit.profiler as qp
import torch
from digits import SEED, DigitsData, evaluate, load_digits_data, torch_threads, train_float
from torch import Tensor, nn

__all__ = ["FaultNet", "FAULTS", "Fault", "with_fault", "calibrated", "calibration_batches",
           "train_faultnet", "trained", "Row", "main"]


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1) -> tuple[nn.Module, ...]:
    return (nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU())


class FaultNet(nn.Module):
    """A small CNN with a site for each fault: stem, ``conv2``, ``mid``, two branches joined
    by ``torch.cat``, a conv module ``shared`` called twice, two linear heads added.

    Example::

        >>> FaultNet()(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.quant = qatkit.QuantStub(scale=1 / 128)
        self.conv1, self.bn1, self.relu1 = _cbr(1, w)
        self.conv2, self.bn2, self.relu2 = _cbr(w, w)
        self.mid, self.mid_bn, self.mid_relu = _cbr(w, w)
        self.conv_a, self.bn_a, self.relu_a = _cbr(w, w // 2)
        self.conv_b, self.bn_b, self.relu_b = _cbr(w, w // 2)
        self.conv_h, self.bn_h, self.relu_h = _cbr(w, 2 * w, stride=2)
        self.conv_p, self.bn_p, self.relu_p = _cbr(2 * w, w)
        self.conv_q, self.bn_q, self.relu_q = _cbr(2 * w, w)
        self.shared = nn.Conv2d(w, w, 1, bias=False)
        self.pool_1 = nn.AdaptiveAvgPool2d(1)
        self.pool_2 = nn.AdaptiveAvgPool2d(1)
        self.fc_a = nn.Linear(w, num_classes)
        self.fc_b = nn.Linear(w, num_classes)
        self.dequant = qatkit.DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        x = self.quant(x)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.mid_relu(self.mid_bn(self.mid(x)))
        a = self.relu_a(self.bn_a(self.conv_a(x)))
        b = self.relu_b(self.bn_b(self.conv_b(x)))
        x = torch.cat([a, b], dim=1)
        x = self.relu_h(self.bn_h(self.conv_h(x)))
        p = self.relu_p(self.bn_p(self.conv_p(x)))
        q = self.relu_q(self.bn_q(self.conv_q(x)))
        f1 = torch.flatten(self.pool_1(self.shared(p)), 1)
        f2 = torch.flatten(self.pool_2(self.shared(q)), 1)
        return self.dequant(self.fc_a(f1) + self.fc_b(f2))


def _scale_bn(bn: nn.BatchNorm2d, factor: Tensor | float) -> None:
    """Multiply a BatchNorm's output (before a ReLU) by ``factor`` (per channel or scalar)."""
    bn.weight.mul_(factor)
    bn.bias.mul_(factor)


@torch.no_grad()
def _cat_ranges(m: FaultNet, factor: float = 1000.0) -> None:
    _scale_bn(m.bn_b, factor)
    half = m.conv_a.out_channels
    m.conv_h.weight[:, half:] /= factor


@torch.no_grad()
def _outlier_channel(m: FaultNet, factor: float = 512.0, channel: int = 3) -> None:
    c = torch.ones(m.mid.out_channels)
    c[channel] = factor
    _scale_bn(m.mid_bn, c)
    for conv in (m.conv_a, m.conv_b):
        conv.weight[:, channel] /= factor


@torch.no_grad()
def _shared_ranges(m: FaultNet, factor: float = 1000.0) -> None:
    _scale_bn(m.bn_q, factor)
    m.fc_b.weight /= factor


@torch.no_grad()
def _weight_outlier(m: FaultNet, factor: float = 1000.0, channel: int = 5) -> None:
    c = torch.ones(m.conv1.out_channels)
    c[channel] = 1.0 / factor
    _scale_bn(m.bn1, c)
    m.conv2.weight[:, channel] *= factor


@dataclasses.dataclass(frozen=True)
class Fault:
    """An injected fault: how to inject it (in place, keeping the float function) and the
    quantizer that causes the drop (name and node type, as the sensitivity tools name it)."""

    inject: Callable[[FaultNet], None]
    culprit: str
    node_type: str
    text: str


#: fault name -> Fault
FAULTS: dict[str, Fault] = {
    "cat_ranges": Fault(_cat_ranges, "cat", "activation",
                        "cat inputs differ 1000x in range"),
    "outlier_channel": Fault(_outlier_channel, "mid", "activation",
                             "one output channel of mid is 512x the others"),
    "shared_ranges": Fault(_shared_ranges, "shared", "activation",
                           "a shared conv called on inputs 1000x apart in range"),
    "weight_outlier": Fault(_weight_outlier, "conv2", "weight",
                            "conv2's weights on one input channel are 1000x larger"),
}


def with_fault(model: FaultNet, fault: str) -> FaultNet:
    """A copy of the trained ``model`` with ``fault`` (a key of :data:`FAULTS`) injected:
    the same float function, a quantization problem at the fault's culprit.

    Example::

        >>> faulty = with_fault(float_model, "cat_ranges")
    """
    model = copy.deepcopy(model)
    FAULTS[fault].inject(model)
    return model.eval()


def train_faultnet(data: DigitsData, epochs: int = 6) -> FaultNet:
    """:class:`FaultNet` trained in float on the digits (seeded; a few seconds).

    Example::

        >>> model = train_faultnet(load_digits_data())
    """
    torch.manual_seed(SEED)
    return train_float(FaultNet(), data, epochs=epochs)


@functools.lru_cache(maxsize=1)
def trained(epochs: int = 6) -> tuple[DigitsData, FaultNet]:
    """``(data, model)``: the digits and :func:`train_faultnet`'s model, trained once per
    process (one thread) and shared: copy the model before changing it (:func:`with_fault`
    does).

    Example::

        >>> data, float_model = trained()
    """
    with torch_threads(1):
        data = load_digits_data()
        return data, train_faultnet(data, epochs)


def calibration_batches(data: DigitsData) -> list[Tensor]:
    """256 training images in two batches: the calibration data of every model here."""
    return list(data.train_x[:256].split(128))


def calibrated(float_model: nn.Module, data: DigitsData, qconfig_dict: dict | None = None,
               **prepare_kwargs) -> nn.Module:
    """``float_model`` prepared (int8 calibration qconfig, or ``qconfig_dict``) and
    calibrated on :func:`calibration_batches` (a new model; ``float_model`` is unchanged).

    Example::

        >>> calib = calibrated(with_fault(model, "cat_ranges"), data)
    """
    qconfig_dict = qconfig_dict or {"": qatkit.default_calib_8bit_fake_quant_qconfig}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qatkit.prepare_qat_fx(copy.deepcopy(float_model), qconfig_dict,
                                   example_inputs=(data.train_x[:2],), **prepare_kwargs)
    qatkit.calibrate(qm.eval(), calibration_batches(data), progress=False)
    return qm


@dataclasses.dataclass(frozen=True)
class Row:
    """One fault's numbers."""

    fault: str
    culprit: str
    rank: int
    top3: tuple[str, ...]
    float_acc: float
    before: float
    recovered: tuple[float, ...]
    after: float
    layers: int
    changes: tuple[str, ...]
    seconds: float


def run_fault(float_model: FaultNet, fault: str, data: DigitsData, out_dir: str,
              print_report: bool = True) -> Row:
    """The walkthrough for one fault (see the module docstring)."""
    start = time.perf_counter()
    spec = FAULTS[fault]
    faulty = with_fault(float_model, fault)
    test = (data.test_x, data.test_y)

    def accuracy(model: nn.Module) -> float:
        return evaluate(model, test)

    float_acc = accuracy(faulty)
    calib = calibrated(faulty, data)
    before = accuracy(calib)
    sample = data.train_x[:128]
    # 1. which quantizer? (one node type at a time, as the guides do)
    node_message = qp.get_sensitivity_of_nodes(
        model_or_file=calib, metrics="cosine-similarity", calibrated_data=sample,
        output_node=None, node_type=spec.node_type, data_num=None, verbose=False,
        interested_nodes=None)
    ranked = list(node_message.keys())
    rank = ranked.index(spec.culprit) if spec.culprit in ranked else len(ranked)
    # 2. does leaving the top ops float (weight and activation together) bring it back?
    nodes = list(qp.get_sensitivity_of_nodes(
        model_or_file=calib, metrics="cosine-similarity", calibrated_data=sample,
        node_type="node", verbose=False))
    sweep = qp.plot_acc_error(save_dir=f"{out_dir}/{fault}", calibrated_data=sample,
                              model_or_file=calib, verbose=False,
                              non_quantize_node=[nodes[:1], nodes[:2], nodes[:3]],
                              metric="cosine-similarity")
    recovered = tuple(float(v) for v in sweep.tables["non_quantize"]["Cosine"])
    # 3. the configuration that fixes it, applied to the float model
    res = qp.suggest_mixed_precision(calib, sample, target=0.99 * float_acc,
                                     eval_fn=accuracy, max_layers=3, verbose=False)
    fixed = calibrated(faulty, data, **res.prepare_kwargs)
    after = accuracy(fixed)
    row = Row(fault, spec.culprit, rank, tuple(ranked[:3]), float_acc, before, recovered,
              after, len(res.layers_changed),
              tuple(f"{s.layer}: {s.change}" for s in res.steps),
              time.perf_counter() - start)
    if print_report:
        print(f"\n== {fault}: {spec.text}")
        print(f"   float {float_acc:.4f}   calibrated int8 {before:.4f} "
              f"({100 * before / float_acc:.1f}% of float)")
        print(f"   sensitivity ({spec.node_type}, cosine): top 3 {list(ranked[:3])} -> culprit "
              f"{spec.culprit!r} ranked {rank + 1}")
        print(f"   output cosine with 0/1/2/3 of {nodes[:3]} left float: "
              + " / ".join(f"{v:.4f}" for v in recovered))
        print(f"   suggest_mixed_precision: {', '.join(row.changes) or 'no change'}"
              f" ({res.evaluations} evaluations)")
        print(f"   after prepare_qat_fx(**res.prepare_kwargs) + calibrate: {after:.4f} "
              f"({100 * after / float_acc:.1f}% of float, {row.layers} layer(s) changed)")
    return row


def main(print_report: bool = True, faults: tuple[str, ...] = tuple(FAULTS),
         out_dir: str | None = None) -> list[Row]:
    """Train, inject each fault, debug and fix it; print the numbers (see the module
    docstring).  Returns one :class:`Row` per fault."""
    with torch_threads(1), tempfile.TemporaryDirectory() as tmp:
        data = load_digits_data()
        float_model = train_faultnet(data)
        rows = [run_fault(float_model, f, data, out_dir or tmp, print_report) for f in faults]
    if print_report:
        print("\nfault            culprit  rank  float   before  after   layers")
        for r in rows:
            print(f"{r.fault:<16} {r.culprit:<8} {r.rank + 1:>4}  {r.float_acc:.4f}  "
                  f"{r.before:.4f}  {r.after:.4f}  {r.layers}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fault", choices=list(FAULTS), action="append",
                        help="run only this fault (repeatable)")
    parser.add_argument("--out-dir", help="keep the plots and tables here")
    args = parser.parse_args()
    main(faults=tuple(args.fault or FAULTS), out_dir=args.out_dir)
