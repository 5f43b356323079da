"""``make demo``: the local stack up (embedded Triton + Locate service), sample photos located.

Locates generated sample images through the gRPC ``Locate`` endpoint with the client library,
prints a table, then keeps serving until Ctrl-C (``DEMO_ONESHOT=1``: stop after the table),
always stopping every process it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from devtools.net import free_port, wait_serving
from devtools.triton_local import LocalTriton
from swc_service.bundle import load_bundle
from visloc_client import LocatorClient
from visloc_client.web import WebApp
from visloc_client.web import start as start_web
from visloc_export import samples

SAMPLES = 8


def write_samples(directory: Path, count: int = SAMPLES) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        path = directory / f"sample_{seed:02d}.jpg"
        if not path.exists():
            path.write_bytes(samples.photo_bytes(seed))
        paths.append(path)
    return paths


def print_table(rows: list[tuple[str, object]]) -> None:
    header = (
        f"{'image':<16} {'input':>9} {'lat':>9} {'lon':>10} {'method':>6} {'cell':>6} {'conf@25km':>9}  localizable"
    )
    print(header)
    print("-" * len(header))
    for name, r in rows:
        if isinstance(r, Exception):
            print(f"{name:<16} ERROR {r}")
            continue
        print(
            f"{name:<16} {r.input_width:>4}x{r.input_height:<4} {r.lat:>9.4f} {r.lon:>10.4f} {r.method.value:>6} "
            f"{r.top_cell.id:>6} {r.confidence:>9.3f}  {'yes' if r.localizable else 'no'}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.demo", description=__doc__)
    p.add_argument("--bundle", required=True)
    p.add_argument("--images", default=".cache/demo-images", help="where the sample photos are written")
    p.add_argument("--oneshot", action="store_true", default=os.environ.get("DEMO_ONESHOT") == "1")
    args = p.parse_args(argv)

    bundle = load_bundle(args.bundle)
    if bundle.source == "demo":
        print(f"NOTE: {bundle.manifest.get('warning', 'demo bundle')}\n")
    grpc_port, metrics_port = free_port(preferred=50051), free_port(preferred=9090)
    workdir = Path(".cache/triton")
    defaults = {"grpc_port": 8001, "http_port": 8000, "metrics_port": 8002}
    ports = {name: free_port(preferred=port) for name, port in defaults.items()}
    triton = LocalTriton(args.bundle, workdir, **ports)
    service = web = web_client = None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        print(f"starting Triton (log: {workdir / 'tritonserver.log'}) ...", flush=True)
        triton.start()
        cmd = [sys.executable, "-m", "swc_service.server", "--bundle", args.bundle, "--port", str(grpc_port),
               "--metrics-port", str(metrics_port), "--triton-url", triton.grpc_url]  # fmt: skip
        print("starting the Locate service ...", flush=True)
        service = subprocess.Popen(cmd)
        target = f"127.0.0.1:{grpc_port}"
        with LocatorClient(target, timeout=60) as client:
            wait_serving(target, timeout=60, proc=service)
            rows: list[tuple[str, object]] = []
            for path in write_samples(Path(args.images)):
                try:
                    rows.append((path.name, client.locate(path)))
                except Exception as exc:  # noqa: BLE001 - shown in the table, the demo goes on
                    rows.append((path.name, exc))
        print()
        print_table(rows)
        print(
            f"\nLocate service  grpc://{target}  (metrics http://127.0.0.1:{metrics_port}/metrics)\n"
            f"Triton          grpc://{triton.grpc_url}  http://{triton.http_url}  metrics {triton.metrics_url}\n"
            f"Try:  .venv/bin/visloc --target {target} locate {args.images}/sample_00.jpg --json"
        )
        failed = sum(isinstance(r, Exception) for _, r in rows)
        if args.oneshot:
            return 1 if failed else 0
        web_client = LocatorClient(target, timeout=60)
        web = start_web(WebApp(web_client), "127.0.0.1", free_port(preferred=8080))
        print(f"Web page        {web.url}   (drop a photo there)")
        print("\nServing until Ctrl-C ...", flush=True)
        while not stop.is_set() and service.poll() is None and triton.running():
            stop.wait(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if web is not None:
            web.shutdown()
            web.server_close()
        if web_client is not None:
            web_client.close()
        if service is not None and service.poll() is None:
            service.send_signal(signal.SIGTERM)
            try:
                service.wait(30)
            except subprocess.TimeoutExpired:
                service.kill()
        triton.stop()
        print("stopped Triton and the Locate service", flush=True)


if __name__ == "__main__":
    sys.exit(main())
