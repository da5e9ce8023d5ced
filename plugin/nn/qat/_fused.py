"""The fusion logic shared by the QAT weighted modules (conv / conv-transpose / linear).

One QAT class per float class (``qatkit.nn.qat.Conv2d``, ``Linear``...), each able to fuse,
by configuration, a BatchNorm, a residual add and a ReLU/ReLU6::

    y = act(bn(op(x, W, b)) + other)            # the float pattern it replaces

In training mode a BatchNorm is folded *approximately* (Krishnamoorthi 2018, as torch's
``ConvBn``): the weight seen by the weight fake quant is the one the integer model will use,
``W * gamma / sqrt(running_var + eps)``, while the BatchNorm still normalizes with the batch
statistics and updates its running statistics::

    sf = gamma / sqrt(running_var + eps)
    y  = bn(op(x, fq_w(W * sf)) / sf + b)        # sf == 0 divides by 1: no NaN, no inf

In eval mode, with :attr:`~FusedMixin.freeze_bn`, or without a BatchNorm, the module runs
what the integer model computes: ``op(x, fq_w(W_fold), b_fold)`` with
``W_fold, b_fold = folded_weight_bias()``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._exact import accumulation_plan, cached, cpu_fp32_is_ieee, grid_int, split_weight
from ...annotation import AnnotatedOp
from ...fake_quantize import FakeQuantState, LSQFakeQuantize, evaluates_exactly
from .ops import ExactInputs, exact_grid

__all__ = ["ACTIVATIONS", "FusedMixin", "freeze_bn_stats", "unfreeze_bn_stats"]

#: fused activations: name -> the function applied after the (optional) add
ACTIVATIONS: dict[str | None, Any] = {
    None: None,
    "relu": F.relu,
    "relu6": functools.partial(F.hardtanh, min_val=0.0, max_val=6.0),
}
_ACT_NAMES = {None: "", "relu": "ReLU", "relu6": "ReLU6"}


class FusedMixin(ExactInputs, AnnotatedOp):
    """Fusion, fake quantization and BN folding for a float ``Conv*``/``Linear`` subclass.

    A concrete class sets ``_FLOAT_MODULE`` (the float class it replaces), ``_BN_MODULE``
    (the BatchNorm class it fuses), ``_KIND`` ("Conv", "ConvTranspose", "Linear"),
    ``_SUFFIX`` ("2d"...) and ``_OUT_AXIS`` (the weight's output-channel axis), and implements
    ``weighted_op(x, weight, bias, output_size)``.
    """

    _FLOAT_MODULE: type[nn.Module]
    _BN_MODULE: type[nn.Module]
    _KIND: str
    _SUFFIX: str
    _OUT_AXIS: int = 0
    _qatkit_leaf = True  # one op for qatkit's tracer, like the other QAT / quantized modules
    qatkit_signature = ("input", "other", "output_size")

    @property
    def qatkit_op_kind(self) -> str:  # type: ignore[override]
        return "linear" if self._KIND == "Linear" else "conv"

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, *args: Any, qconfig: Any, bn: nn.Module | None = None,
                 act: str | None = None, add: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup_fusion(qconfig, bn, act, add)

    def _setup_fusion(self, qconfig: Any, bn: nn.Module | None, act: str | None,
                      add: bool) -> None:
        if act not in ACTIVATIONS:
            raise ValueError(
                f"{type(self).__name__}: unsupported fused activation {act!r}; choose one of "
                f"{list(ACTIVATIONS)} (None = no activation)"
            )
        if qconfig is None or not hasattr(qconfig, "activation") or not hasattr(qconfig,
                                                                                 "weight"):
            raise ValueError(
                f"{type(self).__name__} needs a qatkit.QConfig, got {qconfig!r}; a layer that "
                "must stay float gets no QAT module (qconfig None in the qconfig_dict)"
            )
        if bn is not None:
            self._check_bn(bn)
        self.qconfig = qconfig
        self.bn = bn
        self.with_add = bool(add)
        self.act = act
        self.freeze_bn = False
        device = self.weight.device if self.weight.device.type != "meta" else None
        self.weight_fake_quant = _make_fq(qconfig.weight, device)
        wfq = self.weight_fake_quant
        if wfq is not None:
            wfq.observer.distributed_sync = False  # DDP keeps weights identical on every rank
        if wfq is not None and wfq.ch_axis is not None:
            wfq.ch_axis = self._OUT_AXIS
            wfq.observer.ch_axis = self._OUT_AXIS
        self.activation_post_process = _make_fq(qconfig.activation, device)

    def _check_bn(self, bn: nn.Module) -> None:
        allowed = (self._BN_MODULE, nn.SyncBatchNorm)
        name = type(self).__name__
        if not isinstance(bn, allowed):
            raise ValueError(
                f"{name} fuses a {self._BN_MODULE.__name__}, got {type(bn).__name__}"
            )
        if bn.num_features != self._out_channels:
            raise ValueError(
                f"{name}: the BatchNorm has num_features={bn.num_features} but the layer has "
                f"{self._out_channels} output channels; fuse the BatchNorm that follows it"
            )
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"{name}: cannot fold a BatchNorm without running statistics "
                "(track_running_stats=False); keep it unfused or enable track_running_stats"
            )

    @property
    def _out_channels(self) -> int:
        if self._KIND == "Linear":
            return self.out_features
        return self.out_channels

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: Any, bn: nn.Module | None = None,
                   act: str | None = None, add: bool = False) -> FusedMixin:
        """Build the QAT module from a float module, sharing its parameters (no copy).

        Args:
            mod: the float module, exactly of type ``cls._FLOAT_MODULE``.
            qconfig: a :class:`qatkit.QConfig`.
            bn: the float BatchNorm that follows ``mod`` (becomes the child ``bn``).
            act: ``None``, ``"relu"`` or ``"relu6"``.
            add: fuse a residual add: ``forward(x, other)``.

        Raises:
            ValueError: wrong float type, BatchNorm, or activation.

        Example::

            >>> qconv = qatkit.nn.qat.Conv2d.from_float(
            ...     conv, qatkit.default_qat_8bit_fake_quant_qconfig, bn=bn, act="relu")
        """
        if type(mod) is not cls._FLOAT_MODULE:
            raise ValueError(
                f"{cls.__name__}.from_float expects a {cls._FLOAT_MODULE.__name__}, got "
                f"{type(mod).__name__}; use qatkit.nn.qat.from_float to dispatch on the type"
            )
        kwargs = cls._init_kwargs(mod)
        kwargs["bias"] = mod.bias is not None
        qat = cls(**kwargs, device="meta", qconfig=qconfig, bn=bn, act=act, add=add)
        qat.weight = mod.weight
        if mod.bias is not None:
            qat.bias = mod.bias
        device = mod.weight.device
        for fq in (qat.weight_fake_quant, qat.activation_post_process):
            if fq is not None:
                fq.to(device)
        bn_training = bn.training if bn is not None else False
        qat.train(mod.training)
        if bn is not None:
            bn.train(bn_training)  # a BatchNorm the user put in eval mode stays frozen
        return qat

    @classmethod
    def _init_kwargs(cls, mod: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    # -- names ------------------------------------------------------------------------------
    @property
    def fused_name(self) -> str:
        """The fused kind, e.g. ``"ConvBnAddReLU2d"``, ``"LinearReLU"``, ``"LinearBn1d"``."""
        suffix = self._SUFFIX
        if self._KIND == "Linear":
            suffix = "1d" if self.bn is not None else ""
        return (f"{self._KIND}{'Bn' if self.bn is not None else ''}"
                f"{'Add' if self.with_add else ''}{_ACT_NAMES[self.act]}{suffix}")

    def _get_name(self) -> str:
        return self.fused_name

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        return extra + (", freeze_bn=True" if self.freeze_bn else "")

    def get_extra_state(self) -> dict[str, Any]:
        """``freeze_bn`` travels with ``state_dict``: resuming QAT restores it."""
        return {"freeze_bn": bool(self.freeze_bn)}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict):
            self.freeze_bn = bool(state.get("freeze_bn", False))

    # -- numerics ---------------------------------------------------------------------------
    @property
    def _channel_shape(self) -> tuple[int, ...]:
        """Shape that broadcasts a per-output-channel vector against the output."""
        return (-1,) + (1,) * len(getattr(self, "kernel_size", ()))

    def _scale_weight(self, weight: Tensor, sf: Tensor) -> Tensor:
        """``weight`` with output channel ``o`` multiplied by ``sf[o]``."""
        return weight * sf.reshape(self._channel_shape + (1,))

    def _bn_scale(self) -> Tensor:
        bn = self.bn
        var = bn.running_var + bn.eps
        # the correctly rounded square root, as torch.compile computes it: torch's float32
        # sqrt on CPU can be 1 ulp off (MKL's vector sqrt, e.g. on AVX2 CPUs), its float64
        # one rounded to float32 is exact
        std = torch.sqrt(var.double()).to(var.dtype) if var.device.type == "cpu" else \
            torch.sqrt(var)
        return std.reciprocal() if bn.weight is None else bn.weight / std

    def folded_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        """Weight and bias with the BatchNorm folded in, using its running statistics.

        ``W * sf`` and ``(b - running_mean) * sf + beta`` with ``sf = gamma /
        sqrt(running_var + eps)`` (``b = 0`` without a layer bias); ``(weight, bias)`` when
        no BatchNorm is fused.  Differentiable: the QAT forward uses it.

        Example::

            >>> w, b = qconv.eval().folded_weight_bias()
            >>> y = F.conv2d(x, w, b)            # == bn(conv(x)) in eval mode
        """
        bn = self.bn
        if bn is None:
            return self.weight, self.bias
        sf = self._bn_scale()
        weight = self._scale_weight(self.weight, sf)
        shift = -bn.running_mean if self.bias is None else self.bias - bn.running_mean
        bias = shift * sf
        if bn.bias is not None:
            bias = bias + bn.bias
        return weight, bias

    def link_input_fake_quant(self, fq: nn.Module | None) -> None:
        """Tell the module which fake quant quantizes its input (prepare does this, through
        :meth:`link_exact_inputs`, for every input).

        With it, the folded bias is fake-quantized onto the integer accumulator grid
        ``s_in * s_w`` (int32; 48 bits with 16-bit operands), as the NPU and the integer model
        hold it, so the fake-quant model and ``convert_fx``'s model agree to the bit.  A plain
        reference, not a submodule: ``state_dict`` is unchanged.
        """
        links = {k: v for k, v in self.exact_links().items() if k != "input"}
        if fq is not None:
            links["input"] = fq
        self.link_exact_inputs(links)

    def _input_fq(self, call_site: int | None = None) -> nn.Module | None:
        """The fake quant of the input (``forward``'s first argument), when linked and
        enabled."""
        fq = self.exact_links(call_site).get("input")
        return fq if fq is not None and fq.enabled else None

    @torch.no_grad()
    def quantize_weight(self) -> Tensor:
        """The folded weight's integers, ``clamp(round(w_fold / s_w))`` (float32 division) as
        float32, exactly as the weight fake quant computes them in VALIDATION.  One rule for
        exact evaluation, the integer model (``convert_fx``) and the exporter.

        Example::

            >>> q_w = qconv.quantize_weight()   # integers in [-128, 127], float32
        """
        wfq = self.weight_fake_quant
        scale = wfq.scale.detach().to(torch.float32)
        if isinstance(wfq, LSQFakeQuantize):  # its forward clamps the scale the same way
            scale = scale.clamp(min=torch.finfo(torch.float32).eps)
        w = self.folded_weight_bias()[0].detach().to(torch.float32)
        shape = [1] * w.dim()
        if wfq.is_per_channel:
            shape[wfq.ch_axis % w.dim()] = -1
        return torch.div(w, scale.view(shape)).round_().clamp_(wfq.quant_min, wfq.quant_max)

    def accumulator_scale(self, in_scale: Tensor) -> Tensor:
        """float64 ``s_in * s_w`` per output channel: the scale of the integer accumulator.

        Grouped ConvTranspose: output channel ``g * (out / groups) + j`` uses ``s_w[j]``.

        Example::

            >>> qconv.accumulator_scale(torch.tensor([1 / 64]))   # [out_channels]
        """
        s_w = self.weight_fake_quant.scale.detach().to(torch.float32)
        s_w = s_w.clamp(min=torch.finfo(torch.float32).eps).to(torch.float64)  # as LSQ uses it
        out = self._out_channels
        if s_w.numel() == 1:
            s_w = s_w.expand(out)
        elif s_w.numel() != out:
            s_w = s_w.repeat(out // s_w.numel())
        return in_scale.detach().to(device=s_w.device, dtype=torch.float64).reshape(1) * s_w

    def quantize_bias(self, bias: Tensor | None, in_scale: Tensor,
                      in_bits: int) -> tuple[Tensor, Tensor]:
        """The bias as integers on the accumulator grid, and the grid's scale (both float64).

        ``round_half_even(bias / (s_in * s_w))``, saturated to int32 (48 bits when the input
        or the weight is 16-bit).  One rule for the fake-quant model and the integer model.

        Example::

            >>> q, acc_scale = qconv.quantize_bias(qconv.folded_weight_bias()[1],
            ...                                    torch.tensor([1 / 64]), 8)
        """
        acc_scale = self.accumulator_scale(in_scale)
        if bias is None:
            b = torch.zeros_like(acc_scale)
        else:
            b = bias.detach().to(torch.float64)
            acc_scale = acc_scale.to(b.device)
        limit = 2**31 if (in_bits <= 8 and self.weight_fake_quant.bits <= 8) else 2**47
        q = torch.nan_to_num(torch.round(b / acc_scale), nan=0.0).clamp(-limit, limit - 1)
        return q, acc_scale

    def _fake_quant_bias(self, bias: Tensor | None, dtype: torch.dtype | None = None,
                         call_site: int | None = None) -> Tensor | None:
        """``bias`` rounded to the accumulator grid (straight-through gradient), when known;
        in ``dtype`` (default ``bias.dtype``; float64 holds the grid value exactly)."""
        in_fq = self._input_fq(call_site)
        wfq = self.weight_fake_quant
        if (bias is None or in_fq is None or not in_fq.has_scale or wfq is None
                or not wfq.enabled or not wfq.has_scale
                or in_fq.state is FakeQuantState.CALIBRATION or in_fq.is_per_channel):
            return bias if bias is None or dtype is None else bias.to(dtype)
        q, acc_scale = self.quantize_bias(bias, in_fq.scale, in_fq.bits)
        dtype = dtype or bias.dtype
        on_grid = (q * acc_scale).to(dtype)
        bias = bias.to(dtype)
        return bias + (on_grid - bias).detach()

    def weighted_op(self, x: Tensor, weight: Tensor, bias: Tensor | None,
                    output_size: list[int] | None = None) -> Tensor:
        """The layer's conv / linear on ``x`` with the given (folded) weight and bias: no
        BatchNorm, add, activation or fake quant (``output_size``: a transposed conv's).

        Post-training algorithms run the layer on candidate weights with it::

            >>> w, b = qconv.folded_weight_bias()
            >>> y = qconv.finish(qconv.weighted_op(x, w, b), None, fake_quant=False)
        """
        raise NotImplementedError

    @torch.no_grad()
    def fold_factor(self) -> Tensor:
        """What the BatchNorm fold multiplies the weight by, in the weight's shape
        (``folded_weight = weight * fold_factor()``; ones without a BatchNorm)."""
        ones = torch.ones_like(self.weight)
        return ones if self.bn is None else self._scale_weight(ones, self._bn_scale())

    def finish(self, y: Tensor, other: Tensor | None, fake_quant: bool = True) -> Tensor:
        """The fused add (``other``, None without) and activation on the op's output ``y``,
        then the output fake quant (``fake_quant=False``: without it)."""
        if other is not None:
            y = y + other
        act = ACTIVATIONS[self.act]
        if act is not None:
            y = act(y)
        if fake_quant and self.activation_post_process is not None:
            y = self.activation_post_process(y)
        return y

    def _fused_forward(self, x: Tensor, other: Tensor | None,
                       output_size: list[int] | None = None,
                       call_site: int | None = None) -> Tensor:
        if (other is not None) != self.with_add:
            raise ValueError(
                f"{self.fused_name}: "
                + ("a fused add needs forward(x, other)" if self.with_add
                   else "got a second input but no add is fused (add=False)")
            )
        wfq = self.weight_fake_quant
        if wfq is not None and not wfq.enabled:
            wfq = None  # float weights (set_fake_quant_enabled)
        bn = self.bn
        if bn is not None and (wfq is None or wfq.state is FakeQuantState.CALIBRATION):
            # Weights are not fake-quantized: run the float model's own ops, so that
            # CALIBRATION reproduces the float model exactly; the weight observer still
            # sees the folded weight it will quantize.
            if wfq is not None:
                with torch.no_grad():
                    wfq(self.folded_weight_bias()[0])
            y = self.weighted_op(x, self.weight, self.bias, output_size)
            if self.freeze_bn and self.training:  # running statistics, no update
                y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                 False, 0.0, bn.eps)
            else:
                y = bn(y)
        elif bn is not None and self.training and bn.training and not self.freeze_bn:
            # Simulated folding (Krishnamoorthi 2018): quantize the folded weight, undo the
            # fold on the output, let the BN normalize with batch statistics.  ``sf`` is
            # detached: through the fold and its undoing its gradient cancels (up to the
            # straight-through estimator), and gamma still gets its gradient through bn(y).
            # That saves three full passes over the output in backward.
            sf = self._bn_scale().detach()
            weight = self._scale_weight(self.weight, sf)
            if wfq is not None:
                weight = wfq(weight)
            y = self.weighted_op(x, weight, None, output_size)
            shape = self._channel_shape
            inv = sf.masked_fill(sf == 0, 1.0).reciprocal().reshape(shape)
            if self.bias is not None:
                y = torch.addcmul(self.bias.reshape(shape), y, inv)
            else:
                y = y * inv
            y = bn(y)
        elif wfq is not None and evaluates_exactly(self.activation_post_process):
            if other is not None:
                other = exact_grid(other, self.exact_links(call_site).get("other"))
            return self.finish(self._exact_op(x, output_size, call_site), other).to(x.dtype)
        else:
            weight, bias = self.folded_weight_bias()
            if wfq is not None:
                weight = wfq(weight)
                bias = self._fake_quant_bias(bias, call_site=call_site)
            y = self.weighted_op(x, weight, bias, output_size)
        return self.finish(y, other)

    def _exact_op(self, x: Tensor, output_size: list[int] | None,
                  call_site: int | None = None) -> Tensor:
        """The op on the exact grid values, in float64 (exact evaluation).

        With a known per-tensor input grid: ``(sum(q_x * q_w) + q_b) * s_x * s_w``, the
        integer sum accumulated exactly by the cheapest float kernel the weight bounds allow
        (:mod:`qatkit._exact`, as the integer model does). Otherwise the float64 op of the
        exact grid values.
        """
        in_fq = self._input_fq(call_site)
        wfq = self.weight_fake_quant
        if in_fq is None or not in_fq.has_scale or in_fq.is_per_channel:
            weight, bias = self.folded_weight_bias()
            return self.weighted_op(exact_grid(x, in_fq), exact_grid(wfq(weight), wfq),
                            self._fake_quant_bias(bias, torch.float64, call_site), output_size)
        plan, weights, q_b, acc_scale = self._exact_weights(in_fq, x.device, call_site)
        q_x = grid_int(x, in_fq.scale.reshape(()))
        if plan == "f32":
            acc = self.weighted_op(q_x, weights[0], None, output_size).double()
        elif plan == "f32x2":
            acc = self.weighted_op(q_x, weights[0], None, output_size).double().mul_(16)
            acc.add_(self.weighted_op(q_x, weights[1], None, output_size).double())
        else:
            acc = torch.round(self.weighted_op(q_x.double(), weights[0], None, output_size))
        shape = self._channel_shape
        return acc.add_(q_b.view(shape)).mul_(acc_scale.view(shape))

    def _exact_key(self, in_fq: nn.Module, device: torch.device) -> tuple[tuple, list]:
        """What the integer weights depend on: settings, and the tensors themselves (compared
        by identity; the cache holds them, so no new tensor can take their place) with their
        in-place versions (an optimizer step or load_state_dict bumps them)."""
        tensors = [self.weight, self.bias, self.weight_fake_quant.scale, in_fq.scale]
        if self.bn is not None:
            tensors += [self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias]
        settings = (device, in_fq.bits, torch.backends.mkldnn.enabled,
                    torch.get_float32_matmul_precision(),
                    tuple(None if t is None else t._version for t in tensors))
        return settings, tensors

    @torch.no_grad()
    def _exact_weights(self, in_fq: nn.Module, device: torch.device,
                       call_site: int | None = None
                       ) -> tuple[str, tuple[Tensor, ...], Tensor, Tensor]:
        """``(plan, float weights for the plan, q_b, s_in * s_w)``, cached per call site
        (:func:`qatkit._exact.cached`) while the weights, BatchNorm, scales and input grid
        stay the same; released by :func:`qatkit.fake_quantize.release_exact_caches`."""
        settings, tensors = self._exact_key(in_fq, device)
        return cached(self, settings, tensors, lambda: self._build_exact_weights(in_fq, device),
                      slot=call_site)

    def _build_exact_weights(self, in_fq: nn.Module, device: torch.device
                             ) -> tuple[str, tuple[Tensor, ...], Tensor, Tensor]:
        wfq = self.weight_fake_quant
        q_w = self.quantize_weight()
        kind = self._KIND
        plan = "f64"
        if device.type == "cpu" and cpu_fp32_is_ieee("matmul" if kind == "Linear" else "conv"):
            plan = accumulation_plan(q_w, getattr(self, "groups", 1), kind, in_fq.bits,
                                     wfq.bits)
        if plan == "f32x2":
            weights = tuple(t.to(q_w.dtype) for t in split_weight(q_w))
        else:
            weights = (q_w if plan == "f32" else q_w.double(),)
        q_b, acc_scale = self.quantize_bias(self.folded_weight_bias()[1], in_fq.scale,
                                            in_fq.bits)
        return plan, weights, q_b.to(device), acc_scale.to(device)


def _make_fq(factory: Any, device: torch.device | None) -> nn.Module | None:
    if factory is None:
        return None
    fq = factory()
    return fq if device is None else fq.to(device)


def _set_freeze_bn(model: nn.Module, value: bool) -> int:
    count = 0
    for mod in model.modules():
        if isinstance(mod, FusedMixin) and mod.bn is not None:
            mod.freeze_bn = value
            count += 1
    return count


def freeze_bn_stats(model: nn.Module) -> int:
    """Stop the fused BatchNorms of ``model`` from updating: train on the folded weights.

    For the last epochs of QAT.  Every QAT conv/linear with a fused BatchNorm then runs the
    folded path (running statistics, as the integer model) even in training mode.

    Args:
        model: a prepared QAT model.

    Returns:
        How many modules with a fused BatchNorm were frozen.

    Example::

        >>> freeze_bn_stats(qat_model)
        12
    """
    return _set_freeze_bn(model, True)


def unfreeze_bn_stats(model: nn.Module) -> int:
    """Undo :func:`freeze_bn_stats`: fused BatchNorms use batch statistics in training again.

    Returns:
        How many modules with a fused BatchNorm were unfrozen.

    Example::

        >>> unfreeze_bn_stats(qat_model)
        12
    """
    return _set_freeze_bn(model, False)
