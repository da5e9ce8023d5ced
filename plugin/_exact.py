"""Exact integer accumulation with float kernels: shared by the integer simulator's conv
(``qatkit.quantized.conv``) and VALIDATION's exact evaluation of QAT convs (``nn.qat``).

torch has no integer conv, so integer-valued floats are convolved, the cheapest exact way that
the per-output-channel bounds allow: on CPU, float32 when every partial sum stays below 2**24;
else two float32 convs of the int8 weight's halves ``w = 16 * hi + lo`` when each stays below
2**24; float64 (exact below 2**53) otherwise, on other devices (TF32, Winograd), or when torch's
CPU float32 kernels are not plain IEEE ones.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["F32_EXACT", "F64_EXACT", "cpu_fp32_is_ieee", "grid_int", "acc_bound",
           "split_weight", "accumulation_plan", "cached", "release_exact_caches",
           "exact_cache_size"]

F32_EXACT = 2**24  # integers below this add exactly in float32
F64_EXACT = 2**53


@torch.compiler.assume_constant_result  # read once per compiled graph, not a graph break
def cpu_fp32_is_ieee(kind: str) -> bool:
    """True when torch's CPU float32 ``kind`` ("conv" / "matmul") is plain IEEE float32
    arithmetic with a direct / GEMM algorithm, so integer sums below 2**24 are exact.

    Without oneDNN, torch may pick NNPACK (Winograd, inexact) for big conv batches; a reduced
    fp32 precision (bf16 / tf32, e.g. ``torch.set_float32_matmul_precision("medium")``) is
    inexact too.  Then the accumulation runs in float64.  Under ``torch.compile`` the answer
    is fixed when a graph compiles (change these backend settings before compiling).
    """
    mkldnn = torch.backends.mkldnn
    if kind == "conv" and not (mkldnn.is_available() and mkldnn.enabled):
        return False
    if torch.get_float32_matmul_precision() != "highest":
        return False
    chain = [getattr(getattr(mkldnn, kind, None), "fp32_precision", "none"),
             getattr(mkldnn, "fp32_precision", "none"),
             getattr(torch.backends, "fp32_precision", "none")]
    return next((p for p in chain if p != "none"), "ieee") == "ieee"


def grid_int(x: Tensor, scale: Tensor) -> Tensor:
    """The integers ``q`` of ``x = float32(q * s)`` as float32: ``round(x * float32(1/s))``
    (``scale`` broadcasts against ``x``).

    Exact for ``|q| < 2**20``: the two float32 roundings move ``q`` by less than
    ``3 * 2**-24 * |q|`` < 0.5 (equal to ``to_int`` on the grid, and cheaper).
    """
    scale = scale.detach().to(device=x.device, dtype=torch.float32)
    inv = torch.ones_like(scale).div_(scale)  # float32 1/s, correctly rounded
    return torch.mul(x.to(torch.float32), inv).round_()


def acc_bound(w_q: Tensor, groups: int, kind: str, in_bits: int) -> Tensor:
    """Per output channel: ``sum |w_q| * 2**(in_bits-1)``, a bound on every partial sum.

    ``kind`` is ``"Conv"``, ``"ConvTranspose"`` (weight ``[in, out/g, *k]``) or ``"Linear"``.
    """
    w = w_q.to(torch.int64).abs()
    if kind == "ConvTranspose":  # [in, out/g, *k] -> per output channel o = g*opg + j
        w = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1).sum(dim=(1, 3))
        per_channel = w.reshape(-1)
    else:
        per_channel = w.reshape(w.shape[0], -1).sum(dim=1)
    return per_channel * 2 ** (in_bits - 1)


def split_weight(w_q: Tensor) -> tuple[Tensor, Tensor]:
    """``(hi, lo)`` (int32) with ``w_q = 16 * hi + lo`` and ``hi, lo`` in ``[-8, 8]`` (int8
    weights)."""
    hi = (w_q.to(torch.int32) + 8) >> 4
    return hi, w_q.to(torch.int32) - (hi << 4)


def accumulation_plan(w_q: Tensor, groups: int, kind: str, in_bits: int, w_bits: int,
                      extra: int = 0) -> str:
    """``"f32"``, ``"f32x2"`` or ``"f64"``: the cheapest exact way to accumulate on CPU.

    ``extra`` bounds what is added to every sum besides the products (e.g. ``|bias|``).
    """
    bound = int(acc_bound(w_q, groups, kind, in_bits).max()) + extra
    if bound < F32_EXACT:
        return "f32"
    if w_bits <= 8 and max(int(acc_bound(t, groups, kind, in_bits).max())
                           for t in split_weight(w_q)) < F32_EXACT:
        return "f32x2"
    return "f64"


# -- the exact-evaluation cache -----------------------------------------------------------
# module -> {call site: (settings, tensors, value)}.  Held beside the modules, not in them:
# a deepcopy, a pickle or a state_dict never carries it, and it dies with its module.
# Entries are freed explicitly (release_exact_caches: set_fake_quant_state, set_exact_evaluation
# and the exact_evaluation context call it), never by a forward pass.
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, tuple[Any, list, Any]]] = \
    weakref.WeakKeyDictionary()


def cached(module: nn.Module, settings: Any, tensors: list, build: Callable[[], Any],
           slot: Any = None) -> Any:
    """``build()``, cached for ``module`` (and ``slot``: a call site of a module called at
    several places) while ``settings`` compare equal and ``tensors`` are the very same objects
    (their in-place versions belong in ``settings``)."""
    slots = _CACHE.setdefault(module, {})
    hit = slots.get(slot)
    if (hit is not None and hit[0] == settings
            and all(a is b for a, b in zip(hit[1], tensors, strict=True))):
        return hit[2]
    value = build()
    slots[slot] = (settings, list(tensors), value)
    return value


def release_exact_caches(model: nn.Module) -> int:
    """Free the integer weights that exact evaluation cached for the modules of ``model``;
    return how many modules had one.

    :func:`qatkit.set_fake_quant_state` and :func:`qatkit.set_exact_evaluation` call it, and so
    does leaving :func:`qatkit.exact_evaluation`; a later exact evaluation rebuilds them.

    Example::

        >>> release_exact_caches(qat_model)
        20
    """
    count = 0
    for mod in model.modules():
        if _CACHE.pop(mod, None) is not None:
            count += 1
    return count


def exact_cache_size(model: nn.Module) -> int:
    """How many modules of ``model`` hold cached integer weights (for tests and memory
    checks)."""
    return sum(1 for mod in model.modules() if mod in _CACHE)
