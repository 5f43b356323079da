"""The Locate service end to end: real Triton, real gRPC over loopback, the demo bundle."""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from conftest import ServiceProcess, free_port, wait_serving
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from bench.seed_style import reference_pd, reference_swc
from swc_service.bundle import load_bundle
from visloc_client.preprocessing import preprocess
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc
from visloc_export import samples
from visloc_export.parity import onnx_session

IMAGES = 12


@pytest.fixture(scope="module")
def stub(live_target):
    with grpc.insecure_channel(live_target) as channel:
        yield pb_grpc.LocatorStub(channel)


def _reference_answer(bundle, sess, data: bytes):
    """Recompute a Locate answer the reference's way from raw ONNX outputs."""
    probs, emb = sess.run(None, {"image": preprocess(data).array[None]})
    probs, emb = probs[0], emb[0]
    c = int(np.argmax(probs))
    pd = reference_pd(c, probs, bundle.centres)
    a, b = int(bundle.offsets[c]), int(bundle.offsets[c + 1])
    if a == b:
        return c, tuple(bundle.centres[c]), pd, "cell"
    lat, lon, _ = reference_swc(emb, np.asarray(bundle.features[a:b], dtype=np.float32), bundle.labels[a:b])
    return c, (lat, lon), pd, "swc"


def test_locate_equals_reference_recomputation(stub, demo_bundle):
    bundle = load_bundle(demo_bundle)
    sess = onnx_session(bundle.model_path)
    methods = set()
    for seed in range(IMAGES):
        data = samples.photo_bytes(seed)
        r = stub.Locate(pb.LocateRequest(image=data), timeout=30)
        cell, (lat, lon), pd, method = _reference_answer(bundle, sess, data)
        methods.add(method)
        assert r.top_cell.id == cell
        assert r.method == (pb.METHOD_SWC if method == "swc" else pb.METHOD_CELL)
        assert abs(r.lat - lat) <= 1e-9 and abs(r.lon - lon) <= 1e-9
        assert [d.scale_km for d in r.prediction_density] == [1, 25, 200, 750, 2500]
        np.testing.assert_allclose([d.density for d in r.prediction_density], pd, rtol=0, atol=1e-9)
        assert r.confidence == pytest.approx(pd[1], abs=1e-9)
        assert r.localizable == (pd[1] > 0.2)
        assert (r.input_height, r.input_width) == preprocess(data).array.shape[:2]
        assert r.model_version == bundle.model_version and r.background_version == bundle.bundle_id
    assert methods == {"swc", "cell"}  # both branches of SwC exercised


def test_options_neighbours_and_top_cells(stub, demo_bundle):
    bundle = load_bundle(demo_bundle)
    opts = pb.LocateOptions(top_k=5, eps_km=50.0, return_neighbours=5, return_top_cells=3, conf_threshold=0.0)
    for seed in range(6):
        r = stub.Locate(pb.LocateRequest(image=samples.photo_bytes(seed), options=opts), timeout=30)
        assert r.localizable  # conf > 0 always
        assert [c.id for c in r.top_cells][0] == r.top_cell.id
        assert [c.probability for c in r.top_cells] == sorted([c.probability for c in r.top_cells], reverse=True)
        if r.method == pb.METHOD_SWC:
            a, b = bundle.cell_rows(r.top_cell.id)
            assert 1 <= len(r.neighbours) <= min(5, b - a)
            sims = [n.similarity for n in r.neighbours]
            assert sims == sorted(sims, reverse=True)
            assert set(n.row_id for n in r.neighbours) <= set(bundle.row_ids[a:b].tolist())
            assert r.neighbours[0].cluster == 0
            assert any(n.in_prediction for n in r.neighbours)


