"""FakeQuantize modules and the explicit, sticky FakeQuantState of a model.

Fake quantization (symmetric, zero point 0)::

    q    = clamp(round(x / scale), quant_min, quant_max)    # float32 division, half to even
    x_fq = q * scale

computed in float32: ``x / scale`` is one correctly rounded float32 division, exactly as ONNX
``QuantizeLinear`` defines it (and onnxruntime computes it), so an exported QDQ model means
what the fake-quant model computes (docs/npu_numerics.md, "Quantization").  The gradient
w.r.t. ``x`` is straight-through inside the clamp range and zero outside it.  Training on a
GPU (QAT state, CUDA) runs torch's fused ``fake_quantize_per_{tensor,channel}_affine`` kernel,
which multiplies by a float32 ``1 / scale`` instead: the two differ only where ``x / scale``
lies within a float32 rounding of a half-integer, which does not matter for training;
VALIDATION always divides.
``LSQFakeQuantize`` also learns ``scale`` with the LSQ gradient (Esser et al., 2020), scaled by
``1 / sqrt(numel * quant_max)``.

States (see :class:`FakeQuantState`): ``model.train()`` / ``model.eval()`` never change them;
:func:`set_fake_quant_state` does.
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import functools
import math
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ._deprecation import deprecated_aliases
from ._exact import release_exact_caches
from ._modules import ResizeBuffersOnLoad
from ._ranks import group_of, is_distributed
from .distributed import sync_observer
from .observers import (
    FixedScaleObserver,
    MovingAverageMinMaxObserver,
    ObserverBase,
    dtype_to_bits,
    qrange,
)

__all__ = ["FakeQuantState", "FakeQuantize", "LSQFakeQuantize", "set_fake_quant_state",
           "get_fake_quant_state", "set_fake_quant_enabled", "fake_quant_enabled",
           "evaluates_exactly", "set_exact_evaluation", "exact_evaluation",
           "release_exact_caches"]

#: old spellings, for one release (qatkit._deprecation)
__getattr__ = deprecated_aliases(__name__, {
    "set_fake_quantize": "qatkit.fake_quantize.set_fake_quant_state",
    "get_fake_quantize_state": "qatkit.fake_quantize.get_fake_quant_state",
})


class FakeQuantState(str, enum.Enum):
    """What every fake quant of a model does.

    ===========  ==========================================  ================================
    state        observer                                    fake quantization
    ===========  ==========================================  ================================
    QAT          updates (histogram observers: frozen)       on, straight-through gradient
    CALIBRATION  updates (accumulates statistics)            off: data flows in float
    VALIDATION   frozen                                      on
    ===========  ==========================================  ================================

    Example::

        >>> FakeQuantState("calibration") is FakeQuantState.CALIBRATION
        True
    """

    QAT = "qat"
    CALIBRATION = "calibration"
    VALIDATION = "validation"


_STATE_CODE = {FakeQuantState.QAT: 0, FakeQuantState.CALIBRATION: 1, FakeQuantState.VALIDATION: 2}
_CODE_STATE = {v: k for k, v in _STATE_CODE.items()}


def _as_state(state: FakeQuantState | str) -> FakeQuantState:
    try:
        if isinstance(state, FakeQuantState):
            return state
        return FakeQuantState(str(state).lower())
    except ValueError:
        raise ValueError(
            f"unknown fake-quant state {state!r}: choose one of "
            f"{[s.name for s in FakeQuantState]} (qatkit.FakeQuantState)"
        ) from None


def _is_tracing() -> bool:
    """True under torch.jit tracing, ONNX export, torch.export or torch.compile: the forward
    is being recorded, so it evaluates in float32 (no exact evaluation)."""
    compiler = getattr(torch, "compiler", None)  # is_compiling/is_exporting: newer torch only
    return (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or bool(getattr(compiler, "is_compiling", bool)())
            or bool(getattr(compiler, "is_exporting", bool)()))


_WARNED_COMPILED_HISTOGRAM: set[str] = set()


@torch.compiler.disable(reason="data-dependent histogram update")
def _observe_eagerly(observer: nn.Module, x: Tensor) -> None:
    """A histogram observer's update under torch.compile: it is data dependent (its range
    grows by a data-dependent number of steps), so it runs eagerly, one graph split per fake
    quant; the scales are those of an eager run.  Warns once per observer class."""
    name = type(observer).__name__
    if name not in _WARNED_COMPILED_HISTOGRAM:
        _WARNED_COMPILED_HISTOGRAM.add(name)
        warnings.warn(
            f"{name} is calibrated under torch.compile: its histogram update runs eagerly and "
            "splits the compiled graph at every fake quant (the scales are the same). Fix: "
            "calibrate the model itself, qatkit.calibrate(model, data), and compile it for "
            "QAT", UserWarning, stacklevel=2)
    observer(x)


def _records_aten_op() -> bool:
    """True under torch.jit tracing, ONNX export and torch.export: they record torch's fused
    fake-quant ops (which the TorchScript ONNX exporter maps to QuantizeLinear /
    DequantizeLinear).  torch.compile traces the division rule itself (elementwise ops that
    Inductor fuses), so a compiled model computes what the eager one does."""
    compiler = getattr(torch, "compiler", None)
    return (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or bool(getattr(compiler, "is_exporting", bool)()))


def evaluates_exactly(fq: nn.Module | None) -> bool:
    """Whether the op that ``fq`` quantizes computes exactly (in float64) before it.

    Exact evaluation is a mode of the fake-quant model (docs/exact_evaluation.md): when it is
    enabled (``fq.exact_evaluation``, the default; :func:`set_exact_evaluation` switches it
    for a whole model), a fake quant in VALIDATION that runs without autograd
    (``torch.no_grad()`` / ``torch.inference_mode()``) and outside tracing / export makes
    the op before it evaluate exactly: ops whose integer twins are exact integer arithmetic
    (conv, linear, add, sub, mul, matmul, mean, average pools, the normalizations:
    ``qatkit.nn.qat.EXACT_OPS``) compute in float64 on the exact grid values of their inputs,
    where products and sums of grid values are exact, and ``fq`` rounds that exact value, so
    the fake-quant model rounds exactly where the integer model does.  Training (QAT),
    calibration and a VALIDATION forward with gradients enabled run float32 (gradients flow).

    Example::

        >>> fq = FakeQuantize(); _ = fq(torch.randn(8)); fq.set_state("validation")
        >>> with torch.no_grad():
        ...     evaluates_exactly(fq)
        True
    """
    return (isinstance(fq, FakeQuantize) and fq._state is FakeQuantState.VALIDATION
            and fq.enabled and fq.exact_evaluation and not torch.is_grad_enabled()
            and not _is_tracing())


class _FakeQuantizeSTE(torch.autograd.Function):
    """``clamp(round(x / scale), qmin, qmax) * scale`` with the straight-through gradient.

    ONNX ``QuantizeLinear`` then ``DequantizeLinear`` with zero point 0 (the division rounded
    once to ``x``'s dtype, round half to even, the product rounded once), written in
    vectorized elementwise ops: on CPU several times faster than torch's fused ATen kernel (a
    scalar loop).  ``scale`` is float32 and broadcasts against ``x``; a float64 ``x`` (exact
    evaluation) divides in float64.  NaN stays NaN and +-inf saturates to the nearest end of
    the range.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, quant_min: int, quant_max: int) -> Tensor:
        q = torch.div(x, scale).round_()  # one rounding of x / s, then half to even
        if ctx.needs_input_grad[0]:  # the gradient is zero where the clamp is active
            # Bool temporaries only: `q.clamp(...) != q` needs one pass less but a second
            # float tensor, which pushes a forward's fresh memory past glibc's heap-trim
            # threshold and costs ~2500 page faults (+3 ms) per call (benchmarks/fake_quant.py).
            ctx.save_for_backward((q < quant_min).logical_or_(q > quant_max))
        return q.clamp_(quant_min, quant_max).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (outside,) = ctx.saved_tensors
        return grad.masked_fill(outside, 0.0), None, None, None


