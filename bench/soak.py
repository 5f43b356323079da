"""A bounded soak: Locate at saturation over loopback, watching errors, memory and fds.

``make soak`` (SOAK_SECONDS, default 600) starts its own local stack on the demo bundle;
tests/test_reliability.py runs a short version against the test stack. Loopback only; every
loop is bounded in time and count, and the command stops by itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass

import grpc

from bench.procstat import ProcStat, proc_stat
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc
from visloc_export import samples


@dataclass
class SoakReport:
    seconds: float
    concurrency: int
    calls: int
    codes: dict[str, int]
    rate_per_s: float
    start: ProcStat
    end: ProcStat
    mid: ProcStat | None = None  # halfway: first-touch allocations (arenas, buffers) have settled

    @property
    def late_anon_growth(self) -> float:
        """Growth past the highest earlier sample (start, halfway): a leak keeps growing; warm-up
        allocations and the allocator's give-and-take (anon RSS went 80 -> 72 -> 76 MB in one
        run) do not."""
        base = max(self.start.rss_anon_kb, self.mid.rss_anon_kb if self.mid else 0)
        return self.end.rss_anon_kb / max(1, base) - 1

    @property
    def errors(self) -> int:
        return sum(n for code, n in self.codes.items() if code != "OK")

    @property
    def anon_growth(self) -> float:
        return self.end.rss_anon_kb / max(1, self.start.rss_anon_kb) - 1

    @property
    def rss_growth(self) -> float:
        return self.end.rss_kb / max(1, self.start.rss_kb) - 1

    def as_dict(self) -> dict:
        return asdict(self) | {"errors": self.errors, "anon_growth": self.anon_growth, "rss_growth": self.rss_growth,
                               "late_anon_growth": self.late_anon_growth}  # fmt: skip


def soak(target: str, pid: int, seconds: float, concurrency: int = 8, warmup_s: float = 3.0,
         max_calls: int = 1_000_000, progress: bool = False) -> SoakReport:  # fmt: skip
    """Keep ``concurrency`` Locate calls in flight for ``seconds`` after a warm-up."""
    images = [samples.photo_bytes(seed) for seed in range(16)]
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    stop_at = [time.monotonic() + warmup_s]
    measuring = threading.Event()

    def worker(offset: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.LocatorStub(channel)
            i = offset
            while time.monotonic() < stop_at[0]:
                try:
                    stub.Locate(pb.LocateRequest(image=images[i % len(images)]), timeout=30)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                i += concurrency
                if measuring.is_set():
                    with lock:
                        codes[code] += 1
                        if sum(codes.values()) >= max_calls:
                            stop_at[0] = 0

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(warmup_s)
    start = proc_stat(pid)
    measuring.set()
    began = time.monotonic()
    stop_at[0] = began + seconds
    half_at, mid = began + seconds / 2, None
    while time.monotonic() < stop_at[0]:
        now = time.monotonic()
        wake = half_at if mid is None and half_at > now else stop_at[0]
        time.sleep(min(5.0, max(0.0, wake - now)))
        if mid is None and time.monotonic() >= half_at:
            mid = proc_stat(pid)
        if progress:
            done = time.monotonic() - began
            print(f"soak {done:6.0f}/{seconds:.0f} s  calls {sum(codes.values())}  errors "
                  f"{sum(n for c, n in codes.items() if c != 'OK')}", file=sys.stderr, flush=True)  # fmt: skip
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - began
    end = proc_stat(pid)
    calls = sum(codes.values())
    return SoakReport(elapsed, concurrency, calls, dict(codes), calls / elapsed, start, end, mid)


def main(argv: list[str] | None = None) -> int:
    import os
    import subprocess

    from devtools.triton_local import LocalTriton

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bundle", default=".cache/demo-bundle")
    p.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 600)))
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", default="bench/results/soak.json")
    args = p.parse_args(argv)

    import socket

    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port = free()
    with LocalTriton(args.bundle, threads=2) as triton:
        cmd = [sys.executable, "-m", "swc_service.server", "--bundle", args.bundle, "--port", str(port),
               "--metrics-port", "0", "--triton-url", triton.grpc_url, "--log-level", "WARNING"]  # fmt: skip
        svc = subprocess.Popen(cmd)
        try:
            target = f"127.0.0.1:{port}"
            grpc.channel_ready_future(grpc.insecure_channel(target)).result(timeout=60)
            report = soak(target, svc.pid, args.seconds, args.concurrency, progress=True)
        finally:
            svc.terminate()
            svc.wait(30)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report.as_dict(), f, indent=2)
    print(json.dumps(report.as_dict(), indent=2))
    ok = report.errors == 0 and report.anon_growth < 0.05 and report.end.fds <= report.start.fds + 2
    print("soak", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