def _bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A tiny PNG whose header claims a huge image (zeros compress ~1000:1)."""
    raw = zlib.compress(b"\x00" * (1 + width) * 10, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _truncated_jpeg() -> bytes:
    data = samples.photo_bytes(3)
    return data[: len(data) // 2]


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, format="PNG")
    return buf.getvalue()


BAD = [
    ("empty", b"", None, "empty"),
    ("text", b"this is not an image", None, "not an image"),
    ("truncated jpeg", _truncated_jpeg(), None, "could not be decoded"),
    ("decompression bomb", _bomb_png(), None, "decompression bomb"),
    ("over the pixel limit", _bomb_png(8000, 8000), None, "pixels, over the limit"),
    ("zero width", _bomb_png(0, 10), None, "not an image"),
    ("extreme aspect", _png((5000, 2)), None, "aspect ratio"),
    ("top_k 0", None, pb.LocateOptions(top_k=0), "top_k must be in"),
    ("top_k huge", None, pb.LocateOptions(top_k=100_000), "top_k must be in"),
    ("eps 0", None, pb.LocateOptions(eps_km=0), "eps_km must be in"),
    ("eps negative", None, pb.LocateOptions(eps_km=-1), "eps_km must be in"),
    ("eps nan", None, pb.LocateOptions(eps_km=float("nan")), "eps_km must be in"),
    ("unknown scale", None, pb.LocateOptions(conf_scale_km=30), "not a served PD scale"),
    ("threshold > 1", None, pb.LocateOptions(conf_threshold=1.5), "conf_threshold"),
    ("neighbours > top_k", None, pb.LocateOptions(top_k=3, return_neighbours=4), "cannot exceed top_k"),
    ("top cells > 100", None, pb.LocateOptions(return_top_cells=101), "return_top_cells"),
]


@pytest.mark.parametrize(("name", "data", "options", "reason"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_invalid_argument_and_server_keeps_serving(stub, name, data, options, reason):
    req = pb.LocateRequest(image=samples.photo_bytes(0) if data is None else data, options=options)
    with pytest.raises(grpc.RpcError) as err:
        stub.Locate(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in err.value.details()
    assert stub.Locate(pb.LocateRequest(image=samples.photo_bytes(1)), timeout=30).lat != 0


def test_oversize_message_is_refused(live_target):
    big = b"\xff" * (21 * 1024 * 1024)
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(live_target, options=options) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.LocatorStub(ch).Locate(pb.LocateRequest(image=big), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_deadline_shorter_than_the_work(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Locate(pb.LocateRequest(image=samples.photo_bytes(5, (2000, 1500))), timeout=0.02)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stub.Locate(pb.LocateRequest(image=samples.photo_bytes(5)), timeout=30).top_cell.probability > 0


def test_stream_answers_every_image_and_errors_per_item(stub):
    reqs = [pb.LocateRequest(image=samples.photo_bytes(i % 4), request_id=f"r{i}") for i in range(10)]
    reqs.insert(4, pb.LocateRequest(image=b"garbage", request_id="bad"))
    out = list(stub.LocateStream(iter(reqs), timeout=120))
    assert sorted(r.index for r in out) == list(range(11))
    by_id = {r.request_id: r for r in out}
    assert by_id["bad"].WhichOneof("outcome") == "error"
    assert by_id["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    single = stub.Locate(pb.LocateRequest(image=samples.photo_bytes(2)), timeout=30)
    assert by_id["r2"].result.lat == single.lat and by_id["r6"].result.top_cell.id == single.top_cell.id


def test_concurrent_same_shape_requests_are_grouped(stub, local_triton):
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(local_triton.grpc_url)

    def counts():
        s = client.get_inference_statistics("visloc").model_stats[0]
        return s.inference_count, s.execution_count

    inf0, exe0 = counts()
    data = [samples.photo_bytes(i, (400, 300)) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda d: stub.Locate(pb.LocateRequest(image=d), timeout=60), data))
    inf1, exe1 = counts()
    assert inf1 - inf0 >= 16
    assert exe1 - exe0 < inf1 - inf0  # fewer Triton executions than images: batches merged
    assert max(r.batch_size for r in results) > 1


def test_health_reflection_info_and_metrics(live_service, demo_bundle):
    bundle = load_bundle(demo_bundle)
    with grpc.insecure_channel(live_service.target) as ch:
        for service in ("", "visloc.v1.Locator"):
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert {"visloc.v1.Locator", "grpc.health.v1.Health"} <= names
        info = pb_grpc.LocatorStub(ch).GetInfo(pb.GetInfoRequest(), timeout=10)
    assert (info.num_cells, info.num_background, info.embedding_dim) == (2000, 20_000, 1792)
    assert info.bundle_source == "demo" and "DEMO" in info.bundle_warning
    assert info.model_version == bundle.model_version and list(info.pd_scales_km) == [1, 25, 200, 750, 2500]
    assert info.defaults.top_k == 10 and info.defaults.conf_threshold == pytest.approx(0.2)
    text = urllib.request.urlopen(f"http://127.0.0.1:{live_service.metrics_port}/metrics", timeout=10).read().decode()
    for family in (
        'visloc_requests_total{code="OK",method="Locate"}',
        'visloc_requests_total{code="INVALID_ARGUMENT",method="Locate"}',
        'visloc_stage_duration_seconds_bucket{le="0.001",stage="swc"}',
        'visloc_stage_duration_seconds_count{stage="triton"}',
        "visloc_triton_batch_size_count",
        "visloc_in_flight_images",
        "visloc_triton_ready 1.0",
        'visloc_predictions_total{localizable="true",method="swc"}',
        f'visloc_bundle_info{{bundle_id="{bundle.bundle_id}"',
    ):
        assert family in text, family
    assert '"rpc": "Locate"' in live_service.log_text() and "image" not in live_service.log_text().split("settings")[0]


def test_a_compressed_request_is_answered_as_a_plain_one(live_service):
    """A caller that compresses its messages (gzip, as some gRPC clients do by default) gets the
    same answer: the service reads the image from the message gRPC decompressed."""
    request = pb.LocateRequest(image=samples.photo_bytes(5), request_id="gz")
    with grpc.insecure_channel(live_service.target) as ch:
        stub = pb_grpc.LocatorStub(ch)
        plain = stub.Locate(request, timeout=60)
        packed = stub.Locate(request, timeout=60, compression=grpc.Compression.Gzip)
        streamed = list(stub.LocateStream(iter([request, request]), timeout=60, compression=grpc.Compression.Gzip))
    for answer in (packed, *(item.result for item in streamed)):
        assert (answer.lat, answer.lon, answer.top_cell.id, answer.input_width) == (
            plain.lat, plain.lon, plain.top_cell.id, plain.input_width
        )  # fmt: skip


def test_the_access_log_names_each_call_by_its_request_id(live_service):
    """One JSON line per call with its request id: the caller's, or the one the service made
    (the id in the reply), for an answered call and a refused one alike."""
    with grpc.insecure_channel(live_service.target) as ch:
        stub = pb_grpc.LocatorStub(ch)
        named = stub.Locate(pb.LocateRequest(image=samples.photo_bytes(3), request_id="log-named-3"), timeout=60)
        made = stub.Locate(pb.LocateRequest(image=samples.photo_bytes(4)), timeout=60)
        with pytest.raises(grpc.RpcError) as err:
            stub.Locate(pb.LocateRequest(image=b"not an image", request_id="log-refused-1"), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named.request_id == "log-named-3" and made.request_id
    entries = {}
    for line in live_service.log_text().splitlines():
        start = line.find('{"rpc": "Locate"')
        if start >= 0:
            entry = json.loads(line[start:])
            entries[entry["request_id"]] = entry["code"]
    assert entries.get("log-named-3") == "OK"
    assert entries.get(made.request_id) == "OK"
    assert entries.get("log-refused-1") == "INVALID_ARGUMENT"


def test_triton_down_is_unavailable_fast_and_not_serving(demo_bundle):
    dead = f"127.0.0.1:{free_port()}"
    svc = ServiceProcess(demo_bundle, dead)
    try:
        with grpc.insecure_channel(svc.target) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.LocatorStub(ch).Locate(pb.LocateRequest(image=samples.photo_bytes(0)), timeout=20)
            # Not DEADLINE_EXCEEDED: the call failed fast instead of waiting for Triton.
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert dead in err.value.details()
        text = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=10).read().decode()
        assert f'visloc_triton_endpoint_ready{{endpoint="{dead}"}} 0.0' in text  # never took a batch
        assert "visloc_triton_ready 0.0" in text
    finally:
        assert svc.stop() == 0


def test_graceful_stop_finishes_in_flight_and_refuses_new(demo_bundle, local_triton):
    import queue

    svc = ServiceProcess(demo_bundle, local_triton.grpc_url, "--grace-s", "20")
    wait_serving(svc.target)
    results: list = []

    def call(seed: int) -> None:
        with grpc.insecure_channel(svc.target) as ch:
            try:
                r = pb_grpc.LocatorStub(ch).Locate(pb.LocateRequest(image=samples.photo_bytes(seed)), timeout=60)
                results.append(("ok", r.lat))
            except grpc.RpcError as exc:
                results.append((exc.code().name, exc.details()))

    # A stream the caller keeps open: a call in flight for as long as the test wants, so that
    # new calls can be tried while the process is still draining.
    stream_channel = grpc.insecure_channel(svc.target)
    requests: queue.Queue = queue.Queue()
    stream = pb_grpc.LocatorStub(stream_channel).LocateStream(iter(requests.get, None), timeout=60)
    requests.put(pb.LocateRequest(image=samples.photo_bytes(10)))
    assert next(stream).WhichOneof("outcome") == "result"
    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    metrics_url = f"http://127.0.0.1:{svc.metrics_port}/metrics"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # SIGTERM only once all six calls are inside the service
        text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
        gauge = [line for line in text.splitlines() if line.startswith("visloc_in_flight_images ")]
        if gauge and float(gauge[0].split()[-1]) >= 6:
            break
        time.sleep(0.002)
    svc.proc.send_signal(15)
    for t in threads:
        t.join(60)
    assert all(code == "ok" for code, _ in results), results
    deadline = time.monotonic() + 30
    while "draining" not in svc.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    # Draining: the stream still holds the process, and a new call is refused at once.
    with grpc.insecure_channel(svc.target) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.LocatorStub(ch).Locate(pb.LocateRequest(image=samples.photo_bytes(0)), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    assert svc.proc.poll() is None, "the process exited before the stream in flight was done"
    # The call in flight is served to its end, then the process exits cleanly.
    requests.put(pb.LocateRequest(image=samples.photo_bytes(11)))
    requests.put(None)
    rest = list(stream)
    assert [r.WhichOneof("outcome") for r in rest] == ["result"]
    stream_channel.close()
    assert svc.proc.wait(30) == 0


def test_several_workers_share_one_port(demo_bundle, local_triton, tmp_path):
    port = free_port()
    tmp = tmp_path / "tmp"  # the supervisor's temporary directory: the workers' metric files
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    svc = ServiceProcess(demo_bundle, local_triton.grpc_url, "--workers", "2", port=port, env=env)
    try:
        wait_serving(svc.target)  # one worker; the other may still be running its model check
        deadline = time.monotonic() + 60
        while len({line.split("[")[1].split("]")[0] for line in svc.log_text().splitlines()
                   if "health: SERVING" in line}) < 2:  # fmt: skip
            assert time.monotonic() < deadline and svc.proc.poll() is None, svc.log_text()[-3000:]
            time.sleep(0.1)
        seen = set()
        for i in range(8):  # new connections are spread over the workers by the kernel
            with grpc.insecure_channel(svc.target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                r = pb_grpc.LocatorStub(ch).Locate(pb.LocateRequest(image=samples.photo_bytes(i)), timeout=60)
                seen.add(r.top_cell.id)
        assert seen
        workers = [line for line in svc.log_text().splitlines() if "listening on" in line]
        assert len({line.split("[")[1].split("]")[0] for line in workers}) == 2  # two worker pids
        text = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=10).read().decode()
        ok = [line for line in text.splitlines() if line.startswith('visloc_requests_total{code="OK",method="Locate"}')]
        assert ok and float(ok[0].split()[-1]) == 8.0  # aggregated over the workers
        assert [d.name.startswith("visloc-metrics-") for d in tmp.iterdir()] == [True]
    finally:
        assert svc.stop() == 0
    assert list(tmp.iterdir()) == []  # removed with the workers


def test_a_model_that_does_not_match_the_bundle_is_not_served(local_triton, tmp_path):
    """A bundle of another model than Triton's (another cell count), without probes and served
    unchecked at the operator's risk: the service asks Triton for the bundle's own model version,
    which Triton does not serve. NOT_SERVING, the reason logged. (The shape check of an unchecked
    bundle whose version Triton does serve: tests/test_model_check.py.)"""
    from swc_service import bundle as B

    with B.BundleWriter(tmp_path / "other") as w:
        w.path(B.MODEL).write_bytes(b"not the model Triton serves")
        w.save(B.CELLS, np.zeros((7, 2)))
        w.save(B.OFFSETS, np.zeros(8, dtype=np.int64))
        w.save(B.FEATURES, np.zeros((0, 1792), dtype=np.float16))
        w.save(B.LABELS, np.zeros((0, 2)))
        w.save(B.ROW_IDS, np.zeros(0, dtype=np.int64))
        w.commit(source="demo", tool="test")
    svc = ServiceProcess(tmp_path / "other", local_triton.grpc_url, "--allow-bundle-without-probes", "true")
    try:
        deadline = time.monotonic() + 30
        version = B.load_bundle(tmp_path / "other").triton_version
        while "model check could not run" not in svc.log_text():
            assert time.monotonic() < deadline, svc.log_text()
            time.sleep(0.1)
        assert f"does not serve model 'visloc' version {version}" in svc.log_text()
        with grpc.insecure_channel(svc.target) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        svc.stop()


def test_supervisor_exits_when_a_worker_dies(demo_bundle, local_triton):
    import os
    import re

    svc = ServiceProcess(demo_bundle, local_triton.grpc_url, "--workers", "2", port=free_port())
    try:
        wait_serving(svc.target)
        worker = int(re.search(r"\[(\d+)\] listening on", svc.log_text()).group(1))
        os.kill(worker, 9)
        assert svc.proc.wait(30) != 0  # the orchestrator sees the pod fail and restarts it
        assert "exited; stopping the others" in svc.log_text()
    finally:
        svc.stop()