class FakeQuantize(ResizeBuffersOnLoad):
    """Symmetric fake quantization of a tensor, driven by an observer and a FakeQuantState.

    Args:
        observer: an observer class from :mod:`qatkit.observers` (default: moving average).
        dtype: ``"qint8"`` or ``"qint16"``.
        ch_axis: per-channel quantization along this axis (weights), ``None`` per tensor.
        **observer_kwargs: passed to the observer (``averaging_constant``, ``percentile``,
            ``scale`` for :class:`FixedScaleObserver`, ...).

    A new fake quant starts in the ``QAT`` state.  ``scale`` is a float32 buffer of shape
    ``[1]`` (per tensor) or ``[C]`` (per channel), empty until the observer has seen data.

    Example::

        >>> fq = FakeQuantize(dtype="qint8")
        >>> fq(torch.tensor([0.0, 0.3, 1.0]))   # QAT: observe, then fake-quantize
        tensor([0.0000, 0.2969, 0.9922])
        >>> fq.scale                            # amax 1.0 / 128
        tensor([0.0078])
        >>> fq.scale * torch.tensor([38.0, 127.0])  # 0.3 -> 38, 1.0 -> 128 clamped to 127
        tensor([0.2969, 0.9922])
    """

    #: class defaults, so fake quants pickled before these flags existed still load
    enabled: bool = True
    exact_evaluation: bool = True

    def __init__(self, observer: type[ObserverBase] = MovingAverageMinMaxObserver,
                 dtype: Any = "qint8", ch_axis: int | None = None, **observer_kwargs: Any) -> None:
        super().__init__()
        if not (isinstance(observer, type) and issubclass(observer, ObserverBase)):
            raise ValueError(
                f"observer must be an observer class from qatkit.observers, got {observer!r}"
            )
        self.bits = dtype_to_bits(dtype)
        self.dtype = f"qint{self.bits}"
        self.quant_min, self.quant_max = qrange(self.bits)
        self.ch_axis = ch_axis
        self.observer = observer(dtype=self.dtype, ch_axis=ch_axis, **observer_kwargs)
        self.register_buffer("scale", torch.tensor([], dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor([], dtype=torch.int32))
        self.register_buffer("state_code", torch.tensor(_STATE_CODE[FakeQuantState.QAT],
                                                        dtype=torch.uint8))
        self._state = FakeQuantState.QAT
        #: exact evaluation in VALIDATION without autograd (see evaluates_exactly)
        self.exact_evaluation = True
        #: False: pass tensors through untouched in every state, no observer update
        #: (set_fake_quant_enabled: sensitivity analysis, partial un-quantization)
        self.enabled = True
        self._qatkit_name = ""  # set by set_fake_quant_state, used in error messages
        if isinstance(self.observer, FixedScaleObserver):
            self._set_scale(self.observer.calculate_scale())

    @classmethod
    def with_args(cls, **kwargs: Any) -> Callable[[], FakeQuantize]:
        """A picklable factory: ``FakeQuantize.with_args(dtype="qint16")()`` builds one."""
        return functools.partial(cls, **kwargs)

    # -- state ------------------------------------------------------------------------------
    @property
    def state(self) -> FakeQuantState:
        """The current :class:`FakeQuantState`."""
        return self._state

    def set_state(self, state: FakeQuantState | str) -> None:
        """Switch state.  Leaving CALIBRATION computes the scale from the statistics."""
        state = _as_state(state)
        if self._state is FakeQuantState.CALIBRATION and state is not FakeQuantState.CALIBRATION:
            sync_observer(self.observer)  # all ranks' statistics (qatkit.distributed)
            if self.observer.has_data:
                self.calculate_scale()
        self._state = state
        self.state_code.fill_(_STATE_CODE[state])

    @property
    def is_per_channel(self) -> bool:
        return self.ch_axis is not None

    @property
    def has_scale(self) -> bool:
        """True once a scale has been computed (or was fixed)."""
        return self.scale.numel() > 0

    def calculate_scale(self) -> Tensor:
        """Compute the scale from the observer's statistics, store it, and return it."""
        try:
            scale = self.observer.calculate_scale()
        except RuntimeError as e:
            raise RuntimeError(f"fake quant {self._qatkit_name or '<unnamed>'}: {e}") from e
        self._set_scale(scale)
        return self.scale

    def _set_scale(self, scale: Tensor) -> None:
        scale = scale.detach().to(torch.float32)
        if self.scale.shape != scale.shape:
            self.scale = scale.clone()
            self.zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
        else:
            self.scale.copy_(scale)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        state = self._state
        if not self.enabled:
            return x
        if state is FakeQuantState.CALIBRATION:
            if getattr(self.observer, "is_histogram", False) and torch.compiler.is_compiling():
                _observe_eagerly(self.observer, x)
            else:
                self.observer(x)
            return x
        if state is FakeQuantState.QAT:
            if not self.observer.keeps_scale_in_qat or not self.has_scale:
                # histogram observers (and a moving average with averaging_constant=0) keep
                # their calibrated scale during QAT
                self.observer(x)
                self.calculate_scale()
        elif not self.has_scale:
            self._scale_for_validation()
        return self._fake_quant(x)

    def _scale_for_validation(self) -> None:
        if self.observer.has_data:
            self.calculate_scale()
            return
        raise RuntimeError(
            f"fake quant {self._qatkit_name or '<unnamed>'} is in VALIDATION state but has no "
            "scale: it never saw data. Calibrate first: set_fake_quant_state(model, "
            "FakeQuantState.CALIBRATION), run a few batches, then switch to VALIDATION"
        )

    def _fake_quant(self, x: Tensor) -> Tensor:
        orig_dtype = x.dtype
        tracing = _is_tracing()
        # float64 input (VALIDATION's exact evaluation, docs/npu_numerics.md) is quantized in
        # float64: round(x / s) divided in float64, q * s returned in float64.
        exact64 = orig_dtype == torch.float64 and not tracing
        if orig_dtype != torch.float32 and not exact64:
            x = x.float()
        # torch's fused kernel (x * float32(1/s)) only to trace / export and to train on GPUs
        # in eager mode (torch.compile fuses the division rule's elementwise ops itself)
        fused = _records_aten_op() or (
            x.device.type != "cpu" and not exact64 and not tracing
            and self._state is not FakeQuantState.VALIDATION)
        if not fused:
            if self.ch_axis is None:
                scale = self.scale.view(())  # 0-d: the output keeps the shape of x
            else:
                shape = [1] * x.dim()
                shape[self.ch_axis % x.dim()] = -1
                scale = self.scale.view(shape)
            out = _FakeQuantizeSTE.apply(x, scale, self.quant_min, self.quant_max)
        elif self.ch_axis is None:
            out = torch.fake_quantize_per_tensor_affine(
                x, self.scale, self.zero_point, self.quant_min, self.quant_max)
        else:
            out = torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point, self.ch_axis % x.dim(), self.quant_min,
                self.quant_max)
        return out if orig_dtype == torch.float32 else out.to(orig_dtype)

    def extra_repr(self) -> str:
        exact = "" if self.exact_evaluation else ", exact_evaluation=False"
        off = "" if self.enabled else ", enabled=False"
        return (f"dtype={self.dtype}, ch_axis={self.ch_axis}, state={self._state.name}"
                f"{exact}{off}")

    # -- state_dict ---------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing,
                                      unexpected, error_msgs)
        self._state = _CODE_STATE[int(self.state_code)]  # the python-side copy of the state


