"""Per-layer precision configurations of a calibrated model, emulated on a private copy.

:func:`~qatkit.profiler.causal.mixed_precision.suggest_mixed_precision` tries, layer by layer, int16
activations, int16 weights and float islands.  Preparing and calibrating the model again for
every trial would take minutes; instead each configuration is emulated on the calibrated
copy, as ``prepare_qat_fx`` + calibration would build it:

* int16 for a fake quant: its dtype, integer range and observer width change and its scale is
  recomputed from the observer's calibration statistics (calibration runs the float data flow,
  so a fresh calibration would record the very same statistics);
* a QuantStub that prepare inserted (``x_quant``) and the ``1 / divisor`` fake quant of a
  division take the qconfig of the op they feed, so they follow that op's activation dtype;
* a float island (``hybrid_dict``): its weight fake quants and its ``1 / divisor`` fake quant
  are off; its output stays float unless a quantized op uses it, where prepare re-quantizes it
  with a QuantStub of that op's qconfig -- emulated by the island's own output fake quant (the
  same tensor, the same calibration statistics) at that op's activation dtype.  A shared
  module made an island is re-quantized per call (each call its own QuantStub and scale),
  which one fake quant cannot emulate: its outputs are left float (each call's own scale
  loses little; the score of such a step is close, not exact).

Example::

    >>> space = PrecisionSpace(work)
    >>> config = space.initial()
    >>> with space.applied({**config, "cat": LayerPrecision(16, None)}):
    ...     out = work(x)                       # cat's output in int16
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Mapping

import torch
from qatkit.annotation import get_annotations
from qatkit.fake_quantize import FakeQuantize
from qatkit.observers import FixedScaleObserver, qrange
from torch import fx

from .switches import Quantizer, list_quantizers

__all__ = ["LayerPrecision", "PrecisionSpace", "Setting"]

#: one fake quant's emulated setting: (enabled, bits)
Setting = tuple[bool, int]


@dataclasses.dataclass(frozen=True)
class LayerPrecision:
    """How one layer is quantized.

    Attributes:
        act_bits: its activations' width (None: no activation fake quant, e.g. 32-bit out).
        weight_bits: its weight's width (None: no weight fake quant).
        island: a float island (``hybrid_dict``).
    """

    act_bits: int | None
    weight_bits: int | None
    island: bool = False


def _set_bits(fq: FakeQuantize, bits: int) -> None:
    if fq.bits == bits:
        return
    old = fq.bits
    fq.bits, fq.dtype = bits, f"qint{bits}"
    fq.quant_min, fq.quant_max = qrange(bits)
    obs = fq.observer
    obs.bits = bits
    obs.quant_min, obs.quant_max = qrange(bits)
    if obs.has_data or isinstance(obs, FixedScaleObserver):
        fq.calculate_scale()
    elif fq.has_scale:  # statistics not kept: the min/max rule, amax / 2^(bits-1)
        fq._set_scale(fq.scale * 2.0 ** (old - bits))


class PrecisionSpace:
    """The layers of a private copy and how a configuration sets their fake quants.

    Args:
        work: the private copy (:func:`~qatkit.profiler.core.running.private_model`).

    Attributes:
        layers: the layers (quantizers of node type ``"node"`` that prepare did not insert),
            by name, in execution order.
    """

    def __init__(self, work: fx.GraphModule) -> None:
        self.work = work
        self.fqs = {n: m for n, m in work.named_modules() if isinstance(m, FakeQuantize)}
        nodes = list_quantizers(work, "node")
        self.layers: dict[str, Quantizer] = {q.name: q for q in nodes if not q.inserted}
        self.inserted = [q for q in list_quantizers(work, "activation") if q.inserted]
        self.weights = {q.name: q.fake_quants for q in list_quantizers(work, "weight")}
        acts = {q.name: q.fake_quants for q in list_quantizers(work, "activation")}
        self.acts = {name: acts.get(name, ()) for name in self.layers}
        self.orig = {p: fq.bits for p, fq in self.fqs.items()}
        self.orig_enabled = {p: fq.enabled for p, fq in self.fqs.items()}
        self.outputs: dict[str, str] = {}
        self.consumers: dict[str, list[str]] = {}
        for ann in get_annotations(work).values():
            if ann.module is None or not ann.is_quantized:
                continue
            if ann.output is not None and ann.output.module_path in self.fqs:
                self.outputs.setdefault(ann.module, ann.output.module_path)
            for inp in ann.inputs:
                if inp.spec is not None and inp.spec.module_path in self.fqs:
                    users = self.consumers.setdefault(inp.spec.module_path, [])
                    if ann.module not in users and ann.module in self.layers:
                        users.append(ann.module)
        self.calls: dict[str, list[str]] = {}
        for node in work.graph.nodes:
            if node.op == "call_module":
                self.calls.setdefault(str(node.target), []).append(node.name)
        self._initial = self.initial()
        self.current = self.settings(self._initial)

    # -- configurations ----------------------------------------------------------------------
    def initial(self) -> dict[str, LayerPrecision]:
        """Every layer as calibrated."""
        out = {}
        for name in self.layers:
            act = [p for p in self.acts[name] if p == self.outputs.get(name)] or list(
                self.acts[name])
            w = self.weights.get(name, ())
            out[name] = LayerPrecision(self.orig[act[0]] if act else None,
                                       self.orig[w[0]] if w else None)
        return out

    def _follow(self, path: str, config: Mapping[str, LayerPrecision],
                initial: Mapping[str, LayerPrecision]) -> Setting:
        """A tensor re-quantized for the first quantized op that uses it: off when none
        does; that op's activation dtype when it was changed, else its own."""
        users = [c for c in self.consumers.get(path, []) if not config[c].island]
        if not users:
            return (False, self.orig[path])
        first = users[0]
        bits = config[first].act_bits
        if bits is None or bits == initial[first].act_bits:
            bits = self.orig[path]
        return (True, bits)

    def settings(self, config: Mapping[str, LayerPrecision]) -> dict[str, Setting]:
        """``{fake quant path: (enabled, bits)}`` of ``config``."""
        initial = self._initial
        out = {p: (self.orig_enabled[p], bits) for p, bits in self.orig.items()}
        for name, st in config.items():
            for p in self.weights.get(name, ()):
                out[p] = (not st.island, st.weight_bits or self.orig[p])
            for p in self.acts[name]:
                if not st.island:
                    out[p] = (True, st.act_bits or self.orig[p])
                elif p == self.outputs.get(name) and not self.layers[name].shared:
                    out[p] = self._follow(p, config, initial)
                elif p == self.outputs.get(name):  # a shared island: see the module docstring
                    out[p] = (False, self.orig[p])
                else:  # the 1 / divisor of a float division
                    out[p] = (False, self.orig[p])
        for q in self.inserted:
            for p in q.fake_quants:
                out[p] = self._follow(p, config, initial)
        return out

    # -- switching ---------------------------------------------------------------------------
    def _apply(self, settings: Mapping[str, Setting]) -> None:
        for p, (enabled, bits) in settings.items():
            fq = self.fqs[p]
            fq.enabled = enabled
            _set_bits(fq, bits)

    def diff(self, config: Mapping[str, LayerPrecision]) -> dict[str, Setting]:
        """The settings of ``config`` that differ from the current ones."""
        new = self.settings(config)
        return {p: s for p, s in new.items() if s != self.current[p]}

    def starts(self, paths: Iterator[str] | list[str]) -> list[str]:
        """The FX nodes calling the modules that own the fake quants ``paths``."""
        out: list[str] = []
        for p in paths:
            owner = p.rpartition(".")[0]
            while owner and owner not in self.calls:
                owner = owner.rpartition(".")[0]
            out.extend(self.calls.get(owner, []))
        return out

    @contextlib.contextmanager
    def applied(self, config: Mapping[str, LayerPrecision]) -> Iterator[None]:
        """``config`` set inside the block, the current settings restored after."""
        change = self.diff(config)
        saved = {p: (self.fqs[p].enabled, self.fqs[p].bits, self.fqs[p].scale.detach().clone())
                 for p in change}
        try:
            self._apply(change)
            yield
        finally:
            for p, (enabled, bits, scale) in saved.items():
                fq = self.fqs[p]
                fq.enabled = enabled
                _set_bits(fq, bits)
                with torch.no_grad():
                    fq._set_scale(scale)

    def commit(self, config: Mapping[str, LayerPrecision]) -> None:
        """Set ``config`` for good (the new base)."""
        change = self.diff(config)
        self._apply(change)
        self.current = {**self.current, **change}
