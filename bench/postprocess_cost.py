"""What SwC+PD costs per image at the bundle's scale: ours (memory-mapped float16 rows, the CSR
slice, DensityIndex) against the research code's, and ours on float32 storage.

Each timed call starts with the CPU caches another workload filled: the research code's
post-processing runs between two of ours, as decoding and gRPC run between two calls in a
serving process. The top cell moves over all cells, so every cell size is covered.

Two passes of the same calls:

* **resident** (the target's number): just before each image, one byte of every page the call
  will read is read (the cell's rows and labels, the PD index and its buffers, the research
  code's columns), then the research code's post-processing runs, then ours is timed: the pages
  are in RAM, the CPU caches and the TLB cold. That is a serving process's page cache.
* **first touch**: no such read; a cell's pages were last read when the page cache was warmed,
  seconds before. On a VM whose memory is paged out below the guest when it sits idle, that
  adds ~0.1-0.2 ms to some pages' next read, with no page fault in the guest:
  :func:`idle_page_cost` measures this machine's, and the report shows both.

``python -m bench.postprocess_cost --bundle .cache/bench/bundle-upstream-scale [--update]``;
``make bench`` runs it as step 5.
"""

from __future__ import annotations

import os

# As in the service (swc_service/server.py): single-threaded BLAS for the small numpy work.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import dataclasses
import mmap
import resource
import sys
import time

import numpy as np

from swc_service.bundle import load_bundle
from swc_service.method import DensityIndex, search_within_cell
from visloc_client.preprocessing import preprocess
from visloc_export import samples

SHAPE = (400, 300)
PAGE = mmap.PAGESIZE


