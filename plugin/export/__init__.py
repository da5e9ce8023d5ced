"""QDQ ONNX export (:func:`export_onnx`) and the onnxruntime checks of an exported file."""

from .onnx import export_onnx as export_onnx

__all__ = ["export_onnx"]
