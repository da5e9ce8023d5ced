"""qatkit.profiler: find why a quantized model lost accuracy.

Layer-by-layer comparisons of float / calibrated / QAT / integer models, statistics, structural
checks, an advisor, and one self-contained HTML report (:func:`model_profiler`).

Example::

    >>> from qatkit.profiler import featuremap_similarity
    >>> table = featuremap_similarity(float_model, calib_model, x, method="PerLayer")
"""

from __future__ import annotations

# --- profiler core (capture, metrics, similarity, statistics, weights) ---
# --- end profiler core ---

# --- checks and advisor ---
# --- end checks and advisor ---

# --- report ---
# --- end report ---

__all__: list[str] = []
