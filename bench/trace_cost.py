"""What tracing costs: Locate throughput with tracing off and at 100 % sampling, side by side.

Two services on the same Triton, one without ``OTEL_*`` variables (tracing off) and one
exporting every call (``OTEL_TRACES_SAMPLER=always_on``) over OTLP/gRPC to a real receiver on
loopback (devtools.otlp_sink, in its own process); measured in turn, ``rounds`` times (off-on, on-off, ...), each
ratio taken within its round and the median reported, as the headline ratios of ``make bench``.
Also the service's CPU per image in each, and the spans the receiver got.

``python -m bench.trace_cost --bundle .cache/demo-bundle`` starts its own local Triton (and
updates the ``tracing`` entry of bench/results/bench.json and docs/BENCHMARKS.md when asked
with ``--update``); ``make bench`` runs it as step 10.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from devtools.net import free_port
from devtools.otlp_sink import OtlpSink


def log(msg: str) -> None:
    print(f"[trace_cost {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def measure(
    start_service: Callable[..., object],
    load: Callable[[object], dict],
    rounds: int = 3,
) -> dict:
    """``start_service(env=...)`` -> a service (``.stop()``); ``load(service)`` -> a load row
    (``per_s``, ``cpu_ms_per_image``{"service": ...}) at a fixed concurrency."""
    port = free_port()
    receiver = subprocess.Popen(
        [sys.executable, "-m", "devtools.otlp_sink", "--port", str(port)], stdout=subprocess.PIPE, text=True
    )  # its own process: parsing spans must not slow the load generator
    try:
        assert receiver.stdout is not None and "listening" in receiver.stdout.readline()
        off = start_service(env={})
        on = start_service(env=OtlpSink.env_for(f"http://127.0.0.1:{port}", OTEL_TRACES_SAMPLER="always_on"))
        try:
            rows = []
            for i in range(rounds):
                # Alternating which goes first, so that neither gains from the order.
                first, second = ("off", "on") if i % 2 == 0 else ("on", "off")
                row = {first: load(off if first == "off" else on)}
                row[second] = load(off if second == "off" else on)
                row["ratio"] = row["on"]["per_s"] / row["off"]["per_s"]
                log(
                    f"round {i + 1}: off {row['off']['per_s']:.2f}, 100 % {row['on']['per_s']:.2f} img/s "
                    f"(ratio {row['ratio']:.3f}); service CPU {row['off']['cpu_ms_per_image']['service']:.2f} vs "
                    f"{row['on']['cpu_ms_per_image']['service']:.2f} ms/image"
                )
                rows.append(row)
        finally:
            off.stop()
            on.stop()  # its provider's shutdown exports the last spans
    finally:
        receiver.terminate()
        out, _ = receiver.communicate(timeout=30)
    spans = json.loads(out.strip().splitlines()[-1])["spans"]
    images = sum(r["on"]["calls"] for r in rows)
    cpu = {k: _median([r[k]["cpu_ms_per_image"]["service"] for r in rows]) for k in ("off", "on")}
    stack = _median([sum(v for p, v in r["off"]["cpu_ms_per_image"].items() if p != "load_generator") for r in rows])
    return {
        "rounds": rows,
        "ratio": _median([r["ratio"] for r in rows]),
        "service_cpu_ms": cpu,
        # The CPU tracing adds per image, as a share of the stack's CPU per image (service and
        # Triton): the throughput it can cost when the CPUs are the bottleneck.
        "stack_cpu_ms": stack,
        "cpu_share": (cpu["on"] - cpu["off"]) / stack,
        "spans_received": spans,
        "spans_per_call": spans / max(1, images),
    }


def main(argv: list[str] | None = None) -> int:
    from bench.run import SHAPE, Service, locate_calls
    from bench.run import measure as measure_load
    from devtools.triton_local import LocalTriton
    from visloc_export import samples

    p = argparse.ArgumentParser(prog="python -m bench.trace_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=".cache/demo-bundle")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--update", action="store_true", help="write into bench/results/bench.json and docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    bundle = Path(args.bundle)
    images = [samples.photo_bytes(s, SHAPE) for s in range(16)]
    with LocalTriton(bundle, threads=2, max_batch_size=args.max_batch) as triton:

        def load(svc) -> dict:
            pids = {"service": svc.proc.pid, "triton": triton.pid}
            return measure_load(locate_calls(svc.target, images), pids, args.concurrency, args.seconds)

        def start(env: dict) -> Service:
            return Service(bundle, triton.grpc_url, "--max-batch", str(args.max_batch), env=env)

        result = measure(start, load, args.rounds)
    result |= {"concurrency": args.concurrency, "seconds": args.seconds, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    if args.update:
        from bench.report import update_results

        update_results("tracing", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
