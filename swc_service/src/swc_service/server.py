"""``swc-service``: the Locate gRPC server (grpc.aio), health, reflection, metrics, workers.

With ``--workers N > 1`` this process is a supervisor: it starts N worker processes that
bind the same port (SO_REUSEPORT, so the kernel spreads connections over them, and no worker
is bound to one core by the GIL), serves their aggregated Prometheus metrics, and forwards
SIGTERM/SIGINT for a graceful stop. Each worker memory-maps the same bundle files, so the
background's pages are shared through the page cache.

SIGHUP reloads the bundle (``--bundle`` resolved anew, e.g. a re-pointed symlink), checked
against its model version in Triton before it replaces the served one
(:mod:`swc_service.reload`); a supervisor forwards SIGHUP to every worker.
"""

from __future__ import annotations

import os

# The service's numpy work is tiny (one cell's rows, M x 3 dot products): multi-threaded BLAS
# would only add worker threads that spin after each call and take CPU from Triton on the
# same host (measured: ~60 ms of CPU per image). Set before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import asyncio
import contextlib
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from visloc_client.v1 import locator_pb2 as pb

from .bundle import load_bundle
from .config import Settings, load_settings

log = logging.getLogger("swc_service")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Locator"].full_name


def process_age_s() -> float:
    """Seconds since this process started (interpreter start-up and imports included)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.process_time()


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # Clients re-resolve (and reach new pods after a scale-up) when connections age out.
        *([("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
           ("grpc.max_connection_age_grace_ms", int(settings.grace_s * 1000))]
          if settings.max_connection_age_s > 0 else []),
    ]  # fmt: skip


def health_grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """The health port's options: SO_REUSEPORT as on the main port (the workers of a supervisor
    each bind the same health port), and room for health messages only."""
    return [
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
        ("grpc.max_receive_message_length", 64 * 1024),
        ("grpc.max_send_message_length", 64 * 1024),
    ]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (and mutual TLS with a client CA) from PEM files; None means plaintext."""
    if not settings.tls_cert_file:
        return None
    chain = Path(settings.tls_cert_file).read_bytes()
    key = Path(settings.tls_key_file).read_bytes()
    client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


async def _watch_triton(pool, health_servicer: health.aio.HealthServicer, interval: float, draining) -> None:
    """SERVING only while some Triton endpoint is ready AND passed the bundle's model check
    (:mod:`swc_service.triton_pool`), and we are not draining. One log line per transition."""
    from . import metrics

    last = None
    while not draining.is_set():
        await pool.refresh()
        ready = await pool.ready()
        metrics.TRITON_READY.set(1 if ready else 0)
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        if status != last:
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, status)
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            if ready:
                log.info("health: %s (%s)", name, pool.confirmed().message)
            else:
                log.warning("health: %s (%s)", name, pool.problem())
            last = status
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(draining.wait(), interval)


