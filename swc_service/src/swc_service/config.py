"""Service settings from flags, then environment variables (``VISLOC_*``), then defaults.

Printed at start-up (secrets redacted) so an operator sees what a pod runs with.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from visloc_client.preprocessing import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE

from .admission import AdmissionConfig
from .callers import load_callers, with_shared
from .method import (
    DEFAULT_CONF_SCALE_KM,
    DEFAULT_CONF_THRESHOLD,
    DEFAULT_EPS_KM,
    DEFAULT_SCALES_KM,
    DEFAULT_TOP_K,
)
from .model_check import CHECK_PRECISIONS as MODEL_PRECISIONS
from .targets import parse_target

PREPROCESSING_MODES = ("exact", "center_crop_300")


@dataclass(frozen=True)
class Settings:
    bundle: str
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9090  # 0 disables the metrics endpoint
    health_port: int = 0  # > 0: a second, always plaintext port serving only grpc.health.v1 (probes)
    workers: int = 1
    reuse_port: bool = False  # set for the workers of a supervisor
    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "visloc"
    triton_timeout_s: float = 30.0
    triton_health_interval_s: float = 1.0
    # The endpoint pool and model check (triton_pool.py): dns:// and file:// targets are
    # re-resolved this often; fp16 declares a reduced-precision backend (same top cell, cosine
    # >= 0.999); bundles without probes are refused unless allowed (served unchecked, warned).
    triton_resolve_interval_s: float = 5.0
    model_precision: str = "fp32"
    allow_bundle_without_probes: bool = False
    batch_window_ms: float = 2.0
    max_batch: int = 16
    preprocess_threads: int = 2
    preprocessing: str = "exact"
    exif_transpose: bool = False
    fast_decode: bool = False  # large JPEGs decoded at a reduced DCT scale (not the reference's pixels)
    max_message_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_input_side: int = DEFAULT_MAX_SIDE
    max_concurrent_rpcs: int = 1024
    memory_budget_mb: int = 512  # per worker: bytes the calls in flight hold (messages, decoded pixels); 0: off
    prefetch_background: bool = True  # start reading the background into the page cache at start-up
    max_connection_age_s: float = 0.0  # > 0: close client connections after this long (rebalancing)
    stream_in_flight: int = 64
    grace_s: float = 10.0
    pd_scales_km: tuple[float, ...] = DEFAULT_SCALES_KM
    top_k: int = DEFAULT_TOP_K
    eps_km: float = DEFAULT_EPS_KM
    conf_scale_km: float = DEFAULT_CONF_SCALE_KM
    conf_threshold: float = DEFAULT_CONF_THRESHOLD
    auth_token_file: str = ""  # bearer token required on Locator calls (health stays open)
    auth_token: str = ""  # the same, given directly ; the file wins
    tls_cert_file: str = ""  # PEM server certificate chain: TLS on the gRPC port when set
    tls_key_file: str = ""
    tls_client_ca_file: str = ""  # PEM CA: require client certificates (mutual TLS) when set
    log_level: str = "INFO"
    quiet_settings: bool = False
    # Admission control and named callers (swc_service.admission, swc_service.callers).
    callers_file: str = ""  # 'name:token' lines: named callers (the shared token stays caller "default")
    admission_initial_limit: int = 0  # calls in flight to Triton to start with; 0: max_batch
    admission_min_limit: int = 1  # the adaptive limit's floor
    admission_max_limit: int = 0  # 0: 4 x max_batch
    admission_adaptive: bool = True  # False: the limit stays admission_initial_limit
    admission_max_queue: int = 256  # calls waiting for a slot, all callers together
    admission_caller_max_in_flight: int = 0  # per caller; 0: no cap beyond the limit (round-robin)
    admission_caller_max_queued: int = 0  # per caller; 0: half of admission_max_queue
    admission_codel_target_ms: float = 500.0  # under a standing queue, the longest wait; 0: off
    admission_codel_interval_ms: float = 100.0  # a queue non-empty this long is standing (LIFO)
    admission_interactive_budget_ms: float = 5000.0  # LIFO + CoDel only for deadlines this close

    def validate(self) -> Settings:
        if self.conf_scale_km not in self.pd_scales_km:
            raise ValueError(f"conf_scale_km {self.conf_scale_km} is not one of pd_scales_km {self.pd_scales_km}")
        if self.model_precision not in MODEL_PRECISIONS:
            raise ValueError(f"model_precision must be one of {MODEL_PRECISIONS}, not {self.model_precision!r}")
        if self.triton_resolve_interval_s <= 0:
            raise ValueError("triton_resolve_interval_s must be > 0")
        parse_target(self.triton_url)  # a malformed target fails at start-up, naming itself
        if self.preprocessing not in PREPROCESSING_MODES:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING_MODES}")
        if self.workers < 1 or self.max_batch < 1 or self.preprocess_threads < 1:
            raise ValueError("workers, max_batch and preprocess_threads must be >= 1")
        if self.memory_budget_mb < 0:
            raise ValueError(f"memory_budget_mb must be >= 0 (0: no budget), not {self.memory_budget_mb}")
        if self.batch_window_ms < 0:
            raise ValueError("batch_window_ms must be >= 0")
        if not 0 <= self.health_port <= 65535:
            raise ValueError(f"health_port must be 0 (off) or 1..65535, not {self.health_port}")
        if self.health_port and self.health_port in (self.port, self.metrics_port):
            other = "port" if self.health_port == self.port else "metrics_port"
            raise ValueError(f"health_port {self.health_port} is the same as {other}: it needs a port of its own")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        self.admission_config()  # raises ValueError naming the bad limit
        return self

    def admission_config(self) -> AdmissionConfig:
        """The admission controller's limits; 0 means derived from the batcher's max batch."""
        initial = self.admission_initial_limit or self.max_batch
        maximum = self.admission_max_limit or max(4 * self.max_batch, initial)
        if self.admission_caller_max_in_flight < 0 or self.admission_caller_max_queued < 0:
            raise ValueError("admission_caller_max_in_flight and admission_caller_max_queued must be >= 0")
        return AdmissionConfig(
            initial_limit=initial,
            min_limit=self.admission_min_limit,
            max_limit=maximum,
            adaptive=self.admission_adaptive,
            max_queue=self.admission_max_queue,
            caller_max_in_flight=self.admission_caller_max_in_flight or None,
            caller_max_queued=self.admission_caller_max_queued or max(1, self.admission_max_queue // 2),
            codel_interval_s=self.admission_codel_interval_ms / 1000.0,
            codel_target_s=self.admission_codel_target_ms / 1000.0 if self.admission_codel_target_ms > 0 else None,
            interactive_budget_s=self.admission_interactive_budget_ms / 1000.0,
        )

    def token(self) -> str | None:
        """The bearer token callers must present, or None when auth is off."""
        if self.auth_token_file:
            token = Path(self.auth_token_file).read_text().strip()
            if not token:
                raise ValueError(f"auth token file {self.auth_token_file} is empty")
            return token
        return self.auth_token or None

    def callers(self) -> dict[str, str] | None:
        """{token: caller name} from the callers file plus the shared token (caller "default");
        None when neither is set (auth off: every call is caller "anonymous")."""
        token = self.token()
        if not self.callers_file and not token:
            return None
        return with_shared(load_callers(self.callers_file) if self.callers_file else {}, token)

    def describe(self) -> str:
        def shown(name: str):
            value = getattr(self, name)
            return "<redacted>" if name == "auth_token" and value else value

        return "\n".join(f"  {f.name} = {shown(f.name)!r}" for f in dataclasses.fields(self))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(sorted(float(x) for x in text.split(",") if x.strip()))


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not true/false: {text!r}")


def _switch_value(text: str) -> bool:
    try:
        return _bool(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_PARSERS = {int: int, float: float, bool: _bool, str: str}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Every flag: (group, what it does, unit, choices). `swc-service --help` prints them grouped,
# with the default and the environment variable; a test fails on a flag missing here.
GROUPS = ("serving", "Triton", "batching", "limits", "method", "admission", "security", "logging")
FLAGS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "bundle": ("serving", "the model bundle's directory", "", ()),
    "host": ("serving", "gRPC listen address (0.0.0.0 in containers)", "", ()),
    "port": ("serving", "gRPC port (Locator, health, reflection)", "", ()),
    "metrics_port": ("serving", "Prometheus /metrics port; 0: off", "", ()),
    "health_port": (
        "serving",
        "a second, always plaintext port serving only grpc.health.v1, for probes that cannot speak TLS; 0: off",
        "",
        (),
    ),
    "workers": ("serving", "worker processes sharing the port", "", ()),
    "reuse_port": ("serving", "bind with SO_REUSEPORT (set for the workers of a supervisor)", "", ()),
    "prefetch_background": (
        "serving",
        "read the background into the page cache at start-up, in the background",
        "",
        (),
    ),
    "max_connection_age_s": (
        "serving",
        "close client connections after this long, so round-robin clients find new pods; 0: never",
        "s",
        (),
    ),
    "grace_s": ("serving", "drain time on SIGTERM: in-flight calls finish, new ones are refused", "s", ()),
    "triton_url": ("Triton", "Triton gRPC target: HOST:PORT, H1:P1,H2:P2, dns:///NAME:PORT or file:///path", "", ()),
    "triton_model": ("Triton", "the model's name on Triton", "", ()),
    "triton_timeout_s": ("Triton", "the longest a call to Triton may take", "s", ()),
    "triton_health_interval_s": ("Triton", "how often each endpoint's readiness is checked", "s", ()),
    "triton_resolve_interval_s": ("Triton", "how often dns:/// and file:/// targets are resolved again", "s", ()),
    "model_precision": (
        "Triton",
        "the precision class the model check holds Triton to: fp32 accepts any fp32 "
        "implementation (TF32 on a GPU included), fp16 also a TensorRT FP16 engine",
        "",
        ("fp32", "fp16"),
    ),  # fmt: skip
    "allow_bundle_without_probes": (
        "Triton",
        "serve a bundle that cannot be checked (no probes, or no float64 reference) UNCHECKED, with a loud warning",
        "",
        (),
    ),
    "batch_window_ms": (
        "batching",
        "how long images wait for others of their shape before going to Triton as one batch",
        "ms",
        (),
    ),
    "max_batch": ("batching", "the most images in one Triton request", "images", ()),
    "preprocess_threads": ("batching", "threads decoding and resizing images", "", ()),
    "stream_in_flight": ("batching", "images of one LocateStream in flight at once", "images", ()),
    "max_message_bytes": ("limits", "the largest request accepted", "bytes", ()),
    "max_image_pixels": ("limits", "the most decoded pixels of one image (decompression bombs)", "pixels", ()),
    "max_input_side": ("limits", "the longest side of the preprocessed image", "px", ()),
    "memory_budget_mb": (
        "limits",
        "memory the calls in flight of one worker may hold (messages and decoded pixels); a call "
        "beyond it is refused at once with RESOURCE_EXHAUSTED, before decoding; 0: no budget",
        "MiB",
        (),
    ),
    "max_concurrent_rpcs": ("limits", "calls the gRPC server holds at once (beyond: RESOURCE_EXHAUSTED)", "", ()),
    "preprocessing": (
        "method",
        "exact keeps each photo's aspect ratio (the reference's); center_crop_300 gives "
        "every photo one shape (faster batching, other numbers)",
        "",
        PREPROCESSING_MODES,
    ),
    "exif_transpose": ("method", "apply the EXIF orientation before preprocessing (the reference does not)", "", ()),
    "fast_decode": (
        "method",
        "decode a JPEG much larger than the model input at a reduced DCT scale (still at least twice "
        "the input), then resize exactly: about half the CPU per 12 MP photo, pixels close to but not "
        "the reference's (docs/service.md, 'Fast decode')",
        "",
        (),
    ),
    "pd_scales_km": ("method", "Prediction Density scales, comma-separated", "km", ()),
    "top_k": ("method", "SwC: the most similar background images clustered (a call may ask for another)", "", ()),
    "eps_km": ("method", "SwC: DBSCAN neighbourhood radius (a call may ask for another)", "km", ()),
    "conf_scale_km": ("method", "the PD scale that gives the confidence (one of --pd-scales-km)", "km", ()),
    "conf_threshold": ("method", "confidence above which a photo is localizable", "", ()),
    "auth_token_file": (
        "security",
        "file holding the bearer token Locator calls must present (health stays open); wins over --auth-token",
        "",
        (),
    ),
    "auth_token": ("security", "the bearer token itself (prefer the file or the environment variable)", "", ()),
    "callers_file": ("security", "'name:token' lines: named callers, each with its own share of admission", "", ()),
    "tls_cert_file": ("security", "PEM server certificate chain: TLS on the gRPC port", "", ()),
    "tls_key_file": ("security", "PEM private key of --tls-cert-file", "", ()),
    "tls_client_ca_file": ("security", "PEM CA: require client certificates signed by it (mutual TLS)", "", ()),
    "admission_initial_limit": ("admission", "images in flight to Triton to start with; 0: --max-batch", "images", ()),
    "admission_min_limit": ("admission", "the adaptive in-flight limit's floor", "images", ()),
    "admission_max_limit": ("admission", "the adaptive in-flight limit's ceiling; 0: 4 x --max-batch", "images", ()),
    "admission_adaptive": (
        "admission",
        "adapt the in-flight limit to what Triton delivers (off: it stays at the initial limit)",
        "",
        (),
    ),
    "admission_max_queue": ("admission", "images waiting for a slot, all callers together", "images", ()),
    "admission_caller_max_in_flight": ("admission", "per caller; 0: no cap beyond the limit", "images", ()),
    "admission_caller_max_queued": ("admission", "per caller; 0: half of --admission-max-queue", "images", ()),
    "admission_codel_target_ms": (
        "admission",
        "CoDel: the longest wait of an interactive call under a standing "
        "queue (or a quarter of its deadline, if longer); 0: off",
        "ms",
        (),
    ),
    "admission_codel_interval_ms": (
        "admission",
        "CoDel: how long a queue stays non-empty before it counts as standing (and turns LIFO)",
        "ms",
        (),
    ),
    "admission_interactive_budget_ms": (
        "admission",
        "calls whose deadline is at most this far are interactive (LIFO + CoDel); others are batch work (FIFO)",
        "ms",
        (),
    ),
    "log_level": ("logging", "the service's log level", "", LOG_LEVELS),
    "quiet_settings": ("logging", "do not print the effective settings at start-up", "", ()),
}


def env_name(name: str) -> str:
    return "VISLOC_" + name.upper()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swc-service",
        description="visloc Locate gRPC service. Every flag also reads the environment variable named with it "
        "(VISLOC_<FLAG>); a flag beats the variable, the variable beats the default.",
    )
    groups = {g: p.add_argument_group(g) for g in GROUPS}
    for f in dataclasses.fields(Settings):
        group, what, unit, choices = FLAGS[f.name]
        flag = "--" + f.name.replace("_", "-")
        if f.default is dataclasses.MISSING:
            shown = "required"
        elif f.name == "pd_scales_km":
            shown = "default: " + ",".join(f"{x:g}" for x in f.default)
        else:
            shown = f"default: {'off' if f.default == '' else f.default}"
        text = f"{what}{f' [{unit}]' if unit else ''} ({shown}; env {env_name(f.name)})"
        g = groups[group]
        if isinstance(f.default, bool):  # a switch; --flag true/false still parses
            g.add_argument(
                flag, type=_switch_value, nargs="?", const=True, default=None, metavar="true|false", help=text
            )
            g.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const=False,
                           help=f"{flag} false")  # fmt: skip
        elif f.name == "pd_scales_km":
            g.add_argument(flag, type=_floats, default=None, metavar="KM,KM,...", help=text)
        else:
            parse = str if f.default is dataclasses.MISSING else _PARSERS[type(f.default)]
            g.add_argument(flag, type=parse, default=None, choices=choices or None, help=text)
    return p


def load_settings(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    args = vars(build_parser().parse_args(argv))
    values = {}
    for f in dataclasses.fields(Settings):
        value = args.get(f.name)
        if value is None and (raw := env.get("VISLOC_" + f.name.upper())) is not None:
            try:
                if f.name == "pd_scales_km":
                    value = _floats(raw)
                else:
                    value = _PARSERS[type(f.default) if f.default is not dataclasses.MISSING else str](raw)
                    choices = FLAGS[f.name][3]
                    if choices and value not in choices:
                        raise ValueError(f"must be one of {', '.join(choices)}")
            except ValueError as exc:
                raise ValueError(f"VISLOC_{f.name.upper()}={raw!r} is not valid for {f.name}: {exc}") from None
        if value is not None:
            values[f.name] = value
    if "bundle" not in values:
        raise SystemExit("swc-service: --bundle (or VISLOC_BUNDLE) is required")
    return Settings(**values).validate()
