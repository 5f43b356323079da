"""The web page's HTTP server under attack (issue 20), on the real server (uvicorn) on 127.0.0.1:
each attack from the probe, and the clean outcome. Short time limits come from the config, so
nothing waits long; outcomes are asserted, never durations."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import tracemalloc

import pytest
from test_web_unit import JPEG, PNG, StubClient, _multipart, _request
from test_web_unit import serve_stub as serve_stub  # the fixture

from visloc_client.web import WebApp, WebConfig, start

# Short limits so that an attack is cut off in well under a second.
FAST = dict(max_upload_bytes=1 << 20, body_grace_s=0.3, min_body_rate=1000, body_timeout_s=5.0, header_timeout_s=1.0)


def _raw(port: int, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send ``data`` as is and read everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def _status_and_headers(answer: bytes) -> tuple[str, dict[str, str]]:
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    return head[0], {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}


def _slow_upload(port: int, results: list, started: threading.Event) -> None:
    """One byte every 0.1 s of a declared 1000-byte body, until the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /api/locate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n\xff")
        started.set()
        s.settimeout(0.1)
        answer = b""
        for _ in range(100):
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                answer = b"RESET after: " + answer  # fails below, showing what was read
                break
            except TimeoutError:
                try:
                    s.sendall(b"\xd8")
                except OSError:
                    break
                continue
            if not chunk:
                break
            answer += chunk
        results.append(answer)


def test_a_slow_body_gets_408_and_does_not_block_other_uploads(serve_stub):
    """8 connections trickling their bodies, one slot: a normal upload succeeds meanwhile, the
    trickles get 408 and never reach the service."""
    client = StubClient()
    port = serve_stub(client, WebConfig(max_concurrent=1, **FAST))
    results: list[bytes] = []
    started = [threading.Event() for _ in range(8)]
    slow = [threading.Thread(target=_slow_upload, args=(port, results, e)) for e in started]
    for t in slow:
        t.start()
    assert all(e.wait(10) for e in started)
    status, _, body = _request(port, "POST", "/api/locate", JPEG)  # while they trickle
    for t in slow:
        t.join(20)
    assert status == 200, body
    assert len(results) == 8
    for answer in results:
        line, headers = _status_and_headers(answer)
        assert line == "HTTP/1.1 408 Request Timeout", answer[:200]
        assert headers["x-content-type-options"] == "nosniff"
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "TOO_SLOW"
    assert [data for data, _ in client.calls] == [JPEG]


def _read_answer(s: socket.socket) -> bytes:
    """One whole HTTP answer (headers and Content-Length body), without waiting for a close."""
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
        _status_and_headers(answer)[1].get("content-length", "0")
    ):
        chunk = s.recv(65536)
        assert chunk, answer
        answer += chunk
    return answer


@pytest.mark.parametrize("refusal", ["slow body (the app's 408)", "connection cap (the protocol's 503)"])
def test_a_client_still_sending_reads_its_answer_then_an_orderly_close(serve_stub, refusal):
    """A browser refused mid-upload keeps sending for a moment. Were the socket closed at once,
    the kernel would answer those bytes with a reset, which can reach the browser before it read
    the answer ("connection reset" instead of the 408/503). The server shuts its side and drops
    what still arrives: the client reads the answer, then end of stream, never a reset."""
    cap = refusal.startswith("connection cap")
    port = serve_stub(StubClient(), WebConfig(**{**FAST, "max_connections": 1} if cap else FAST))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as holder:
        holder.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # holds the one connection if cap
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /api/locate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n\xff")
            answer = _read_answer(s)
            assert _status_and_headers(answer)[0] == (
                "HTTP/1.1 503 Service Unavailable" if cap else "HTTP/1.1 408 Request Timeout"
            )
            for _ in range(5):  # the rest of the upload, as a browser still sends it
                s.sendall(b"\xd8" * 1000)
                time.sleep(0.02)
            time.sleep(0.2)  # a reset, if any, comes back over loopback in far less
            assert s.recv(65536) == b""  # FIN; a reset raises ConnectionResetError here


