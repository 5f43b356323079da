"""The endpoint pool and the model check on the real stack: real tritonserver processes, the real
service, real gRPC on loopback (issues 19 and 16). Small bundles, few clients, bounded waits and
no timing assertions (the times are printed for the report)."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import ServiceProcess, free_port, wait_serving
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from devtools.triton_local import LocalTriton
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc
from visloc_export import samples


@pytest.fixture(scope="module")
def small_bundles(demo_bundle, demo_bundle_b):
    """Two demo bundles of the same shapes, different seeds: A and B's models differ (the
    session's, built once for every module that needs two models)."""
    from swc_service.bundle import load_bundle

    return load_bundle(demo_bundle), load_bundle(demo_bundle_b)


def samples_of(url: str, name: str) -> dict[tuple, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in (name, f"{name}_total")  # the parser names Triton's counters ..._total
    }


def pool_metric(svc: ServiceProcess, name: str, endpoint: str) -> float:
    got = samples_of(f"http://127.0.0.1:{svc.metrics_port}/metrics", name)
    return got.get((("endpoint", endpoint),), 0.0)


def triton_successes(triton: LocalTriton) -> float:
    got = samples_of(triton.metrics_url, "nv_inference_request_success")
    return sum(v for labels, v in got.items() if ("model", "visloc") in labels)


def health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def wait_for(predicate, timeout: float, what: str, poll: float = 0.1) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout`` (a bound, not a measurement)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(poll)
    return time.monotonic() - start


def start_tritons(bundle, n: int, **kw) -> list[LocalTriton]:
    servers = [LocalTriton(bundle, threads=1, **kw) for _ in range(n)]
    with ThreadPoolExecutor(n) as ex:
        list(ex.map(lambda t: t.start(), servers))
    return servers


class Load:
    """``clients`` threads calling Locate with a 10 s deadline until stopped; every outcome kept."""

    def __init__(self, target: str, clients: int = 3):
        self.target, self.stop, self.results = target, threading.Event(), []
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(clients)]

    def _run(self, k: int) -> None:
        with grpc.insecure_channel(self.target) as ch:
            stub, i = pb_grpc.LocatorStub(ch), k
            while not self.stop.is_set():
                try:
                    r = stub.Locate(pb.LocateRequest(image=samples.photo_bytes(i % 8)), timeout=10)
                    self.results.append(("OK", r.model_version))
                except grpc.RpcError as exc:
                    self.results.append((exc.code().name, exc.details()))
                i += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_calls_spread_over_three_tritons_survive_a_kill_and_reach_a_fourth(small_bundles, tmp_path):
    a, _ = small_bundles
    tritons = start_tritons(a.path, 3)
    endpoints = tmp_path / "endpoints"
    endpoints.write_text("".join(f"{t.grpc_url}\n" for t in tritons))
    svc = ServiceProcess(a.path, f"file://{endpoints}", "--triton-resolve-interval-s", "1")
    fourth = None
    try:
        wait_serving(svc.target, timeout=120, proc=svc.proc)
        wait_for(lambda: all(pool_metric(svc, "visloc_triton_endpoint_ready", t.grpc_url) == 1 for t in tritons),
                 60, "all three endpoints checked")  # fmt: skip
        before = [triton_successes(t) for t in tritons]
        with Load(svc.target) as load:
            wait_for(lambda: len(load.results) >= 60, 120, "60 calls under load")
            spread = [triton_successes(t) - b for t, b in zip(tritons, before, strict=True)]
            shares = [s / sum(spread) for s in spread]
            print(f"Triton request shares under load: {[f'{s:.0%}' for s in shares]} of {sum(spread):.0f}")
            assert all(0.15 <= s <= 0.50 for s in shares), shares

            killed, done_before_kill = tritons.pop(0), len(load.results)
            os.kill(killed.pid, signal.SIGKILL)
            killed.stop()
            wait_for(lambda: len(load.results) >= done_before_kill + 30, 120, "30 calls after the kill")

            fourth = start_tritons(a.path, 1)[0]
            endpoints.write_text("".join(f"{t.grpc_url}\n" for t in [*tritons, fourth]))
            added = wait_for(lambda: pool_metric(svc, "visloc_triton_endpoint_batches_total", fourth.grpc_url) > 0,
                             60, "the fourth endpoint took a batch")  # fmt: skip
            print(f"the fourth endpoint took its first batch {added:.1f} s after it was added to the target file")
            wait_for(lambda: len(load.results) >= done_before_kill + 60, 120, "30 more calls")
        failed = [r for r in load.results if r[0] != "OK"]
        assert not failed, failed[:5]
        assert {v for _, v in load.results} == {a.model_version}
        print(f"{len(load.results)} calls, 0 failed, across a Triton SIGKILL and an endpoint added")
    finally:
        svc.stop()
        for t in [*tritons, *([fourth] if fourth else [])]:
            t.stop()


