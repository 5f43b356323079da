"""A burst of phone photos against one worker: does its memory stay within the budget?

``--clients`` callers (48), each on its own connection, send a 12 MP JPEG of ~13 MB at once,
with ``--deadline-s`` (20 s), ``--rounds`` times (3); then one small photo. Measured on the
service process (one worker): its resident memory before the burst (warm) and its peak during
it (``VmHWM`` after resetting it through ``/proc/PID/clear_refs``, and a 5 ms poll of
``VmRSS``, whichever is larger), and the status of every call. Run with the worker's default
memory budget and without one (``--memory-budget-mb 0``), one after the other on the same
Triton, so the difference is the budget's. Refused calls are counted by the reason the service
gives them (its ``visloc_admission_shed_total`` counter, read from the worker's metrics).

``python -m bench.burst --bundle .cache/demo-bundle`` starts its own local Triton; ``make bench``
runs it as step 9.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench import photos
from bench.procstat import proc_stat
from devtools.net import free_port
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc

MB = 1 << 20
PHOTO = (4032, 3024)


def log(msg: str) -> None:
    print(f"[burst {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def big_photo(seed: int) -> bytes:
    """A 12 MP JPEG of ~13 MB: strong detail at quality 99 (a phone's fine-detail setting)."""
    buf = io.BytesIO()
    Image.fromarray(photos.pixels(*PHOTO, seed, detail=5.0)).save(buf, format="JPEG", quality=99)
    return buf.getvalue()


class PeakRss:
    """The peak resident memory of ``pid`` from now until :meth:`stop`, in bytes."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cleared = _clear_peak(pid)
        self.peak = proc_stat(pid).rss_kb * 1024
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, proc_stat(self.pid).rss_kb * 1024)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        if self.cleared:
            self.peak = max(self.peak, _vm_hwm(self.pid))
        return self.peak


def _clear_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


async def burst(target: str, files: list[bytes], clients: int, rounds: int, deadline_s: float) -> Counter:
    """``clients`` callers on their own connections, ``rounds`` photos each, all at once per round."""
    codes: Counter = Counter()
    options = [("grpc.max_send_message_length", 64 * MB), ("grpc.max_receive_message_length", 64 * MB)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(clients)]
    try:
        stubs = [pb_grpc.LocatorStub(ch) for ch in channels]

        async def one(i: int) -> None:
            try:
                await stubs[i].Locate(pb.LocateRequest(image=files[i % len(files)]), timeout=deadline_s)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as err:
                codes[err.code().name] += 1

        for r in range(rounds):
            await asyncio.gather(*(one(i) for i in range(clients)))
            log(f"   round {r + 1}: {dict(codes)}")
    finally:
        for ch in channels:
            await ch.close()
    return codes


def small_call(target: str) -> str:
    """One 640 x 480 photo right after the burst: the status it gets."""
    data = photos.encode(photos.MIX[4], seed=99)
    with grpc.insecure_channel(target) as ch:
        try:
            pb_grpc.LocatorStub(ch).Locate(pb.LocateRequest(image=data), timeout=30)
            return "OK"
        except grpc.RpcError as err:
            return err.code().name


def shed_by_reason(metrics_text: str) -> dict[str, int]:
    """Calls the service shed, by reason (summed over callers), from its Prometheus metrics."""
    shed: Counter = Counter()
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "visloc_admission_shed":
            for sample in family.samples:
                if sample.name == "visloc_admission_shed_total" and sample.value:
                    shed[sample.labels["reason"]] += int(sample.value)
    return dict(shed)


def run(start_service, files: list[bytes], clients: int, rounds: int, deadline_s: float, budget_mb: int) -> dict:
    """One burst against a fresh service started by ``start_service(*flags)`` (with ``.target``,
    ``.proc``, ``.stop()``)."""
    metrics_port = free_port()
    svc = start_service(
        "--memory-budget-mb", str(budget_mb), "--max-message-bytes", str(64 * MB), "--metrics-port", str(metrics_port)
    )
    try:
        for _ in range(3):  # warm: the first calls allocate what every later call reuses
            small_call(svc.target)
        before = proc_stat(svc.proc.pid).rss_kb * 1024
        peak = PeakRss(svc.proc.pid)
        codes = asyncio.run(burst(svc.target, files, clients, rounds, deadline_s))
        peak_bytes = peak.stop()
        after = small_call(svc.target)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
            shed = shed_by_reason(reply.read().decode())
    finally:
        svc.stop()
    out = {
        "memory_budget_mb": budget_mb,
        "rss_before_mb": before / MB,
        "rss_peak_mb": peak_bytes / MB,
        "growth_mb": (peak_bytes - before) / MB,
        "codes": dict(codes),
        "shed": shed,
        "small_photo_after": after,
    }
    log(
        f"budget {budget_mb or 'none'}: RSS {out['rss_before_mb']:.0f} -> peak {out['rss_peak_mb']:.0f} MB "
        f"(+{out['growth_mb']:.0f}); {dict(codes)}, shed {shed}; a small photo after: {after}"
    )
    return out


def measure(start_service, clients: int = 48, rounds: int = 3, deadline_s: float = 20.0) -> dict:
    files = [big_photo(seed) for seed in range(4)]
    log(f"{clients} clients x {rounds} rounds, photos of {sum(map(len, files)) / len(files) / MB:.1f} MB")
    from swc_service.config import Settings

    default = Settings(bundle="").memory_budget_mb
    return {
        "clients": clients,
        "rounds": rounds,
        "deadline_s": deadline_s,
        "photo_mb": sum(map(len, files)) / len(files) / MB,
        "with_budget": run(start_service, files, clients, rounds, deadline_s, default),
        "without_budget": run(start_service, files, clients, rounds, deadline_s, 0),
    }


def main(argv: list[str] | None = None) -> int:
    from bench.run import Service
    from devtools.triton_local import LocalTriton

    p = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=".cache/demo-bundle")
    p.add_argument("--clients", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--deadline-s", type=float, default=20.0)
    args = p.parse_args(argv)
    bundle = Path(args.bundle)
    with LocalTriton(bundle, threads=2) as triton:
        result = measure(lambda *flags: Service(bundle, triton.grpc_url, *flags), args.clients, args.rounds,
                         args.deadline_s)  # fmt: skip
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
