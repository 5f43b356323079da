"""Prometheus metrics of the Locate service (multiprocess-safe when workers > 1).

With several workers, ``PROMETHEUS_MULTIPROC_DIR`` is set before this module is imported and
the supervisor serves the aggregate; gauges then say how they combine across processes.
"""

from __future__ import annotations

import glob
import json
import math
import os
import threading
import time
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 2.5, 5, 10)
_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

REQUESTS = Counter("visloc_requests_total", "Locate service RPCs by method and status code", ["method", "code"])
REQUEST_SECONDS = Histogram(
    "visloc_request_duration_seconds", "RPC latency by method", ["method"], buckets=_LATENCY_BUCKETS
)
IMAGES = Counter("visloc_images_total", "Images answered (streams count each image) by status code", ["code"])
STAGE_SECONDS = Histogram(
    "visloc_stage_duration_seconds",
    "Per-image latency of each stage: decode, preprocess, queue, triton, swc, pd, total",
    ["stage"],
    buckets=_STAGE_BUCKETS,
)
IN_FLIGHT = Gauge("visloc_in_flight_images", "Images being located now", multiprocess_mode="livesum")
IMAGE_BYTES = Histogram(
    "visloc_image_bytes", "Encoded image sizes", buckets=(1e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2.5e6, 5e6, 1e7, 2e7)
)
IMAGE_PIXELS = Histogram(
    "visloc_image_pixels", "Decoded image sizes in pixels", buckets=(1e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 5e7)
)
PREDICTIONS = Counter(
    "visloc_predictions_total", "Predictions by SwC method and localizability", ["method", "localizable"]
)
TRITON_ERRORS = Counter("visloc_triton_errors_total", "Failed Triton calls by gRPC status", ["code"])
TRITON_BATCH = Histogram(
    "visloc_triton_batch_size", "Images per Triton request (shape groups)", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
)
TRITON_READY = Gauge("visloc_triton_ready", "1 when Triton and the model are ready", multiprocess_mode="min")
BUNDLE_INFO = Gauge(
    "visloc_bundle_info",
    "The served bundle (value 1)",
    ["bundle_id", "source", "model_version", "num_cells", "num_background"],
    multiprocess_mode="max",
)
BATCH_WINDOW = Gauge(
    "visloc_batch_window_seconds", "The shape-grouping window the service waits", multiprocess_mode="max"
)

# Admission control (swc_service.admission). ``caller`` is a name from the callers
# token file (bounded), "default" for the shared token, "anonymous" when auth is off.
ADMISSION_SHED = Counter(
    "visloc_admission_shed_total",
    "Calls shed by admission control, by reason (deadline_unmeetable, expired_in_queue, queue_full, "
    "caller_limit, queue_timeout, memory_budget) and caller",
    ["reason", "caller"],
)
ADMISSION_QUEUE_WAIT = Histogram(
    "visloc_admission_queue_wait_seconds",
    "Time admitted calls waited in the admission queue, by caller",
    ["caller"],
    buckets=_LATENCY_BUCKETS,
)
ADMISSION_IN_FLIGHT = Gauge(
    "visloc_admission_in_flight", "Calls admitted and not yet done, by caller", ["caller"], multiprocess_mode="livesum"
)
ADMISSION_LIMIT = Gauge(
    "visloc_admission_limit", "Calls admission control lets in flight (adaptive)", multiprocess_mode="livesum"
)

# The memory budget (swc_service.memory): bytes the calls in flight hold, and the budget.
MEMORY_HELD_BYTES = Gauge(
    "visloc_memory_held_bytes",
    "Bytes the calls in flight hold (messages and decoded pixels, as reserved)",
    multiprocess_mode="livesum",
)
MEMORY_BUDGET_BYTES = Gauge(
    "visloc_memory_budget_bytes", "The memory budget of the calls in flight, per worker", multiprocess_mode="livesum"
)


class AdmissionMetrics:
    """The admission controller's observer (swc_service.admission.AdmissionObserver) -> Prometheus."""

    def shed(self, caller: str, reason: str) -> None:
        ADMISSION_SHED.labels(reason=reason, caller=caller).inc()

    def queue_wait(self, caller: str, seconds: float) -> None:
        ADMISSION_QUEUE_WAIT.labels(caller=caller).observe(seconds)

    def in_flight(self, caller: str, delta: int) -> None:
        ADMISSION_IN_FLIGHT.labels(caller=caller).inc(delta)

    def limit(self, value: int) -> None:
        ADMISSION_LIMIT.set(value)


def observe_located(
    pixels: int, stages: dict[str, float], method: str, localizable: bool, exemplar: dict[str, str] | None = None
) -> None:
    """One located image: its size, the seconds of each stage and what was predicted;
    ``exemplar`` (the trace id of a sampled call) goes on its total."""
    IMAGE_PIXELS.observe(pixels)
    for stage, seconds in stages.items():
        if stage == "total" and exemplar:
            observe_with_exemplar(STAGE_SECONDS, {"stage": stage}, _STAGE_BUCKETS, seconds, exemplar)
        else:
            STAGE_SECONDS.labels(stage).observe(seconds)
    PREDICTIONS.labels(method, str(localizable).lower()).inc()