def test_stopping_does_not_wait_for_a_connection_lingering_after_its_answer():
    """A refused client that keeps its connection open (and keeps sending) has its answer; the
    server stopping closes it rather than waiting out the drain deadline (60 s here) or the
    grace for uploads in progress (30 s)."""
    server = start(WebApp(StubClient(), WebConfig(**{**FAST, "header_timeout_s": 60.0})), "127.0.0.1", 0, grace_s=30)
    try:
        with socket.create_connection(server.server_address[:2], timeout=10) as s:
            s.sendall(b"POST /api/locate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n\xff")
            assert _status_and_headers(_read_answer(s))[0] == "HTTP/1.1 408 Request Timeout"
            s.sendall(b"\xd8" * 1000)
            server.shutdown(10)
            assert server._done.is_set()  # stopped, not still waiting for this connection
            with contextlib.suppress(ConnectionResetError):  # closed with our bytes unread: fine here
                assert s.recv(65536) == b""
    finally:
        server.shutdown(10)
        server.server_close()


def test_slow_headers_get_408(serve_stub):
    port = serve_stub(StubClient(), WebConfig(**FAST))
    line, headers = _status_and_headers(_raw(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1"))
    assert line == "HTTP/1.1 408 Request Timeout"
    assert "default-src 'none'" in headers["content-security-policy"]


def _post_streamed(port: int, body: bytes, ctype: str) -> tuple[int, dict]:
    """POST ``body`` in 64 KiB pieces (http.client would copy a bytes body whole, which is
    memory the test, not the server, allocates)."""
    view = memoryview(body)
    pieces = (view[i : i + 65536] for i in range(0, len(body), 65536))
    headers = {"Content-Type": ctype, "Content-Length": str(len(body))}
    status, _, answer = _request(port, "POST", "/api/locate", pieces, headers)
    return status, json.loads(answer)["error"]


def _peak_memory_of(fn) -> tuple[object, int]:
    """``fn()`` and the peak of memory allocated while it ran (all threads: the server's too)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_a_form_of_many_tiny_parts_is_refused_using_little_memory(serve_stub):
    """The probe's attack, at 4 MB: ~80,000 tiny parts (the old parser took 441 MB for 10 MB).
    What the server holds is its socket buffers (a few hundred KB), whatever the body's size."""
    client = StubClient()
    port = serve_stub(client, WebConfig(**{**FAST, "max_upload_bytes": 8 << 20}))
    part = b'--XyZ\r\nContent-Disposition: form-data; name="a"\r\n\r\nx\r\n'
    body = part * ((4 << 20) // len(part)) + b"--XyZ--\r\n"
    ctype = "multipart/form-data; boundary=XyZ"
    (status, error), peak = _peak_memory_of(lambda: _post_streamed(port, body, ctype))
    assert (status, error["code"]) == (400, "BAD_FORM") and "more than 4 parts" in error["message"]
    assert peak < len(body) // 2, peak  # far less than the body itself: parts are not kept
    assert client.calls == []
    assert _request(port, "POST", "/api/locate", JPEG)[0] == 200  # and the server is fine


def test_a_nested_form_is_refused_using_little_memory(serve_stub):
    """A multipart nested 1,000 deep (the old parser hit RecursionError): refused at the first
    nested part."""
    client = StubClient()
    port = serve_stub(client, WebConfig(**FAST))
    body, ctype = JPEG, "image/jpeg"
    for depth in range(1000):  # from the inside out
        head = f'--b{depth}\r\nContent-Disposition: form-data; name="image"\r\nContent-Type: {ctype}\r\n\r\n'
        body = head.encode() + body + f"\r\n--b{depth}--\r\n".encode()
        ctype = f"multipart/mixed; boundary=b{depth}"
    ctype = "multipart/form-data; boundary=b999"
    (status, error), peak = _peak_memory_of(lambda: _post_streamed(port, body, ctype))
    assert (status, error["code"]) == (400, "BAD_FORM") and "Nested" in error["message"]
    assert peak < 2 << 20, peak  # socket buffers and the like: nothing per level
    assert client.calls == []


@pytest.mark.parametrize(
    "form",
    [
        [("image", "a.jpg", JPEG)] + [("f", None, b"x")] * 4,  # too many parts
        [("image", "a.jpg", JPEG), ("b", "b.png", PNG)],  # two files
    ],
    ids=["parts", "files"],
)
def test_forms_beyond_the_caps(serve_stub, form):
    client = StubClient()
    port = serve_stub(client, WebConfig(**FAST))
    ctype, body = _multipart(form)
    status, _, answer = _request(port, "POST", "/api/locate", body, {"Content-Type": ctype})
    assert (status, json.loads(answer)["error"]["code"]) == (400, "BAD_FORM")
    many_headers = (
        b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        + b"".join(b"X-H%d: v\r\n" % i for i in range(10))
        + b"\r\n"
        + JPEG
        + b"\r\n--XyZ--\r\n"
    )
    status, _, answer = _request(
        port, "POST", "/api/locate", many_headers, {"Content-Type": "multipart/form-data; boundary=XyZ"}
    )
    assert status == 400 and "headers" in json.loads(answer)["error"]["message"]
    assert client.calls == []


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("top_k=4294967296", "top_k"),
        ("neighbours=4294967296", "neighbours"),
        ("top_cells=4294967296", "top_cells"),
        ("top_k=99999999999999999999999", "top_k"),
        ("top_k=0", "top_k"),
        ("top_k=1001", "top_k"),
        ("top_cells=101", "top_cells"),
        ("top_k=5&neighbours=6", "neighbours"),
        ("neighbours=5", "neighbours"),  # beyond the service's default top_k (4 here)
        ("eps_km=0", "eps_km"),
        ("eps_km=1e9", "eps_km"),
        ("conf_threshold=1.5", "conf_threshold"),
        ("conf_scale_km=30", "conf_scale_km"),  # not a served scale (1, 25, 2500 here)
        ("conf_scale_km=1e999", "conf_scale_km"),
    ],
)
def test_out_of_range_options_get_400_naming_the_option(serve_stub, query, name):
    client = StubClient()
    port = serve_stub(client, WebConfig(**FAST))
    status, _, answer = _request(port, "POST", f"/api/locate?{query}", JPEG)
    error = json.loads(answer)["error"]
    assert (status, error["code"]) == (400, "BAD_OPTION")
    assert error["message"].startswith(f"{name} must be ")
    assert client.calls == []


def test_every_exception_is_a_json_500_with_the_request_id_and_the_log_is_escaped(capfd):
    class Broken(StubClient):
        def locate(self, data, **options):
            raise RuntimeError("broken\x1b[2J\r\nvisloc-web 6.6.6.6 forged 200")

    server = start(WebApp(Broken(), WebConfig(**FAST)), "127.0.0.1", 0)
    try:
        port = server.server_address[1]
        error = _attack_and_log(port)
    finally:
        # Shutting down waits for requests in progress, so every request's line is written
        # (after its answer) before stderr is read: one read, no race with the writer thread.
        server.shutdown(10)
        server.server_close()
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("visloc-web ")]
    assert not any(c in err for c in "\x1b\x08\x00\x07\r"), repr(err)
    assert "6.6.6.6" not in {line.split()[1] for line in lines}  # no forged line
    crash = next(line for line in lines if "error=RuntimeError" in line)
    assert error["request_id"] in crash and "\\x1b[2J\\x0d\\x0avisloc-web 6.6.6.6 forged" in crash
    assert any("host=evil\\x1b]0;pwned\\x07.example" in line for line in lines)


