"""``make bench``: every figure as a ratio of two things measured side by side in one run.

1. model ceiling: in-process onnxruntime at batch 1..16;
2. raw Triton (tritonclient gRPC, asyncio) at concurrency 1..32;
3. the service end to end (Locate, LocateStream), same images and concurrencies;
4. the seed-style pipeline (PyTorch eager, background in RAM, sklearn DBSCAN, full PD), in turn with
   ORT, Triton and Locate (paired rounds, every other one reversed);
5. SwC+PD alone at upstream scale, ours vs the seed's code, pages resident and on first touch
   (bench/postprocess_cost.py);
6. memory and start-up at upstream scale, ours vs the seed's loading;
7. a realistic mix of photo shapes: exact preprocessing vs centre crop;
8. real photos (bench/photos.py): service CPU and bytes per image, file vs fast decode vs caller-side pixels;
9. a burst of 12 MP photos against one worker: peak memory with and without the memory budget;
10. tracing: Locate throughput with tracing off and at 100 % sampling (OTLP to a local receiver);
11. the claim check: SwC+PD per image with and without a claim, in turn (bench/claim_cost.py).

Results: bench/results/bench.json; docs/BENCHMARKS.md and PNG plots (bench/report.py).
Everything runs on loopback, bounded in time and count.
"""

from __future__ import annotations

import os

# As in the service (swc_service/server.py): single-threaded BLAS for the small numpy work.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from bench import burst, claim_cost, photo_mix, postprocess_cost, trace_cost
from bench.load import run_load
from bench.procstat import proc_stat, tree_cpu_s
from devtools.net import free_port, wait_serving
from swc_service.bundle import load_bundle
from visloc_client.preprocessing import preprocess
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc
from visloc_export import samples

CONCURRENCIES = (1, 4, 8, 16, 32)
BATCHES = (1, 2, 4, 8, 16)
SHAPE = (400, 300)  # (width, height) of the uniform-shape images: a 300x400 model input
MIX = ((400, 300), (300, 400), (533, 300), (300, 300))  # 4:3, 3:4, 16:9, 1:1


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- 1. ORT ceiling


