"""Hybrid (step) quantization: float islands inside a QAT model.

``prepare_qat_fx(model, qconfig_dict, hybrid=True, hybrid_dict={"module_name": [...],
"module_type": [...]})`` keeps the listed modules (and everything inside them) float during
QAT.  prepare then quantizes again wherever an island's float output feeds a quantized op
(a ``QuantStub`` named ``<op>_quant``) and the island itself computes on the dequantized
values, so users can bisect which layer breaks QAT accuracy: quantize everything, then
move layers in and out of ``hybrid_dict`` and watch the metric.

An island is the same thing as ``qconfig=None`` for those names/types, with a priority above
every qconfig_dict entry and module ``.qconfig`` attribute.
"""

from __future__ import annotations

__all__ = ["check_hybrid_args"]


def check_hybrid_args(hybrid: bool, hybrid_dict: dict | None) -> dict | None:
    """Validate ``hybrid``/``hybrid_dict`` and return the float-island overrides (or None).

    Raises:
        ValueError: ``hybrid_dict`` given without ``hybrid=True``, or not a dict of lists.

    Example::

        >>> check_hybrid_args(True, {"module_name": ["conv1"]})
        {'module_name': ['conv1'], 'module_type': []}
    """
    if not hybrid:
        if hybrid_dict:
            raise ValueError("hybrid_dict is given but hybrid=False: pass hybrid=True to keep "
                             "those modules float during QAT")
        return None
    if not hybrid_dict:
        raise ValueError("hybrid=True needs hybrid_dict={'module_name': [...], "
                         "'module_type': [...]} naming the modules to keep float")
    if not isinstance(hybrid_dict, dict):
        raise ValueError(f"hybrid_dict must be a dict, got {type(hybrid_dict).__name__}")
    out = {}
    for key in ("module_name", "module_type"):
        value = hybrid_dict.get(key, [])
        if isinstance(value, (str, type)):
            value = [value]
        out[key] = list(value)
    bad = set(hybrid_dict) - set(out)
    if bad:
        raise ValueError(f"unknown hybrid_dict keys {sorted(bad)}: use 'module_name' and "
                         "'module_type'")
    return out
