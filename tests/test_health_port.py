"""The health port (``--health-port``): plaintext grpc.health.v1 only, beside a TLS main port, with
the main port's answers (Triton down, drain), one port shared by the workers; its settings."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import ServiceProcess, free_port, wait_serving
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from swc_service.config import load_settings
from swc_service.server import SERVICE_NAME
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc
from visloc_export import samples

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# --------------------------------------------------------------------------- settings


def test_health_port_setting_from_flag_env_and_default():
    assert load_settings(["--bundle", "/b"], {}).health_port == 0  # off by default
    env = {"VISLOC_BUNDLE": "/b", "VISLOC_HEALTH_PORT": "50052"}
    s = load_settings([], env)
    assert s.health_port == 50052 and "health_port = 50052" in s.describe()
    assert load_settings(["--health-port", "8081"], env).health_port == 8081  # the flag wins
    # Free to coincide with a port that is off (0) or ephemeral.
    assert load_settings(["--bundle", "/b", "--metrics-port", "0", "--port", "0", "--health-port", "9090"], {})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--health-port", "-1"], r"health_port must be 0 \(off\) or 1\.\.65535, not -1"),
        (["--health-port", "65536"], r"health_port must be 0 \(off\) or 1\.\.65535, not 65536"),
        (["--health-port", "50051"], r"health_port 50051 is the same as port\b"),
        (["--port", "7000", "--health-port", "7000"], r"health_port 7000 is the same as port\b"),
        (["--metrics-port", "9100", "--health-port", "9100"], r"health_port 9100 is the same as metrics_port"),
    ],
)
def test_bad_health_port_is_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        load_settings(["--bundle", "/b", *argv], {})


def test_health_port_that_is_not_a_number_is_refused(capsys):
    with pytest.raises(ValueError, match=r"VISLOC_HEALTH_PORT='x' is not valid for health_port"):
        load_settings([], {"VISLOC_BUNDLE": "/b", "VISLOC_HEALTH_PORT": "x"})
    with pytest.raises(SystemExit):
        load_settings(["--bundle", "/b", "--health-port", "x"], {})
    assert "argument --health-port: invalid int value: 'x'" in capsys.readouterr().err


# --------------------------------------------------------------------------- live service


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> Path:
    """A self-signed server certificate for 127.0.0.1 (cert.pem, key.pem; the client trusts it)."""
    d = tmp_path_factory.mktemp("health-port-tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "cert.pem",
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=d, check=True, capture_output=True,
    )  # fmt: skip
    return d


class HealthPortService(ServiceProcess):
    """swc-service with TLS on the main port (when ``cert`` is given) and a health port."""

    def __init__(self, bundle, triton_url, *extra, cert: Path | None = None, **kwargs):
        self.health_port = free_port()
        self.health_target = f"127.0.0.1:{self.health_port}"
        tls = ["--tls-cert-file", str(cert / "cert.pem"), "--tls-key-file", str(cert / "key.pem")] if cert else []
        super().__init__(bundle, triton_url, *tls, "--health-port", str(self.health_port), *extra, **kwargs)


def _tls_channel(target: str, cert: Path) -> grpc.Channel:
    return grpc.secure_channel(target, grpc.ssl_channel_credentials((cert / "cert.pem").read_bytes()))


def _until(condition, svc: ServiceProcess, limit_s: float = 60.0) -> None:
    """Poll ``condition`` while the service runs; a bound against hangs, not a timing assertion."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert svc.proc.poll() is None, svc.log_text()
        assert time.monotonic() < deadline, svc.log_text()
        time.sleep(0.05)