async def serve(settings: Settings, *, on_started=None) -> None:
    """Run one server until SIGTERM/SIGINT, then drain: NOT_SERVING, finish in-flight calls, exit."""
    from . import metrics, tracing
    from .admission import AdmissionController
    from .interceptors import AuthInterceptor, MemoryDoor, StatusInterceptor, TracingInterceptor
    from .locator import Locator
    from .servicer import LocatorServicer, add_to_server
    from .triton_pool import TritonPool

    inference = TritonPool(
        settings.triton_url, settings.triton_model, lambda: locator.state, timeout_s=settings.triton_timeout_s,
        precision=settings.model_precision, allow_without_probes=settings.allow_bundle_without_probes,
        resolve_interval_s=settings.triton_resolve_interval_s,
        health_timeout_s=max(1.0, settings.triton_health_interval_s),
        backend_model_version=lambda state: state.triton_version,  # the bundle's exact version, never "latest"
    )  # fmt: skip
    # One admission controller per worker process (it belongs to this event loop).
    admission = AdmissionController(settings.admission_config(), observer=metrics.AdmissionMetrics())
    # No local name keeps the bundle: a SIGHUP reload must be able to release its memory maps.
    locator = Locator(
        settings, _open_bundle(settings), inference, model_status=inference.model_status, admission=admission
    )
    callers = settings.callers()
    tracing.start()  # each worker process exports its own spans
    server = grpc.aio.server(
        # Outermost first: the call's span covers everything; the memory door acts before a
        # message is read; the status interceptor answers, counts and logs auth failures too.
        interceptors=[
            *([TracingInterceptor(SERVICE_NAME)] if tracing.enabled() else []),
            MemoryDoor(SERVICE_NAME, locator.memory, callers),
            StatusInterceptor(SERVICE_NAME),
            AuthInterceptor(SERVICE_NAME, callers),
        ],
        options=grpc_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    add_to_server(LocatorServicer(locator, settings.stream_in_flight), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    credentials = server_credentials(settings)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    # The health port: plaintext whatever the main port speaks (the kubelet's native gRPC probe
    # cannot do TLS), grpc.health.v1 only, the SAME servicer (so the same answers, NOT_SERVING
    # while Triton is down and during the drain). No Locator, no reflection, no token (health
    # is open on the main port too). Bound before either server starts: a taken port fails here.
    health_server = None
    if settings.health_port:
        health_server = grpc.aio.server(options=health_grpc_options(settings), maximum_concurrent_rpcs=64)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_server.add_insecure_port(f"{settings.host}:{settings.health_port}")
    await server.start()
    if health_server is not None:
        await health_server.start()
    log.info(
        "listening on %s:%d (%s%s; bundle %s, %s, M=%d, N=%d, Triton version %s) after %.2f s",
        settings.host, port, "TLS" if credentials else "plaintext",
        f", bearer token required ({len(set(callers.values()))} callers)" if callers else "",
        locator.state.bundle.bundle_id, locator.state.bundle.source, locator.state.bundle.num_cells,
        locator.state.bundle.num_background, locator.state.triton_version, process_age_s(),
    )  # fmt: skip
    if health_server is not None:
        log.info("health on %s:%d (plaintext, grpc.health.v1 only)", settings.host, settings.health_port)
    if on_started is not None:
        on_started(port)

    draining = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, draining.set)
    reloader = _reloader(settings, locator, inference)
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    watcher = asyncio.create_task(
        _watch_triton(inference, health_servicer, settings.triton_health_interval_s, draining)
    )
    await draining.wait()
    loop.remove_signal_handler(signal.SIGHUP)
    await reloader.cancel()  # a reload not yet swapped changes nothing; the drain does not wait for it
    log.info("draining: NOT_SERVING, refusing new calls, %.1f s grace for calls in flight", settings.grace_s)
    await health_servicer.enter_graceful_shutdown()
    await watcher
    try:
        await server.stop(settings.grace_s)
    finally:
        # The health port answers NOT_SERVING for as long as calls drain, then goes away with
        # the main port (no grace: only probes and open health watches are on it).
        if health_server is not None:
            await health_server.stop(None)
    await locator.close()
    tracing.stop()  # the last spans are exported before the process ends
    log.info("stopped")


def _open_bundle(settings: Settings):
    bundle = load_bundle(settings.bundle)
    if settings.prefetch_background:
        bundle.prefetch()
    return bundle


def _reloader(settings: Settings, locator, inference):
    """The SIGHUP reload: the same model check as at start-up, with the new bundle's version."""
    from .reload import BundleReloader

    return BundleReloader(
        locator, inference, settings.bundle,
        # Issue 16 part 1's settings (the declared backend precision, serving probe-less bundles).
        precision=settings.model_precision,
        allow_without_probes=settings.allow_bundle_without_probes,
        model_name=settings.triton_model, max_batch=settings.max_batch, prefetch=settings.prefetch_background,
    )  # fmt: skip


def _serve_metrics(settings: Settings, multiproc_dir: str | None) -> None:
    if not settings.metrics_port:
        return
    from prometheus_client import CollectorRegistry, start_http_server

    registry = None
    if multiproc_dir:
        from prometheus_client import multiprocess

        from .metrics import ExemplarCollector

        registry = CollectorRegistry()  # the workers' values, with their exemplars (trace ids)
        registry.register(
            ExemplarCollector(multiprocess.MultiProcessCollector(None, path=multiproc_dir), multiproc_dir)
        )
    start_http_server(settings.metrics_port, addr=settings.host, **({"registry": registry} if registry else {}))
    log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)


def _supervise(settings: Settings, argv: list[str]) -> int:
    if settings.port == 0:
        raise SystemExit("swc-service: --workers > 1 needs a fixed --port")
    multiproc_dir = tempfile.mkdtemp(prefix="visloc-metrics-")
    try:
        return _run_workers(settings, argv, multiproc_dir)
    finally:  # the workers' value files go with them (a restart in the same pod starts afresh)
        try:
            shutil.rmtree(multiproc_dir)
        except OSError as exc:
            log.warning("supervisor: could not remove the metrics directory %s: %s", multiproc_dir, exc)


def _run_workers(settings: Settings, argv: list[str], multiproc_dir: str) -> int:
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=multiproc_dir)
    _serve_metrics(settings, multiproc_dir)
    cmd = [sys.executable, "-m", "swc_service.server", *argv]
    cmd += ["--workers", "1", "--metrics-port", "0", "--reuse-port", "true", "--quiet-settings", "true"]
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited: a SIGHUP before a worker's loop is up is dropped
    children = [subprocess.Popen(cmd, env=env) for _ in range(settings.workers)]
    log.info("supervisor: %d workers (pids %s)", len(children), [c.pid for c in children])

    stopping = False

    def forward(signum: int, _frame) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    def reload(signum: int, _frame) -> None:
        log.info("supervisor: SIGHUP: every worker reloads the bundle")
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, reload)
    # A worker that dies on its own takes the others down with it, so the supervisor exits and
    # the orchestrator restarts the whole pod: the port would otherwise stay open on fewer workers.
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(0.2)
    if not stopping:
        dead = [c.pid for c in children if c.poll() is not None]
        log.error("supervisor: worker(s) %s exited; stopping the others", dead)
        forward(signal.SIGTERM, None)
    codes = [child.wait() for child in children]
    return 1 if not stopping and all(c == 0 for c in codes) else max(abs(c) for c in codes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings = load_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
        stream=sys.stderr,
    )
    if not settings.quiet_settings:
        print("swc-service settings:\n" + settings.describe(), file=sys.stderr, flush=True)
    try:  # a bad OTEL_* variable fails here, in one line, not in every worker
        from visloc_client.tracing import TracingConfigError, check

        check()
    except TracingConfigError as exc:
        print(f"swc-service: tracing: {exc}", file=sys.stderr)
        return 2
    # SIGHUP (reload) would end the process by default until serve() installs its handler.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from .memory import bound_allocator

    bound_allocator()  # the worker's RSS follows its memory budget (memory.py)
    if settings.workers > 1:
        return _supervise(settings, argv)
    _serve_metrics(settings, os.environ.get("PROMETHEUS_MULTIPROC_DIR") if settings.metrics_port else None)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
