"""visloc Locate service: exact Search within Cell and Prediction Density behind gRPC."""

__version__ = "0.1.0"
