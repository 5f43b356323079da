"""Write bundles (demo and upstream) and check ONNX-vs-PyTorch parity."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

import h5py
import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from swc_service import bundle as B
from swc_service.preprocessing import prepare_image, preprocess
from visloc_client import safe_pickle
from visloc_export import samples

from . import __version__, demo
from .model import VislocNet, load_upstream
from .onnx_export import export_onnx
from .probes import record_probes

TOOL = f"visloc-export {__version__}"
VERIFY_SHAPES = ((300, 300), (400, 300), (300, 400), (533, 300))  # (width, height)
LOG_PROB_TOL = 1e-4
EMBEDDING_TOL = 1e-4


def _progress(**kw) -> tqdm:
    return tqdm(file=sys.stderr, dynamic_ncols=True, mininterval=0.5, **kw)


# --------------------------------------------------------------------------- parity


@dataclass
class ParityReport:
    cases: list[dict]
    max_log_prob_diff: float
    max_embedding_diff: float
    top5_equal: bool

    @property
    def ok(self) -> bool:
        return self.top5_equal and self.max_log_prob_diff <= LOG_PROB_TOL and self.max_embedding_diff <= EMBEDDING_TOL

    def as_dict(self) -> dict:
        return asdict(self) | {
            "ok": self.ok,
            "tolerances": {"log_prob": LOG_PROB_TOL, "embedding": EMBEDDING_TOL},
        }


def onnx_session(path: str | os.PathLike[str], threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def parity_batches(images: list[bytes] | None = None) -> list[np.ndarray]:
    """Batches of 1 and 4 at each verify shape, or the given images one by one."""
    if images:
        return [preprocess(data).array[None] for data in images]
    batches = []
    for i, size in enumerate(VERIFY_SHAPES):
        four = np.stack([prepare_image(samples.photo(100 * i + j, size)) for j in range(4)])
        batches += [four[:1], four]
    return batches


@torch.no_grad()
def check_parity(net: VislocNet, onnx_path: str | os.PathLike[str], batches: list[np.ndarray]) -> ParityReport:
    """PyTorch vs onnxruntime on the same uint8 batches: log-prob, embedding and top-5 diffs."""
    net = net.eval()
    sess = onnx_session(onnx_path)
    cases, lp_max, emb_max, top5 = [], 0.0, 0.0, True
    for batch in batches:
        t_probs, t_emb = (t.numpy() for t in net(torch.from_numpy(batch)))
        o_probs, o_emb = sess.run([B.OUTPUT_PROBS, B.OUTPUT_EMBEDDING], {B.INPUT_NAME: batch})
        lp = float(np.max(np.abs(np.log(t_probs.astype(np.float64)) - np.log(o_probs.astype(np.float64)))))
        em = float(np.max(np.abs(t_emb - o_emb)))
        same = bool(
            np.array_equal(
                np.argsort(-t_probs, axis=1, kind="stable")[:, :5],
                np.argsort(-o_probs, axis=1, kind="stable")[:, :5],
            )
        )
        cases.append(
            {
                "batch": batch.shape[0],
                "height": batch.shape[1],
                "width": batch.shape[2],
                "max_log_prob_diff": lp,
                "max_embedding_diff": em,
                "top5_equal": same,
            }
        )
        lp_max, emb_max, top5 = max(lp_max, lp), max(emb_max, em), top5 and same
    return ParityReport(cases, lp_max, emb_max, top5)


# --------------------------------------------------------------------------- demo


def _commit(w: B.BundleWriter, arrays: tuple, *, source: str, extra: dict) -> B.Bundle:
    """Save the other arrays (cells, offsets, labels, row ids) next to the filled features and commit."""
    for rel, array in zip((B.CELLS, B.OFFSETS, B.LABELS, B.ROW_IDS), arrays):
        w.save(rel, array)
    return w.commit(source=source, tool=TOOL, extra=extra)


def build_demo(
    out: str | os.PathLike[str],
    *,
    cells: int = 2000,
    background: int = 50_000,
    seed: int = 0,
    features_dtype: str = "float16",
    overwrite: bool = False,
) -> B.Bundle:
    """A clearly labelled demo bundle: random seeded weights, synthetic background."""
    rng = np.random.default_rng(seed)
    centres = demo.cell_centres(cells, rng)
    with B.BundleWriter(out, overwrite=overwrite) as w:
        print(f"demo: calibrating heads ({demo.CALIBRATION_IMAGES} images)", file=sys.stderr)
        net, record = demo.build_demo_net(cells, centres, seed)
        print("demo: exporting ONNX", file=sys.stderr)
        export_onnx(net, w.path(B.MODEL))
        parity = check_parity(net, w.path(B.MODEL), parity_batches())
        if not parity.ok:
            raise RuntimeError(f"ONNX parity check failed: {parity.as_dict()}")
        record_probes(w, centres)
        print(f"demo: background N={background} over M={cells} cells", file=sys.stderr)
        offsets, labels, row_ids = demo.write_background(w, centres, background, rng, features_dtype)
        extra = {
            "warning": "DEMO BUNDLE: random weights, synthetic background. Not a geolocation model.",
            "demo": record | {"cells": cells, "background": background},
            "parity": parity.as_dict(),
        }
        return _commit(w, (centres, offsets, labels, row_ids), source="demo", extra=extra)


def demo_net_for(bundle: B.Bundle) -> VislocNet:
    """Rebuild the PyTorch network of a demo bundle from its recorded seed."""
    rec = bundle.manifest.get("demo")
    if bundle.source != "demo" or not rec:
        raise ValueError("not a demo bundle: pass the upstream checkpoint files to verify it")
    net, _ = demo.build_demo_net(bundle.num_cells, bundle.centres, int(rec["seed"]))
    return net


# --------------------------------------------------------------------------- upstream


def read_assignments(path: str | os.PathLike[str], num_cells: int, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``cells_assignments.pkl`` -> (order, offsets): rows grouped by cell, ascending within.

    Checked: every key a cell id in [0, M), every row an int in [0, N), each row exactly once.
    """
    data = safe_pickle.load_path(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict cell_id -> set(rows), got {type(data).__name__}")
    sizes = np.zeros(num_cells, dtype=np.int64)
    per_cell: dict[int, np.ndarray] = {}
    for cell, rows in data.items():
        if not isinstance(cell, int) or not 0 <= cell < num_cells:
            raise ValueError(f"{path}: cell id {cell!r} is not an int in [0, {num_cells})")
        if not isinstance(rows, (set, frozenset, list, tuple)):
            raise ValueError(f"{path}: rows of cell {cell} are a {type(rows).__name__}, not a set")
        arr = np.fromiter(rows, dtype=np.int64, count=len(rows)) if rows else np.empty(0, np.int64)
        per_cell[cell] = np.sort(arr)
        sizes[cell] = arr.size
    order = np.concatenate([per_cell[c] for c in sorted(per_cell)]) if per_cell else np.empty(0, np.int64)
    if order.size and (order.min() < 0 or order.max() >= num_rows):
        raise ValueError(f"{path}: row ids outside [0, {num_rows})")
    counts = np.bincount(order, minlength=num_rows)
    if order.size != num_rows or np.any(counts != 1):
        missing, repeated = int(np.sum(counts == 0)), int(np.sum(counts > 1))
        raise ValueError(
            f"{path}: every background row must be assigned exactly once; "
            f"{missing} rows unassigned, {repeated} assigned more than once"
        )
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return order, offsets


def import_upstream(
    out: str | os.PathLike[str],
    *,
    backbone: str,
    mvmf: str,
    rrm: str,
    background: str,
    assignments: str,
    features_dtype: str = "float16",
    chunk: int = 16384,
    overwrite: bool = False,
) -> B.Bundle:
    """Upstream checkpoints + background collection -> a bundle (parity-checked)."""
    net = load_upstream(backbone, mvmf, rrm)
    centres = net.cell_head.centres.numpy().astype(np.float64)
    with h5py.File(background, "r") as h5:
        if "features" not in h5 or "labels" not in h5:
            raise ValueError(f"{background}: needs datasets 'features' and 'labels'")
        fds, lds = h5["features"], h5["labels"]
        n = fds.shape[0]
        if fds.ndim != 2 or fds.shape[1] != B.EMBEDDING_DIM or lds.shape != (n, 2):
            raise ValueError(
                f"{background}: features must be [N, {B.EMBEDDING_DIM}] and labels [N, 2], "
                f"got {fds.shape} and {lds.shape}"
            )
        order, offsets = read_assignments(assignments, centres.shape[0], n)
        position = np.empty(n, dtype=np.int64)
        position[order] = np.arange(n, dtype=np.int64)
        with B.BundleWriter(out, overwrite=overwrite) as w:
            print("upstream: exporting ONNX", file=sys.stderr)
            export_onnx(net, w.path(B.MODEL))
            parity = check_parity(net, w.path(B.MODEL), parity_batches())
            if not parity.ok:
                raise RuntimeError(f"ONNX parity check failed: {parity.as_dict()}")
            record_probes(w, centres)
            feats = w.open_array(B.FEATURES, np.dtype(features_dtype), (n, B.EMBEDDING_DIM))
            labels = np.empty((n, 2), dtype=np.float64)
            with _progress(total=n, unit="rows", desc="background") as bar:
                for a in range(0, n, chunk):
                    b = min(n, a + chunk)
                    dest = position[a:b]
                    feats[dest] = fds[a:b].astype(feats.dtype)
                    labels[dest] = lds[a:b]
                    bar.update(b - a)
            feats.flush()
            del feats
            return _commit(
                w,
                (centres, offsets, labels, order),
                source="upstream",
                extra={
                    "upstream": {
                        k: os.path.basename(v)
                        for k, v in {
                            "backbone": backbone,
                            "mvmf": mvmf,
                            "rrm": rrm,
                            "background": background,
                            "assignments": assignments,
                        }.items()
                    },
                    "parity": parity.as_dict(),
                },
            )