class OrtCeiling:
    """In-process onnxruntime on the same images: the model's ceiling on this machine, the better
    of two layouts of its cores: one session with ``threads`` intra-op threads, or ``threads``
    single-threaded sessions run side by side (the layout of Triton's CPU instances)."""

    LAYOUTS = ("one session", "sessions side by side")

    def __init__(self, bundle, threads: int):
        import onnxruntime as ort

        def session(n: int):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = n
            opts.inter_op_num_threads = 1
            return ort.InferenceSession(str(bundle.model_path), opts, providers=["CPUExecutionProvider"])

        self.threads = threads
        self.best_layout = self.LAYOUTS[0]  # until sweep() has measured both
        self.sess = session(threads)
        self.side_by_side = [session(1) for _ in range(threads)] if threads > 1 else []
        self.images = [preprocess(samples.photo_bytes(s, SHAPE)).array for s in range(16)]

    def per_s(self, batch_size: int, seconds: float, layout: str = "one session") -> float:
        batch = np.stack(self.images[:batch_size])
        sessions = [self.sess] if layout == "one session" else self.side_by_side
        for sess in sessions:
            sess.run(None, {"image": batch})  # warm-up
        rates = [0.0] * len(sessions)
        t0 = time.perf_counter()

        def work(k: int) -> None:  # onnxruntime releases the GIL while it runs
            n = 0
            while time.perf_counter() - t0 < seconds:
                sessions[k].run(None, {"image": batch})
                n += batch_size
            rates[k] = n / (time.perf_counter() - t0)  # each session's own span: none waits for the other

        threads = [threading.Thread(target=work, args=(k,)) for k in range(len(sessions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(rates)

    def sweep(self, seconds: float) -> dict:
        out: dict = {}
        layouts = self.LAYOUTS if self.side_by_side else self.LAYOUTS[:1]
        for b in BATCHES:
            out[b] = {layout: self.per_s(b, seconds, layout) for layout in layouts}
            log(f"ORT in-process batch {b}: " + ", ".join(f"{k} {v:.1f}" for k, v in out[b].items()) + " img/s")
        best, layout = max(((b, k) for b in out for k in out[b]), key=lambda x: out[x[0]][x[1]])
        per_batch = {b: max(v.values()) for b, v in out.items()}
        self.best_layout = layout
        return {"per_batch": per_batch, "per_layout": out, "best_batch": best, "best_layout": layout,
                "best_per_s": out[best][layout], "threads": self.threads}  # fmt: skip


# --------------------------------------------------------------------------- 2/3. Triton and service


def measure(coro_factory, pids: dict[str, int], concurrency: int, seconds: float) -> dict:
    """Run a load and account CPU seconds per image to each process tree (and the generator),
    over the load's measured window only (``coro_factory(concurrency, seconds, on_edge)``)."""
    snaps: dict[str, dict[str, float]] = {}

    def on_edge(edge: str) -> None:
        snaps[edge] = {name: tree_cpu_s(pid) for name, pid in pids.items()} | {"load_generator": time.process_time()}

    result = asyncio.run(coro_factory(concurrency, seconds, on_edge))
    cpu = {name: snaps["close"][name] - snaps["open"][name] for name in snaps["open"]}
    row = result.as_dict()
    row["cpu_ms_per_image"] = {k: 1e3 * v / max(1, result.calls) for k, v in cpu.items()}
    return row


def raw_triton(triton, concurrency: int, seconds: float, on_edge=None):
    import tritonclient.grpc.aio as tc

    from swc_service.triton_infer import CHANNEL_ARGS

    arrays = [preprocess(samples.photo_bytes(s, SHAPE)).array[None] for s in range(16)]

    async def go():
        client = tc.InferenceServerClient(triton.grpc_url, channel_args=CHANNEL_ARGS)

        async def call(i: int):
            inp = tc.InferInput("image", list(arrays[i % 16].shape), "UINT8")
            inp.set_data_from_numpy(arrays[i % 16])
            await client.infer("visloc", [inp])

        try:
            return await run_load(call, concurrency, seconds, warmup_calls=2, on_edge=on_edge)
        finally:
            await client.close()

    return go()


def triton_calls(triton):
    """The raw-Triton load as :func:`measure` takes it."""
    return lambda c, s, on_edge: raw_triton(triton, c, s, on_edge=on_edge)


def locate_calls(target: str, images: list[bytes]):
    """The unary-Locate load as :func:`measure` takes it."""
    return lambda c, s, on_edge: locate_unary(target, images, c, s, on_edge=on_edge)


def locate_unary(target: str, images: list[bytes], concurrency: int, seconds: float, metadata=None, on_edge=None):
    async def go():
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.LocatorStub(ch)

            async def call(i: int):
                await stub.Locate(pb.LocateRequest(image=images[i % len(images)]), timeout=120, metadata=metadata)

            return await run_load(call, concurrency, seconds, warmup_calls=2, on_edge=on_edge)

    return go()


def locate_stream(target: str, images: list[bytes], in_flight: int, seconds: float) -> dict:
    """One LocateStream keeping ``in_flight`` images outstanding. As in :func:`run_load`, the
    answers counted are those of a window of ``seconds`` opened after the first ``in_flight``
    answers (the pipeline full) and the drain after it is not counted."""

    async def go() -> dict:
        async with grpc.aio.insecure_channel(target) as ch:
            stream = pb_grpc.LocatorStub(ch).LocateStream(timeout=600)
            sent = done = errors = counted = 0
            opened = closes = None
            for _ in range(in_flight):
                await stream.write(pb.LocateRequest(image=images[sent % len(images)]))
                sent += 1
            async for resp in stream:
                now = time.perf_counter()
                done += 1
                errors += resp.WhichOneof("outcome") == "error"
                if opened is None and done == in_flight:
                    opened, closes = now, now + seconds
                elif opened is not None and now <= closes:
                    counted += 1
                if closes is None or now <= closes:
                    await stream.write(pb.LocateRequest(image=images[sent % len(images)]))
                    sent += 1
                elif done == sent:
                    break
            await stream.done_writing()
            return {"in_flight": in_flight, "images": counted, "errors": errors, "per_s": counted / seconds}

    return asyncio.run(go())


class Service:
    """swc-service as a subprocess for the benchmark."""

    def __init__(self, bundle: Path, triton_url: str, *extra: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "swc_service.server", "--bundle", str(bundle), "--port", str(self.port),
               "--metrics-port", "0", "--triton-url", triton_url, "--log-level", "WARNING", *extra]  # fmt: skip
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env} if env else None)
        self.startup_s = self._wait_serving()

    def _wait_serving(self, timeout: float = 120) -> float:
        wait_serving(self.target, timeout, proc=self.proc, poll_s=0.01)
        return time.monotonic() - self.started

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def paired_rounds(ort: OrtCeiling, batch: int, triton, target: str, images: list[bytes], pids: dict,
                  rounds: int, seconds: float, seed: SeedPipeline) -> list[dict]:  # fmt: skip
    """The headline throughputs measured in turn, ``rounds`` times: on a shared VM the machine's
    speed drifts by several per cent within a minute, so each ratio is taken within a round
    (seconds apart) and the report gives the median over rounds. Every other round runs in the
    reverse order, so a steady drift biases the rounds' ratios in opposite directions instead of
    all in one."""

    def run_ort() -> dict:
        return {"ort_per_s": ort.per_s(batch, seconds, ort.best_layout)}

    def run_triton() -> dict:
        return {"triton": measure(triton_calls(triton), {"triton": pids["triton"]}, 16, seconds)}

    def run_locate() -> dict:
        return {"locate": measure(locate_calls(target, images), pids, 16, seconds)}

    def run_seed() -> dict:
        return {"seed": seed.measure(seconds)}

    steps = [run_ort, run_triton, run_locate, run_seed]
    out = []
    for i in range(rounds):
        row: dict = {"order": "forward" if i % 2 == 0 else "reverse"}
        for step in steps if i % 2 == 0 else steps[::-1]:
            row |= step()
        log(f"   round {i + 1} ({row['order']}): ORT {row['ort_per_s']:.2f}, Triton c16 "
            f"{row['triton']['per_s']:.2f}, Locate c16 {row['locate']['per_s']:.2f}, "
            f"research-code-style {row['seed']['per_s']:.2f} img/s")  # fmt: skip
        out.append(row)
    return out


# --------------------------------------------------------------------------- 4. seed-style pipeline


class SeedPipeline:
    """PyTorch eager at batch 1 + the seed's post-processing, per image, as evaluation.py does."""

    def __init__(self, bundle, images: list[bytes], background) -> None:
        import torch

        from visloc_export.build import demo_net_for

        torch.set_num_threads(2)
        self.bundle, self.images, self.background = bundle, images, background
        self.net = demo_net_for(bundle).eval()

    def measure(self, seconds: float) -> dict:
        import torch

        from bench.seed_style import timed

        n, t0, post = 0, time.perf_counter(), []
        with torch.no_grad():
            while time.perf_counter() - t0 < seconds:
                x = torch.from_numpy(preprocess(self.images[n % len(self.images)]).array[None])
                probs, emb = self.net(x)
                _, dt = timed(self.background.postprocess, probs[0].numpy(), emb[0].numpy(), self.bundle.centres)
                post.append(dt)
                n += 1
        per_s = n / (time.perf_counter() - t0)
        return {"per_s": per_s, "images": n, "postprocess_p50_ms": 1e3 * float(np.median(post))}


def seed_background(bundle):
    from bench.seed_style import SeedBackground

    offsets = bundle.offsets
    rows = np.arange(bundle.num_background)
    assignments = {c: rows[offsets[c] : offsets[c + 1]] for c in range(bundle.num_cells) if offsets[c + 1] > offsets[c]}
    return SeedBackground(np.asarray(bundle.features, dtype=np.float32), bundle.labels, assignments)


# --------------------------------------------------------------------------- 6. memory and start-up


SEED_LOAD = r"""
import json, sys, time, re
t0 = time.monotonic()
import h5py, numpy as np, torch
from swc_service.bundle import load_bundle
from visloc_export.model import VislocNet
b = load_bundle(sys.argv[1])
net = VislocNet(b.num_cells).eval()            # the seed builds the torch model in-process
with h5py.File(sys.argv[2], "r") as h5:        # evaluation.py: all features in RAM, float32, transposed
    feats = h5["features"][:, :].T.astype(np.float32)
    labels = h5["labels"][:, :]
status = open("/proc/self/status").read()
kb = lambda k: int(re.search(k + r":\s+(\d+)", status).group(1))
print(json.dumps({"seconds": time.monotonic() - t0, "rss_kb": kb("VmRSS"), "hwm_kb": kb("VmHWM")}))
"""


def write_seed_hdf5(bundle, path: Path) -> None:
    import h5py

    if path.exists():
        return
    log(f"writing the seed-style HDF5 background ({bundle.num_background} rows, float32) to {path}")
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as h5:
        f = h5.create_dataset("features", (bundle.num_background, bundle.features.shape[1]), dtype=np.float32)
        for a in range(0, bundle.num_background, 65536):
            f[a : a + 65536] = np.asarray(bundle.features[a : a + 65536], dtype=np.float32)
        h5["labels"] = np.asarray(bundle.labels)
    tmp.rename(path)


def memory_and_startup(bundle_dir: Path, bundle, triton_url: str, hdf5: Path, images: list[bytes]) -> dict:
    svc = Service(bundle_dir, triton_url)
    try:
        asyncio.run(locate_unary(svc.target, images, 4, 5))  # serve a while first
        ours = proc_stat(svc.proc.pid)
        startup = svc.startup_s
    finally:
        svc.stop()
    write_seed_hdf5(bundle, hdf5)
    out = subprocess.run([sys.executable, "-c", SEED_LOAD, str(bundle_dir), str(hdf5)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    seed = json.loads(out.stdout.strip().splitlines()[-1])
    res = {
        "ours_rss_mb": ours.rss_kb / 1024, "ours_private_mb": ours.rss_anon_kb / 1024,
        "ours_startup_s": startup, "seed_rss_mb": seed["rss_kb"] / 1024, "seed_peak_mb": seed["hwm_kb"] / 1024,
        "seed_startup_s": seed["seconds"],
    }  # fmt: skip
    log(f"memory: ours {res['ours_rss_mb']:.0f} MB RSS, start-up {startup:.2f} s; seed {res['seed_rss_mb']:.0f} "
        f"MB RSS (peak {res['seed_peak_mb']:.0f}), {res['seed_startup_s']:.1f} s")  # fmt: skip
    return res


# --------------------------------------------------------------------------- main


def ensure_bundle(path: Path, cells: int, background: int) -> None:
    if (path / "manifest.json").exists():
        probes = load_bundle(path).probes
        if probes is None or probes.reference is None:  # built before the float64 reference: add it
            log(f"adding the float64 reference to the probes of {path}")
            subprocess.run([sys.executable, "-m", "visloc_export.cli", "add-probes", str(path)], check=True)
        return
    log(f"building the benchmark bundle M={cells} N={background} at {path} (once)")
    subprocess.run([sys.executable, "-m", "visloc_export.cli", "demo", "--out", str(path), "--cells", str(cells),
                    "--background", str(background)], check=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from devtools.triton_local import LocalTriton

    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--bundle", default=".cache/bench/bundle-upstream-scale")
    p.add_argument("--cells", type=int, default=31_145)
    p.add_argument("--background", type=int, default=763_265)
    p.add_argument("--seconds", type=float, default=8.0, help="per measured point")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (model ceiling and Triton)")
    p.add_argument("--rounds", type=int, default=5, help="paired rounds for the headline ratios")
    p.add_argument("--out", default="bench/results/bench.json")
    p.add_argument("--photos-per-class", type=int, default=4, help="photos of each class in the photo mix (step 8)")
    p.add_argument("--skip-memory", action="store_true", help="skip the upstream-scale seed-style load (5.5 GB)")
    args = p.parse_args(argv)

    bundle_dir = Path(args.bundle)
    ensure_bundle(bundle_dir, args.cells, args.background)
    bundle = load_bundle(bundle_dir)
    images = [samples.photo_bytes(s, SHAPE) for s in range(16)]
    mixed = [samples.photo_bytes(s, MIX[s % len(MIX)]) for s in range(16)]
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "when": time.strftime("%Y-%m-%d %H:%M:%S")},
        "bundle": {"cells": bundle.num_cells, "background": bundle.num_background, "id": bundle.bundle_id},
        "seconds_per_point": args.seconds,
    }  # fmt: skip

    log("4. the research-code-style pipeline (background in RAM as float32), measured in the paired rounds")
    background = seed_background(bundle)
    seed = SeedPipeline(bundle, images, background)
    seed.measure(1.0)  # warm: PyTorch's first calls allocate

    log("1. model ceiling (in-process onnxruntime)")
    ort = OrtCeiling(bundle, args.threads)
    results["ort"] = ort.sweep(args.seconds)
    # Triton's dynamic batcher and the service's grouping both stop at the batch this CPU runs
    # fastest (step 1): on a CPU a batch of 16 runs slower per image than a batch of 1-4. The
    # production GPU config keeps its own max_batch_size.
    max_batch = results["ort"]["best_batch"]
    results["max_batch"] = max_batch
    # Triton on a CPU: one single-threaded instance (stub process) per core. While one instance's
    # batch crosses the stub boundary (shared memory, numpy, the responses) the other keeps its
    # core on the model; one instance with all the threads leaves the cores idle in those gaps.
    results["triton_layout"] = {"instances": args.threads, "intra_op_threads": 1}

    with LocalTriton(bundle_dir, threads=1, instances=args.threads, max_batch_size=max_batch) as triton:
        log("2. raw Triton")
        results["triton"] = [
            measure(triton_calls(triton), {"triton": triton.pid}, c, args.seconds) for c in CONCURRENCIES
        ]
        for row in results["triton"]:
            log(f"   c={row['concurrency']:>2}: {row['per_s']:.1f} req/s p99 {row['p99_ms']:.0f} ms")
        log("3. the service (exact preprocessing)")
        svc = Service(bundle_dir, triton.grpc_url, "--max-batch", str(max_batch))
        results["service_max_batch"] = max_batch
        try:
            pids = {"service": svc.proc.pid, "triton": triton.pid}
            results["locate"] = [
                measure(locate_calls(svc.target, images), pids, c, args.seconds) for c in CONCURRENCIES
            ]
            for row in results["locate"]:
                log(f"   c={row['concurrency']:>2}: {row['per_s']:.1f} img/s p99 {row['p99_ms']:.0f} ms")
            log(f"   paired rounds: ORT batch {max_batch}, raw Triton c=16, Locate c=16, research-code-style, in turn")
            results["paired"] = paired_rounds(
                ort, max_batch, triton, svc.target, images, pids, args.rounds, args.seconds, seed
            )
            results["seed"] = {
                k: statistics.median([x["seed"][k] for x in results["paired"]]) for k in ("per_s", "postprocess_p50_ms")
            }
            results["stream"] = locate_stream(svc.target, images, 16, args.seconds)
            log(f"   LocateStream 16 in flight: {results['stream']['per_s']:.1f} img/s")
            log("7. mixed shapes, exact")
            results["mixed_exact"] = measure(locate_calls(svc.target, mixed), pids, 16, args.seconds)
        finally:
            svc.stop()
        svc = Service(bundle_dir, triton.grpc_url, "--preprocessing", "center_crop_300", "--max-batch", str(max_batch))
        try:
            log("7. mixed shapes, centre crop")
            pids = {"service": svc.proc.pid, "triton": triton.pid}
            results["mixed_crop"] = measure(locate_calls(svc.target, mixed), pids, 16, args.seconds)
        finally:
            svc.stop()

        log("8. real photos: the photo mix, original file / fast decode / caller-side pixels")
        big = ("--max-batch", str(max_batch), "--max-message-bytes", str(64 << 20))
        exact = Service(bundle_dir, triton.grpc_url, *big)
        fast = Service(bundle_dir, triton.grpc_url, *big, "--fast-decode")
        try:
            results["photo_mix"] = photo_mix.run(
                {
                    "original": (exact.target, exact.proc.pid),
                    "caller_pixels": (exact.target, exact.proc.pid),
                    "fast_decode": (fast.target, fast.proc.pid),
                },
                args.photos_per_class,
                5,  # each photo 5 times: 20 calls per class and path (CPU time comes in 10 ms ticks)
            )
        finally:
            exact.stop()
            fast.stop()

        log("9. a burst of 12 MP photos against one worker, with and without the memory budget")
        results["burst"] = burst.measure(lambda *flags: Service(bundle_dir, triton.grpc_url, *flags))

        log("10. tracing off vs 100 % sampling, Locate c=16, in turn")
        pids_of = lambda svc: {"service": svc.proc.pid, "triton": triton.pid}  # noqa: E731
        results["tracing"] = trace_cost.measure(
            lambda env: Service(bundle_dir, triton.grpc_url, "--max-batch", str(max_batch), env=env),
            lambda svc: measure(locate_calls(svc.target, images), pids_of(svc), 16, args.seconds),
            2 * args.rounds,  # the difference is small beside the machine's drift: more rounds
        ) | {"concurrency": 16, "seconds": args.seconds}

        log("11. the claim check: SwC+PD per image alone and with a claim")
        results["claims"] = claim_cost.measure(bundle)

        del ort, seed
        log("5. post-processing, ours and the research code's")
        results["postprocess"] = postprocess_cost.measure(bundle, background, 2000)
        del background
        if not args.skip_memory:
            log("6. memory and start-up")
            results["memory"] = memory_and_startup(
                bundle_dir, bundle, triton.grpc_url, bundle_dir.parent / "back_coll_features.hdf5", images
            )

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {args.out}")
    from bench.report import write_report

    write_report(results, Path("docs/BENCHMARKS.md"), Path("docs/img"))
    log("wrote docs/BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
