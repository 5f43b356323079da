"""The web app without a browser or a service: upload checks, error mapping, the HTTP layer
(against a stub client that records what would have reached the Locate service)."""

from __future__ import annotations

import http.client
import json
import os
import threading
from pathlib import Path

import grpc
import pytest

from visloc_client import LocateError, LocateOptions, LocateResult, Method, ServiceInfo
from visloc_client.cli import build_parser
from visloc_client.results import Cell, Neighbour, ScaleDensity
from visloc_client.web import WebApp, WebConfig, messages, start, upload
from visloc_client.web.app import content_security_policy, parse_options, tile_origin
from visloc_client.web.body import FormSink
from visloc_client.web.upload import UploadError

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 100
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100
MAGIC = {
    "JPEG": JPEG,
    "PNG": PNG,
    "WebP": b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 20,
    "GIF": b"GIF89a" + b"\x00" * 20,
    "BMP": b"BM" + b"\x00" * 60,
    "TIFF": b"II*\x00" + b"\x00" * 20,
    "HEIC": b"\x00\x00\x00\x18ftypheic" + b"\x00" * 20,
    "AVIF": b"\x00\x00\x00\x18ftypavif" + b"\x00" * 20,
}


# --- type sniffing -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(MAGIC))
def test_sniff_accepts_the_service_formats(fmt):
    assert upload.sniff_format(MAGIC[fmt]) == fmt
    assert upload.check_image(MAGIC[fmt], 10_000) == fmt


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"%PDF-1.7\n...", "PDF"),
        (b"PK\x03\x04" + b"\x00" * 30, "ZIP"),
        (b"\x00\x00\x00\x18ftypisom" + b"\x00" * 20, "video"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
        (b"<!doctype html><html></html>", "HTML"),
        (b'{"lat": 1}', "JSON"),
        (b"hello, this is a note\n", "text"),
        (b"\x01\x02\x03\xfe\xff\x80\x81", "binary"),
        (b"\x7fELF\x02\x01", "program"),
    ],
)
def test_non_images_are_refused_with_what_they_look_like(data, words):
    assert upload.sniff_format(data) is None
    with pytest.raises(UploadError) as info:
        upload.check_image(data, 10_000)
    err = info.value
    assert err.status == 415 and err.code == "NOT_AN_IMAGE"
    assert words in err.message
    assert "JPEG" in err.message  # says what to upload instead


def test_the_file_name_and_declared_type_are_not_trusted():
    # A text file called photo.jpg, sent as image/jpeg: the bytes decide.
    with pytest.raises(UploadError):
        upload.check_image(b"not really a jpeg", 10_000)


def test_empty_and_oversized():
    with pytest.raises(UploadError) as info:
        upload.check_image(b"", 10)
    assert info.value.status == 400 and info.value.code == "EMPTY"
    with pytest.raises(UploadError) as info:
        upload.check_image(JPEG + b"\x00" * 1000, 1000)
    assert info.value.status == 413 and "limit" in info.value.message


def test_declared_length_is_checked_before_reading():
    upload.check_declared_length(1000, 1000, multipart=False)
    with pytest.raises(UploadError) as info:
        upload.check_declared_length(1001, 1000, multipart=False)
    assert info.value.status == 413
    upload.check_declared_length(1000 + upload.MULTIPART_OVERHEAD, 1000, multipart=True)
    with pytest.raises(UploadError) as info:
        upload.check_declared_length(None, 1000, multipart=False)
    assert info.value.status == 411
    with pytest.raises(UploadError) as info:
        upload.check_declared_length(0, 1000, multipart=False)
    assert info.value.status == 400


def _multipart(fields: list[tuple[str, str | None, bytes]], boundary: str = "XyZ123") -> tuple[str, bytes]:
    body = b""
    for name, filename, data in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        body += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


