"""Loopback helpers shared by the launcher, the demo, the tests and the benchmarks."""

from __future__ import annotations

import socket
import subprocess
import time


def free_port(host: str = "127.0.0.1", preferred: int = 0) -> int:
    """``preferred`` when it is free on ``host``, else any free TCP port there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, preferred))
        except OSError:
            s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_serving(
    target: str, timeout: float = 60.0, service: str = "", proc: subprocess.Popen | None = None, poll_s: float = 0.1
) -> None:
    """Block until the gRPC health check of ``target`` says SERVING (fails early when ``proc`` exits)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the server for {target} exited with code {proc.returncode}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(poll_s)
    raise TimeoutError(f"{target} did not become SERVING within {timeout} s")