def _attack_and_log(port: int) -> dict:
    """A crash with control characters in its text, a raw request line with controls, and a
    foreign Host with controls; returns the crash's JSON error."""
    status, headers, answer = _request(port, "POST", "/api/locate", JPEG)
    error = json.loads(answer)["error"]
    assert (status, error["code"]) == (500, "INTERNAL")
    assert error["request_id"] and error["request_id"] == headers["X-Request-Id"]
    assert "broken" not in answer.decode()  # the exception's text stays in the log
    assert headers["X-Frame-Options"] == "DENY"
    # Control characters in the request line (raw: refused by the parser) and in a header
    # value (reaches the app, which logs the foreign Host).
    line, _ = _status_and_headers(_raw(port, b"GET /\x1b[31mred\x08\x00 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
    assert line == "HTTP/1.1 400 Bad Request"
    status, _, _ = _request(port, "GET", "/", headers={"Host": "evil\x1b]0;pwned\x07.example"})
    assert status == 421
    return error


def test_host_allowlist(serve_stub):
    port = serve_stub(StubClient(), WebConfig(**FAST))
    for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"localhost:{port}", "[::1]:80", "127.1.2.3"):
        assert _request(port, "GET", "/", headers={"Host": host})[0] == 200, host
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "[::2]", "localhost:x", ""):
        status, headers, answer = _request(port, "GET", "/api/info", headers={"Host": host})
        assert status == 421, host
        assert json.loads(answer)["error"]["code"] == "MISDIRECTED"
        assert headers["X-Content-Type-Options"] == "nosniff"
    assert _request(port, "GET", "/healthz", headers={"Host": "10.1.2.3:8080"})[0] == 200  # probes
    behind = serve_stub(StubClient(), WebConfig(allowed_hosts=("visloc.example.org", "*.example.net"), **FAST))
    for host, status in [("visloc.example.org", 200), ("a.example.net:443", 200), ("example.net", 421)]:
        assert _request(behind, "GET", "/", headers={"Host": host})[0] == status, host
    with pytest.raises(ValueError):
        WebConfig(allowed_hosts=("bad host",))


