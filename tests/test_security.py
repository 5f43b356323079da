"""Who may call: bearer-token auth and TLS (with a throwaway CA), health stays open."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import grpc
import pytest
from conftest import ServiceProcess, wait_serving
from grpc_health.v1 import health_pb2, health_pb2_grpc

from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc
from visloc_export import samples

TOKEN = "s3cret-token-for-tests"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "1", "-subj", "/CN=visloc test CA", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext", cwd=d)  # fmt: skip
    (d / "token").write_text(TOKEN + "\n")
    return d


@pytest.fixture(scope="module")
def secured(demo_bundle, local_triton, pki):
    svc = ServiceProcess(
        demo_bundle, local_triton.grpc_url,
        "--auth-token-file", str(pki / "token"),
        "--tls-cert-file", str(pki / "server.pem"), "--tls-key-file", str(pki / "server.key"),
    )  # fmt: skip
    try:
        yield svc
    finally:
        svc.stop()


def _channel(svc, pki: Path, client_cert: bool = False) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "client.key").read_bytes() if client_cert else None,
        certificate_chain=(pki / "client.pem").read_bytes() if client_cert else None,
    )
    return grpc.secure_channel(svc.target, creds)


def test_token_required_over_tls_and_health_open(secured, pki):
    with _channel(secured, pki) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        health = health_pb2_grpc.HealthStub(ch)
        for _ in range(300):  # health needs no token
            if health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1:
                break
            time.sleep(0.1)
        stub = pb_grpc.LocatorStub(ch)
        req = pb.LocateRequest(image=samples.photo_bytes(0))
        for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", TOKEN)]):
            with pytest.raises(grpc.RpcError) as err:
                stub.Locate(req, metadata=metadata, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(stub.LocateStream(iter([req]), timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        r = stub.Locate(req, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=30)
        assert r.top_cell.probability > 0
    assert TOKEN not in secured.log_text()  # the token is never logged


def test_plaintext_client_cannot_talk_to_tls_port(secured):
    with grpc.insecure_channel(secured.target) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.LocatorStub(ch).GetInfo(pb.GetInfoRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate(demo_bundle, local_triton, pki):
    svc = ServiceProcess(
        demo_bundle, local_triton.grpc_url,
        "--tls-cert-file", str(pki / "server.pem"), "--tls-key-file", str(pki / "server.key"),
        "--tls-client-ca-file", str(pki / "ca.pem"),
    )  # fmt: skip
    try:
        with _channel(svc, pki, client_cert=True) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            assert pb_grpc.LocatorStub(ch).GetInfo(pb.GetInfoRequest(), timeout=10).num_cells == 2000
        with _channel(svc, pki, client_cert=False) as ch, pytest.raises(grpc.RpcError) as err:
            pb_grpc.LocatorStub(ch).GetInfo(pb.GetInfoRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        svc.stop()


def test_token_from_env_and_plaintext(demo_bundle, local_triton):
    import os

    svc = ServiceProcess(demo_bundle, local_triton.grpc_url, env=dict(os.environ, VISLOC_AUTH_TOKEN=TOKEN))
    try:
        wait_serving(svc.target)
        with grpc.insecure_channel(svc.target) as ch:
            stub = pb_grpc.LocatorStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.GetInfo(pb.GetInfoRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            info = stub.GetInfo(pb.GetInfoRequest(), metadata=[("authorization", f"bearer {TOKEN}")], timeout=10)
            assert info.num_cells == 2000
        assert "auth_token = '<redacted>'" in svc.log_text() and TOKEN not in svc.log_text()
    finally:
        svc.stop()