def _form_image(ctype: str, body: bytes, chunk: int = 7) -> bytes:
    """The image a streamed form yields, fed in small chunks (boundaries split across them)."""
    sink = FormSink(ctype)
    for i in range(0, len(body), chunk):
        sink.feed(body[i : i + chunk])
    return bytes(sink.finish())


def test_multipart_extracts_the_image_field_byte_exact():
    data = JPEG + bytes(range(256)) + b"\r\n--XyZ12" + b"\r\n\r\n"  # boundary-like bytes inside
    ctype, body = _multipart([("note", None, b"hi"), ("image", "p.jpg", data)])
    assert _form_image(ctype, body) == data
    assert _form_image(ctype, body, chunk=len(body)) == data
    ctype, body = _multipart([("photo", "p.jpg", data)])  # another name: the one file part
    assert _form_image(ctype, body) == data
    ctype, body = _multipart([("note", None, b"hi")])
    with pytest.raises(UploadError) as info:
        _form_image(ctype, body)
    assert info.value.status == 400
    ctype, body = _multipart([("image", "a.jpg", JPEG), ("more", "b.jpg", PNG)])
    with pytest.raises(UploadError, match="more than one file"):
        _form_image(ctype, body)
    with pytest.raises(UploadError, match="closing boundary"):
        _form_image(ctype, body[: len(body) // 2])
    with pytest.raises(UploadError, match="boundary"):
        FormSink("multipart/form-data")


# --- error mapping -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "words"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 422, "could not use this image"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 503, "busy"),
        (grpc.StatusCode.UNAVAILABLE, 503, "not available"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "too long"),
        (grpc.StatusCode.UNAUTHENTICATED, 502, "may not use"),
        (grpc.StatusCode.PERMISSION_DENIED, 502, "may not use"),
        (grpc.StatusCode.INTERNAL, 502, "failed"),
        (grpc.StatusCode.UNKNOWN, 502, "failed"),
    ],
)
def test_service_errors_in_plain_words_with_the_reason(code, status, words):
    got_status, body = messages.service_error(LocateError(code, "image is truncated"))
    assert got_status == status
    assert words in body["title"]
    assert body["code"] == code.name
    assert body["reason"] == "image is truncated"
    assert body["message"]


def test_verdicts():
    assert messages.verdict(True) == "Localizable: the model is confident about the region"
    assert messages.verdict(False) == "Not localizable: treat this location as a guess"


# --- settings ----------------------------------------------------------------------------------


def test_options_from_the_query():
    q = {"top_k": ["20"], "neighbours": ["5"], "eps_km": ["2.5"], "conf_scale_km": ["200"], "other": ["x"]}
    assert parse_options(q) == {"top_k": 20, "neighbours": 5, "eps_km": 2.5, "conf_scale_km": 200.0}
    for bad in ({"top_k": ["ten"]}, {"eps_km": ["nan"]}, {"neighbours": ["-1"]}, {"conf_threshold": ["inf"]}):
        with pytest.raises(UploadError) as info:
            parse_options(bad)
        assert info.value.status == 400
        assert info.value.message.startswith(next(iter(bad)))  # names the option
    for bad in ({"top_k": ["1_000"]}, {"top_k": [" 7"]}, {"eps_km": ["."]}, {"top_k": ["\u0663"]}):
        with pytest.raises(UploadError):
            parse_options(bad)


def test_csp_is_self_only_unless_tiles_are_configured():
    csp = content_security_policy(WebConfig())
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "http" not in csp and "unsafe" not in csp
    tiled = content_security_policy(WebConfig(tiles_url="https://tiles.example.org:8443/{z}/{x}/{y}.png"))
    assert "img-src 'self' blob: https://tiles.example.org:8443;" in tiled
    assert tile_origin("http://127.0.0.1:9/t/{z}/{x}/{y}") == "http://127.0.0.1:9"
    for bad in ("ftp://x/{z}/{x}/{y}", "https://x/tiles.png", "https://{s}.x/{z}/{x}/{y}", "/{z}/{x}/{y}"):
        with pytest.raises(ValueError):
            WebConfig(tiles_url=bad)


