# syntax=docker/dockerfile:1.7
# The Locate service (swc-service): slim, non-root, no torch, no Triton binary.
#
#   docker build -f deploy/service.Dockerfile -t visloc/swc-service:0.1.0 .   # from the repo root
#
# Only client/ and swc_service/ are copied (deploy/service.Dockerfile.dockerignore); the image
# holds the two packages and their runtime dependencies from PyPI (numpy, Pillow, grpcio,
# tritonclient[grpc], prometheus-client), the `tracing` extra (OpenTelemetry SDK and OTLP exporters:
# traces are then a matter of OTEL_* variables) and NOT the `triton` extra (the embedded local
# Triton), torch or onnxruntime. The model runs in Triton; the bundle is mounted at /bundle.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: wheels -> /opt/venv
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# A C compiler for the service's one extension (SwC/PD kernels); it stays in this stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY client/ client/
COPY swc_service/ swc_service/
# Both local packages at once, so swc_service's `visloc-client` requirement resolves to ./client.
RUN python -m pip wheel --wheel-dir /wheels "./client[tracing]" "./swc_service[tracing]" \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --find-links /wheels "visloc-client[tracing]" "visloc-swc-service[tracing]" \
 && /opt/venv/bin/pip uninstall -y pip \
 && /opt/venv/bin/python -c "import importlib.util as u, sys; bad = [m for m in ('torch', 'pytriton', 'onnxruntime') if u.find_spec(m)]; sys.exit(f'unexpected in the service image: {bad}' if bad else 0)"

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="visloc swc-service" \
      org.opencontainers.image.description="visloc Locate gRPC service (preprocessing, Triton client, Search within Cell, Prediction Density)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 visloc \
 && useradd --system --uid 10001 --gid visloc --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin visloc
COPY --from=build /opt/venv /opt/venv
# Read-only root filesystem friendly: no .pyc written at run time (pip compiled them at build),
# temporary files (the Prometheus multiprocess directory when VISLOC_WORKERS > 1) under /tmp,
# which Kubernetes mounts as an emptyDir and compose as a tmpfs.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    VISLOC_HOST=0.0.0.0 \
    VISLOC_PORT=50051 \
    VISLOC_METRICS_PORT=9090 \
    VISLOC_BUNDLE=/bundle
USER 10001:10001
WORKDIR /tmp
# 50051: gRPC (visloc.v1.Locator, grpc.health.v1, reflection); 9090: Prometheus /metrics.
EXPOSE 50051 9090
# SERVING only while Triton and the model are ready (grpc.health.v1, service ""); over the
# plaintext health port when VISLOC_HEALTH_PORT is set (it works with TLS on the main port).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; p = os.environ.get('VISLOC_HEALTH_PORT', '0'); p = p if p not in ('', '0') else os.environ.get('VISLOC_PORT', '50051'); ch = grpc.insecure_channel('127.0.0.1:' + p); sys.exit(0 if g.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=4).status == h.HealthCheckResponse.SERVING else 1)"]
# SIGTERM drains (NOT_SERVING, in-flight calls finish within VISLOC_GRACE_S); exec form: the
# service is PID 1 and gets the signal. Settings: VISLOC_* (docs/service.md).
STOPSIGNAL SIGTERM
ENTRYPOINT ["swc-service"]
