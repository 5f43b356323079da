"""Client library and CLI for the visloc Locate gRPC service."""

__version__ = "0.1.0"
