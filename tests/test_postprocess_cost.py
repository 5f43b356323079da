"""bench/postprocess_cost.py: the resident pass reads every page a call will read and no other
(mincore(2) on a fresh mapping says which pages are in memory), and both passes and the
idle-page probe reach the report."""

from __future__ import annotations

import copy
import ctypes
import json
import mmap
from pathlib import Path

import numpy as np
import pytest

from bench.postprocess_cost import PAGE, idle_page_cost, make_resident, measure
from bench.report import write_report
from bench.run import seed_background
from swc_service.bundle import load_bundle

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "bench.json"


LIBC = ctypes.CDLL(None, use_errno=True)


def resident(buf: mmap.mmap) -> list[int]:
    """Which pages of the mapping are in memory (mincore(2)): a page never read is not."""
    pages = len(buf) // PAGE
    vec = (ctypes.c_ubyte * pages)()
    addr = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    if LIBC.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(pages * PAGE), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return [i for i in range(pages) if vec[i] & 1]


@pytest.fixture
def fresh_pages() -> mmap.mmap:
    """40 pages of shared anonymous memory, none read yet."""
    buf = mmap.mmap(-1, 40 * PAGE)
    assert resident(buf) == []
    return buf


def test_every_page_a_slice_spans_is_read(fresh_pages):
    view = np.frombuffer(fresh_pages, dtype=np.uint8)
    make_resident(view[100 : 100 + 30 * PAGE])  # not page-aligned: it spans 31 pages, the last one by 100 bytes
    assert resident(fresh_pages) == list(range(31))


def test_a_column_of_a_row_major_matrix_reads_each_rows_page(fresh_pages):
    matrix = np.frombuffer(fresh_pages, dtype=np.float32).reshape(40, PAGE // 4)  # one page per row
    make_resident(matrix[:25, 7])
    assert resident(fresh_pages) == list(range(25))


def test_the_idle_probe_reports_both_reads():
    idle = idle_page_cost(0.05, 1)
    assert idle["pages"] == (1 << 20) // PAGE and idle["idle_s"] == 0.05
    assert idle["at_once_us"] > 0 and idle["after_idle_us"] > 0 and idle["guest_page_faults"] >= 0


def test_both_passes_over_a_demo_bundle_reach_the_report(demo_bundle, tmp_path):
    bundle = load_bundle(demo_bundle)
    res = measure(bundle, seed_background(bundle), count=24, idle_s=0.05)
    for block in (res, res["first_touch"]):
        for key in ("ours", "seed", "ours_f32", "swc", "pd"):
            assert 0 < block[f"{key}_p50_ms"] <= block[f"{key}_p99_ms"]
    results = json.loads(RESULTS.read_text())
    results["postprocess"] = res
    write_report(results, tmp_path / "B.md", tmp_path)
    text = (tmp_path / "B.md").read_text()
    assert f"ours p50 {res['first_touch']['ours_p50_ms']:.3f} / p99 {res['first_touch']['ours_p99_ms']:.3f} ms" in text
    assert f"after 0 s untouched {res['idle_page']['after_idle_us']:.2f} us" in text
    old = copy.deepcopy(results)  # results from before the resident pass still render, without it
    for key in ("first_touch", "idle_page"):
        del old["postprocess"][key]
    write_report(old, tmp_path / "B.md", tmp_path)
    assert "first touch" not in (tmp_path / "B.md").read_text()
