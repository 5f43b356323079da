"""Liveness of swc-service for the kubelet (an exec probe: ``python /probes/liveness.py``).

Alive means every worker's event loop still answers. The kubelet's native gRPC probe cannot
say that here: it passes only on SERVING, and the service answers NOT_SERVING while Triton is
down (which must not restart every Locate pod); a TCP probe passes even when no loop runs,
because the kernel completes the handshake for a process that never answers.

So this asks grpc.health.v1 Check on the plaintext health port (VISLOC_HEALTH_PORT, else
VISLOC_PORT) and takes ANY answer (SERVING, NOT_SERVING) as alive; no answer within
ANSWER_TIMEOUT_S (a hung loop) or no listener is a failure. The workers of one pod share the
port (SO_REUSEPORT: the kernel hands each new connection to one of them), so it opens
CONNECTIONS_PER_WORKER x VISLOC_WORKERS separate connections: the chance that none of them lands
on a given hung worker is (1 - 1/W)^(16 W) <= e^-16 per probe.

Runs with the image's Python (grpcio and grpcio-health-checking are service dependencies).
Exit 0: alive; 1: a worker did not answer (the reason on stderr, which the kubelet records).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

CONNECTIONS_PER_WORKER = 16
ANSWER_TIMEOUT_S = 2.0


def target(env: dict[str, str]) -> str:
    """The port the kubelet's readiness probe also asks: the health port when one is set."""
    port = env.get("VISLOC_HEALTH_PORT", "0")
    if port in ("", "0"):
        port = env.get("VISLOC_PORT", "50051")
    return f"127.0.0.1:{port}"


def check(address: str, connections: int) -> str | None:
    """None when every connection got an answer, else why not."""
    # A local subchannel pool: each channel opens its own TCP connection (gRPC would otherwise
    # share one connection between channels to the same address, i.e. ask one worker only).
    options = [("grpc.use_local_subchannel_pool", 1)]
    for i in range(connections):
        with grpc.insecure_channel(address, options=options) as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=ANSWER_TIMEOUT_S)
            except grpc.RpcError as exc:
                return f"connection {i + 1}/{connections} to {address}: {exc.code().name} {exc.details()}"
    return None


def main() -> int:
    env = dict(os.environ)
    workers = max(1, int(env.get("VISLOC_WORKERS", "1")))
    problem = check(target(env), CONNECTIONS_PER_WORKER * workers)
    if problem:
        print(f"liveness: no answer from a worker: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
