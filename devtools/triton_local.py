"""Embedded local Triton: the PyPI ``tritonserver`` binary serving a bundle's ONNX model.

Production runs the NGC Triton container with the onnxruntime backend on a GPU
(``model_repository/visloc/config.pbtxt``). Where there is no Docker or GPU (a laptop, CI,
this machine) the default is still a REAL Triton: the ``tritonserver`` 2.51 shipped in the
``nvidia-pytriton`` wheel, which has only the Python backend. This module renders a model
repository for it from the production config (one source of truth for the tensor contract:
only the backend, the instance kind and the GPU-only settings change), adds
``triton_model/model.py`` (onnxruntime inside the Python backend), starts ``tritonserver``,
waits until the model is ready and stops it with everything it spawned.

The production config contract itself is :mod:`swc_service.triton_config`.

Python API::

    with LocalTriton(bundle_dir) as triton:          # free loopback ports, temporary workdir
        client = tritonclient.grpc.InferenceServerClient(triton.grpc_url)

Console script: ``visloc-triton --bundle DIR [--grpc-port 8001 ...]`` (``--help``).

Versions side by side: the model's version directory is the bundle's ``triton_version`` (what
the service asks for) and Triton runs with explicit model control, so a second bundle's model
is loaded next to the first and the old one unloaded while the server runs::

    triton.add_bundle(other_dir); triton.remove_bundle(old_dir)          # Python
    visloc-triton add --workdir W --url 127.0.0.1:8001 --bundle B         # CLI (W: the launcher's)
    visloc-triton remove --workdir W --url 127.0.0.1:8001 --bundle A

Triton's load of an already loaded model reloads it with every version directory present
(``version_policy: all``): versions that did not change keep serving throughout, a new one is
loaded, a removed one is unloaded once its requests finish.

Linux only (like the wheel). The server gets PR_SET_PDEATHSIG, so it also goes when the
launcher is killed with SIGKILL; its Python-backend stubs follow it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from tritonclient.grpc import model_config_pb2 as mc

import swc_service
from devtools.net import free_port
from swc_service import bundle as B
from swc_service.triton_config import (
    MODEL_NAME,
    PRODUCTION_CONFIG,
    TritonError,
    config_text,
    load_production_config,
    production_config,
)

__all__ = ["LocalTriton", "TritonError", "local_config", "load_production_config", "main", "MODEL_NAME"]

MODEL_PY = Path(swc_service.__file__).resolve().parent / "triton_model" / "model.py"
# Python-backend shared memory per stub: a batch of 32 photos of 300x533 is 15 MiB of input.
SHM_DEFAULT_BYTES = 16 << 20
SHM_GROWTH_BYTES = 16 << 20
_PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------- configs


def local_config(
    num_cells: int,
    *,
    path: str | os.PathLike[str] | None = None,
    threads: int = 0,
    instances: int = 1,
    max_batch_size: int | None = None,
    max_queue_delay_us: int | None = None,
) -> mc.ModelConfig:
    """The production config turned into a Python-backend CPU config; the tensors stay as they are."""
    cfg = production_config(num_cells, path)
    cfg.backend = "python"
    cfg.ClearField("optimization")  # onnxruntime-backend accelerators (TensorRT)
    cfg.ClearField("parameters")  # onnxruntime-backend knobs (cuDNN search)
    cfg.parameters["intra_op_threads"].string_value = str(threads)
    cfg.parameters["model_filename"].string_value = B.MODEL
    del cfg.instance_group[:]
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
    if max_batch_size is not None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 (the tensors have a batch dim), got {max_batch_size}")
        cfg.max_batch_size = max_batch_size
    # tritonserver 2.51 crashes (SIGSEGV) on a warmup batch larger than max_batch_size.
    warmups = [w for w in cfg.model_warmup if w.batch_size <= cfg.max_batch_size]
    del cfg.model_warmup[:]
    cfg.model_warmup.extend(warmups)
    if max_queue_delay_us is not None:
        cfg.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    return cfg


# --------------------------------------------------------------------------- the binary


def _wheel_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise TritonError("nvidia-pytriton is not installed: pip install 'visloc-swc-service[triton]'")
    return Path(next(iter(spec.submodule_search_locations)))


def _server_env() -> dict[str, str]:
    """Environment for tritonserver and its stubs: the wheel's libs and this Python's libpython
    (else the stub loads the system one against our stdlib); this venv's bin first on PATH, so
    the stub's embedded Python finds the venv and imports its numpy and onnxruntime."""
    env = dict(os.environ)

    def prepend(key: str, *values: str) -> None:
        env[key] = os.pathsep.join([*values, *([env[key]] if env.get(key) else [])])

    prepend("LD_LIBRARY_PATH", str(_wheel_dir().parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR"))
    prepend("PATH", str(Path(sys.executable).parent))
    return env


def _pdeathsig_preexec() -> object:
    """A preexec_fn giving the child SIGTERM when the thread that forked it dies (with the launcher)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: nothing to load in the child
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class LocalTriton:
    """One ``tritonserver`` process serving one bundle as model ``visloc``; a context manager.

    Ports 0 mean "any free port" (chosen at construction, so the URLs are known before
    :meth:`start`). ``workdir`` None means a temporary directory removed by :meth:`stop`;
    a given one is kept (it holds the rendered repository and ``tritonserver.log``).
    ``threads`` is onnxruntime's intra-op thread count (0: its default); ``max_batch_size`` and
    ``max_queue_delay_us`` default to the production config's values; ``extra_args`` are more
    ``tritonserver`` flags.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        workdir: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        threads: int = 0,
        instances: int = 1,
        max_batch_size: int | None = None,
        max_queue_delay_us: int | None = None,
        log_file: str | os.PathLike[str] | None = None,
        config_path: str | os.PathLike[str] | None = None,
        exit_timeout_s: int = 10,
        extra_args: tuple[str, ...] = (),
    ):
        self.bundle = B.load_bundle(bundle_dir)
        self.extra_args = tuple(extra_args)  # more tritonserver flags (e.g. --trace-config)
        self.config = local_config(
            self.bundle.num_cells,
            path=config_path,
            threads=threads,
            instances=instances,
            max_batch_size=max_batch_size,
            max_queue_delay_us=max_queue_delay_us,
        )
        self._config_source = str(config_path or PRODUCTION_CONFIG)
        self.host = host
        self.grpc_port, self.http_port, self.metrics_port = (
            p or free_port(host) for p in (grpc_port, http_port, metrics_port)
        )
        self._workdir_arg = Path(workdir) if workdir is not None else None
        self._log_arg = Path(log_file) if log_file is not None else None
        self.exit_timeout_s = exit_timeout_s
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._release = threading.Event()
        self._shm_prefix = ""

    # -- addresses (clients connect over loopback when the server listens on all interfaces)
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def grpc_url(self) -> str:
        """``host:port`` for ``tritonclient.grpc.InferenceServerClient``."""
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``host:port`` for ``tritonclient.http.InferenceServerClient``."""
        return f"{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus endpoint."""
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        """tritonserver's pid (also its process group id), None when not started."""
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle
    def __enter__(self) -> LocalTriton:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def render(self) -> Path:
        """Write ``models/`` and ``backends/`` under the workdir; returns the workdir."""
        if self.workdir is None:
            if self._workdir_arg is None:
                self.workdir = Path(tempfile.mkdtemp(prefix="visloc-triton-"))
            else:
                self.workdir = self._workdir_arg.resolve()
                self.workdir.mkdir(parents=True, exist_ok=True)
        wheel = _wheel_dir() / "tritonserver"
        stub = wheel / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}"
        stub /= "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonError(f"the wheel has no Python-backend stub for this Python: {stub}")
        for sub in ("models", "backends"):
            shutil.rmtree(self.workdir / sub, ignore_errors=True)
        backend = self.workdir / "backends" / "python"
        shutil.copytree(wheel / "backends" / "python", backend, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, backend / stub.name)  # the backend looks for its stub next to itself
        model_dir = self.workdir / "models" / MODEL_NAME
        model_dir.mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(config_text(self.config, self._config_source))
        write_version(model_dir, self.bundle)
        return self.workdir

    @property
    def model_dir(self) -> Path:
        assert self.workdir is not None, "render() or start() first"
        return self.workdir / "models" / MODEL_NAME

    def add_bundle(self, bundle_dir: str | os.PathLike[str], timeout_s: float = 180.0) -> str:
        """Load another bundle's model next to the served ones; returns its Triton version."""
        return add_bundle(self.model_dir, bundle_dir, self.grpc_url, timeout_s)

    def remove_bundle(self, bundle_dir: str | os.PathLike[str], timeout_s: float = 180.0) -> str:
        """Unload a bundle's model version (the others keep serving); returns its Triton version."""
        return remove_bundle(self.model_dir, bundle_dir, self.grpc_url, timeout_s)

    def command(self) -> list[str]:
        assert self.workdir is not None
        h, exe = self.host, _wheel_dir() / "tritonserver" / "bin" / "tritonserver"
        return [
            str(exe),
            f"--model-repository={self.workdir / 'models'}",
            f"--backend-directory={self.workdir / 'backends'}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}",
            "--model-control-mode=explicit",  # versions are added and removed at run time
            f"--load-model={MODEL_NAME}",
            "--disable-auto-complete-config",
            f"--grpc-address={h}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={h}",
            f"--http-port={self.http_port}",
            "--allow-metrics=true",
            f"--metrics-address={h}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            *self.extra_args,
        ]

    def start(self, timeout: float = 180.0) -> LocalTriton:
        """Render, launch and wait until the server and model are ready; raises :class:`TritonError`."""
        if self.running():
            return self
        try:
            self.render()
            assert self.workdir is not None
            self.log_path = (self._log_arg or self.workdir / "tritonserver.log").resolve()
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._shm_prefix = f"visloc{os.getpid()}-{secrets.token_hex(4)}-"
            self._proc = self._spawn(self.command(), self.log_path)
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        """Fork from a thread that lives until :meth:`stop`: PR_SET_PDEATHSIG fires when the
        forking THREAD exits, so forking from a short-lived caller thread would kill the server."""
        box: dict[str, object] = {}
        forked = threading.Event()
        self._release.clear()
        preexec = _pdeathsig_preexec()

        def hold() -> None:
            try:
                with open(log_path, "wb") as log:  # stubs inherit it: their tracebacks land here too
                    box["proc"] = subprocess.Popen(
                        cmd,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=_server_env(),
                        cwd=self.workdir,
                        start_new_session=True,  # its own process group: stop() signals the stubs too
                        preexec_fn=preexec,
                    )
            except BaseException as exc:
                box["error"] = exc
            forked.set()
            self._release.wait()

        threading.Thread(target=hold, name="visloc-triton-parent", daemon=True).start()
        forked.wait()
        if "error" in box:
            raise TritonError(f"cannot start tritonserver: {box['error']}")
        return box["proc"]  # type: ignore[return-value]

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            assert self._proc is not None
            rc = self._proc.poll()
            if rc is not None:
                raise TritonError(f"tritonserver exited with status {rc} while starting\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TritonError(f"tritonserver not ready after {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.2)

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until tritonserver exits (its status) or ``timeout`` passes (None)."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """SIGTERM tritonserver (it unloads the model and ends its stubs), wait up to the exit
        timeout, then SIGKILL whatever is left in its process group. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(self.exit_timeout_s + 5)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # leftover stubs (a no-op when all are gone)
            proc.wait()
        self._release.set()
        if self._shm_prefix:  # regions a killed stub could not unlink
            for f in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
                f.unlink(missing_ok=True)
        if self.workdir is not None and self._workdir_arg is None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def log_tail(self, lines: int = 20) -> str:
        """The log's error lines, then its last lines (its ASCII tables left out), for error messages."""
        if self.log_path is None or not self.log_path.is_file():
            return "(no tritonserver log)"
        text = [s for s in self.log_path.read_text(errors="replace").splitlines() if s.strip()]
        text = [s for s in text if not s.startswith(("+", "|"))]
        errors = [s for s in text if s.startswith("E") and s not in text[-lines:]][-10:]
        head = "--- errors ---\n" + "\n".join(errors) + "\n" if errors else ""
        return f"{head}--- last lines of {self.log_path} ---\n" + "\n".join(text[-lines:])


# --------------------------------------------------------------------------- versions


def write_version(model_dir: Path, bundle: B.Bundle) -> Path:
    """``<model_dir>/<bundle.triton_version>/``: the Python-backend model and a link to the bundle's ONNX."""
    version = model_dir / bundle.triton_version
    if version.exists():
        shutil.rmtree(version)
    tmp = model_dir / f".{bundle.triton_version}.tmp"  # not a number: Triton ignores it
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shutil.copyfile(MODEL_PY, tmp / "model.py")
    (tmp / B.MODEL).symlink_to(bundle.model_path.resolve())
    os.rename(tmp, version)
    return version


def served_versions(model_dir: str | os.PathLike[str]) -> list[str]:
    """The version directories of the rendered model (what a load serves)."""
    return sorted(p.name for p in Path(model_dir).iterdir() if p.is_dir() and p.name.isdigit())


def _config_cells(model_dir: Path) -> int:
    from google.protobuf import text_format

    cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    return int(next(o.dims[0] for o in cfg.output if o.name == B.OUTPUT_PROBS))


def _reload(url: str, timeout_s: float) -> None:
    """Triton's load of the (already loaded) model: it serves the version directories present now."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with grpcclient.InferenceServerClient(url) as client:
        try:
            client.load_model(MODEL_NAME, client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise TritonError(f"Triton at {url} did not load {MODEL_NAME}: {exc.message()}") from exc


def add_bundle(model_dir: str | os.PathLike[str], bundle_dir: str | os.PathLike[str], url: str,
               timeout_s: float = 180.0) -> str:  # fmt: skip
    """Write the bundle's version into the rendered model and have Triton load it (the versions
    already served keep serving). The bundle must have the served config's cell count."""
    model_dir, bundle = Path(model_dir), B.load_bundle(bundle_dir)
    cells = _config_cells(model_dir)
    if bundle.num_cells != cells:
        raise TritonError(
            f"bundle {bundle.path} has M={bundle.num_cells} cells, the served config's {B.OUTPUT_PROBS} has {cells}: "
            f"versions of one model share its config (serve it with its own visloc-triton)"
        )
    existed = (model_dir / bundle.triton_version).is_dir()
    write_version(model_dir, bundle)
    try:
        _reload(url, timeout_s)
    except TritonError:
        if not existed:  # leave the repository as it was
            shutil.rmtree(model_dir / bundle.triton_version, ignore_errors=True)
        raise
    return bundle.triton_version