def test_triton_restarted_with_another_bundles_model_stops_the_service(small_bundles):
    """Service and Triton on A: serving. Triton restarted on B's model under the same name and
    ports (B's version only, as a rollout that replaced the repository would leave it): the
    service goes NOT_SERVING and refuses Locate with UNAVAILABLE, naming A's model and the exact
    Triton version it asked for, and what Triton answered."""
    a, b = small_bundles
    ports = {"grpc_port": free_port(), "http_port": free_port(), "metrics_port": free_port()}
    triton = LocalTriton(a.path, threads=1, **ports).start()
    svc = ServiceProcess(a.path, triton.grpc_url)
    try:
        wait_serving(svc.target, timeout=120, proc=svc.proc)
        with grpc.insecure_channel(svc.target) as ch:
            r = pb_grpc.LocatorStub(ch).Locate(pb.LocateRequest(image=samples.photo_bytes(0)), timeout=30)
            info = pb_grpc.LocatorStub(ch).GetInfo(pb.GetInfoRequest(), timeout=10)
        assert r.model_version == info.model_version == a.model_version

        triton.stop()
        triton = LocalTriton(b.path, threads=1, **ports).start()  # same name, same ports, B's model
        took = wait_for(lambda: health(svc.target) == health_pb2.HealthCheckResponse.NOT_SERVING
                        and "model check could not run" in svc.log_text(), 60, "NOT_SERVING and why")  # fmt: skip
        print(f"NOT_SERVING with the verdict logged {took:.1f} s after Triton on B was ready")
        with grpc.insecure_channel(svc.target) as ch:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.LocatorStub(ch).Locate(pb.LocateRequest(image=samples.photo_bytes(0)), timeout=30)
            info = pb_grpc.LocatorStub(ch).GetInfo(pb.GetInfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        details = err.value.details()
        print(details)
        assert a.model_version in details
        assert f"does not serve model 'visloc' version {a.triton_version}" in details and triton.grpc_url in details
        assert info.model_version == "" and "model not confirmed" in info.bundle_warning
        lines = svc.log_text().splitlines()
        verdicts = [line for line in lines if "] Triton endpoint " in line and "could not run" in line]
        assert len(verdicts) == 1, verdicts  # one line per transition, not one per health check
        url = f"http://127.0.0.1:{svc.metrics_port}/metrics"
        checks = samples_of(url, "visloc_model_check_total")
        assert checks[(("endpoint", triton.grpc_url), ("result", "error"))] >= 1.0
        assert checks.get((("endpoint", triton.grpc_url), ("result", "ok")), 0.0) == 1.0  # A's, before the restart
    finally:
        svc.stop()
        triton.stop()


def test_a_triton_with_max_batch_size_1_is_checked_and_served(small_bundles):
    """The model check sends its probes (two of one shape) one by one, and the data plane splits
    its shape groups (up to the service's --max-batch 16) to fit the endpoint's max_batch_size."""
    a, _ = small_bundles
    triton = LocalTriton(a.path, threads=1, max_batch_size=1).start()
    svc = ServiceProcess(a.path, triton.grpc_url)
    try:
        wait_serving(svc.target, timeout=120, proc=svc.proc)
        same_shape = [samples.photo_bytes(i) for i in range(6)]  # one shape: grouped into batches > 1
        with grpc.insecure_channel(svc.target) as ch:
            stub = pb_grpc.LocatorStub(ch)
            got = list(stub.LocateStream(iter(pb.LocateRequest(image=d) for d in same_shape), timeout=120))
        assert [r.WhichOneof("outcome") for r in got] == ["result"] * len(same_shape), got
        assert {r.result.model_version for r in got} == {a.model_version}
        assert "model check passed" in svc.log_text()
        checks = samples_of(f"http://127.0.0.1:{svc.metrics_port}/metrics", "visloc_model_check_total")
        assert checks[(("endpoint", triton.grpc_url), ("result", "ok"))] >= 1.0
    finally:
        svc.stop()
        triton.stop()