def test_cli_has_the_web_subcommand():
    args = build_parser().parse_args(["web", "--target", "svc:50051", "--host", "0.0.0.0", "--port", "9999"])
    assert (args.command, args.target, args.host, args.port) == ("web", "svc:50051", "0.0.0.0", 9999)
    assert args.tiles_url is None and args.max_upload_mb == 10


# --- the HTTP layer, with a stub service -------------------------------------------------------


def _result(**over) -> LocateResult:
    fields = dict(
        request_id="req-1",
        lat=48.8566,
        lon=2.3522,
        method=Method.SWC,
        confidence=0.42,
        localizable=True,
        top_cell=Cell(7, 48.9, 2.3, 0.3),
        prediction_density=(ScaleDensity(1, 0.1), ScaleDensity(25, 0.42), ScaleDensity(2500, 0.9)),
        neighbours=(Neighbour(11, 0.8, 48.85, 2.35, 0, True),),
        top_cells=(Cell(7, 48.9, 2.3, 0.3),),
        model_version="m1",
        background_version="b1",
    )
    fields.update(over)
    return LocateResult(**fields)


def _info(**over) -> ServiceInfo:
    fields = dict(
        service_version="0.1.0",
        model_name="visloc",
        model_version="m1",
        bundle_id="demo-0",
        bundle_source="demo",
        background_version="b1",
        num_cells=2000,
        num_background=20000,
        embedding_dim=1792,
        pd_scales_km=(1.0, 25.0, 2500.0),
        defaults=LocateOptions(top_k=4, eps_km=1.0, conf_scale_km=25.0, conf_threshold=0.2),
        max_image_bytes=20_000_000,
        max_image_pixels=100_000_000,
        preprocessing="exact",
        bundle_warning="random weights",
    )
    fields.update(over)
    return ServiceInfo(**fields)


class StubClient:
    """Stands in for LocatorClient: records what reaches the 'service'."""

    def __init__(self, error: LocateError | None = None, info_error: LocateError | None = None):
        self.calls: list[tuple[bytes, dict]] = []
        self.info_calls = 0
        self.error = error
        self.info_error = info_error

    def locate(self, data, **options):
        self.calls.append((data, options))
        if self.error:
            raise self.error
        return _result()

    def info(self):
        self.info_calls += 1
        if self.info_error:
            raise self.info_error
        return _info()


