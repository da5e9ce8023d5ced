"""qatkit's version (setup.cfg's; the exporter writes it as the ONNX producer version)."""

__version__ = "0.1.0"