def observe_request(method: str, seconds: float, exemplar: dict[str, str] | None = None) -> None:
    """One finished RPC's latency; ``exemplar``: the trace id of a sampled call."""
    if exemplar:
        observe_with_exemplar(REQUEST_SECONDS, {"method": method}, _LATENCY_BUCKETS, seconds, exemplar)
    else:
        REQUEST_SECONDS.labels(method).observe(seconds)


def observe_with_exemplar(histogram: Histogram, labels: dict[str, str], buckets, value: float, exemplar) -> None:
    """An observation with its OpenMetrics exemplar; with workers, also kept for the supervisor."""
    histogram.labels(**labels).observe(value, exemplar=exemplar)
    if _shared is not None:
        _shared.add(histogram._name, labels, buckets, value, exemplar["trace_id"])


class SharedExemplars:
    """Exemplars across worker processes. prometheus_client's multiprocess files hold values only,
    so each worker writes the latest exemplar of each bucket to ``exemplars_<pid>.json`` beside
    them (a quarter of a second after the first exemplar since it last wrote), and
    :class:`ExemplarCollector` in the supervisor puts the newest of each bucket back on the
    aggregated histograms."""

    def __init__(self, directory: str, interval_s: float = 0.25):
        self.path = Path(directory) / f"exemplars_{os.getpid()}.json"
        self.interval_s = interval_s
        self.latest: dict[str, list] = {}
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None  # a flush of what came since the last one

    def add(self, name: str, labels: dict[str, str], buckets, value: float, trace_id: str) -> None:
        le = next((b for b in buckets if value <= b), math.inf)
        with self._lock:
            self.latest[bucket_key(name, {**labels, "le": floatToGoString(le)})] = [trace_id, value, time.time()]
            if self._timer is None:
                self._timer = threading.Timer(self.interval_s, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        with self._lock:
            self._timer = None
            text = json.dumps(self.latest)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)


def bucket_key(name: str, labels: dict[str, str]) -> str:
    return json.dumps([name, sorted(labels.items())])


class ExemplarCollector:
    """The supervisor's collector: ``inner`` (the MultiProcessCollector) with the workers'
    exemplars on the histogram buckets (the newest per bucket)."""

    def __init__(self, inner, directory: str):
        self.inner = inner
        self.directory = directory

    def _exemplars(self) -> dict[str, list]:
        newest: dict[str, list] = {}
        for path in glob.glob(os.path.join(self.directory, "exemplars_*.json")):
            try:
                entries = json.loads(Path(path).read_text())
            except (OSError, ValueError):  # a worker replacing its file right now: next scrape
                continue
            for key, entry in entries.items():
                if key not in newest or entry[2] > newest[key][2]:
                    newest[key] = entry
        return newest

    def collect(self):
        exemplars = self._exemplars()
        for metric in self.inner.collect():
            if metric.type == "histogram" and exemplars:
                samples = []
                for s in metric.samples:
                    entry = exemplars.get(bucket_key(metric.name, s.labels)) if s.name.endswith("_bucket") else None
                    if entry is not None:
                        s = s._replace(exemplar=Exemplar({"trace_id": entry[0]}, entry[1], entry[2]))
                    samples.append(s)
                metric.samples = samples
            yield metric


_MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
_shared = SharedExemplars(_MULTIPROC_DIR) if _MULTIPROC_DIR else None


# The Triton endpoint pool (swc_service.triton_pool) and the model check (swc_service.model_check).
# ``endpoint`` is a resolved HOST:PORT of the --triton-url target.
ENDPOINT_BATCHES = Counter("visloc_triton_endpoint_batches_total", "Batches sent to each Triton endpoint", ["endpoint"])
ENDPOINT_FAILURES = Counter(
    "visloc_triton_endpoint_failures_total", "Batches that failed on each Triton endpoint", ["endpoint"]
)
ENDPOINT_OUTSTANDING = Gauge(
    "visloc_triton_endpoint_outstanding", "Batches in flight on each Triton endpoint", ["endpoint"],
    multiprocess_mode="livesum",
)  # fmt: skip
ENDPOINT_READY = Gauge(
    "visloc_triton_endpoint_ready",
    "1 when the endpoint is ready AND passed the bundle's model check (it takes batches)",
    ["endpoint"],
    multiprocess_mode="livemin",
)
MODEL_CHECKS = Counter(
    "visloc_model_check_total",
    "Model checks of an endpoint against the bundle by result (ok, mismatch, no_probes, error)",
    ["result", "endpoint"],
)
MODEL_CHECK_FAILING = Gauge(
    "visloc_model_check_failing",
    "Ready Triton endpoints refused by the model check (mismatch, or a bundle without probes)",
    multiprocess_mode="max",
)


# Bundle reloads (SIGHUP, swc_service.reload). ``result``: ok, unchanged, bundle_error
# (the new bundle did not load), mismatch / no_probes / error (its model check did not pass).
BUNDLE_RELOADS = Counter("visloc_bundle_reload_total", "Bundle reloads (SIGHUP) by result", ["result"])


def set_bundle_info(bundle, served: bool) -> None:
    """visloc_bundle_info of a bundle: 1 while it is served, 0 after a reload replaced it."""
    labels = (bundle.bundle_id, bundle.source, bundle.model_version, str(bundle.num_cells), str(bundle.num_background))
    BUNDLE_INFO.labels(*labels).set(1 if served else 0)