def log(msg: str) -> None:
    print(f"[postprocess_cost {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_resident(*arrays: np.ndarray) -> None:
    """Read one byte in every page each array spans (a contiguous array: its bytes a page apart;
    any other view: every element, e.g. a column of the research code's [D, N] matrix)."""
    for a in arrays:
        a = np.asarray(a)
        if a.size == 0:
            continue
        if a.flags.c_contiguous:
            raw = a.reshape(-1).view(np.uint8)
            raw[::PAGE].max()
            raw[-1:].max()  # the last page, where the array ends past a page boundary
        else:
            a.max()


def idle_page_cost(idle_s: float = 10.0, megabytes: int = 64) -> dict:
    """This machine's price for memory left idle: microseconds per 4 KB page to read one byte of
    each page of an anonymous mapping (no huge pages) at once after a first read, and again after
    ``idle_s`` seconds without touching it, and the page faults the process took for that read.
    The two are the same on a machine whose RAM is its own."""

    def per_page_us(pages: np.ndarray) -> float:
        t = time.perf_counter()
        pages.max()
        return 1e6 * (time.perf_counter() - t) / pages.size

    buf = mmap.mmap(-1, megabytes << 20)
    try:
        pages = np.frombuffer(buf, dtype=np.uint8)[::PAGE]
        pages[:] = 1  # every page allocated, then read once more so the first timing is warm
        pages.max()
        at_once = per_page_us(pages)
        time.sleep(idle_s)
        faults = resource.getrusage(resource.RUSAGE_SELF)
        after = per_page_us(pages)
        now = resource.getrusage(resource.RUSAGE_SELF)
        faults = now.ru_minflt + now.ru_majflt - faults.ru_minflt - faults.ru_majflt
        del pages  # the mapping closes only without views into it
    finally:
        buf.close()
    return {
        "pages": (megabytes << 20) // PAGE,
        "idle_s": idle_s,
        "at_once_us": at_once,
        "after_idle_us": after,
        "guest_page_faults": faults,
    }


def model_outputs(bundle, photos: int = 8) -> list:
    """The bundle's network (onnxruntime) on ``photos`` sample photos: [probs, embedding] each."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    return [sess.run(None, {"image": preprocess(samples.photo_bytes(s, SHAPE)).array[None]}) for s in range(photos)]


def warm_page_cache(bundle) -> None:
    """Read the whole background once: a warm page cache, as in a serving process (what
    Bundle.prefetch asks the kernel to read)."""
    for a in range(0, bundle.num_background, 65536):
        for array in (bundle.features, bundle.labels, bundle.row_ids):
            np.asarray(array[a : a + 65536]).max()


def _density_arrays(density: DensityIndex) -> tuple[np.ndarray, ...]:
    """Every array a PD call may read: the cell index, the centres and this thread's buffers."""
    return (*density._index, density.centres, *density._buffers(), density._codes(1))


def measure(bundle, background, count: int = 2000, idle_s: float = 10.0) -> dict:
    """Both passes (module docstring) over the same ``count`` images, and the idle-page probe."""
    outs = model_outputs(bundle)
    density = DensityIndex(bundle.centres)
    sizes = np.diff(bundle.offsets)
    f32 = dataclasses.replace(bundle, features=np.asarray(bundle.features, dtype=np.float32))

    def ours(c: int, probs: np.ndarray, emb: np.ndarray, b=bundle) -> tuple[float, float]:
        t = time.perf_counter()
        feats, labels, _ = b.cell_slice(c)
        if feats.shape[0]:
            search_within_cell(emb, feats, labels)
        t_pd = time.perf_counter()
        density.density(c, probs)
        t_end = time.perf_counter()
        return t_pd - t, t_end - t_pd

    def seed(c: int, probs: np.ndarray, emb: np.ndarray) -> float:
        t = time.perf_counter()
        background.postprocess(probs, emb, bundle.centres)
        return time.perf_counter() - t

    def pages_of(c: int) -> tuple[np.ndarray, ...]:
        a, b = bundle.cell_rows(c)
        feats, labels, _ = bundle.cell_slice(c)
        seed_cols = (background.features_t[:, a], background.features_t[:, b - 1]) if b > a else ()
        return (feats, labels, f32.cell_slice(c)[0], *seed_cols, background.labels[a:b], *_density_arrays(density))

    passes = {}
    for name in ("first_touch", "resident"):
        log(f"{name}: warming the page cache, then {count} images")
        warm_page_cache(bundle)
        rng = np.random.default_rng(0)  # the same images and cells in both passes
        t = {k: [] for k in ("swc", "pd", "seed", "f32")}
        for i in range(count):
            probs, emb = outs[i % len(outs)][0][0], outs[i % len(outs)][1][0]
            target = int(rng.integers(0, bundle.num_cells))  # move the top cell: cover every cell size
            probs = np.roll(probs, target - int(np.argmax(probs)))
            c = int(np.argmax(probs))
            if name == "resident":
                make_resident(probs, *pages_of(c))
                t["seed"].append(seed(c, probs, emb))  # fills the caches before ours
                swc, pd = ours(c, probs, emb)
                seed(c, probs, emb)  # and again before the float32 variant
            else:
                swc, pd = ours(c, probs, emb)
                t["seed"].append(seed(c, probs, emb))
            t["swc"].append(swc)
            t["pd"].append(pd)
            t["f32"].append(sum(ours(c, probs, emb, f32)))
        total = np.add(t["swc"], t["pd"])
        pct = lambda xs, q: 1e3 * float(np.percentile(xs, q))  # noqa: E731
        passes[name] = {
            "ours_p50_ms": pct(total, 50), "ours_p99_ms": pct(total, 99),
            "seed_p50_ms": pct(t["seed"], 50), "seed_p99_ms": pct(t["seed"], 99),
            "ours_f32_p50_ms": pct(t["f32"], 50), "ours_f32_p99_ms": pct(t["f32"], 99),
            "swc_p50_ms": pct(t["swc"], 50), "swc_p99_ms": pct(t["swc"], 99),
            "pd_p50_ms": pct(t["pd"], 50), "pd_p99_ms": pct(t["pd"], 99),
        }  # fmt: skip
        p = passes[name]
        log(f"{name}: SwC+PD ours p50 {p['ours_p50_ms']:.3f} p99 {p['ours_p99_ms']:.3f} ms; "
            f"research code p50 {p['seed_p50_ms']:.3f} p99 {p['seed_p99_ms']:.3f} ms")  # fmt: skip
    log("memory left idle: the price of reading it again")
    idle = idle_page_cost(idle_s)
    log(f"{idle['at_once_us']:.2f} us per page at once, {idle['after_idle_us']:.2f} after {idle['idle_s']:.0f} s idle")
    return {
        "images": count,
        **passes["resident"],
        "first_touch": passes["first_touch"],
        "idle_page": idle,
        "cells_with_rows": int((sizes > 0).sum()),
        "rows_p99": float(np.percentile(sizes[sizes > 0], 99)),
    }


def main(argv: list[str] | None = None) -> int:
    from bench.report import step_main
    from bench.run import seed_background

    def both(path: str, count: int) -> dict:
        bundle = load_bundle(path)
        return measure(bundle, seed_background(bundle), count)

    return step_main(argv, "postprocess_cost", __doc__, "postprocess", both)


if __name__ == "__main__":
    sys.exit(main())
