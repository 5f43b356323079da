"""bench/overload.py's load loop and report against a real gRPC server on loopback whose answers
are scripted (OK / RESOURCE_EXHAUSTED in turn): the harness counts, backs off and reports."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from bench.overload import BACKOFF_S, Call, Group, offer, summarize, verdicts
from bench.report import OVERLOAD_HEADING, write_overload_section
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc


class Scripted(pb_grpc.LocatorServicer):
    """Refuses every ``every``-th call; records the callers' tokens."""

    def __init__(self, every: int = 2) -> None:
        self.n = 0
        self.every = every
        self.tokens: list[str] = []

    async def Locate(self, request, context):  # noqa: N802 - the gRPC method name
        self.n += 1
        self.tokens.append(dict(context.invocation_metadata()).get("authorization", ""))
        if self.n % self.every == 0:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded")
        return pb.LocateResponse()


def _offer(servicer: Scripted, groups: list[Group], seconds: float, clients: str):
    async def go():
        server = grpc.aio.server()
        pb_grpc.add_LocatorServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await offer(f"127.0.0.1:{port}", [b"x"], groups, seconds, 2.0, clients=clients)
        finally:
            await server.stop(None)

    return asyncio.run(go())


@pytest.mark.parametrize("clients", ["visloc", "grpc"])
def test_offer_counts_codes_backs_off_and_sends_tokens(clients):
    servicer = Scripted()
    calls, elapsed = _offer(servicer, [Group("A", 2, "token-a"), Group("B", 1, None)], 0.5, clients)
    assert calls and len(calls) == servicer.n  # half refused: the library's throttle keeps nothing back
    assert {c.caller for c in calls} == {"A", "B"}
    assert {c.code for c in calls} == {"OK", "RESOURCE_EXHAUSTED"}
    assert set(servicer.tokens) == {"Bearer token-a", ""}
    # Each refusal costs its client at least the minimum backoff: 3 clients, 0.5 s of offering.
    refused = sum(c.code == "RESOURCE_EXHAUSTED" for c in calls)
    assert refused <= 3 * (0.5 / BACKOFF_S[0] + 1)
    row = summarize(calls, elapsed, 2.0)
    assert row["calls"] == len(calls) and row["codes"]["RESOURCE_EXHAUSTED"] == refused


def test_library_clients_keep_calls_back_when_the_service_refuses_nearly_all():
    """Production callers' clients (the library's adaptive throttle): once the service refuses
    nearly every call, a share of the calls is refused on the client and never sent. The throttle
    holds nothing back before 20 calls in its window; 12 clients backing off 0.1-0.2 s after each
    refusal ask 90+ times in 1.5 s however slow the machine is (4 clients asked 30-40: a slow
    loop could stay under 20)."""
    servicer = Scripted(every=1)  # refuses everything
    calls, elapsed = _offer(servicer, [Group("A", 12, "token-a")], 1.5, "visloc")
    row = summarize(calls, elapsed, 2.0)
    assert row["codes"] == {"RESOURCE_EXHAUSTED": len(calls)}
    assert row["throttled_client_side"] > 0 and servicer.n == len(calls) - row["throttled_client_side"]


def test_summary_verdicts_and_report_section(tmp_path):
    calls = [Call("A", 0, 0.5, "OK"), Call("A", 0, 3.0, "OK"), Call("A", 0, 0.1, "RESOURCE_EXHAUSTED"),
             Call("A", 0, 2.0, "DEADLINE_EXCEEDED")]  # fmt: skip
    row = summarize(calls, 2.0, 2.0)
    assert row["goodput_per_s"] == 1.0 and row["ok_share"] == 0.5 and row["late_ok"] == 1
    assert row["refused_p50_s"] == pytest.approx(0.1)
    after = summarize([Call("after", 0, 0.2, "OK")], 1.0, 2.0)
    phase = row | {"clients": 48, "after": after}
    two = phase | {"callers": {"A": row, "B": summarize([Call("B", 0, 0.2, "OK")], 1.0, 2.0)}}
    r = {"deadline_s": 2.0, "capacity_per_s": 1.0, "phases": {"4x": phase, "12x": phase}, "two_callers": two}
    r |= {"when": "now", "cpus": 2, "bundle": "b", "seconds": 30, "backoff_s": [0.1, 0.2], "named_callers": True}
    v = verdicts(r)
    assert v["goodput_12x_vs_capacity >= 0.8"] and v["refused_p50 <= 0.25 x deadline"]
    assert not v["ok_p99 <= deadline"]  # one OK call took 3 s
    assert v["100 % OK once the load stops"] and v["B >= 95 % OK"]
    r["targets"] = v
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nintro\n\n## Reading the numbers\n\nkept\n")
    write_overload_section(md, r)
    write_overload_section(md, r)  # replaced, not appended twice
    text = md.read_text()
    assert text.count(OVERLOAD_HEADING) == 1 and "kept" in text and "**missed**: ok_p99 <= deadline" in text
    assert "| 12x | 48 |" in text and "caller B: 1 calls, 100.0 % OK" in text
