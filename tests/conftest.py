"""Shared fixtures: a demo bundle built once per test session, free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from devtools.net import free_port, wait_serving

__all__ = ["free_port", "wait_serving"]  # the test files import both from here


def dependency_closure(*roots: str) -> set[str]:
    """Every distribution that installing ``roots`` (no extras) pulls in, walked through the
    installed distributions' metadata (offline)."""
    import contextlib
    import importlib.metadata as md
    import re

    def requirements(dist: str) -> set[str]:
        out = set()
        for req in md.requires(dist) or []:
            if "extra ==" in req or "extra==" in req:
                continue
            if ";" in req and "python_version" in req and "<" in req.split(";", 1)[1]:
                continue  # backports for older Pythons
            out.add(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-"))
        return out

    seen, todo = set(), list(roots)
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        with contextlib.suppress(md.PackageNotFoundError):
            todo += requirements(dist)
    return seen


def dockerfile(name: str) -> list[tuple[str, str]]:
    """deploy/``name`` as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = (Path(__file__).resolve().parents[1] / "deploy" / name).read_text()
    lines, buf = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        lines.append(buf + raw)
        buf = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "") for ln in lines]


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    return instructions[starts[-1] :]


LIVE_FIXTURES = {"local_triton", "live_service", "live_target"}
LIVE_NAMES = ("LocalTriton", "ServiceProcess", "running_service", "swc_service.server")
MODEL_FIXTURES = {"demo_bundle", "demo_bundle_b", "upstream_files"}  # EfficientNet-B4 networks


def pytest_collection_modifyitems(config, items) -> None:
    """Mark what `make check` leaves out: tests with live processes, and tests of the demo model."""
    sources: dict[str, str] = {}
    for item in items:
        path = str(item.path)
        if path not in sources:
            sources[path] = item.path.read_text()
        names = set(getattr(item, "fixturenames", ()))
        if names & LIVE_FIXTURES or any(name in sources[path] for name in LIVE_NAMES):
            item.add_marker(pytest.mark.live)
        if names & MODEL_FIXTURES:
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory) -> Path:
    """A small demo bundle (M=2000, N=20000) built by the real exporter, once per session."""
    return built_demo(tmp_path_factory, "demo", seed=0)


@pytest.fixture(scope="session")
def demo_bundle_b(tmp_path_factory) -> Path:
    """Another demo model (seed 1) of the demo bundle's shapes: a second bundle whose model differs."""
    return built_demo(tmp_path_factory, "demo-b", seed=1)


def built_demo(tmp_path_factory, name: str, seed: int) -> Path:
    """``build_demo`` into the session's temporary directory; with ``VISLOC_TEST_BUNDLE_CACHE``
    set (an edit loop; CI leaves it unset), a copy kept there is reused while the code that
    builds and reads bundles is unchanged (keyed by the hash of export/ and swc_service/ sources)."""
    import hashlib
    import shutil

    from visloc_export.build import build_demo

    out = tmp_path_factory.mktemp("bundles") / name
    cache = os.environ.get("VISLOC_TEST_BUNDLE_CACHE")
    if not cache:
        build_demo(out, cells=2000, background=20_000, seed=seed)
        return out
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for source in sorted([*root.glob("export/src/**/*.py"), *root.glob("swc_service/src/**/*.py")]):
        digest.update(source.relative_to(root).as_posix().encode() + source.read_bytes())
    kept = Path(cache) / f"{name}-{digest.hexdigest()[:16]}"
    if not kept.exists():
        partial = kept.with_suffix(".partial")
        shutil.rmtree(partial, ignore_errors=True)
        build_demo(partial, cells=2000, background=20_000, seed=seed)
        partial.rename(kept)
    shutil.copytree(kept, out)
    return out


class ServiceProcess:
    """``swc-service`` as a real subprocess on loopback; always stopped by the fixture."""

    log_dir: Path | None = None  # the session's (removed after a green run), set below

    def __init__(self, bundle: Path, triton_url: str, *extra: str, port: int | None = None, env=None):
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "swc_service.server", "--bundle", str(bundle), "--host", "127.0.0.1",
               "--port", str(self.port), "--metrics-port", str(self.metrics_port), "--triton-url", triton_url,
               "--triton-health-interval-s", "0.2", *extra]  # fmt: skip
        fd, self.log_path = tempfile.mkstemp(prefix="swc-service-", suffix=".log", dir=self.log_dir)
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def log_text(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session", autouse=True)
def service_logs(tmp_path_factory) -> Path:
    """Service processes log under the session's temporary directory, not loose in /tmp."""
    ServiceProcess.log_dir = tmp_path_factory.mktemp("service-logs")
    return ServiceProcess.log_dir


@pytest.fixture(scope="session")
def local_triton(demo_bundle):
    """The real embedded Triton serving the demo bundle (one per session)."""
    from devtools.triton_local import LocalTriton

    with LocalTriton(demo_bundle, threads=2) as triton:
        yield triton


@contextmanager
def running_service(bundle: Path, triton_url: str, *extra: str) -> Iterator[ServiceProcess]:
    """A ServiceProcess that is serving, stopped on leaving."""
    svc = ServiceProcess(bundle, triton_url, *extra)
    try:
        wait_serving(svc.target)
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def live_service(demo_bundle, local_triton):
    """Real Triton + the real Locate service on the demo bundle."""
    with running_service(demo_bundle, local_triton.grpc_url) as svc:
        yield svc


@pytest.fixture(scope="session")
def live_target(live_service) -> str:
    """``127.0.0.1:PORT`` of a live Locate service (real Triton, demo bundle)."""
    return live_service.target
