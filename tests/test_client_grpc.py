"""The client library and the ``visloc`` CLI against a real in-process gRPC server.

The fake ``Locator`` reads its instructions from the image bytes: ``b"lat,lon,conf"`` answers
that location and confidence; prefixes add behaviour: ``sleep=S;`` (answer after S seconds),
``flaky=N;`` (UNAVAILABLE for the first N attempts), ``busy;`` (always RESOURCE_EXHAUSTED),
``hang;`` (never answer), and ``bad``
is undecodable (INVALID_ARGUMENT).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import http.server
import io
import json
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from visloc_client import AsyncLocatorClient, LocateError, LocatorClient, Method, RetryPolicy, TLSConfig
from visloc_client.cli import main
from visloc_client.evaluation import haversine_km, split_summary
from visloc_client.fetch import FetchError, fetch_url
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc

FAST = RetryPolicy(retries=3, initial_backoff=0.01, max_backoff=0.05)


class _Fail(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code, self.message = code, message


class FakeLocator(pb_grpc.LocatorServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0  # Locate calls
        self.streams = 0  # LocateStream calls
        self.unavailable = 0  # fail this many Locate calls with UNAVAILABLE first
        self.kill_streams = 0  # abort this many streams with UNAVAILABLE ...
        self.kill_after = 0  # ... after this many responses
        self.required_token: str | None = None
        self.metadata: list[dict[str, str]] = []
        self.options: list[pb.LocateOptions] = []
        self.attempts: dict[bytes, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.received = 0
        self.shutdown = threading.Event()  # releases "hang;" requests at teardown

    def _check_auth(self, context: grpc.ServicerContext) -> None:
        md = dict(context.invocation_metadata())
        self.metadata.append(md)
        if self.required_token and md.get("authorization") != f"Bearer {self.required_token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def answer(self, request: pb.LocateRequest) -> pb.LocateResponse:
        with self.lock:
            self.options.append(request.options)
            self.attempts[request.image] = self.attempts.get(request.image, 0) + 1
            attempt = self.attempts[request.image]
        text = request.image.decode("utf-8", "replace")
        while ";" in text:
            head, text = text.split(";", 1)
            if head.startswith("sleep="):
                time.sleep(float(head[6:]))
            elif head.startswith("flaky=") and attempt <= int(head[6:]):
                raise _Fail(grpc.StatusCode.UNAVAILABLE, "Triton is not ready")
            elif head == "busy":
                raise _Fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "over capacity")
            elif head == "hang":
                self.shutdown.wait(60)
        try:
            lat, lon, conf = (float(x) for x in text.split(","))
        except ValueError:
            raise _Fail(grpc.StatusCode.INVALID_ARGUMENT, "cannot decode image: unknown format") from None
        opts = request.options
        threshold = opts.conf_threshold if opts.HasField("conf_threshold") else 0.2
        return pb.LocateResponse(
            request_id=request.request_id or "server-made",
            lat=lat,
            lon=lon,
            method=pb.METHOD_SWC,
            top_cell=pb.Cell(id=7, lat=lat, lon=lon, probability=0.5),
            confidence=conf,
            localizable=conf > threshold,
            prediction_density=[pb.ScaleDensity(scale_km=s, density=conf) for s in (1, 25, 200)],
            neighbours=[
                pb.Neighbour(row_id=i, similarity=0.9, lat=lat, lon=lon, cluster=0, in_prediction=True)
                for i in range(opts.return_neighbours)
            ],
            top_cells=[pb.Cell(id=i, lat=lat, lon=lon, probability=0.1) for i in range(opts.return_top_cells)],
            model_version="fake-1",
            background_version="bg-1",
            timings=pb.StageTimings(decode_ms=1.0, triton_ms=2.0, total_ms=3.5),
            image_width=640,
            image_height=480,
            input_width=400,
            input_height=300,
            batch_size=1,
        )

    def Locate(self, request, context):
        self._check_auth(context)
        with self.lock:
            self.calls += 1
            if self.unavailable > 0:
                self.unavailable -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        try:
            return self.answer(request)
        except _Fail as fail:
            context.abort(fail.code, fail.message)

    def GetInfo(self, request, context):
        self._check_auth(context)
        return pb.GetInfoResponse(
            service_version="0.1.0",
            model_name="visloc",
            model_version="fake-1",
            bundle_id="demo-123",
            bundle_source="demo",
            background_version="bg-1",
            num_cells=2000,
            num_background=20000,
            embedding_dim=1792,
            pd_scales_km=[1, 25, 200, 750, 2500],
            defaults=pb.LocateOptions(top_k=10, eps_km=1.0, conf_scale_km=25, conf_threshold=0.2),
            max_image_bytes=20 << 20,
            max_image_pixels=40_000_000,
            preprocessing="exact",
        )

    def LocateStream(self, request_iterator, context):
        with self.lock:
            self.streams += 1
            kill = self.kill_streams > 0
            self.kill_streams -= int(kill)
        self._check_auth(context)
        out: queue.Queue[pb.LocateStreamResponse | None] = queue.Queue()
        pending = [0]
        finished = threading.Event()

        def work(index: int, request: pb.LocateRequest) -> None:
            try:
                msg = pb.LocateStreamResponse(request_id=request.request_id, index=index, result=self.answer(request))
            except _Fail as fail:
                msg = pb.LocateStreamResponse(
                    request_id=request.request_id,
                    index=index,
                    error=pb.Error(code=fail.code.value[0], message=fail.message),
                )
            out.put(msg)

        def read() -> None:
            try:
                for index, request in enumerate(request_iterator):
                    with self.lock:
                        pending[0] += 1
                        self.received += 1
                        self.in_flight += 1
                        self.max_in_flight = max(self.max_in_flight, self.in_flight)
                    threading.Thread(target=work, args=(index, request), daemon=True).start()
            except grpc.RpcError:
                pass  # the client cancelled
            finished.set()
            out.put(None)

        threading.Thread(target=read, daemon=True).start()
        sent = 0
        while not (finished.is_set() and pending[0] == 0):
            try:
                msg = out.get(timeout=0.05)
            except queue.Empty:
                if not context.is_active():  # the client went away
                    return
                continue
            if msg is None:
                continue
            if kill and sent == self.kill_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset by peer")
            with self.lock:
                pending[0] -= 1
                self.in_flight -= 1
            sent += 1
            yield msg


@contextlib.contextmanager
def serve_fake(servicer: FakeLocator | None = None) -> Iterator[tuple[FakeLocator, str]]:
    """A ``FakeLocator`` served on a free 127.0.0.1 port: (servicer, target); stopped after."""
    servicer = servicer or FakeLocator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    pb_grpc.add_LocatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        servicer.shutdown.set()
        server.stop(grace=None)


@pytest.fixture
def fake():
    with serve_fake() as served:
        yield served


def img(lat: float, lon: float, conf: float = 0.5, prefix: str = "") -> bytes:
    return f"{prefix}{lat},{lon},{conf}".encode()


# --- unary -----------------------------------------------------------------------------------


def test_locate_converts_the_response(fake, tmp_path):
    servicer, target = fake
    path = tmp_path / "p.jpg"
    path.write_bytes(img(48.85, 2.29, 0.7))
    with LocatorClient(target, retries=FAST) as client:
        result = client.locate(path, top_k=20, neighbours=2, top_cells=3, conf_threshold=0.8)
        assert (result.lat, result.lon, result.confidence) == (48.85, 2.29, 0.7)
        assert result.method is Method.SWC and result.method == "swc"
        assert result.localizable is False  # 0.7 > 0.8 is false: the server decides
        assert result.top_cell is not None and result.top_cell.id == 7
        assert [d.scale_km for d in result.prediction_density] == [1, 25, 200]
        assert len(result.neighbours) == 2 and result.neighbours[0].in_prediction
        assert len(result.top_cells) == 3
        assert result.timings.total_ms == 3.5 and result.model_version == "fake-1"
        assert (result.image_width, result.input_height) == (640, 300)
        assert json.loads(json.dumps(result.to_dict()))["method"] == "swc"
        # Unset options stay unset (the server's defaults apply); set ones are sent.
        opts = servicer.options[-1]
        assert opts.top_k == 20 and opts.HasField("top_k") and not opts.HasField("eps_km")
        assert opts.return_neighbours == 2 and opts.conf_threshold == 0.8
        assert client.locate(img(1, 2), conf_scale_km=25).lat == 1.0  # bytes work too


def test_unavailable_is_retried_with_backoff(fake):
    servicer, target = fake
    servicer.unavailable = 2
    policy = RetryPolicy(retries=3, initial_backoff=0.05, max_backoff=1.0)
    with LocatorClient(target, retries=policy) as client:
        start = time.monotonic()
        assert client.locate(img(1, 2)).lat == 1.0
        elapsed = time.monotonic() - start
    assert servicer.calls == 3
    assert elapsed >= 0.05 / 2 + 0.1 / 2  # at least the fixed halves of two backoffs


def test_retries_run_out(fake):
    servicer, target = fake
    servicer.unavailable = 10
    policy = RetryPolicy(retries=2, initial_backoff=0.01)
    with LocatorClient(target, retries=policy) as client, pytest.raises(LocateError) as info:
        client.locate(img(1, 2))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.reason == "warming up"
    assert servicer.calls == 3


def test_invalid_argument_is_not_retried(fake):
    servicer, target = fake
    with LocatorClient(target, retries=FAST) as client, pytest.raises(LocateError) as info:
        client.locate(b"bad")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot decode image" in info.value.reason
    assert str(info.value).startswith("INVALID_ARGUMENT: ")
    assert servicer.calls == 1


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    policy = RetryPolicy(retries=5, initial_backoff=0.1, max_backoff=0.5, multiplier=2)
    for attempt, cap in enumerate([0.1, 0.2, 0.4, 0.5, 0.5]):
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(set(delays)) > 100  # jittered


def test_deadline_is_honoured_and_not_retried(fake):
    servicer, target = fake
    with LocatorClient(target, timeout=0.3, retries=FAST) as client, pytest.raises(LocateError) as info:
        client.locate(img(1, 2, prefix="sleep=2;"))
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert servicer.calls == 1


def test_bearer_token_is_sent(fake):
    servicer, target = fake
    servicer.required_token = "s3cret"
    with LocatorClient(target, token="s3cret") as client:
        assert client.info().bundle_id == "demo-123"
    assert servicer.metadata[-1]["authorization"] == "Bearer s3cret"
    with LocatorClient(target) as client, pytest.raises(LocateError) as info:
        client.locate(img(1, 2))
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_oversize_image_is_refused_before_sending(fake):
    servicer, target = fake
    with LocatorClient(target, max_message_bytes=64 * 1024) as client, pytest.raises(LocateError) as info:
        client.locate(b"x" * 100_000)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert servicer.calls == 0


def test_info(fake):
    _, target = fake
    with LocatorClient(target) as client:
        info = client.info()
    assert info.pd_scales_km == (1, 25, 200, 750, 2500)
    assert info.defaults.top_k == 10 and info.defaults.eps_km == 1.0 and info.defaults.neighbours == 0
    assert info.num_background == 20000 and info.preprocessing == "exact"


def test_options_are_checked_lightly():
    with LocatorClient("127.0.0.1:1") as client:
        with pytest.raises(ValueError, match="neighbours"):
            client.locate(b"x", neighbours=-1)
        with pytest.raises(ValueError, match="top_k"):
            client.locate(b"x", top_k=True)
        with pytest.raises(ValueError, match="eps_km"):
            client.locate(b"x", eps_km="1")


def test_unreachable_server_is_unavailable():
    policy = RetryPolicy(retries=1, initial_backoff=0.01)
    with LocatorClient("127.0.0.1:1", retries=policy) as client, pytest.raises(LocateError) as info:
        client.locate(b"x")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


# --- streaming -------------------------------------------------------------------------------


def _inputs(n: int, slow_first: bool = False) -> list[bytes]:
    out = []
    for i in range(n):
        delay = 0.3 if slow_first and i == 0 else (i * 7 % 5) * 0.01
        out.append(img(i, -i, 0.5, prefix=f"sleep={delay};"))
    return out


def test_locate_many_in_order_with_bounded_concurrency(fake):
    servicer, target = fake
    with LocatorClient(target) as client:
        items = list(client.locate_many(_inputs(40), concurrency=5))
    assert [item.index for item in items] == list(range(40))
    assert all(item.ok and item.result.lat == item.index for item in items)
    assert servicer.max_in_flight <= 5 and servicer.streams == 1


def test_locate_many_as_completed(fake):
    servicer, target = fake
    with LocatorClient(target) as client:
        items = list(client.locate_many(_inputs(10, slow_first=True), concurrency=10, ordered=False))
    order = [item.index for item in items]
    assert sorted(order) == list(range(10))
    assert order[-1] == 0  # the slow one last, the others did not wait for it
    assert all(item.result.lat == item.index for item in items)


def test_locate_many_consumes_input_lazily(fake):
    _, target = fake
    taken = []

    def gen():
        for i in range(1000):
            taken.append(i)
            yield img(i, 0)

    with LocatorClient(target) as client:
        stream = client.locate_many(gen(), concurrency=4)
        first = [next(stream) for _ in range(3)]
        stream.close()  # cancels the stream
    assert [f.index for f in first] == [0, 1, 2]
    assert len(taken) < 20


def test_locate_many_errors_are_per_item(fake, tmp_path):
    servicer, target = fake
    good = tmp_path / "good.jpg"
    good.write_bytes(img(3, 4))
    inputs = [img(1, 2), b"bad", tmp_path / "missing.jpg", good, b"x" * 70_000, img(5, 6)]
    with LocatorClient(target, max_message_bytes=64 * 1024) as client:
        items = list(client.locate_many(inputs, concurrency=2))
    assert [i.ok for i in items] == [True, False, False, True, False, True]
    assert items[1].error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(items[2].error, FileNotFoundError)
    assert items[2].source == str(tmp_path / "missing.jpg") and items[3].source == str(good)
    assert items[4].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert items[0].source is None and items[5].result.lat == 5
    assert servicer.streams == 1


def test_locate_many_retries_unavailable_items(fake):
    servicer, target = fake
    flaky = img(9, 9, prefix="flaky=2;")
    with LocatorClient(target, retries=FAST) as client:
        items = list(client.locate_many([img(1, 1), flaky, img(2, 2)], concurrency=3))
    assert all(i.ok for i in items) and items[1].result.lat == 9
    assert servicer.attempts[flaky] == 3
    with LocatorClient(target, retries=RetryPolicy(retries=1, initial_backoff=0.01)) as client:
        items = list(client.locate_many([img(8, 8, prefix="flaky=5;")]))
    assert items[0].error.code == grpc.StatusCode.UNAVAILABLE


def test_locate_many_reconnects_when_the_stream_drops(fake):
    servicer, target = fake
    servicer.kill_streams, servicer.kill_after = 1, 3
    with LocatorClient(target, retries=FAST) as client:
        items = list(client.locate_many(_inputs(12), concurrency=4))
    assert [i.index for i in items] == list(range(12))
    assert all(i.ok and i.result.lat == i.index for i in items)
    assert servicer.streams == 2


def test_locate_many_raises_when_the_stream_fails_for_good(fake):
    servicer, target = fake
    servicer.required_token = "s3cret"
    with LocatorClient(target, retries=FAST) as client, pytest.raises(LocateError) as info:
        list(client.locate_many(_inputs(3)))
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert servicer.streams == 1  # not retried
    servicer.required_token = None
    servicer.kill_streams, servicer.kill_after = 10, 0
    policy = RetryPolicy(retries=2, initial_backoff=0.01)
    with LocatorClient(target, retries=policy) as client, pytest.raises(LocateError) as info:
        list(client.locate_many(_inputs(3)))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert servicer.streams == 1 + 3


def test_locate_many_times_out_when_nothing_comes_back(fake):
    _, target = fake
    with LocatorClient(target, timeout=0.3) as client, pytest.raises(LocateError) as info:
        list(client.locate_many([img(1, 1), img(2, 2, prefix="hang;")], concurrency=2))
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_locate_many_of_nothing(fake):
    _, target = fake
    with LocatorClient(target) as client:
        assert list(client.locate_many([])) == []
        with pytest.raises(ValueError):
            client.locate_many([b"x"], concurrency=0)


# --- asyncio ---------------------------------------------------------------------------------


def test_async_client(fake):
    servicer, target = fake

    async def run():
        servicer.unavailable = 1
        async with AsyncLocatorClient(target, retries=FAST) as client:
            result = await client.locate(img(10, 20, 0.9), neighbours=1)
            info = await client.info()
            with pytest.raises(LocateError) as bad:
                await client.locate(b"bad")
            ordered = [i async for i in client.locate_many(_inputs(15), concurrency=4)]
            done = [i async for i in client.locate_many(_inputs(6, slow_first=True), ordered=False, concurrency=6)]
            mixed = [i async for i in client.locate_many([b"bad", img(1, 1)])]
        return result, info, bad.value, ordered, done, mixed

    result, info, bad, ordered, done, mixed = asyncio.run(run())
    assert (result.lat, result.lon, result.localizable, len(result.neighbours)) == (10, 20, True, 1)
    assert servicer.calls == 3  # one UNAVAILABLE retried, then the good call and the bad one
    assert info.bundle_source == "demo"
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [i.index for i in ordered] == list(range(15)) and all(i.result.lat == i.index for i in ordered)
    assert [i.index for i in done][-1] == 0
    assert mixed[0].error.code == grpc.StatusCode.INVALID_ARGUMENT and mixed[1].ok


def test_async_stream_reconnects_and_times_out(fake):
    servicer, target = fake
    servicer.kill_streams, servicer.kill_after = 1, 2

    async def run():
        async with AsyncLocatorClient(target, retries=FAST, timeout=0.3) as client:
            items = [i async for i in client.locate_many(_inputs(8), concurrency=3)]
            with pytest.raises(LocateError) as hung:
                _ = [i async for i in client.locate_many([img(1, 1, prefix="hang;")])]
        return items, hung.value

    items, hung = asyncio.run(run())
    assert [i.index for i in items] == list(range(8)) and all(i.ok for i in items)
    assert servicer.streams == 3
    assert hung.code == grpc.StatusCode.DEADLINE_EXCEEDED


# --- URL fetching ----------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/missing"):
            self.send_error(404, "Not Found")
            return
        size = int(self.path.rsplit("/", 1)[-1])
        body = img(1.5, 2.5, 0.9) if size == 0 else b"x" * size
        self.send_response(200)
        if "nolength" not in self.path:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_url_enforces_the_size_limit(http_url):
    assert fetch_url(f"{http_url}/1000", max_bytes=1000) == b"x" * 1000
    with pytest.raises(FetchError, match="more than the limit"):  # declared too large
        fetch_url(f"{http_url}/1001", max_bytes=1000)
    with pytest.raises(FetchError, match="exceeds the limit"):  # no length given: counted while reading
        fetch_url(f"{http_url}/nolength/300000", max_bytes=100_000)
    assert len(fetch_url(f"{http_url}/nolength/5000", max_bytes=100_000)) == 5000
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_url(f"{http_url}/missing/1")
    with pytest.raises(FetchError, match="not an http"):
        fetch_url("file:///etc/passwd")


# --- CLI -------------------------------------------------------------------------------------


def test_cli_locate(fake, tmp_path, capsys, monkeypatch, http_url):
    _, target = fake
    a = tmp_path / "a.jpg"
    a.write_bytes(img(48.8584, 2.2945, 0.75))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(img(-33.9, 151.2, 0.1))))
    rc = main(["--target", target, "locate", str(a), "-", f"{http_url}/0"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[0] == f"{a}\t48.858400\t2.294500\t0.7500\tlocalizable\tswc"
    assert out[1] == "<stdin>\t-33.900000\t151.200000\t0.1000\tnot-localizable\tswc"
    assert out[2].startswith(f"{http_url}/0\t1.500000\t2.500000")

    monkeypatch.setenv("VISLOC_TARGET", target)  # target from the environment, options after
    rc = main(["locate", str(a), "--json", "--neighbours", "2", "--conf-threshold", "0.9", "--timeout", "5"])
    record = json.loads(capsys.readouterr().out)
    assert rc == 0 and record["source"] == str(a) and record["localizable"] is False
    assert len(record["neighbours"]) == 2 and record["method"] == "swc"


def test_cli_claims_in_every_hemisphere(fake, tmp_path, capsys):
    """``--claim -33.9,151.2`` (south, or west: a value starting with '-') is a claim, not an
    unknown option; the claims reach the server as given, in order."""
    servicer, target = fake
    a = tmp_path / "a.jpg"
    a.write_bytes(img(-33.9, 151.2, 0.75))
    claims = ["-33.9,151.2", "40.7, -74.0", "-22.9,-43.2", "48.8584,2.2945"]
    argv = ["--target", target, "locate", str(a)]
    for claim in claims:
        argv += ["--claim", claim]
    assert main(argv) == 0
    sent = [(c.lat, c.lon) for c in servicer.options[-1].claims]
    assert sent == [tuple(float(x) for x in c.split(",")) for c in claims]
    capsys.readouterr()
    for bad, says in (("-91,0", "latitude -90 to 90"), ("-1,x", "decimal degrees")):
        with pytest.raises(SystemExit) as exit_:
            main(["--target", target, "locate", str(a), "--claim", bad])
        assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_cli_locate_reports_every_failure(fake, tmp_path, capsys, http_url):
    _, target = fake
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"bad")
    good = tmp_path / "good.jpg"
    good.write_bytes(img(1, 2))
    args = ["--target", target, "locate", str(bad), str(tmp_path / "nope.jpg"), str(good)]
    rc = main([*args, f"{http_url}/300000", "--max-bytes", "1000", "--json"])
    captured = capsys.readouterr()
    assert rc == 1
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert lines[0]["error"] == {"code": "INVALID_ARGUMENT", "reason": "cannot decode image: unknown format"}
    assert lines[1]["error"]["code"] == "LOCAL" and lines[2]["lat"] == 1.0
    assert "limit" in lines[3]["error"]["reason"]
    assert f"visloc: {bad}: INVALID_ARGUMENT: cannot decode image" in captured.err
    assert "nope.jpg: FileNotFoundError" in captured.err


def test_cli_info(fake, capsys):
    _, target = fake
    assert main(["--target", target, "info"]) == 0
    text = capsys.readouterr().out
    assert "demo-123 (demo)" in text and "top_k=10" in text
    assert main(["info", "--target", target, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["defaults"]["eps_km"] == 1.0
    assert main(["info", "--target", "127.0.0.1:1", "--retries", "0"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_cli_reads_the_token_under_the_service_names(fake, tmp_path, capsys, monkeypatch):
    servicer, target = fake
    servicer.required_token = "s3cret"
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    for name in ("VISLOC_AUTH_TOKEN", "VISLOC_AUTH_TOKEN_FILE", "VISLOC_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    info = ["--target", target, "--retries", "0", "info", "--json"]

    assert main(info) == 1  # no token: refused
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["--auth-token-file", str(token), *info]) == 0
    assert main([*info, "--auth-token-file", str(token)]) == 0  # after the subcommand too
    assert "deprecated" not in capsys.readouterr().err
    monkeypatch.setenv("VISLOC_AUTH_TOKEN_FILE", str(token))
    assert main(info) == 0
    monkeypatch.delenv("VISLOC_AUTH_TOKEN_FILE")
    monkeypatch.setenv("VISLOC_AUTH_TOKEN", "s3cret")
    assert main(info) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert servicer.metadata[-1]["authorization"] == "Bearer s3cret"

    # The old names still work, with a warning that names the new ones.
    monkeypatch.delenv("VISLOC_AUTH_TOKEN")
    assert main(["--token-file", str(token), *info]) == 0
    assert "--token-file is deprecated; use --auth-token-file" in capsys.readouterr().err
    monkeypatch.setenv("VISLOC_TOKEN", "s3cret")
    assert main(info) == 0
    assert "VISLOC_TOKEN is deprecated; use VISLOC_AUTH_TOKEN" in capsys.readouterr().err

    # An empty token file is a usage error, not a call without a token.
    empty = tmp_path / "empty"
    empty.write_text("\n")
    calls = len(servicer.metadata)
    assert main(["--auth-token-file", str(empty), *info]) == 2
    assert f"auth token file {empty} is empty" in capsys.readouterr().err
    assert len(servicer.metadata) == calls


def _dataset(tmp_path: Path) -> tuple[Path, Path, dict[str, tuple[float, float]]]:
    images = tmp_path / "images"
    images.mkdir()
    truth: dict[str, tuple[float, float]] = {}
    preds = [(10.0, 10.0, 0.9, 0.0), (20.0, 20.0, 0.1, 0.5), (30.0, 30.0, 0.5, 3.0), (40.0, 40.0, 0.05, 30.0)]
    for i, (lat, lon, conf, shift) in enumerate(preds):
        image_id = f"{1000 + i}"
        truth[image_id] = (lat + shift, lon)
        (images / f"x_{image_id}.jpg").write_bytes(img(lat, lon, conf))
    truth["2000"] = (0.0, 0.0)
    (images / "2000.jpg").write_bytes(b"bad")
    (images / "stranger.png").write_bytes(img(0, 0))
    (images / "readme.txt").write_text("not an image")
    metadata = tmp_path / "gt.csv"
    with open(metadata, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "lat", "lon"])
        for image_id, (lat, lon) in truth.items():
            writer.writerow([image_id, lat, lon])
    return images, metadata, truth


def test_cli_evaluate(fake, tmp_path, capsys):
    _, target = fake
    images, metadata, truth = _dataset(tmp_path)
    out, plot = tmp_path / "report.json", tmp_path / "errors.png"
    args = ["--target", target, "evaluate", "--images", str(images), "--metadata", str(metadata)]
    rc = main([*args, "--out", str(out), "--plot", str(plot), "--concurrency", "3", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 1  # one image failed
    report = json.loads(out.read_text())
    assert report["counts"] == {"files": 6, "evaluated": 4, "failed": 1, "no_metadata": 1, "not_run": 0,
                                "metadata_photos": 5, "missing": 0}  # fmt: skip
    assert report["complete"] is True and report["interrupted"] is False
    assert report["failures"] == [
        {"file": "2000.jpg", "id": "2000", "code": "INVALID_ARGUMENT", "reason": "cannot decode image: unknown format"}
    ]
    assert report["no_metadata"] == ["stranger.png"]
    records = report["records"]
    assert [r["file"] for r in records] == ["x_1000.jpg", "x_1001.jpg", "x_1002.jpg", "x_1003.jpg"]
    for r in records:
        gt = truth[r["id"]]
        assert (r["gt_lat"], r["gt_lon"]) == gt
        assert r["error_km"] == haversine_km(gt[0], gt[1], r["pred_lat"], r["pred_lon"])
    assert [r["localizable"] for r in records] == [True, False, True, False]
    expected = split_summary([r["error_km"] for r in records], [r["localizable"] for r in records])
    assert report["summary"] == json.loads(json.dumps(expected.to_dict()))
    # 0, ~55.6, ~333.6, ~3336 km: Acc@1km = 25%, Acc@200km = 50%, Acc@2500km = 75%.
    accuracy = report["summary"]["all"]["accuracy"]
    assert accuracy == {"0.1": 0.25, "1": 0.25, "25": 0.25, "200": 0.5, "750": 0.75, "2500": 0.75}
    assert "Acc@100m:\t25.0%" in text and "Localizable images: 2 (50.0%)" in text
    assert "Failed images: 1" in text and "2000.jpg: INVALID_ARGUMENT" in text
    assert "Images without metadata: 1" in text and "stranger.png" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_evaluate_ctrl_c_prints_the_partial_report(fake, tmp_path, capsys, monkeypatch):
    _, target = fake
    images, metadata, _ = _dataset(tmp_path)
    from visloc_client import client as client_module

    real = client_module.LocatorClient.locate_many

    def interrupted(self, images, **kwargs):
        for n, item in enumerate(real(self, images, **kwargs)):
            if n == 2:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(client_module.LocatorClient, "locate_many", interrupted)
    out = tmp_path / "partial.json"
    args = ["--target", target, "evaluate", "--images", str(images), "--metadata", str(metadata)]
    rc = main([*args, "--out", str(out), "--concurrency", "1", "--no-progress"])
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert rc == 130
    assert report["interrupted"] is True and report["complete"] is False
    assert report["counts"]["evaluated"] + report["counts"]["failed"] == 2
    assert report["counts"]["not_run"] == 3
    assert "Interrupted: partial report" in text and "Total predictions:" in text


def test_cli_evaluate_usage_errors(tmp_path, capsys):
    assert main(["evaluate", "--images", str(tmp_path / "none"), "--metadata", str(tmp_path / "m.csv")]) == 2
    assert "visloc:" in capsys.readouterr().err


# --- TLS -------------------------------------------------------------------------------------


@pytest.fixture
def tls_fake(tmp_path):
    """The fake behind mutual TLS, with a self-signed certificate for 127.0.0.1 (via openssl)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    credentials = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())], root_certificates=cert.read_bytes(), require_client_auth=True
    )
    servicer = FakeLocator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_LocatorServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield f"127.0.0.1:{port}", cert, key
    finally:
        server.stop(grace=None)


