# syntax=docker/dockerfile:1.7
# The bundle exporter (visloc-export): PyTorch model, ONNX export with its parity check,
# upstream import, demo bundles. Runs as a one-off job that writes a bundle onto a volume
# (k8s/jobs/, docs/deploy.md); never part of the serving path.
#
#   docker build -f deploy/exporter.Dockerfile -t visloc/exporter:0.1.0 .   # from the repo root
#
# torch is pinned to the version the parity tests run with. The default index gives the
# Linux wheel with its CUDA dependencies (several GB); the export needs only the CPU, so pass
# the CPU-only wheel index of your mirror or of the PyTorch project as TORCH_INDEX_URL to get
# a much smaller image: --build-arg TORCH_INDEX_URL=<index URL>.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# A C compiler for swc_service's extension (SwC/PD kernels); it stays in this stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
COPY client/ client/
COPY swc_service/ swc_service/
COPY export/ export/
# No `triton` extra: the exporter checks ONNX parity with onnxruntime, not through Triton.
RUN /opt/venv/bin/pip install ./client ./swc_service ./export \
 && /opt/venv/bin/visloc-export --help > /dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="visloc exporter" \
      org.opencontainers.image.description="visloc-export: build and verify visloc model bundles" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 visloc \
 && useradd --system --uid 10001 --gid visloc --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin visloc
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 TMPDIR=/tmp HOME=/tmp
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["visloc-export"]
CMD ["--help"]