class LSQFakeQuantize(FakeQuantize):
    """Fake quantization with a learnable scale (LSQ, Esser et al., ICLR 2020).

    The scale is a ``nn.Parameter`` that receives the LSQ gradient, scaled by
    ``1 / sqrt(numel_per_scale * quant_max)``.  It is initialized from the calibration
    statistics when the model was calibrated, otherwise from the first QAT batch with the
    paper's ``2 * mean(|x|) / sqrt(quant_max)``.  It is kept >= ``float32.eps``.

    Example::

        >>> fq = LSQFakeQuantize()
        >>> y = fq(torch.randn(4, 8, requires_grad=True)); y.sum().backward()
        >>> fq.scale.grad is not None
        True
    """

    def __init__(self, observer: type[ObserverBase] = MovingAverageMinMaxObserver,
                 dtype: Any = "qint8", ch_axis: int | None = None, **observer_kwargs: Any) -> None:
        super().__init__(observer=observer, dtype=dtype, ch_axis=ch_axis, **observer_kwargs)
        scale = self._buffers.pop("scale")
        self.scale = nn.Parameter(scale)

    def _set_scale(self, scale: Tensor) -> None:
        scale = scale.detach().to(torch.float32)
        with torch.no_grad():
            if self.scale.shape != scale.shape:
                self.scale.data = scale.clone()
                self.zero_point = torch.zeros(scale.shape, dtype=torch.int32,
                                              device=scale.device)
            else:
                self.scale.copy_(scale)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected,
                              error_msgs):
        key = prefix + "scale"  # a parameter here: resize it like the buffers
        if key in state_dict and state_dict[key].shape != self.scale.shape:
            self.scale.data = self.scale.data.new_empty(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing,
                                      unexpected, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        state = self._state
        if not self.enabled:
            return x
        if state is FakeQuantState.CALIBRATION:
            self.observer(x)
            return x
        if not self.has_scale:
            if state is FakeQuantState.QAT:
                self._init_from_batch(x)
            else:
                self._scale_for_validation()
        with torch.no_grad():
            self.scale.clamp_(min=torch.finfo(torch.float32).eps)
        if state is FakeQuantState.VALIDATION and not _is_tracing():
            return self._fake_quant(x)  # frozen scale: the division rule (float64: exactly)
        orig_dtype = x.dtype
        if orig_dtype != torch.float32:
            x = x.float()
        zp = self.zero_point.to(torch.float32)
        if self.ch_axis is None:
            grad_factor = 1.0 / math.sqrt(x.numel() * self.quant_max)
            out = torch._fake_quantize_learnable_per_tensor_affine(
                x, self.scale, zp, self.quant_min, self.quant_max, grad_factor)
        else:
            axis = self.ch_axis % x.dim()
            grad_factor = 1.0 / math.sqrt(x.numel() / x.shape[axis] * self.quant_max)
            out = torch._fake_quantize_learnable_per_channel_affine(
                x, self.scale, zp, axis, self.quant_min, self.quant_max, grad_factor)
        return out if orig_dtype == torch.float32 else out.to(orig_dtype)

    @torch.no_grad()
    def _init_from_batch(self, x: Tensor) -> None:
        self.observer(x)
        data = x.detach().float()
        if self.ch_axis is None:
            data = data.reshape(1, -1)
        else:
            data = data.transpose(0, self.ch_axis).reshape(data.shape[self.ch_axis], -1)
        sums = torch.stack([data.abs().sum(dim=1).double(),
                            torch.full((data.shape[0],), float(data.shape[1]),
                                       dtype=torch.float64, device=data.device)])
        group = group_of(self.observer)
        if self.observer.distributed_sync and is_distributed(group):
            torch.distributed.all_reduce(sums, group=group)  # the global batch's mean |x|
        mean_abs = (sums[0] / sums[1]).float()
        self._set_scale((2.0 * mean_abs / math.sqrt(self.quant_max)).clamp_min(
            torch.finfo(torch.float32).eps))


def set_fake_quant_state(model: nn.Module, state: FakeQuantState | str) -> int:
    """Set every fake quant in ``model`` to ``state``; return how many were set.

    Leaving CALIBRATION computes each scale from its statistics.  Fake quants that never saw
    data keep no scale and are listed in a warning (they raise if a VALIDATION forward
    reaches them).  ``model.train()``/``model.eval()`` are not touched.  The integer weights
    cached by exact evaluation are released (:func:`qatkit.fake_quantize.release_exact_caches`).

    Args:
        model: a prepared model (or any module holding :class:`FakeQuantize` modules).
        state: a :class:`FakeQuantState` or its name (``"calibration"``...).

    Raises:
        ValueError: ``model`` holds no fake quant (not prepared?) or ``state`` is unknown.

    Example::

        >>> qat_model = nn.Sequential(FakeQuantize(), nn.ReLU(), FakeQuantize())
        >>> set_fake_quant_state(qat_model, FakeQuantState.CALIBRATION)
        2
        >>> for x in [torch.randn(4, 8), torch.randn(4, 8)]:
        ...     _ = qat_model(x)                # float: outputs are the inputs' ReLU
        >>> set_fake_quant_state(qat_model, "validation")  # computes the scales
        2
        >>> qat_model[0].has_scale
        True
    """
    state = _as_state(state)
    count = 0
    never: list[str] = []
    for name, mod in model.named_modules():
        if isinstance(mod, FakeQuantize):
            mod._qatkit_name = name
            was_calibrating = mod.state is FakeQuantState.CALIBRATION
            mod.set_state(state)
            if was_calibrating and state is not FakeQuantState.CALIBRATION and not mod.has_scale:
                never.append(name)
            count += 1
    if count == 0:
        raise ValueError(
            f"{type(model).__name__} has no FakeQuantize module: prepare it first "
            "(qatkit.prepare_qat_fx(model, qconfig_dict))"
        )
    release_exact_caches(model)  # scales may change from here: rebuilt when next needed
    if never:
        shown = ", ".join(never[:10]) + (f" and {len(never) - 10} more" if len(never) > 10 else "")
        warnings.warn(
            f"{len(never)} fake quant(s) saw no data during calibration and have no scale: "
            f"{shown}. Their layers were not reached by the calibration data (unused branch?)",
            RuntimeWarning,
            stacklevel=2,
        )
    return count


def get_fake_quant_state(model: nn.Module) -> dict[FakeQuantState, int]:
    """Count the fake quants of ``model`` in each state (e.g. to assert VALIDATION before
    profiling).

    Example::

        >>> qat_model = nn.Sequential(FakeQuantize(), nn.ReLU(), FakeQuantize())
        >>> _ = set_fake_quant_state(qat_model, FakeQuantState.CALIBRATION)
        >>> get_fake_quant_state(qat_model)
        {<FakeQuantState.CALIBRATION: 'calibration'>: 2}
    """
    counts: dict[FakeQuantState, int] = {}
    for mod in model.modules():
        if isinstance(mod, FakeQuantize):
            counts[mod.state] = counts.get(mod.state, 0) + 1
    return counts


def _fake_quants(model: nn.Module) -> list[FakeQuantize]:
    fqs = [m for m in model.modules() if isinstance(m, FakeQuantize)]
    if not fqs:
        raise ValueError(f"{type(model).__name__} has no FakeQuantize module: prepare it first "
                         "(qatkit.prepare_qat_fx(model, qconfig_dict))")
    return fqs


def set_exact_evaluation(model: nn.Module, enabled: bool = True) -> int:
    """Switch exact evaluation (see :func:`evaluates_exactly`) on or off for a whole model.

    On (the default of every fake quant): VALIDATION forwards without autograd evaluate
    exactly and agree with ``convert_fx``'s integer model to the bit.  Off: they run the
    plain float32 fake quantization (what torch.ao's fake-quant models compute: faster,
    notably on GPUs where float64 is slow, and off by float32 rounding at rare near-ties).
    Switching releases the cached integer weights.

    Args:
        model: a prepared model.
        enabled: True for exact evaluation, False for float32.

    Returns:
        how many fake quants were set.

    Example::

        >>> model = nn.Sequential(FakeQuantize(), nn.ReLU(), FakeQuantize())
        >>> set_exact_evaluation(model, False)   # float32 fake quant everywhere
        2
    """
    fqs = _fake_quants(model)
    for fq in fqs:
        fq.exact_evaluation = bool(enabled)
    release_exact_caches(model)
    return len(fqs)


@contextlib.contextmanager
def exact_evaluation(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Run ``model`` with exact evaluation ``enabled`` (or not) inside the block, under
    ``torch.no_grad()``; on exit the exact-evaluation flags and the grad mode are restored and
    the cached integer weights are released.

    Raises:
        ValueError: a fake quant is not in VALIDATION state (exact evaluation applies to a
            calibrated / trained model with frozen scales).

    Example::

        >>> model = nn.Sequential(FakeQuantize(), nn.ReLU(), FakeQuantize())
        >>> _ = model(torch.randn(4, 8)); _ = set_fake_quant_state(model, "validation")
        >>> with exact_evaluation(model):     # with a prepared model: == its convert_fx
        ...     y = model(torch.randn(4, 8))
        >>> torch.is_grad_enabled()
        True
    """
    fqs = _fake_quants(model)
    other = [fq._qatkit_name or "<unnamed>" for fq in fqs
             if fq.state is not FakeQuantState.VALIDATION]
    if other:
        raise ValueError(f"exact_evaluation: {len(other)} fake quant(s) of "
                         f"{type(model).__name__} are not in VALIDATION state "
                         f"({', '.join(other[:4])}). Fix: qatkit.set_fake_quant_state(model, "
                         "qatkit.FakeQuantState.VALIDATION) after calibrating")
    saved = [(fq, fq.exact_evaluation) for fq in fqs]
    try:
        for fq in fqs:
            fq.exact_evaluation = bool(enabled)
        with torch.no_grad():
            yield model
    finally:
        for fq, flag in saved:
            fq.exact_evaluation = flag
        release_exact_caches(model)


def _select(model: nn.Module, names: Any) -> list[tuple[str, FakeQuantize]]:
    """The fake quants of ``model`` named in ``names`` (module paths; a string is one name;
    None: all), in model order.  Unknown names raise with the closest names."""
    fqs = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantize)]
    if not fqs:
        raise ValueError(f"{type(model).__name__} has no FakeQuantize module: prepare it first "
                         "(qatkit.prepare_qat_fx(model, qconfig_dict))")
    if names is None:
        return fqs
    if isinstance(names, str):
        names = [names]
    by_name = dict(fqs)
    missing = [n for n in names if n not in by_name]
    if missing:
        close = difflib.get_close_matches(missing[0], list(by_name), n=5, cutoff=0.4)
        raise ValueError(f"{type(model).__name__} has no fake quant named {missing[0]!r}; "
                         f"closest: {close or list(by_name)[:5]}")
    wanted = set(names)
    return [(n, m) for n, m in fqs if n in wanted]


def set_fake_quant_enabled(model: nn.Module, enabled: bool, names: Any = None) -> list[str]:
    """Switch fake quants on or off without changing their state, scale or observer.

    A disabled fake quant passes tensors through untouched in every state (its op then runs
    in float: a disabled weight fake quant leaves the float weight and bias; a disabled output
    fake quant leaves the output float and the next ops see a float input).  What
    sensitivity analysis and partial un-quantization need; ``convert_fx`` still converts every
    quantized op (re-enable before converting).

    Args:
        model: a prepared model.
        enabled: True to quantize, False to pass through.
        names: fake quant module paths (``"layer1.0.conv1.activation_post_process"``,
            ``"layer1.0.conv1.weight_fake_quant"``), one name, or None for all.

    Returns:
        the names set.

    Raises:
        ValueError: no fake quant, or a name that is not one (the closest are listed).

    Example::

        >>> model = nn.Sequential(FakeQuantize(), nn.ReLU(), FakeQuantize())
        >>> set_fake_quant_enabled(model, False, ["2"])
        ['2']
    """
    chosen = _select(model, names)
    for _, fq in chosen:
        fq.enabled = bool(enabled)
    release_exact_caches(model)
    return [n for n, _ in chosen]


@contextlib.contextmanager
def fake_quant_enabled(model: nn.Module, enabled: Any, names: Any = None) -> Iterator[nn.Module]:
    """Inside the block, the fake quants ``names`` are enabled or not (``enabled``: a bool, or
    a dict name -> bool); every flag is restored on exit, even when the block raises.

    Example::

        >>> model = nn.Sequential(FakeQuantize(), nn.ReLU(), FakeQuantize())
        >>> with fake_quant_enabled(model, False):      # every fake quant off
        ...     y = model(torch.randn(2, 3))
        >>> all(m.enabled for m in model.modules() if isinstance(m, FakeQuantize))
        True
    """
    fqs = _select(model, None)
    saved = [(fq, fq.enabled) for _, fq in fqs]
    try:
        if isinstance(enabled, dict):
            for name, value in enabled.items():
                set_fake_quant_enabled(model, value, [name])
        else:
            set_fake_quant_enabled(model, enabled, names)
        yield model
    finally:
        for fq, flag in saved:
            fq.enabled = flag
        release_exact_caches(model)
