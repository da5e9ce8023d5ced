"""AdaRound: learn, layer by layer, whether each weight rounds down or up.

Rounding every weight to the nearest integer minimizes each weight's own error, not the
layer's output error: the errors of a row add up in each output.  AdaRound (Nagel et al.,
"Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020) chooses floor or
ceil for each weight so that the layer's output on calibration data matches the float
model's, through a continuous relaxation annealed to hard 0/1 decisions (the engine is
:mod:`._reconstruction`).  Its gain grows as the grid gets coarser: large at 4 bits, small
at 8 bits with per-channel scales.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from ._reconstruction import reconstruct

__all__ = ["adaround"]


def adaround(model: fx.GraphModule, data: Any, finetune_epochs: int = 500,
             finetune_batch_size: int = 1, finetune_lr: float = 1e-3, reg_weight: float = 0.01,
             warmup: float = 0.2, beta: tuple[float, float] = (20.0, 2.0),
             num_batches: int | None = None, device: Any = None, progress: bool = True,
             inplace: bool = False, seed: int = 0) -> fx.GraphModule:
    """Learn the rounding of each layer's weights against its float output (AdaRound).

    Layers are optimized in graph order; each sees its input from the quantized model with
    the layers before it already rounded, and reconstructs the float model's output (after
    its fused activation, before its output fake quant).  The weight scales and the bit width
    are the weight fake quant's, unchanged.

    Args:
        model: a prepared (:func:`qatkit.prepare_qat_fx`) and calibrated model.
        data: the calibration data the layers are reconstructed on.
        finetune_epochs: optimization steps per layer (the NPU toolchains' name; each step
            uses ``finetune_batch_size`` samples drawn from the calibration data).
        finetune_batch_size: samples per step.
        finetune_lr: Adam's learning rate for the rounding variables.
        reg_weight: weight of the regularizer pushing the rounding to 0 / 1 (lambda).
        warmup: fraction of the steps without the regularizer.
        beta: the regularizer's exponent, annealed from ``beta[0]`` to ``beta[1]``.
        num_batches: use at most this many batches of ``data``.
        device: where to run (default: the model's device; CUDA when the model is there).
        progress: show a progress bar over layers.
        inplace: change ``model`` itself instead of a copy.
        seed: seed of the sampling (the result depends only on the data and the seed).

    Returns:
        the model with the learned integer weights written as ordinary weights (``convert_fx``
        and ``export_onnx`` keep them).  :func:`qatkit.ptq_log` lists per layer the
        reconstruction error with nearest and with learned rounding and how many weights
        flipped; a layer whose learned rounding is worse on the calibration data keeps
        nearest rounding (``kept`` False).

    Raises:
        ValueError: a model that is not prepared or not calibrated, or a bad argument.

    Example::

        >>> qm = qatkit.adaround(qat_model, calib_batches, finetune_epochs=500)
        >>> qatkit.ptq_log(qm)[["layer", "error_nearest", "error_learned", "flipped"]]
    """
    return reconstruct(model, data, algorithm="adaround", block_size=None,
                       finetune_epochs=finetune_epochs, finetune_batch_size=finetune_batch_size,
                       finetune_lr=finetune_lr, reg_weight=reg_weight, warmup=warmup, beta=beta,
                       num_batches=num_batches, device=device, progress=progress,
                       inplace=inplace, seed=seed)
