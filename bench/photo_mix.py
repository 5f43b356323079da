"""The photo mix priced per path: what a real photo costs the service, and what the wire carries.

For every class of :data:`bench.photos.MIX` (``--per-class`` seeded photos each) and for the
mix weighted by its shares, three ways a photo reaches the model:

``original``
    the file is sent; the service decodes and preprocesses it exactly (the reference's pixels);
``fast_decode``
    the file is sent to a service started with ``--fast-decode`` (a large JPEG decoded at a
    reduced DCT scale, then the exact resize);
``caller_pixels``
    the caller preprocesses exactly and sends the model input (``LocateRequest.pixels``).

Measured per image: the service process's CPU time (user + system, from /proc; Triton's is
not included: it is the same on every path), and the request's size on the wire. The
answers of ``fast_decode`` are compared with ``original``'s on every photo: the top cell,
PD at 25 km, the distance between the two predicted locations. (``caller_pixels`` answers
are bit-identical to ``original``'s: tests/test_caller_preprocessing_live.py.) The 12 MP JPEGs'
preprocessing is also timed in this process on both paths, with a 1/8-scale decode: the
entropy decoding under the fast path, which no DCT scale skips.

Run alone (``python -m bench.photo_mix --bundle .cache/demo-bundle``) it starts its own local
Triton; ``make bench`` runs it as step 8 against its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path

import grpc

from bench import photos
from bench.procstat import tree_cpu_s
from swc_service.geo import haversine_km
from visloc_client.preprocessing import Recipe
from visloc_client.upload import Upload
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc

PATHS = ("original", "fast_decode", "caller_pixels")
PD_SCALE_KM = 25.0
CONCURRENCY = 2  # calls in flight: the service's CPU per image, not its latency
# A call's work goes on after its answer (the message and pixel buffers are freed, the access
# log written): a pass's CPU is read once the service has been quiet this long before and after.
SETTLE_S = 0.2
IN_PROCESS_CLASS = "12mp_jpeg"  # the class whose decoding is also timed in process


def log(msg: str) -> None:
    print(f"[photo-mix {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def generate(per_class: int) -> dict[str, list[bytes]]:
    """``per_class`` photos of every class (seeds 0..per_class-1), as files."""
    out = {}
    for cls in photos.MIX:
        out[cls.name] = [photos.encode(cls, seed) for seed in range(per_class)]
        log(f"generated {per_class} x {cls.name} ({sum(map(len, out[cls.name])) / per_class / 1e6:.2f} MB each)")
    return out


def requests(files: list[bytes], path: str) -> list[pb.LocateRequest]:
    """The requests that carry ``files`` on ``path`` (the caller's preprocessing happens here,
    outside the service's CPU account)."""
    upload = Upload("client", Recipe()) if path == "caller_pixels" else Upload("server")
    return [pb.LocateRequest(request_id=str(i), **upload.fields(data)) for i, data in enumerate(files)]


async def send(stub: pb_grpc.LocatorStub, reqs: list[pb.LocateRequest]) -> list[pb.LocateResponse]:
    """Every request once, ``CONCURRENCY`` at a time, in order of the answers' requests."""
    answers: list[pb.LocateResponse | None] = [None] * len(reqs)
    todo = list(range(len(reqs)))

    async def worker() -> None:
        while todo:
            i = todo.pop(0)
            answers[i] = await stub.Locate(reqs[i], timeout=300)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return [a for a in answers if a is not None]


def price(services: dict[str, tuple[str, int]], files: list[bytes], repeat: int) -> tuple[dict, dict]:
    """The service's CPU and the bytes per image for ``files`` on every path. The paths take
    turns, one pass over the photos each, ``repeat`` times, each on its own open channel: the
    machine's speed drifts by several per cent within a minute, and the ratios between paths
    should not see it."""
    reqs = {path: requests(files, path) for path in PATHS}
    cpu_s = dict.fromkeys(PATHS, 0.0)
    answers: dict[str, list[pb.LocateResponse]] = {}

    async def go() -> None:
        options = [("grpc.max_send_message_length", 64 << 20)]
        channels = {path: grpc.aio.insecure_channel(services[path][0], options=options) for path in PATHS}
        try:
            stubs = {path: pb_grpc.LocatorStub(ch) for path, ch in channels.items()}
            for path in PATHS:
                await send(stubs[path], reqs[path][:1])  # warm: the first call of a shape pays for allocations
            for _ in range(repeat):
                for path in PATHS:
                    pid = services[path][1]
                    await asyncio.sleep(SETTLE_S)  # the last pass's tail (buffers freed after the answer) ends
                    before = tree_cpu_s(pid)
                    got = await send(stubs[path], reqs[path])
                    await asyncio.sleep(SETTLE_S)  # and this pass's is counted to it
                    cpu_s[path] += tree_cpu_s(pid) - before
                    answers.setdefault(path, got)
        finally:
            for ch in channels.values():
                await ch.close()

    asyncio.run(go())
    n = len(files) * repeat
    rows = {
        path: {
            "images": n,
            "service_cpu_ms": 1e3 * cpu_s[path] / n,
            "bytes": sum(r.ByteSize() for r in reqs[path]) / len(reqs[path]),
        }
        for path in PATHS
    }
    return rows, answers


def pd_at(answer: pb.LocateResponse, scale_km: float) -> float:
    return next(d.density for d in answer.prediction_density if math.isclose(d.scale_km, scale_km))


def deviation(exact: list[pb.LocateResponse], fast: list[pb.LocateResponse]) -> dict:
    """How far the fast decode's answers are from the exact path's, photo by photo."""
    km = [haversine_km(a.lat, a.lon, b.lat, b.lon) for a, b in zip(exact, fast, strict=True)]
    dpd = [abs(pd_at(a, PD_SCALE_KM) - pd_at(b, PD_SCALE_KM)) for a, b in zip(exact, fast, strict=True)]
    same = [a.top_cell.id == b.top_cell.id for a, b in zip(exact, fast, strict=True)]
    return {
        "photos": len(km),
        "top_cell_agreement": sum(same) / len(same),
        "pd25_abs_diff_median": sorted(dpd)[len(dpd) // 2],
        "pd25_abs_diff_max": max(dpd),
        "distance_km_median": sorted(km)[len(km) // 2],
        "distance_km_max": max(km),
        "same_location": sum(k == 0.0 for k in km) / len(km),
    }


def in_process(files: list[bytes], passes: int = 5) -> dict:
    """The two paths' preprocessing in this process, without the service's per-call costs (gRPC,
    the message's and the frames' fresh pages), and a 1/8-scale decode: the entropy decoding that
    every DCT scale pays, the floor under the fast path. CPU ms per photo, the median pass (the
    first is a warm-up)."""
    import io
    import statistics

    from PIL import Image

    from visloc_client.preprocessing import preprocess

    def eighth(data: bytes) -> None:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (img.width // 8, img.height // 8))
            img.load()

    def cpu_ms(fn) -> float:
        times = []
        for _ in range(passes + 1):
            t = time.process_time()
            for data in files:
                fn(data)
            times.append(1e3 * (time.process_time() - t) / len(files))
        return statistics.median(times[1:])

    return {
        "photos": len(files),
        "exact_ms": cpu_ms(preprocess),
        "fast_ms": cpu_ms(lambda data: preprocess(data, draft=True)),
        "decode_eighth_ms": cpu_ms(eighth),
    }


def run(services: dict[str, tuple[str, int]], per_class: int, repeat: int) -> dict:
    """``services``: path -> (target, pid); ``original`` and ``caller_pixels`` may share one."""
    files = generate(per_class)
    out: dict = {"per_class": per_class, "repeat": repeat, "classes": {}, "deviation": {}}
    for cls in photos.MIX:
        rows, answers = price(services, files[cls.name], repeat)
        out["classes"][cls.name] = {"share": cls.share, **rows}
        out["deviation"][cls.name] = deviation(answers["original"], answers["fast_decode"])
        log(
            f"{cls.name}: service CPU/image "
            + ", ".join(f"{p} {rows[p]['service_cpu_ms']:.1f} ms ({rows[p]['bytes'] / 1e3:.0f} kB)" for p in PATHS)
            + f"; fast decode top cell agrees on {out['deviation'][cls.name]['top_cell_agreement']:.0%}"
        )
    out["in_process"] = {IN_PROCESS_CLASS: in_process(files[IN_PROCESS_CLASS])}
    c = out["in_process"][IN_PROCESS_CLASS]
    log(f"{IN_PROCESS_CLASS} in process: exact {c['exact_ms']:.1f} ms, fast {c['fast_ms']:.1f} ms, "
        f"a 1/8-scale decode {c['decode_eighth_ms']:.1f} ms")  # fmt: skip
    out["mix"] = {
        p: {k: sum(c["share"] * c[p][k] for c in out["classes"].values()) for k in ("service_cpu_ms", "bytes")}
        for p in PATHS
    }
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.run import Service
    from devtools.triton_local import LocalTriton

    p = argparse.ArgumentParser(prog="python -m bench.photo_mix", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=".cache/demo-bundle")
    p.add_argument("--per-class", type=int, default=4, help="photos of each class (default 4)")
    p.add_argument("--repeat", type=int, default=2, help="times each photo is sent (default 2)")
    p.add_argument("--out", default="", help="write the result as JSON here")
    args = p.parse_args(argv)
    with LocalTriton(Path(args.bundle), threads=2) as triton:
        exact = Service(Path(args.bundle), triton.grpc_url, "--max-message-bytes", str(64 << 20))
        fast = Service(Path(args.bundle), triton.grpc_url, "--max-message-bytes", str(64 << 20), "--fast-decode")
        try:
            result = run(
                {
                    "original": (exact.target, exact.proc.pid),
                    "caller_pixels": (exact.target, exact.proc.pid),
                    "fast_decode": (fast.target, fast.proc.pid),
                },
                args.per_class,
                args.repeat,
            )
        finally:
            exact.stop()
            fast.stop()
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
