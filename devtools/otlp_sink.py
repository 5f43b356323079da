"""A real OTLP trace receiver on loopback: the collector's ``TraceService`` over gRPC (from
opentelemetry-proto) and ``POST /v1/traces`` over HTTP (protobuf; Triton's OpenTelemetry exporter
speaks only that), keeping every span it is sent. The live-stack tests and the tracing benchmark
point the exporters at it; ``spans()`` and ``tree()`` read what arrived.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from devtools.net import free_port


@dataclass
class Span:
    """One received span, its ids as hex and its attributes as plain values."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict
    links: list[tuple[str, str, dict]]  # (trace id, span id, attributes)
    status_code: int  # 0 unset, 1 ok, 2 error
    service: str
    children: list[Span] = field(default_factory=list)

    @property
    def ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(v) -> object:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attributes(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


def _spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> list[Span]:
    received = []
    for rs in request.resource_spans:
        service = str(_attributes(rs.resource.attributes).get("service.name", ""))
        for ss in rs.scope_spans:
            for s in ss.spans:
                received.append(
                    Span(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(),
                        name=s.name,
                        kind=s.kind,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes=_attributes(s.attributes),
                        links=[(ln.trace_id.hex(), ln.span_id.hex(), _attributes(ln.attributes)) for ln in s.links],
                        status_code=s.status.code,
                        service=service,
                    )
                )
    return received


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: OtlpSink):
        self.sink = sink

    def Export(self, request, context):  # noqa: N802 - the proto's name
        self.sink.add(_spans_of(request))
        return trace_service_pb2.ExportTraceServiceResponse()


def _from_json(body: bytes) -> trace_service_pb2.ExportTraceServiceRequest:
    """OTLP/JSON: the protobuf JSON mapping, except that trace and span ids are hex, not base64."""

    def fix(node):
        if isinstance(node, dict):
            return {
                k: base64.b64encode(bytes.fromhex(v)).decode() if k in _ID_FIELDS and isinstance(v, str) else fix(v)
                for k, v in node.items()
            }
        return [fix(v) for v in node] if isinstance(node, list) else node

    return json_format.ParseDict(fix(json.loads(body)), trace_service_pb2.ExportTraceServiceRequest())


_ID_FIELDS = {"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"}


def _http_handler(sink: OtlpSink) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            kind = self.headers.get("Content-Type") or ""
            if self.path != "/v1/traces" or not ("protobuf" in kind or "json" in kind):
                self.send_error(404 if self.path != "/v1/traces" else 415)
                return
            parse = _from_json if "json" in kind else trace_service_pb2.ExportTraceServiceRequest.FromString
            request = parse(body)
            sink.add(_spans_of(request))
            response = trace_service_pb2.ExportTraceServiceResponse()
            reply = json_format.MessageToJson(response).encode() if "json" in kind else response.SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/json" if "json" in kind else "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args) -> None:  # quiet
            return

    return Handler


class OtlpSink:
    """``with OtlpSink() as sink``: OTLP/gRPC on ``sink.endpoint`` (``http://127.0.0.1:PORT``),
    OTLP/HTTP on ``sink.http_url`` (``http://127.0.0.1:PORT2/v1/traces``)."""

    def __init__(self, port: int = 0):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.received: list[Span] = []
        self.exports = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Receiver(self), self._server)
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _http_handler(self))
        self.http_url = f"http://127.0.0.1:{self._http.server_address[1]}/v1/traces"

    def __enter__(self) -> OtlpSink:
        self._server.start()
        threading.Thread(target=self._http.serve_forever, name="otlp-http", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(None)
        self._http.shutdown()
        self._http.server_close()

    def add(self, spans: list[Span]) -> None:
        with self.lock:
            self.received.extend(spans)
            self.exports += 1

    def env(self, **extra: str) -> dict[str, str]:
        """The standard variables that send a process's spans here, promptly."""
        return self.env_for(self.endpoint, OTEL_BSP_SCHEDULE_DELAY="50", **extra)

    @staticmethod
    def env_for(endpoint: str, **extra: str) -> dict[str, str]:
        """The standard variables that send a process's spans to an OTLP/gRPC ``endpoint``."""
        return {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true", **extra}

    def spans(self) -> list[Span]:
        with self.lock:
            return list(self.received)

    def clear(self) -> None:
        with self.lock:
            self.received.clear()

    def wait(self, predicate, timeout: float = 15.0) -> list[Span]:
        """The spans once ``predicate(spans)`` holds (AssertionError with what arrived otherwise)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"spans never met the condition; received {[s.name for s in spans]}")
            time.sleep(0.05)


def tree(spans: list[Span], trace_id: str) -> list[Span]:
    """The roots of one trace with ``children`` filled in (sorted by start), from ``spans``."""
    mine = {s.span_id: s for s in spans if s.trace_id == trace_id}
    for s in mine.values():
        s.children = []
    roots = []
    for s in sorted(mine.values(), key=lambda s: s.start_ns):
        parent = mine.get(s.parent_id)
        (parent.children if parent is not None else roots).append(s)
    return roots


def render(roots: list[Span], indent: str = "") -> str:
    """A span tree as text, one span a line with its duration (the docs' example trace)."""
    lines = []
    for s in roots:
        start = s.start_ns
        lines.append(f"{indent}{s.name}  {s.ms:.2f} ms")
        lines.extend(_render_children(s, start, indent + "  "))
    return "\n".join(lines)


def _render_children(span: Span, origin: int, indent: str) -> list[str]:
    lines = []
    for c in span.children:
        extra = f"  links {len(c.links)}" if c.links else ""
        lines.append(f"{indent}- {c.name}  +{(c.start_ns - origin) / 1e6:.2f} ms  {c.ms:.2f} ms{extra}")
        lines.extend(_render_children(c, origin, indent + "  "))
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m devtools.otlp_sink --port N``: a receiver in its own process (a benchmark's
    load generator must not pay for parsing the spans); on SIGTERM prints what it received."""
    import argparse
    import signal

    p = argparse.ArgumentParser(prog="python -m devtools.otlp_sink", description=main.__doc__)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with OtlpSink(args.port) as sink:
        print(json.dumps({"listening": sink.endpoint}), flush=True)
        stop.wait()
        print(json.dumps({"spans": len(sink.spans()), "exports": sink.exports}), flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
