"""Swap a bundle while serving (issue 16 parts 2 and 3), on the real local Triton.

Bundles A and B have the same shapes and different models. Triton serves both as separate
versions (the launcher adds B next to A at run time); the service runs on a symlink to A and
gets SIGHUP after the symlink is re-pointed to B. Every answer must come from A or B and equal
that bundle's own recomputation in process (onnxruntime on its model.onnx + the service's
predict). A reload whose model Triton does not serve keeps A serving and says why.
"""

from __future__ import annotations

import io
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from conftest import ServiceProcess, wait_serving
from PIL import Image

from devtools.triton_local import LocalTriton, served_versions
from swc_service import bundle as B
from swc_service.config import Settings
from swc_service.options import resolve_options
from swc_service.prediction import ServingState, predict
from visloc_client.preprocessing import Limits, preprocess
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc

CLIENTS = 4
MAX_CALLS = 3000  # per client: the loops are bounded whatever happens
SIZES = ((400, 300), (300, 400), (400, 300))


@pytest.fixture(scope="module")
def bundle_b(demo_bundle_b) -> Path:
    """A second bundle with the demo bundle's shapes and ANOTHER model (demo seed 1)."""
    return demo_bundle_b


@pytest.fixture(scope="module")
def triton(demo_bundle):
    """A Triton of this module's own (versions are added and removed here), serving A."""
    with LocalTriton(demo_bundle, threads=1) as t:
        yield t


def images() -> list[bytes]:
    rng = np.random.default_rng(7)
    out = []
    for w, h in SIZES:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def expected(bundle_dir: Path, data: list[bytes]) -> list[tuple[float, float, int, float]]:
    """(lat, lon, top cell, confidence) the bundle's own model and the service's predict() give."""
    bundle = B.load_bundle(bundle_dir)
    settings = Settings(bundle=str(bundle_dir))
    state = ServingState.of(bundle, settings.pd_scales_km)
    opts = resolve_options(pb.LocateOptions(), settings, state.density.scales_km)
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    out = []
    for d in data:
        x = preprocess(d, Limits(settings.max_image_pixels, settings.max_input_side)).array[None]
        probs, emb = session.run([B.OUTPUT_PROBS, B.OUTPUT_EMBEDDING], {B.INPUT_NAME: x})
        p = predict(state, probs[0], emb[0], opts)
        out.append((p.lat, p.lon, p.top_cell.id, p.confidence))
    return out