def test_mutual_tls(tls_fake, capsys):
    target, cert, key = tls_fake
    with LocatorClient(target, tls=TLSConfig(ca=cert, cert=cert, key=key)) as client:
        assert client.locate(img(1, 2)).lat == 1.0
    args = ["--target", target, "--ca", str(cert), "--cert", str(cert), "--key", str(key), "--retries", "0"]
    assert main([*args, "info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bundle_id"] == "demo-123"
    with LocatorClient(target, tls=TLSConfig(ca=cert), retries=0) as client, pytest.raises(LocateError) as info:
        client.locate(img(1, 2))  # no client certificate
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    with LocatorClient(target, retries=0) as client, pytest.raises(LocateError):
        client.locate(img(1, 2))  # plaintext to a TLS port
    with pytest.raises(ValueError, match="both cert and key"):
        LocatorClient(target, tls=TLSConfig(ca=cert, cert=cert))


def test_cli_evaluate_real_sigint(fake, tmp_path):
    """A real Ctrl-C (SIGINT) to the console script mid-run: partial report, exit 130."""
    import signal
    import subprocess
    import sys

    servicer, target = fake
    images = tmp_path / "images"
    images.mkdir()
    for i in range(20):
        (images / f"{i}.jpg").write_bytes(img(i, i, prefix="sleep=0.1;"))
    metadata = tmp_path / "gt.csv"
    metadata.write_text("id,lat,lon\n" + "".join(f"{i},{i},{i}\n" for i in range(20)))
    out = tmp_path / "report.json"
    visloc = Path(sys.executable).with_name("visloc")
    cmd = [str(visloc), "--target", target, "evaluate", "--images", str(images), "--metadata", str(metadata)]
    # A shell's background job starts with SIGINT ignored, and Python then keeps it ignored: the
    # child gets the default disposition whatever started this test run, from a small launcher
    # that execs the console script (exec keeps it). Not a preexec_fn: that runs Python code
    # between fork and exec of this process, whose gRPC threads are live (the fake server), and
    # once gRPC logged "epoll_wait error: Bad file descriptor" to the child's stderr from there.
    launcher = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, *cmd, "--concurrency", "1", "--out", str(out), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert "evaluating 20 images" in proc.stderr.readline()
    deadline = time.monotonic() + 30
    while servicer.calls + servicer.received < 3:  # two answered (one at a time), however slow the machine
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    report = json.loads(out.read_text())
    assert report["interrupted"] is True
    assert 0 < report["counts"]["evaluated"] < 20
    assert report["counts"]["not_run"] == 20 - report["counts"]["evaluated"]
    assert "Interrupted: partial report" in stdout and "Total predictions" in stdout
