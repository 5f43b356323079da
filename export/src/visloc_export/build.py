"""Write bundles (demo and upstream) and check ONNX-vs-PyTorch parity."""

from __future__ import annotations

import json
import os
import sys

import h5py
import numpy as np
from tqdm import tqdm

from swc_service import bundle as B
from visloc_client import safe_pickle

from . import __version__, demo, probes
from .model import VislocNet, load_upstream
from .onnx_export import export_onnx
from .parity import check_parity, parity_batches
from .reference import ReferenceModel, TorchReference

TOOL = f"visloc-export {__version__}"
DEMO_WARNING = "DEMO BUNDLE: random weights, synthetic background. Not a geolocation model."


def _progress(**kw) -> tqdm:
    return tqdm(file=sys.stderr, dynamic_ncols=True, mininterval=0.5, **kw)


# --------------------------------------------------------------------------- parity


def gate(w: B.BundleWriter, model: ReferenceModel, centres: np.ndarray, *, accept_failure: bool = False) -> dict:
    """Run the parity gate on the written ONNX against ``model`` (the network it was exported
    from, e.g. a :class:`~visloc_export.reference.TorchReference`), record the probes with their
    float64 reference, put parity.json in the bundle and print it.

    Returns the manifest entries; raises unless the gate passed or ``accept_failure``.
    """
    images, sources = probes.choose(model)
    report, measurement = check_parity(model, w.path(B.MODEL), centres, parity_batches(), extra_photos=images)
    record = report.as_dict()
    w.path(B.PARITY).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "cases"}, indent=2), file=sys.stderr)
    print("\n".join([report.summary(), *(f"  {f}" for f in report.failures)]), file=sys.stderr)
    if not report.ok and not accept_failure:
        raise RuntimeError(
            f"ONNX parity check failed ({len(report.failures)} failures, first: {report.failures[0]}); "
            "nothing written. --accept-parity-failure imports anyway, marked in the manifest"
        )
    reference = measurement.reference([measurement.index(image) for image in images])
    probes.record(w, centres, images, sources, reference)
    if report.ok:
        return {"parity": record}
    return {
        "parity": record,
        "parity_failure_accepted": True,
        "warning": (
            f"PARITY CHECK FAILED, imported with --accept-parity-failure: the served ONNX model "
            f"differs from the PyTorch model ({report.failures[0]}); see {B.PARITY}"
        ),
    }


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
    accept_parity_failure: bool = False,
) -> B.Bundle:
    """A clearly labelled demo bundle: random seeded weights, synthetic background."""
    rng = np.random.default_rng(seed)
    centres = demo.cell_centres(cells, rng)
    with B.BundleWriter(out, overwrite=overwrite) as w:
        print(f"demo: calibrating heads ({demo.CALIBRATION_IMAGES} images)", file=sys.stderr)
        net, record = demo.build_demo_net(cells, centres, seed)
        print("demo: exporting ONNX", file=sys.stderr)
        export_onnx(net, w.path(B.MODEL))
        parity = gate(w, TorchReference(net), centres, accept_failure=accept_parity_failure)
        print(f"demo: background N={background} over M={cells} cells", file=sys.stderr)
        offsets, labels, row_ids = demo.write_background(w, centres, background, rng, features_dtype)
        extra = parity | {
            "warning": " ".join([DEMO_WARNING, parity["warning"]] if "warning" in parity else [DEMO_WARNING]),
            "demo": record | {"cells": cells, "background": background},
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
    accept_parity_failure: bool = False,
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
            parity = gate(w, TorchReference(net), centres, accept_failure=accept_parity_failure)
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
                }
                | parity,
            )