def point(link: Path, target: Path) -> None:
    """Re-point the symlink atomically, as an operator would (ln -sfn + rename)."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def metric(svc: ServiceProcess, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def locate(target: str, data: bytes) -> pb.LocateResponse:
    with grpc.insecure_channel(target) as ch:
        return pb_grpc.LocatorStub(ch).Locate(pb.LocateRequest(image=data), timeout=60)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


def maps_of(pid: int, bundle_dir: Path) -> bool:
    """Whether the process still maps a file of the bundle (its background memory maps)."""
    return str(bundle_dir.resolve()) + "/" in Path(f"/proc/{pid}/maps").read_text()


def test_a_reload_whose_model_triton_does_not_serve_keeps_the_old_bundle(demo_bundle, bundle_b, triton, tmp_path):
    a, b = B.load_bundle(demo_bundle), B.load_bundle(bundle_b)
    if b.triton_version in served_versions(triton.model_dir):
        triton.remove_bundle(bundle_b)
    link = tmp_path / "current"
    point(link, demo_bundle)
    svc = ServiceProcess(link, triton.grpc_url)
    try:
        wait_serving(svc.target)
        point(link, bundle_b)
        os.kill(svc.proc.pid, signal.SIGHUP)
        wait_for(lambda: metric(svc, "visloc_bundle_reload_total", result="error") >= 1, 120, "the failed reload")
        r = locate(svc.target, images()[0])
        assert (r.model_version, r.background_version) == (a.model_version, a.bundle_id)  # A keeps serving
        assert metric(svc, "visloc_bundle_info", bundle_id=a.bundle_id) == 1
        assert metric(svc, "visloc_bundle_reload_total", result="ok") == 0
        log = svc.log_text()
        assert f"bundle {b.bundle_id} from {bundle_b.resolve()} refused" in log, log[-3000:]
        assert f"version {b.triton_version}" in log and f"still serving bundle {a.bundle_id}" in log
    finally:
        svc.stop()


def test_swap_under_load_answers_every_call_with_one_bundle_s_own_numbers(demo_bundle, bundle_b, triton, tmp_path):
    a, b = B.load_bundle(demo_bundle), B.load_bundle(bundle_b)
    data = images()
    want = {a.bundle_id: expected(demo_bundle, data), b.bundle_id: expected(bundle_b, data)}
    assert [w[2] for w in want[a.bundle_id]] != [w[2] for w in want[b.bundle_id]]  # the models tell apart
    identity = {a.bundle_id: a.model_version, b.bundle_id: b.model_version}
    link = tmp_path / "current"
    point(link, demo_bundle)
    svc = ServiceProcess(link, triton.grpc_url)
    results: list[tuple[float, float, int, pb.LocateResponse | None, str]] = []  # start, end, image, reply, error
    stop = threading.Event()
    lock = threading.Lock()

    def client(k: int) -> None:
        with grpc.insecure_channel(svc.target) as ch:
            stub = pb_grpc.LocatorStub(ch)
            for n in range(MAX_CALLS):
                if stop.is_set():
                    return
                i = (k + n) % len(data)
                t0 = time.monotonic()
                try:
                    r, err = stub.Locate(pb.LocateRequest(image=data[i]), timeout=60), ""
                except grpc.RpcError as exc:
                    r, err = None, f"{exc.code()}: {exc.details()}"
                with lock:
                    results.append((t0, time.monotonic(), i, r, err))

    rss: list[int] = []

    def sample() -> None:
        while not stop.is_set():
            rss.append(rss_kib(svc.proc.pid))
            time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    sampler = threading.Thread(target=sample)
    try:
        wait_serving(svc.target)
        for t in threads:
            t.start()
        wait_for(lambda: len(results) >= 8, 120, "answers from A")
        # The launcher loads B's model next to A's while A is being served (none of A's calls fail).
        if b.triton_version not in served_versions(triton.model_dir):
            triton.add_bundle(bundle_b)
        rss_before = rss_kib(svc.proc.pid)
        sampler.start()
        point(link, bundle_b)
        hup = time.monotonic()
        os.kill(svc.proc.pid, signal.SIGHUP)

        def first_b() -> float | None:
            with lock:
                ends = [end for _, end, _, r, _ in results if r is not None and r.background_version == b.bundle_id]
            return min(ends) if ends else None

        try:
            wait_for(lambda: first_b() is not None, 120, "an answer from B")
        except AssertionError as exc:
            lines = [x for x in svc.log_text().splitlines() if x.startswith("20") and "swc_service.access" not in x]
            raise AssertionError(
                f"{exc}; the service's log (no access lines) ends:\n" + "\n".join(lines[-20:])
            ) from None
        swapped = first_b()
        wait_for(lambda: sum(1 for s, *_ in list(results) if s > swapped) >= 4 * CLIENTS, 120, "answers after the swap")
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join(120)
    try:
        if sampler.is_alive():
            sampler.join(10)
        errors = [err for *_, err in results if err]
        assert not errors, errors[:5]
        for _, _, i, r, _ in results:
            assert r.background_version in want, r.background_version
            assert r.model_version == identity[r.background_version]  # model and background of ONE bundle
            lat, lon, cell, conf = want[r.background_version][i]
            assert r.top_cell.id == cell
            assert (r.lat, r.lon) == pytest.approx((lat, lon), abs=1e-4)
            assert r.confidence == pytest.approx(conf, rel=1e-3, abs=1e-6)
        by = [r.background_version for *_, r, _ in results]
        assert a.bundle_id in by and b.bundle_id in by
        assert all(r.background_version == b.bundle_id for s, _, _, r, _ in results if s > swapped)
        assert metric(svc, "visloc_bundle_reload_total", result="ok") == 1
        assert metric(svc, "visloc_bundle_info", bundle_id=b.bundle_id) == 1
        assert metric(svc, "visloc_bundle_info", bundle_id=a.bundle_id) == 0
        # The old bundle's memory maps go once its calls in flight are done.
        wait_for(lambda: not maps_of(svc.proc.pid, demo_bundle), 30, "A's memory maps released")
        assert maps_of(svc.proc.pid, bundle_b)
        # The launcher unloads A's model; the service, on B, keeps answering.
        triton.remove_bundle(demo_bundle)
        assert served_versions(triton.model_dir) == [b.triton_version]
        assert locate(svc.target, data[0]).background_version == b.bundle_id
        print(
            f"\nswap under load: {len(results)} calls by {CLIENTS} clients, 0 failed; SIGHUP -> first answer "
            f"from B {swapped - hup:.3f} s; service RSS {rss_before / 1024:.1f} MiB before, peak "
            f"{max(rss) / 1024:.1f} MiB during the swap (VmHWM {rss_kib(svc.proc.pid, 'VmHWM') / 1024:.1f} MiB)"
        )
    finally:
        svc.stop()


def test_the_supervisor_forwards_sighup_to_every_worker(demo_bundle, triton, tmp_path):
    """--workers 2: one SIGHUP to the supervisor reloads in both workers (counted in the
    aggregated metrics); the bundle is the one served, so each says "unchanged"."""
    served = served_versions(triton.model_dir)
    if B.load_bundle(demo_bundle).triton_version not in served:
        triton.add_bundle(demo_bundle)
    link = tmp_path / "current"
    point(link, demo_bundle)
    svc = ServiceProcess(link, triton.grpc_url, "--workers", "2")
    try:
        wait_serving(svc.target)
        wait_for(lambda: svc.log_text().count("listening on") == 2, 60, "both workers listening")
        os.kill(svc.proc.pid, signal.SIGHUP)
        wait_for(lambda: metric(svc, "visloc_bundle_reload_total", result="unchanged") == 2, 60, "two reloads")
        assert svc.log_text().count("reload unchanged") == 2
        assert svc.proc.poll() is None  # nobody died of the signal
    finally:
        assert svc.stop() == 0