def _check(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture(scope="module")
def secured(demo_bundle, local_triton, cert):
    svc = HealthPortService(demo_bundle, local_triton.grpc_url, cert=cert)
    try:
        wait_serving(svc.health_target)  # plaintext
        yield svc
    finally:
        svc.stop()


def test_plaintext_health_on_the_health_port_beside_tls(secured, cert):
    with grpc.insecure_channel(secured.health_target) as ch:
        assert _check(ch) == SERVING
        assert _check(ch, SERVICE_NAME) == SERVING
        with pytest.raises(grpc.RpcError) as err:
            _check(ch, "no.such.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # the same servicer's registry
    with _tls_channel(secured.target, cert) as ch:
        assert _check(ch) == SERVING and _check(ch, SERVICE_NAME) == SERVING  # the main port, over TLS
    log = secured.log_text()
    assert f"health on 127.0.0.1:{secured.health_port} (plaintext, grpc.health.v1 only)" in log
    assert f"listening on 127.0.0.1:{secured.port} (TLS" in log


def test_the_health_port_serves_nothing_but_health(secured):
    with grpc.insecure_channel(secured.health_target) as ch:
        stub = pb_grpc.LocatorStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Locate(pb.LocateRequest(image=samples.photo_bytes(0)), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as err:
            stub.GetInfo(pb.GetInfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        reflection = reflection_pb2_grpc.ServerReflectionStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=10))  # fmt: skip
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_main_port_still_refuses_plaintext(secured):
    with grpc.insecure_channel(secured.target) as ch:
        for call in (lambda: _check(ch), lambda: pb_grpc.LocatorStub(ch).GetInfo(pb.GetInfoRequest(), timeout=5)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_health_port_says_not_serving_while_triton_is_down(demo_bundle):
    svc = HealthPortService(demo_bundle, f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        with grpc.insecure_channel(svc.health_target) as health, grpc.insecure_channel(svc.target) as main:
            grpc.channel_ready_future(health).result(timeout=60)
            _until(lambda: "health: NOT_SERVING (no Triton endpoint" in svc.log_text(), svc)  # the watcher ran
            assert ": not ready" in svc.log_text()
            assert _check(health) == _check(main) == NOT_SERVING
            assert _check(health, SERVICE_NAME) == NOT_SERVING
    finally:
        assert svc.stop() == 0


def test_drain_turns_the_health_port_not_serving_before_exit(demo_bundle, local_triton, cert):
    """SIGTERM: while a call is still in flight on the TLS port the health port answers NOT_SERVING
    (also once the TLS port refuses new calls); when the call ends, the process exits 0 and the
    health port is gone."""
    svc = HealthPortService(demo_bundle, local_triton.grpc_url, "--grace-s", "60", cert=cert)
    release = threading.Event()

    def requests():
        yield pb.LocateRequest(image=samples.photo_bytes(1), request_id="held")
        release.wait(120)  # the stream stays open (in flight) until the test releases it

    try:
        wait_serving(svc.health_target)
        with _tls_channel(svc.target, cert) as main, grpc.insecure_channel(svc.health_target) as health:
            stream = pb_grpc.LocatorStub(main).LocateStream(requests(), timeout=120)
            assert next(stream).request_id == "held"  # the stream is inside the service
            svc.proc.send_signal(15)
            seen = []
            # Until NOT_SERVING the process must stay up (the stream holds the drain open).
            _until(lambda: seen.append(_check(health)) or seen[-1] == NOT_SERVING, svc)
            assert set(seen) <= {SERVING, NOT_SERVING}
            assert svc.proc.poll() is None
            assert _check(health, SERVICE_NAME) == NOT_SERVING

            def main_refuses() -> bool:
                try:
                    assert _check(main) == NOT_SERVING  # the same answer, until it stops listening
                    return False
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    return True

            # The TLS port refuses new calls during the drain; the health port still answers.
            _until(main_refuses, svc)
            assert _check(health) == NOT_SERVING and svc.proc.poll() is None
            release.set()
            assert list(stream) == []
            assert svc.proc.wait(60) == 0
            assert "stopped" in svc.log_text()
        with grpc.insecure_channel(svc.health_target) as health, pytest.raises(grpc.RpcError) as err:
            _check(health)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # gone with the process
    finally:
        release.set()
        svc.stop()


def test_workers_share_the_health_port(demo_bundle, local_triton):
    """Each worker of a supervisor binds the same health port (SO_REUSEPORT, like the main port)."""
    svc = HealthPortService(demo_bundle, local_triton.grpc_url, "--workers", "2")
    try:
        bound = rf"\[(\d+)\] health on 127\.0\.0\.1:{svc.health_port} "
        serving = r"\[(\d+)\] health: SERVING"

        def workers(pattern: str) -> set[str]:
            return set(re.findall(pattern, svc.log_text()))

        # Both workers bound the port (one that failed would exit, and the supervisor with it)
        # and both see Triton ready.
        _until(lambda: len(workers(bound)) == 2 and workers(serving) == workers(bound), svc)
        for _ in range(4):  # fresh connections, whichever worker the kernel picks
            with grpc.insecure_channel(svc.health_target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                assert _check(ch) == SERVING
    finally:
        assert svc.stop() == 0