def test_server_header_has_no_version_and_a_malformed_version_gets_a_status_line(serve_stub):
    port = serve_stub(StubClient(), WebConfig(**FAST))
    _, headers, _ = _request(port, "GET", "/")
    assert "Server" not in headers
    for request in (b"GET / HTTP/1.x\r\nHost: 127.0.0.1\r\n\r\n", b"GET / FOO\r\n\r\n", b"\x16\x03\x01\x02\x00\x01"):
        answer = _raw(port, request)
        line, headers = _status_and_headers(answer)
        assert line == "HTTP/1.1 400 Bad Request", answer[:100]
        assert "default-src 'none'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
        assert "server" not in headers
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "BAD_REQUEST"


def test_connection_cap(serve_stub):
    port = serve_stub(StubClient(), WebConfig(max_connections=2, **FAST))
    held = []
    for _ in range(2):  # two keep-alive connections, each answered once (so they are counted)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b"ok\n"
        held.append(conn)
    line, headers = _status_and_headers(_raw(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
    assert line == "HTTP/1.1 503 Service Unavailable" and headers["x-content-type-options"] == "nosniff"
    for conn in held:
        conn.close()
    for _ in range(50):  # the server sees the closes
        if _request(port, "GET", "/healthz")[0] == 200:
            break
    else:
        pytest.fail("the cap did not free up")


def test_upload_memory_budget():
    """Bytes held by uploads in flight are bounded: past the budget, 503 BUSY at once."""
    patient = {**FAST, "body_grace_s": 60.0, "body_timeout_s": 60.0}  # the hog is not cut off here
    server = start(WebApp(StubClient(), WebConfig(max_buffered_bytes=1 << 20, **patient)), "127.0.0.1", 0)
    port = server.server_address[1]
    hog = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:  # ~900 KB sent of a 1 MB upload, the rest held back: its bytes stay in the budget
        hog.sendall(b"POST /api/locate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1048000\r\n\r\n")
        hog.sendall(JPEG + b"\x00" * 900_000)
        for _ in range(500):  # until the server has read them
            if server.asgi.budget.used >= 900_000:
                break
            time.sleep(0.01)
        status, _, answer = _request(port, "POST", "/api/locate", JPEG + b"\x00" * 200_000)
        assert (status, json.loads(answer)["error"]["code"]) == (503, "BUSY")
        assert _request(port, "POST", "/api/locate", JPEG)[0] == 200  # a small one still fits
        hog.close()
        for _ in range(500):  # the server sees the hog go
            if server.asgi.budget.used == 0:
                break
            time.sleep(0.01)
        assert _request(port, "POST", "/api/locate", JPEG + b"\x00" * 200_000)[0] == 200
    finally:
        hog.close()
        server.shutdown()
        server.server_close()


def test_without_the_web_extra_the_cli_says_what_to_install():
    code = (
        "import sys; sys.modules.update(uvicorn=None, starlette=None, python_multipart=None);"
        "from visloc_client.cli import main; sys.exit(main(['web', '--target', '127.0.0.1:1', '--port', '0']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert 'pip install "visloc-client[web]"' in out.stderr
