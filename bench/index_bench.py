"""Indexing throughput (``visloc-export index``) as a ratio to the raw model, same run.

For in-process onnxruntime and for Triton (the embedded local one), in turn:

1. raw: the model alone on the already preprocessed photos (onnxruntime ``run``; Triton through
   the indexer's own client, same batch size and calls in flight);
2. index: ``build_index`` over the geotagged JPEGs (read, hash, EXIF, preprocess, embed,
   checkpoint), pass 1 only timed, then the bundle assembly separately;
3. raw again; the ratio is index / mean(raw before, raw after); steps 2-3 repeat ``--rounds``
   times and the median round is reported (all rounds are kept in the JSON). CPU seconds per
   photo (this process and the local Triton) are measured for every run too: on a shared
   machine they move far less than wall time, so raw / index CPU per photo is the steadier
   figure of what indexing adds to the model.

Results: bench/results/index.json and the "Indexing your own photos" section of
docs/BENCHMARKS.md (``bench/report.py`` renders it; ``make bench`` keeps it).

    python -m bench.index_bench [--bundle DIR] [--photos 48]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.procstat import proc_stat
from swc_service import bundle as B
from visloc_client.preprocessing import preprocess
from visloc_export import samples


def _photos(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        lat, lon = rng.uniform(-60, 70), rng.uniform(-180, 180)
        path = folder / f"photo{i:05d}.jpg"
        path.write_bytes(samples.encode(samples.photo(10_000 + i, (400, 300)), exif=samples.gps_exif(lat, lon)))
        paths.append(path)
    return paths


_ROOTS: list[int] = [os.getpid()]  # plus the local Triton's pid while it runs


def _cpu_s() -> float:
    """CPU seconds of this process, the local Triton and their descendants, each counted once."""
    seen: set[int] = set()
    todo = list(_ROOTS)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # ended meanwhile
                todo += [int(c) for c in (task / "children").read_text().split()]
    total = 0.0
    for pid in seen:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # ended meanwhile
            total += proc_stat(pid).cpu_s
    return total


def _raw(embedder, arrays: list[np.ndarray], batch: int, concurrency: int) -> tuple[float, float]:
    """(photos per second, CPU seconds per photo) of the model alone, fed like the indexer feeds it."""
    embedder.run(arrays[0][None])  # warm up
    cpu = _cpu_s()
    start = time.perf_counter()
    inflight = []
    for a in range(0, len(arrays), batch):
        inflight.append(embedder.submit(np.stack(arrays[a : a + batch])))
        if len(inflight) > concurrency:
            inflight.pop(0).result()
    for f in inflight:
        f.result()
    return len(arrays) / (time.perf_counter() - start), (_cpu_s() - cpu) / len(arrays)


def _index(bundle: Path, photos: Path, out: Path, options, triton_url: str | None) -> tuple[float, float, float]:
    """(photos/s of pass 1, CPU seconds per photo in pass 1, seconds of the assembly)."""
    from visloc_export import index as I

    timings = {}
    real_embed, real_assemble = I.embed_photos, I.assemble

    def embed(*args, **kw):
        t, cpu = time.perf_counter(), _cpu_s()
        real_embed(*args, **kw)
        timings["embed"] = time.perf_counter() - t
        timings["cpu"] = _cpu_s() - cpu

    def assemble(*args, **kw):
        t = time.perf_counter()
        result = real_assemble(*args, **kw)
        timings["assemble"] = time.perf_counter() - t
        return result

    I.embed_photos, I.assemble = embed, assemble
    try:
        new = I.build_index(bundle, out, photos=photos, triton_url=triton_url, options=options)
    finally:
        I.embed_photos, I.assemble = real_embed, real_assemble
    n = new.manifest["index"]["counts"]["indexed"]
    return n / timings["embed"], timings["cpu"] / n, timings["assemble"]


def run(bundle: Path, count: int, work: Path, rounds: int = 3) -> dict:
    from devtools.triton_local import LocalTriton
    from visloc_export.index import Options
    from visloc_export.index_embed import OnnxEmbedder, TritonEmbedder

    paths = _photos(work / "photos", count)
    arrays = [preprocess(p.read_bytes()).array for p in paths]
    out: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "photos": count,
        "rounds": rounds,
        "photo_size": [400, 300],
        "bundle": {"cells": B.load_bundle(bundle).num_cells, "background": B.load_bundle(bundle).num_background},
    }

    def measure(make_embedder, opts: Options, name: str, url: str | None) -> dict:
        """raw, then ``rounds`` x (index, raw): a shared machine's speed drifts, so each index run
        is compared with the mean of the raw runs on either side of it; the median round counts."""
        emb = make_embedder()
        try:
            raws, raw_cpu = map(list, zip(_raw(emb, arrays, opts.batch_size, opts.concurrency)))
            rates, index_cpu, assemble = [], [], []
            for k in range(rounds):
                rate, cpu, assemble_s = _index(bundle, work / "photos", work / f"new-{name}-{k}", opts, url)
                rates.append(rate)
                index_cpu.append(cpu)
                assemble.append(assemble_s)
                raw_rate, cpu = _raw(emb, arrays, opts.batch_size, opts.concurrency)
                raws.append(raw_rate)
                raw_cpu.append(cpu)
        finally:
            emb.close()
        ratios = [rate / ((raws[k] + raws[k + 1]) / 2) for k, rate in enumerate(rates)]
        # CPU per photo is far less sensitive to other tenants than wall time: raw / index.
        cpu_ratio = statistics.median(raw_cpu) / statistics.median(index_cpu)
        mid = sorted(range(rounds), key=lambda k: ratios[k])[rounds // 2]
        print(f"{name}: raw {[round(x, 2) for x in raws]} photos/s, index {[round(x, 2) for x in rates]}, ratios "
              f"{[round(x, 3) for x in ratios]}, CPU/photo raw {raw_cpu}, index {index_cpu}")  # fmt: skip
        return {
            "raw_per_s": (raws[mid] + raws[mid + 1]) / 2,
            "raw_before_after": [raws[mid], raws[mid + 1]],
            "index_per_s": rates[mid],
            "ratio": ratios[mid],
            "rounds": [
                {"raw_before": raws[k], "index": rates[k], "raw_after": raws[k + 1], "ratio": ratios[k]}
                for k in range(rounds)
            ],
            "cpu_s_per_photo": {"raw": statistics.median(raw_cpu), "index": statistics.median(index_cpu)},
            "cpu_ratio": cpu_ratio,
            "assemble_s": assemble[mid],
            "batch_size": opts.batch_size,
            "concurrency": opts.concurrency,
        }

    model = B.load_bundle(bundle).model_path
    out["in_process"] = measure(lambda: OnnxEmbedder(model), Options(batch_size=1, concurrency=1), "ort", None)
    with LocalTriton(bundle, threads=0) as triton:
        _ROOTS.append(triton.pid)
        out["triton"] = measure(
            lambda: TritonEmbedder(triton.grpc_url, "visloc"),
            Options(batch_size=4, concurrency=4),
            "triton",
            triton.grpc_url,
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="base bundle (default: a demo bundle M=2000, N=20000 built here)")
    p.add_argument("--photos", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3, help="index runs per path, each between two raw runs")
    p.add_argument("--results", default="bench/results/index.json")
    p.add_argument("--doc", default="docs/BENCHMARKS.md")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="index-bench-") as tmp:
        work = Path(tmp)
        bundle = Path(args.bundle) if args.bundle else None
        if bundle is None:
            from visloc_export.build import build_demo

            bundle = build_demo(work / "demo", cells=2000, background=20_000).path
        results = run(bundle, args.photos, work, args.rounds)
    Path(args.results).write_text(json.dumps(results, indent=1) + "\n")
    from bench.report import replace_section

    replace_section(Path(args.doc), results)
    print(f"{args.results}, {args.doc}")


if __name__ == "__main__":
    main()
