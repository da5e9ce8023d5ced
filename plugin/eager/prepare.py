"""prepare_qat: prepare a model for QAT by swapping its modules (eager mode).

For models users prefer to prepare by hand (torch.ao's eager mode): quantization is where the
model says, module by module, and the forward is never rewritten.

* **qconfigs**: a module's ``.qconfig`` attribute (``None`` keeps it float) covers everything
  inside it, above the ``qconfig_dict`` entries (``""``, ``"module_type"``, ``"module_name"``),
  resolved by the same :class:`qatkit.fx.qconfig_dict.QConfigResolver` as ``prepare_qat_fx``.
* **module swapping**, to the QAT modules the FX path uses (:mod:`qatkit.nn.qat`):
  conv / conv-transpose / linear -> ``from_float`` (fused with the BatchNorm and ReLU of a
  :func:`qatkit.fuse_modules` group, or of a torch.ao fused module); activations, pools,
  norms, softmax, upsampling, grid sample -> ``output_quantized``; a ``QuantStub`` -> the QAT
  ``QuantStub`` (a fixed ``scale`` honoured); a ``DeQuantStub`` stays the float boundary; a
  :class:`qatkit.nn.FloatFunctional` -> :class:`~qatkit.eager.QATFloatFunctional`.  torch.ao's
  ``QuantStub`` / ``DeQuantStub`` / ``FloatFunctional`` are taken as qatkit's.
* **float tensors quantized where they enter quantized ops**, as prepare_qat_fx does: a float
  island (qconfig None, or ``hybrid_dict``), a module without a quantized implementation (an
  ``nn.LSTM``, a custom leaf), a functional op (a model input without ``QuantStub`` is an
  error):
  :mod:`qatkit.eager.boundaries` attaches the ``QuantStub`` to the module that makes the
  tensor (``output_quant``) or, for functional ops and inputs, to the module it enters
  (``input_quant``).  Functional ops themselves stay float (eager mode swaps modules): use a
  module or a :class:`qatkit.nn.FloatFunctional` to quantize them; prepare lists them.
* **one trace, after swapping**: the prepared model is traced with qatkit's tracer (QAT
  modules are leaves) and annotated (:func:`qatkit.eager.eager_graph`): it places those
  stubs, and each QAT module learns which fake quants make its inputs (the bias grid and
  exact evaluation need them, as in prepare_qat_fx).  A model that cannot be traced still
  trains (with a warning); convert, the profiler and the exporter need the trace.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from torch import fx, nn
from torch.ao.nn.quantized import FloatFunctional as AoFloatFunctional
from torch.ao.quantization import DeQuantStub as AoDeQuantStub
from torch.ao.quantization import QuantStub as AoQuantStub

from .._modules import module_device, set_module
from ..annotation import AnnotatedOp
from ..fake_quantize import FakeQuantize
from ..fx.annotate import op_kind
from ..fx.patterns import PASSTHROUGH_MODULES
from ..fx.qconfig_dict import QConfigResolver, check_hybrid_args
from ..nn import qat
from ..nn.functional_modules import FloatFunctional
from ..nn.stubs import DeQuantStub, QuantStub
from ..observers import FixedScaleObserver, dtype_to_bits
from ..qconfig import QConfig, default_qat_8bit_fake_quant_qconfig
from .functional import QATFloatFunctional
from .fuse import fused_parts
from .graph import link_eager_model
from .info import EAGER_ATTR, FLOAT_NOTE_ATTR, EagerInfo

__all__ = ["prepare_qat", "activation_qconfig"]

_NOTE_CONFIG = "qconfig None (float island)"
_NOTE_UNSUPPORTED = "no quantized implementation"
_CUSTOM_KEYS = {"concrete_args", "leaf_module_types", "leaf_module_names", "wrapped_functions"}
#: torch.nn containers that are never called (walked, not traced)
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def _is_torch_leaf(mod: nn.Module) -> bool:
    """A module torch.fx does not trace into (a ``torch.nn`` module other than a container)."""
    module = type(mod).__module__
    return (module.startswith("torch.nn") or module.startswith("torch.ao.nn")) and not \
        isinstance(mod, (nn.Sequential,) + _CONTAINERS)


def prepare_qat(model: nn.Module, qconfig_dict: dict | None = None, hybrid: bool = False,
                hybrid_dict: dict | None = None, inplace: bool = False,
                prepare_custom_config_dict: dict | None = None) -> nn.Module:
    """Prepare a float model for calibration and QAT by swapping its modules (eager mode).

    Args:
        model: the float model, with ``QuantStub`` / ``DeQuantStub`` where quantization
            starts and ends, :class:`qatkit.nn.FloatFunctional` modules for functional ops,
            and chains fused with :func:`qatkit.fuse_modules` (see the module docstring).
        qconfig_dict: as for :func:`qatkit.prepare_qat_fx` (``""``, ``"module_type"``,
            ``"module_name"``); None: only the modules' ``.qconfig`` attributes count.
        hybrid: step quantization, as prepare_qat_fx: ``hybrid_dict`` names float islands.
            A module whose qconfig is None is a float island either way (its output is
            quantized again where a quantized op uses it); ``hybrid=True`` alone is accepted
            (the QAT guide's ``model.conv1.qconfig = None; prepare_qat(model, hybrid=True)``).
        hybrid_dict: ``{"module_name": [...], "module_type": [...]}``: float islands (needs
            ``hybrid=True``), above every qconfig.
        inplace: prepare ``model`` itself instead of a deep copy.
        prepare_custom_config_dict: the tracing options of prepare_qat_fx
            (``concrete_args``, ``leaf_module_types``, ``leaf_module_names``,
            ``wrapped_functions``), used whenever qatkit traces this model.

    Returns:
        the model (its own class and forward) with QAT modules, fake quants in QAT state.

    Raises:
        ValueError: no module gets a qconfig, a qconfig that is not a ``qatkit.QConfig``, a
            bad ``qconfig_dict`` / ``hybrid_dict`` key or name, a model already prepared, a
            qconfig given to a module without quantized implementation (``nn.LSTM``...), a
            model input entering a quantized module without a ``QuantStub``, one
            FloatFunctional used for two ops (:class:`qatkit.eager.FloatFunctionalReuseError`);
            each message names the module and the fix.

    Warns:
        UserWarning: functional ops that stay float (not written with a FloatFunctional),
            modules without quantized implementation kept float, a module called at several
            places with different input scales, a forward that cannot be traced.

    Example::

        >>> model = qatkit.fuse_modules(model, [["conv1", "bn1", "relu1"]])
        >>> model.qconfig = qatkit.default_qat_8bit_fake_quant_qconfig
        >>> model.conv2.qconfig = None          # a float island
        >>> qat_model = qatkit.prepare_qat(model, hybrid=True)
        >>> qatkit.calibrate(qat_model, data)
    """
    custom = dict(prepare_custom_config_dict or {})
    bad = set(custom) - _CUSTOM_KEYS
    if bad:
        raise ValueError(f"unknown prepare_custom_config_dict keys {sorted(bad)}; valid: "
                         f"{sorted(_CUSTOM_KEYS)}")
    islands = check_hybrid_args(True, hybrid_dict) if hybrid_dict else None
    if hybrid_dict and not hybrid:
        check_hybrid_args(False, hybrid_dict)  # raises: hybrid_dict needs hybrid=True
    done = [n for n, m in model.named_modules() if isinstance(m, (FakeQuantize, AnnotatedOp))]
    if done:
        raise ValueError(f"prepare_qat: {type(model).__name__} is already prepared (it holds "
                         f"fake quants / QAT modules: {done[:4]}); prepare the float model")
    if not inplace:
        memo = {id(m.__dict__["qconfig"]): m.__dict__["qconfig"] for m in model.modules()
                if "qconfig" in m.__dict__}
        model = copy.deepcopy(model, memo)
        return _prepare(model, qconfig_dict, islands, hybrid, custom)
    saved = _snapshot(model)
    try:
        return _prepare(model, qconfig_dict, islands, hybrid, custom)
    except BaseException:
        _restore(saved)  # inplace: a failed prepare leaves the model as it was
        raise


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Every module's attributes, its dicts (submodules, parameters, buffers, hooks) copied
    one level deep: what prepare changes (it swaps modules and adds attributes; it never
    writes into a tensor)."""
    return [(m, {k: copy.copy(v) if isinstance(v, dict) else v for k, v in m.__dict__.items()})
            for m in model.modules()]


def _restore(saved: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    for module, attrs in saved:
        module.__dict__.clear()
        module.__dict__.update(attrs)


def _prepare(model: nn.Module, qconfig_dict: dict | None, islands: dict | None, hybrid: bool,
             custom: dict[str, Any]) -> nn.Module:
    resolver = QConfigResolver(qconfig_dict or {}, _empty_graph(), {}, {},
                               float_overrides=islands, root=model)
    swapper = _Swapper(model, resolver)
    swapper.run()
    if not swapper.quantized:
        raise ValueError(
            f"prepare_qat: no module of {type(model).__name__} has a qconfig. Set one: "
            "model.qconfig = qatkit.default_qat_8bit_fake_quant_qconfig, or pass "
            "qconfig_dict={'': qatkit.default_qat_8bit_fake_quant_qconfig}")
    model.__dict__[EAGER_ATTR] = EagerInfo(_trace_args(custom), hybrid=hybrid)
    swapper.warn()
    link_eager_model(model, lambda m: activation_qconfig(getattr(m, "qconfig", None),
                                                         resolver.global_qconfig))
    return model


def _trace_args(custom: dict[str, Any]) -> dict[str, Any]:
    return {"concrete_args": custom.get("concrete_args"),
            "leaf_modules": tuple(custom.get("leaf_module_types", ())),
            "leaf_module_names": tuple(custom.get("leaf_module_names", ())),
            "wrapped_functions": tuple(custom.get("wrapped_functions", ()))}


def _empty_graph() -> fx.GraphModule:
    graph = fx.Graph()
    graph.output(None)
    return fx.GraphModule(nn.Module(), graph)


def _is_quant_stub(mod: nn.Module) -> bool:
    return isinstance(mod, (QuantStub, AoQuantStub))


def _is_dequant_stub(mod: nn.Module) -> bool:
    return isinstance(mod, (DeQuantStub, AoDeQuantStub))


def _is_float_functional(mod: nn.Module) -> bool:
    return isinstance(mod, (FloatFunctional, AoFloatFunctional))


class _Swapper:
    """The walk over the module tree (see the module docstring)."""

    def __init__(self, model: nn.Module, resolver: QConfigResolver) -> None:
        self.model = model
        self.resolver = resolver
        self.device = module_device(model)
        self.quantized = 0
        self.float_ops: dict[str, list[str]] = {}

    def run(self) -> None:
        self._walk("", self.model)

    def warn(self) -> None:
        if self.float_ops:
            listing = "; ".join(f"{t}: {', '.join(ns[:4])}{' ...' if len(ns) > 4 else ''}"
                                for t, ns in sorted(self.float_ops.items()))
            warnings.warn(
                f"prepare_qat: {sum(map(len, self.float_ops.values()))} module(s) have no "
                f"quantized implementation and compute in float (quantized again where a "
                f"quantized op uses their output): {listing}", UserWarning, stacklevel=3)

    def qconfig(self, path: str, mod: nn.Module) -> Any:
        keys: tuple = (type(mod), op_kind(mod))
        parts = fused_parts(mod, path)
        if parts is not None:
            keys = keys + (type(parts[0]), op_kind(parts[0]))
        qc = self.resolver.resolve(path, path, mod, keys)
        if qc is not None and not isinstance(qc, QConfig):
            raise ValueError(
                f"prepare_qat: module '{path or '<root>'}' ({type(mod).__name__}) has qconfig "
                f"{qc!r}, not a qatkit.QConfig; use one of qatkit's (e.g. "
                "qatkit.default_qat_8bit_fake_quant_qconfig), or None to keep it float")
        return qc

    def _set(self, path: str, old: nn.Module, new: nn.Module, qc: Any,
             float_name: str | None = None) -> None:
        new.qconfig = qc
        new.training = old.training  # (a fused BatchNorm keeps its own flag)
        dev = module_device(old, self.device)
        if dev is not None:
            for m in new.modules():
                if isinstance(m, FakeQuantize):
                    m.to(dev)
        new.qatkit_float_name = float_name or path
        set_module(self.model, path, new)
        self.quantized += 1

    def _walk(self, path: str, mod: nn.Module) -> None:
        for name, child in list(mod.named_children()):
            cpath = f"{path}.{name}" if path else name
            if not self._swap(cpath, child, self.qconfig(cpath, child)):
                self._walk(cpath, child)

    def _swap(self, path: str, child: nn.Module, qc: Any) -> bool:
        """Prepare ``child``; True when its subtree is done (no recursion)."""
        if _is_quant_stub(child):
            self._quant_stub(path, child, qc)
            return True
        if _is_dequant_stub(child):
            if not isinstance(child, DeQuantStub):
                set_module(self.model, path, DeQuantStub().train(child.training))
            return True
        if isinstance(child, PASSTHROUGH_MODULES):
            return True
        if qc is None:  # a float island; a module inside may have its own qconfig
            child.__dict__[FLOAT_NOTE_ATTR] = _NOTE_CONFIG
            return False
        parts = fused_parts(child, path)
        if parts is not None or type(child) in qat.FLOAT_TO_QAT:
            weighted, bn, act, float_name = parts or (child, None, None, path)
            self._set(path, child, qat.from_float(weighted, qc, bn=bn, act=act), qc,
                      float_name)
            return True
        if _is_float_functional(child):
            new = QATFloatFunctional(qc.activation() if qc.activation is not None else None)
            new.qatkit_path = path
            self._set(path, child, new, qc)
            return True
        if type(child) in qat.OUTPUT_QUANTIZED_MODULES:
            fq = qc.activation() if qc.activation is not None else None
            self._set(path, child, qat.output_quantized(child, fq), qc)
            return True
        if isinstance(child, (nn.Sequential,) + _CONTAINERS):  # (an empty one: identity)
            return False
        if _is_torch_leaf(child) or not any(True for _ in child.children()):
            # no quantized implementation (a torch.nn composite such as nn.MultiheadAttention
            # is one op for the tracer, as for prepare_qat_fx): it computes in float, unless
            # the user gave *this* module a qconfig (then it is a mistake worth an error)
            self._refuse_explicit(path, child)
            self.float_ops.setdefault(type(child).__name__, []).append(path)
            child.__dict__[FLOAT_NOTE_ATTR] = _NOTE_UNSUPPORTED
            return True
        return False

    def _refuse_explicit(self, path: str, child: nn.Module) -> None:
        """A ValueError when a qconfig names this module without a quantized implementation
        itself (its own ``.qconfig``, a ``module_name`` / ``module_type`` entry); an inherited
        qconfig only makes it float (listed in a warning)."""
        by_name = dict(self.resolver.by_name)
        explicit = (child.__dict__.get("qconfig") is not None
                    or by_name.get(path) is not None
                    or any(k is type(child) and qc is not None for k, qc in self.resolver.by_type))
        if explicit:
            raise ValueError(
                f"prepare_qat: module '{path}' ({type(child).__name__}) has a qconfig, but "
                f"qatkit has no quantized {type(child).__name__}. Fix: keep it float "
                f"(model.{path}.qconfig = None, or qconfig_dict['module_name'] "
                f"[('{path}', None)]): its output is quantized again where a quantized op "
                "uses it; or build it from supported modules (conv, linear, activations, "
                "pools, norms, qatkit.nn.FloatFunctional)")

    def _quant_stub(self, path: str, stub: nn.Module, qc: Any) -> None:
        scale = getattr(stub, "scale", None) if isinstance(stub, QuantStub) else None
        dtype = getattr(stub, "dtype", None) if isinstance(stub, QuantStub) else None
        if qc is None or (qc.activation is None and scale is None):
            return
        if dtype is not None:
            dtype = f"qint{dtype_to_bits(dtype)}"
        else:
            dtype = qc.activation().dtype if qc.activation is not None else "qint8"
        if scale is not None:
            fq = FakeQuantize(observer=FixedScaleObserver, scale=scale, dtype=dtype)
        else:
            fq = qc.activation(dtype=dtype)
        self._set(path, stub, qat.QuantStub(fq), qc)


def activation_qconfig(qc: Any, global_qc: Any) -> QConfig:
    """A qconfig that quantizes activations (as prepare_qat_fx picks one for a QuantStub):
    ``qc``, else the global one, else int8.

    Example::

        >>> activation_qconfig(None, None) is qatkit.default_qat_8bit_fake_quant_qconfig
        True
    """
    for candidate in (qc, global_qc):
        if candidate is not None and candidate.activation is not None:
            return candidate

    return default_qat_8bit_fake_quant_qconfig