@pytest.fixture
def serve_stub():
    servers = []

    def make(client: StubClient, config: WebConfig | None = None):
        server = start(WebApp(client, config or WebConfig(max_upload_bytes=4096)), "127.0.0.1", 0)
        servers.append(server)
        return server.server_address[1]

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def _request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def test_page_static_files_and_security_headers(serve_stub):
    port = serve_stub(StubClient())
    status, headers, body = _request(port, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'type="file"' in body and b"<script>" not in body  # no inline script (CSP)
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"
    for path, ctype in [
        ("/static/app.js", "text/javascript"),
        ("/static/style.css", "text/css"),
        ("/static/vendor/d3-geo/d3-geo.min.js", "text/javascript"),
        ("/static/vendor/world-atlas/countries-110m.json", "application/json"),
        ("/static/vendor/d3-geo/LICENSE", "text/plain"),
    ]:
        status, headers, _ = _request(port, "GET", path)
        assert status == 200 and headers["Content-Type"].startswith(ctype), path
    _, headers, _ = _request(port, "GET", "/static/app.js")
    status, _, body = _request(port, "GET", "/static/app.js", headers={"If-None-Match": headers["ETag"]})
    assert (status, body) == (304, b"")
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/etc/passwd", "/static/", "/web/app.py"):
        status, _, body = _request(port, "GET", path)
        assert status == 404, path
        assert json.loads(body)["error"]["code"] == "NOT_FOUND"
    status, headers, body = _request(port, "HEAD", "/")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    status, _, body = _request(port, "DELETE", "/api/locate")
    assert status == 501 and json.loads(body)["error"]["title"]
    assert _request(port, "GET", "/healthz")[0] == 200


def test_info_carries_limits_and_the_demo_warning(serve_stub):
    port = serve_stub(StubClient())
    status, headers, body = _request(port, "GET", "/api/info")
    data = json.loads(body)
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert data["service"]["bundle_source"] == "demo" and data["service"]["bundle_warning"] == "random weights"
    assert data["web"]["max_upload_bytes"] == 4096 and data["web"]["tiles"] is None
    assert data["web"]["accepted_formats"] == ["JPEG", "PNG", "WebP", "HEIC", "AVIF", "GIF", "BMP", "TIFF"]


def test_info_when_the_service_is_down(serve_stub):
    port = serve_stub(StubClient(info_error=LocateError(grpc.StatusCode.UNAVAILABLE, "connection refused")))
    status, _, body = _request(port, "GET", "/api/info")
    data = json.loads(body)
    assert status == 503 and data["service"] is None
    assert data["error"]["code"] == "UNAVAILABLE" and data["error"]["reason"] == "connection refused"
    assert data["web"]["max_upload_bytes"] == 4096


def test_locate_answer_and_options(serve_stub):
    client = StubClient()
    port = serve_stub(client)
    status, headers, body = _request(port, "POST", "/api/locate", JPEG, {"Content-Type": "application/octet-stream"})
    assert status == 200, body
    data = json.loads(body)
    assert data["result"] == json.loads(json.dumps(_result().to_dict()))
    assert data["verdict"] == messages.LOCALIZABLE
    assert (data["conf_scale_km"], data["conf_threshold"]) == (25.0, 0.2)
    assert data["upload"] == {"format": "JPEG", "bytes": len(JPEG)}
    assert headers["Cache-Control"] == "no-store"
    # neighbours default 10, capped at the service's top_k (4 here); top_cells 5
    assert client.calls[-1] == (JPEG, {"neighbours": 4, "top_cells": 5})
    status, _, body = _request(port, "POST", "/api/locate?top_k=8&conf_threshold=0.5", JPEG)
    assert status == 200
    assert client.calls[-1][1] == {"top_k": 8, "conf_threshold": 0.5, "neighbours": 8, "top_cells": 5}
    assert json.loads(body)["conf_threshold"] == 0.5
    ctype, form = _multipart([("image", "photo.jpg", PNG)])
    status, _, body = _request(port, "POST", "/api/locate", form, {"Content-Type": ctype})
    assert status == 200 and client.calls[-1][0] == PNG


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b"hello, world", {"Content-Type": "image/jpeg"}, 415, "NOT_AN_IMAGE"),
        (b"%PDF-1.4 ...", {}, 415, "NOT_AN_IMAGE"),
        (JPEG + b"\x00" * 5000, {}, 413, "TOO_LARGE"),
        (b"", {}, 400, "EMPTY"),
    ],
)
def test_refused_uploads_never_reach_the_service(serve_stub, body, headers, status, code):
    client = StubClient()
    port = serve_stub(client)
    got, _, answer = _request(port, "POST", "/api/locate", body, headers)
    error = json.loads(answer)["error"]
    assert (got, error["code"]) == (status, code)
    assert error["title"] and error["message"]
    assert client.calls == []


def test_too_large_is_refused_from_content_length_alone(serve_stub):
    client = StubClient()
    port = serve_stub(client)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("POST", "/api/locate")
    conn.putheader("Content-Length", str(10 * 1024 * 1024 * 1024))  # 10 GiB declared, none sent
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "TOO_LARGE"
    conn.close()
    assert _request(port, "POST", "/api/locate?neighbours=x", JPEG)[0] == 400
    assert client.calls == []