def remove_bundle(model_dir: str | os.PathLike[str], bundle_dir: str | os.PathLike[str], url: str,
                  timeout_s: float = 180.0) -> str:  # fmt: skip
    """Remove the bundle's version and have Triton reload: it unloads that version only."""
    model_dir, bundle = Path(model_dir), B.load_bundle(bundle_dir)
    version = bundle.triton_version
    present = served_versions(model_dir)
    if version not in present:
        raise TritonError(f"bundle {bundle.path} (Triton version {version}) is not served; served: {present}")
    if present == [version]:
        raise TritonError(f"version {version} is the only one served: add the next bundle before removing it")
    shutil.rmtree(model_dir / version)
    _reload(url, timeout_s)
    return version


def _version_main(argv: list[str]) -> int:
    """``visloc-triton add|remove --workdir W --url HOST:PORT --bundle DIR``."""
    p = argparse.ArgumentParser(prog=f"visloc-triton {argv[0]}", description=(
        "Load a bundle's model next to the served ones (add) or unload one version (remove) in a running "
        "visloc-triton, whose --workdir (printed when it is ready) holds the rendered repository."))  # fmt: skip
    p.add_argument("--workdir", required=True, help="the running launcher's workdir")
    p.add_argument("--url", default="127.0.0.1:8001", help="its gRPC address")
    p.add_argument("--bundle", required=True, help="bundle directory")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the load")
    args = p.parse_args(argv[1:])
    action = add_bundle if argv[0] == "add" else remove_bundle
    try:
        version = action(Path(args.workdir) / "models" / MODEL_NAME, args.bundle, args.url, args.timeout)
    except (TritonError, B.BundleError) as exc:
        print(f"visloc-triton {argv[0]}: {exc}", file=sys.stderr)
        return 1
    served = served_versions(Path(args.workdir) / "models" / MODEL_NAME)
    print(f"visloc-triton {argv[0]}: version {version} ({args.bundle}); Triton serves versions {served}", flush=True)
    return 0


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="visloc-triton",
        description="Serve a bundle's model with the local tritonserver (Python backend + onnxruntime).",
        epilog="At run time: `visloc-triton add|remove --workdir W --url HOST:PORT --bundle DIR` loads another "
        "bundle's model version next to the served ones, or unloads one (W: printed when ready).",
    )
    p.add_argument("--bundle", required=True, help="bundle directory (visloc-export demo|upstream)")
    p.add_argument("--workdir", help="where to render the repository and log (default: a temporary directory)")
    p.add_argument("--host", default="127.0.0.1", help="listen address; 0.0.0.0 inside a container")
    p.add_argument("--grpc-port", type=int, default=8001, help="KServe v2 gRPC port (what the service calls)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (/v2/health/ready for probes)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Triton's Prometheus /metrics port")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--instances", type=int, default=1, help="model instances (each one its own stub process)")
    p.add_argument("--max-batch-size", type=int, help="default: the production config's")
    p.add_argument("--max-queue-delay-us", type=int, help="default: the production config's")
    p.add_argument("--log-file", help="tritonserver log (default: WORKDIR/tritonserver.log)")
    p.add_argument("--config", help=f"production config.pbtxt (default: {PRODUCTION_CONFIG})")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    p.add_argument("--exit-timeout", type=int, default=10, help="tritonserver --exit-timeout-secs")
    p.add_argument(
        "--print-config",
        choices=("production", "local"),
        help="print the config rendered for this bundle (production: onnxruntime on GPU) and exit",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("add", "remove"):
        return _version_main(argv)
    args = build_parser().parse_args(argv)
    tuning = {k: getattr(args, k) for k in ("threads", "instances", "max_batch_size", "max_queue_delay_us")}
    if args.print_config:
        m = B.load_bundle(args.bundle).num_cells
        production = args.print_config == "production"
        cfg = production_config(m, args.config) if production else local_config(m, path=args.config, **tuning)
        print(config_text(cfg, str(args.config or PRODUCTION_CONFIG)), end="")
        return 0

    def on_signal(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop at a time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ports = {"grpc_port": args.grpc_port, "http_port": args.http_port, "metrics_port": args.metrics_port}
    server = LocalTriton(args.bundle, args.workdir, host=args.host, log_file=args.log_file, config_path=args.config,
                         exit_timeout_s=args.exit_timeout, **ports, **tuning)  # fmt: skip
    try:
        server.start(args.timeout)
        print(
            f"visloc-triton ready: model {MODEL_NAME} version {server.bundle.triton_version} (bundle "
            f"{server.bundle.bundle_id}, M={server.bundle.num_cells}) grpc={server.grpc_url} http={server.http_url} "
            f"metrics={server.metrics_url} pid={server.pid} workdir={server.workdir} log={server.log_path}",
            flush=True,
        )
        rc = server.wait()
        print(f"visloc-triton: tritonserver exited with status {rc}\n{server.log_tail()}", file=sys.stderr)
        return 1
    except TritonError as exc:
        print(f"visloc-triton: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
