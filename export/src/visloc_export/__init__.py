"""Build visloc model bundles: PyTorch model, ONNX export with parity checks, imports."""

__version__ = "0.1.0"
