"""qatkit.profiler: find why a quantized model lost accuracy (layer-by-layer comparisons,
statistics, checks, HTML report)."""

__all__: list[str] = []