def test_service_errors_reach_the_page_readably(serve_stub):
    err = LocateError(grpc.StatusCode.INVALID_ARGUMENT, "cannot decode image: image file is truncated")
    port = serve_stub(StubClient(error=err))
    status, _, body = _request(port, "POST", "/api/locate", JPEG)
    error = json.loads(body)["error"]
    assert status == 422
    assert error["title"] == "The service could not use this image"
    assert error["reason"] == "cannot decode image: image file is truncated"


def test_busy_when_all_slots_are_taken(serve_stub):
    release = threading.Event()
    entered = threading.Event()

    class Slow(StubClient):
        def locate(self, data, **options):
            entered.set()
            release.wait(10)
            return super().locate(data, **options)

    port = serve_stub(Slow(), WebConfig(max_upload_bytes=4096, max_concurrent=1, busy_wait_s=0.2))
    first = threading.Thread(target=_request, args=(port, "POST", "/api/locate", JPEG))
    first.start()
    assert entered.wait(10)
    status, _, body = _request(port, "POST", "/api/locate", JPEG)
    release.set()
    first.join(10)
    assert status == 503 and json.loads(body)["error"]["code"] == "BUSY"


def test_nothing_is_written_or_logged(serve_stub, tmp_path, monkeypatch, capfd):
    """Uploads live in memory only: no file appears in the temp dir or the working directory,
    and the log has request lines, not image bytes."""
    import tempfile

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    port = serve_stub(StubClient())
    marker = b"SECRET-PIXELS-0123456789"
    assert _request(port, "POST", "/api/locate", JPEG + marker)[0] == 200
    assert _request(port, "POST", "/api/locate", b"%PDF" + marker)[0] == 415
    ctype, form = _multipart([("image", "x.jpg", JPEG + marker)])
    assert _request(port, "POST", "/api/locate", form, {"Content-Type": ctype})[0] == 200
    assert list(Path(tmp_path).iterdir()) == []
    out, err = capfd.readouterr()
    assert "POST /api/locate" in err
    assert marker.decode() not in out + err
    assert os.environ["TMPDIR"] == str(tmp_path)


def test_service_down_answers_fast_and_plainly(serve_stub):
    """With the service down, uploads get its status in plain words, and do not each wait on
    GetInfo again (one failed GetInfo is remembered for a few seconds)."""
    down = LocateError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    client = StubClient(error=down, info_error=down)
    port = serve_stub(client)
    for _ in range(3):
        status, _, body = _request(port, "POST", "/api/locate", JPEG)
        error = json.loads(body)["error"]
        assert status == 503 and error["code"] == "UNAVAILABLE"
        assert error["title"] == "The location service is not available right now"
        assert error["reason"] == "failed to connect to all addresses"
    assert client.info_calls == 1


def test_visloc_web_command_serves_and_stops_cleanly():
    """`python -m visloc_client.web` (= `visloc web`): prints its URL, serves the page even while
    the service is down, and exits 0 on SIGTERM."""
    import signal
    import subprocess
    import sys
    import urllib.request

    from conftest import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "visloc_client.web", "--target", f"127.0.0.1:{free_port()}", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == f"visloc web: serving http://127.0.0.1:{port}/"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert resp.status == 200 and b"Where was this photo taken?" in resp.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "does not answer yet" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_claim_in_the_query_is_one_place_or_a_precise_400():
    assert parse_options({"claim": ["48.8584,2.2945"]}) == {"claims": ((48.8584, 2.2945),)}
    assert parse_options({"claim": ["-33.9,-180"]}) == {"claims": ((-33.9, -180.0),)}
    assert parse_options({"claim": [""]}) == {}
    for bad in ("91,0", "0,180.5", "nan,0", "1e5,0", "48.8584", "48.8584,2.2945,3", "0x1,2", " 1,2", "inf,0"):
        with pytest.raises(UploadError) as err:
            parse_options({"claim": [bad]})
        assert err.value.status == 400 and err.value.code == "BAD_OPTION", bad
        assert "claim must be LAT,LON" in err.value.message
