"""``visloc-export fetch`` against a fake upstream: a real HTTP server on 127.0.0.1 in a thread."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from visloc_export import fetch as F

VENV_BIN = Path(sys.executable).parent
NAMES = list(F.UPSTREAM_FILES)


class _QuietServer(ThreadingHTTPServer):
    """A client that gives up mid-file (what several tests make the fetcher do) is no error."""

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeUpstream:
    """Serves ``files`` under ``/mirror/``; behaviour switches for every failure mode."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.ranges = True  # honour Range requests
        self.drop_after: dict[str, int] = {}  # name -> bytes sent before the connection drops (once)
        self.extra_length: dict[str, int] = {}  # name -> Content-Length overstated by this much
        self.drop_every: dict[str, int] = {}  # name -> bytes sent before every response drops
        self.fail_once: dict[str, int] = {}  # name -> HTTP status answered once before serving
        self.requests: list[tuple[str, str | None]] = []  # (name, Range header)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                name = self.path.removeprefix("/mirror/")
                rng = self.headers.get("Range")
                with fake.lock:
                    fake.requests.append((name, rng))
                    drop = fake.drop_after.pop(name, None)
                    if drop is None and name in fake.drop_every:
                        drop = fake.drop_every[name]
                    fail = fake.fail_once.pop(name, None)
                body = fake.files.get(name)
                if body is None or fail:
                    self.send_response(fail or 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if rng and fake.ranges:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                part = body[start:]
                self.send_header("Content-Length", str(len(part) + fake.extra_length.get(name, 0)))
                self.end_headers()
                if drop is not None or name in fake.extra_length:
                    self.wfile.write(part[: drop if drop is not None else len(part)])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(part)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/mirror/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def gets(self, name: str) -> list[str | None]:
        return [r for n, r in self.requests if n == name]


def _files() -> dict[str, bytes]:
    """Distinct pseudo-random contents per name; the background a few MB so it streams in chunks."""
    out = {}
    for i, name in enumerate(NAMES):
        size = 3 * F.CHUNK + 12345 if name == "back_coll_features.hdf5" else 5000 + 997 * i
        out[name] = (hashlib.sha256(name.encode()).digest() * (size // 32 + 1))[:size]
    return out


@pytest.fixture
def upstream():
    with FakeUpstream(_files()) as fake:
        yield fake


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([VENV_BIN / "visloc-export", "fetch", *args], capture_output=True, text=True, timeout=120)


def _fetcher(out: Path, fake: FakeUpstream, **kw) -> F.Fetcher:
    return F.Fetcher(out, base_url=fake.base_url, progress=False, sleep=lambda s: None, **kw)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    """Exit status 2 and exactly one error line on stderr, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("visloc-export: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_full_fetch_is_byte_identical_and_recorded(upstream, tmp_path):
    out = tmp_path / "up"
    proc = _cli("--base-url", upstream.base_url, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "B/s" in proc.stderr  # progress: bytes, rate (and ETA) on stderr
    sources = json.loads((out / F.SOURCES).read_text())["files"]
    assert sorted(sources) == sorted(NAMES)
    for name, body in upstream.files.items():
        assert (out / name).read_bytes() == body
        rec = sources[name]
        assert rec["url"] == upstream.base_url + name
        assert rec["bytes"] == len(body)
        assert rec["sha256"] == hashlib.sha256(body).hexdigest()
        assert rec["date"].startswith("20")
    assert sorted(p.name for p in out.iterdir()) == sorted([*NAMES, F.SOURCES])  # no .part left
    # A second fetch verifies what is there and downloads nothing.
    before = len(upstream.requests)
    again = _cli("--base-url", upstream.base_url, "--out", str(out), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert len(upstream.requests) == before
    assert again.stderr.count("sha256 verified") == len(NAMES)


def test_only_fetches_the_named_files(upstream, tmp_path):
    _fetcher(tmp_path, upstream).fetch(F.resolve_names(["mvmf_head.pt"]))
    assert [n for n, _ in upstream.requests] == ["mvmf_head.pt"]
    with pytest.raises(F.FetchError, match="unknown file"):
        F.resolve_names(["weights.bin"])


def test_connection_dropped_mid_file_is_resumed(upstream, tmp_path):
    name = "back_coll_features.hdf5"
    upstream.drop_after[name] = F.CHUNK + 100
    records = _fetcher(tmp_path, upstream).fetch([name])
    assert (tmp_path / name).read_bytes() == upstream.files[name]
    ranges = upstream.gets(name)
    assert ranges[0] is None and len(ranges) == 2
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= F.CHUNK + 100  # resumed, not started again
    assert records[name]["sha256"] == hashlib.sha256(upstream.files[name]).hexdigest()


def test_transient_server_error_is_retried(upstream, tmp_path):
    upstream.fail_once["rrm_head.pt"] = 503
    _fetcher(tmp_path, upstream).fetch(["rrm_head.pt"])
    assert (tmp_path / "rrm_head.pt").read_bytes() == upstream.files["rrm_head.pt"]
    assert upstream.gets("rrm_head.pt") == [None, None]


def test_gives_up_after_retries_and_keeps_the_part_to_resume(upstream, tmp_path):
    name = "back_coll_features.hdf5"
    upstream.drop_every[name] = 1000
    with pytest.raises(F.FetchError, match=r"gave up after 2 retries; run fetch again to resume from byte \d+"):
        _fetcher(tmp_path, upstream, retries=2).fetch([name])
    assert not (tmp_path / name).exists()
    assert (tmp_path / (name + F.PART_SUFFIX)).stat().st_size > 0
    assert len(upstream.gets(name)) == 3
    del upstream.drop_every[name]
    _fetcher(tmp_path, upstream).fetch([name])  # the next run resumes and completes
    assert (tmp_path / name).read_bytes() == upstream.files[name]
    assert upstream.gets(name)[-1] is not None


def test_server_without_range_restarts_from_zero(upstream, tmp_path):
    name = "back_coll_features.hdf5"
    upstream.ranges = False
    upstream.drop_after[name] = F.CHUNK + 100
    (tmp_path / (name + F.PART_SUFFIX)).write_bytes(b"stale bytes from another download")
    _fetcher(tmp_path, upstream).fetch([name])
    assert (tmp_path / name).read_bytes() == upstream.files[name]
    ranges = upstream.gets(name)
    assert len(ranges) == 2 and all(r is not None for r in ranges)  # asked to resume twice, got 200s
    assert not (tmp_path / (name + F.PART_SUFFIX)).exists()


def test_404_is_one_line_naming_the_url(upstream, tmp_path):
    del upstream.files["rrm_head.pt"]
    proc = _cli("--base-url", upstream.base_url, "--out", str(tmp_path), "--only", "rrm_head.pt")
    line = _one_line_error(proc)
    assert upstream.base_url + "rrm_head.pt" in line and "HTTP 404" in line
    assert "--base-url" in line and "by hand" in line
    assert not (tmp_path / "rrm_head.pt").exists()


def test_wrong_size_is_refused(upstream, tmp_path):
    upstream.extra_length["mvmf_head.pt"] = 100
    proc = _cli("--base-url", upstream.base_url, "--out", str(tmp_path), "--only", "mvmf_head.pt", "--no-progress")
    line = _one_line_error(proc)
    assert "size mismatch" in line and upstream.base_url + "mvmf_head.pt" in line
    assert not (tmp_path / "mvmf_head.pt").exists()
    assert not (tmp_path / ("mvmf_head.pt" + F.PART_SUFFIX)).exists()


def test_corrupted_file_is_downloaded_again(upstream, tmp_path):
    fetcher = _fetcher(tmp_path, upstream)
    fetcher.fetch(NAMES)
    path = tmp_path / "rrm_head.pt"
    data = bytearray(path.read_bytes())
    data[1234] ^= 0xFF  # same size, one byte wrong: only the sha256 sees it
    path.write_bytes(bytes(data))
    before = list(upstream.requests)
    fetcher.fetch(NAMES)
    assert path.read_bytes() == upstream.files["rrm_head.pt"]
    assert upstream.requests[len(before) :] == [("rrm_head.pt", None)]  # nothing else fetched


def test_mirror_with_different_bytes_fails_the_checksum(upstream, tmp_path):
    _fetcher(tmp_path, upstream).fetch(["rrm_head.pt"])
    (tmp_path / "rrm_head.pt").unlink()
    upstream.files["rrm_head.pt"] = upstream.files["rrm_head.pt"][::-1]
    proc = _cli("--base-url", upstream.base_url, "--out", str(tmp_path), "--only", "rrm_head.pt")
    line = _one_line_error(proc)
    assert "checksum mismatch" in line and upstream.base_url + "rrm_head.pt" in line
    assert not (tmp_path / "rrm_head.pt").exists()


def test_connection_refused_fails_fast_with_one_line(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    proc = _cli("--base-url", url, "--out", str(tmp_path), "--only", "mvmf_head.pt")
    line = _one_line_error(proc)
    assert url + "mvmf_head.pt" in line and "cannot connect" in line and "Connection refused" in line
    assert not (tmp_path / "mvmf_head.pt").exists()


def test_file_placed_by_hand_is_recorded_not_downloaded(upstream, tmp_path):
    (tmp_path / "mvmf_head.pt").write_bytes(b"copied from a USB stick")
    records = _fetcher(tmp_path, upstream).fetch(["mvmf_head.pt"])
    assert upstream.requests == []
    assert records["mvmf_head.pt"]["url"] == "placed by hand"
    assert records["mvmf_head.pt"]["sha256"] == hashlib.sha256(b"copied from a USB stick").hexdigest()


def test_not_enough_disk_space_is_refused_before_downloading(upstream, tmp_path, monkeypatch):
    monkeypatch.setattr(F.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(F.FetchError, match="free some space"):
        _fetcher(tmp_path, upstream).fetch(["back_coll_features.hdf5"])
    assert not (tmp_path / "back_coll_features.hdf5").exists()
    assert not (tmp_path / ("back_coll_features.hdf5" + F.PART_SUFFIX)).exists()
