"""BRECQ: learn the weight rounding block by block, so that errors inside a block cancel.

AdaRound reconstructs each layer alone; BRECQ (Li et al., "BRECQ: Pushing the Limit of
Post-Training Quantization by Block Reconstruction", ICLR 2021) reconstructs the output of a
block of consecutive layers, letting a later layer's rounding compensate an earlier one's,
which matters most at 2-4 bits.  Here a block is ``finetune_block_size`` consecutive weighted
layers in graph order and every op between them (residual adds included); its outputs are all
the values that leave it.  Activations inside the block are fake-quantized with their
calibrated scales.  Not done: the paper's Fisher-weighted loss (plain squared error here) and
its learned activation step sizes (the calibrated scales are kept).
"""

from __future__ import annotations

from typing import Any

from torch import fx

from ._reconstruction import reconstruct

__all__ = ["brecq"]


def brecq(model: fx.GraphModule, data: Any, finetune_block_size: int = 4,
          finetune_epochs: int = 500, finetune_batch_size: int = 1, finetune_lr: float = 1e-3,
          reg_weight: float = 0.01, warmup: float = 0.2, beta: tuple[float, float] = (20.0, 2.0),
          num_batches: int | None = None, device: Any = None, progress: bool = True,
          inplace: bool = False, seed: int = 0) -> fx.GraphModule:
    """Learn the rounding of the weights block by block against the float model (BRECQ).

    Args:
        model: a prepared (:func:`qatkit.prepare_qat_fx`) and calibrated model.
        data: the calibration data the blocks are reconstructed on.
        finetune_block_size: weighted layers per block (1 is AdaRound).
        finetune_epochs: optimization steps per block (each on ``finetune_batch_size``
            samples drawn from the calibration data).
        finetune_batch_size: samples per step.
        finetune_lr: Adam's learning rate for the rounding variables.
        reg_weight: weight of the regularizer pushing the rounding to 0 / 1 (lambda).
        warmup: fraction of the steps without the regularizer.
        beta: the regularizer's exponent, annealed from ``beta[0]`` to ``beta[1]``.
        num_batches: use at most this many batches of ``data``.
        device: where to run (default: the model's device; CUDA when the model is there).
        progress: show a progress bar over blocks.
        inplace: change ``model`` itself instead of a copy.
        seed: seed of the sampling.

    Returns:
        the model with the learned integer weights written as ordinary weights.
        :func:`qatkit.ptq_log` lists per block the reconstruction error with nearest and with
        learned rounding; a block whose learned rounding is worse on the calibration data
        keeps nearest rounding.

    Raises:
        ValueError: a model that is not prepared or not calibrated, or a bad argument.

    Example::

        >>> qm = qatkit.brecq(qat_model, calib_batches, finetune_block_size=4)
    """
    return reconstruct(model, data, algorithm="brecq", block_size=finetune_block_size,
                       finetune_epochs=finetune_epochs, finetune_batch_size=finetune_batch_size,
                       finetune_lr=finetune_lr, reg_weight=reg_weight, warmup=warmup, beta=beta,
                       num_batches=num_batches, device=device, progress=progress,
                       inplace=inplace, seed=seed)
