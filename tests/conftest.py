"""Shared fixtures: a demo bundle built once per test session, free loopback ports."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (tests only ever listen on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory) -> Path:
    """A small demo bundle (M=2000, N=20000) built by the real exporter, once per session."""
    from visloc_export.build import build_demo

    out = tmp_path_factory.mktemp("bundles") / "demo"
    build_demo(out, cells=2000, background=20_000, seed=0)
    return out
