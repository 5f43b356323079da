"""The model bundle: one immutable directory the service loads in O(1).

Layout (format version 1)::

    manifest.json                  what it is, where it came from, sha256 of every file
    model.onnx                     uint8 image [B, H, W, 3] -> cell_probs [B, M], embedding [B, D]
    cells.npy                      float64 [M, 2] cell centres (lat, lon) degrees ("mus")
    background/offsets.npy         int64 [M + 1] CSR offsets: rows of cell c are [off[c], off[c+1])
    background/features.npy        float16 (default) or float32 [N, D] embeddings, grouped by cell
    background/labels.npy          float64 [N, 2] (lat, lon) of each row
    background/row_ids.npy         int64 [N] the row's index in the upstream collection
    parity.json                    (optional) the exporter's ONNX-vs-PyTorch parity report

Rows of one cell are contiguous and ordered by upstream row id, so SwC reads one slice.
Every array is a plain ``.npy`` file memory-mapped read-only: no copy, no transpose, and the
page cache is shared by every worker process on the host.

The writer builds the bundle in a temporary sibling directory and renames it into place.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import mmap as _mmap_module
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "visloc-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL = "model.onnx"
CELLS = "cells.npy"
OFFSETS = "background/offsets.npy"
FEATURES = "background/features.npy"
LABELS = "background/labels.npy"
ROW_IDS = "background/row_ids.npy"
ARRAY_FILES = (CELLS, OFFSETS, FEATURES, LABELS, ROW_IDS)
PARITY = "parity.json"
OPTIONAL_FILES = (PARITY,)  # hashed into the manifest when the writer put them there

# The model contract shared by the exporter, Triton configs and the service.
INPUT_NAME = "image"
OUTPUT_PROBS = "cell_probs"
OUTPUT_EMBEDDING = "embedding"
EMBEDDING_DIM = 1792


class BundleError(ValueError):
    """A bundle is missing, incomplete or inconsistent; the message names the file."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: small arrays in memory, the background memory-mapped."""

    path: Path
    manifest: dict[str, Any]
    centres: np.ndarray  # float64 [M, 2]
    offsets: np.ndarray  # int64 [M + 1]
    features: np.ndarray  # memmap [N, D]
    labels: np.ndarray  # memmap float64 [N, 2]
    row_ids: np.ndarray  # memmap int64 [N]

    @property
    def model_path(self) -> Path:
        return self.path / MODEL

    @property
    def num_cells(self) -> int:
        return int(self.centres.shape[0])

    @property
    def num_background(self) -> int:
        return int(self.features.shape[0])

    @property
    def source(self) -> str:
        return str(self.manifest["source"])

    @property
    def bundle_id(self) -> str:
        """Short content id: the first 12 hex digits of the sha256 over the manifest's file hashes."""
        return str(self.manifest["bundle_id"])

    @property
    def model_version(self) -> str:
        return "sha256:" + self.manifest["files"][MODEL]["sha256"][:12]

    def cell_rows(self, cell: int) -> tuple[int, int]:
        return int(self.offsets[cell]), int(self.offsets[cell + 1])

    def cell_slice(self, cell: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features, labels, row_ids) of one cell: views into the memory maps."""
        a, b = self.cell_rows(cell)
        return self.features[a:b], self.labels[a:b], self.row_ids[a:b]

    def prefetch(self) -> None:
        """Ask the kernel to read the background into the page cache in the background
        (MADV_WILLNEED returns at once): the first requests then do not wait on the disk."""
        for array in (self.features, self.labels, self.row_ids):
            mapping = getattr(array, "_mmap", None)
            if mapping is not None and hasattr(_mmap_module, "MADV_WILLNEED"):
                mapping.madvise(_mmap_module.MADV_WILLNEED)

    def verify_checksums(self) -> list[str]:
        """Files whose sha256 differs from the manifest (reads everything: not for start-up)."""
        bad = []
        for rel, meta in self.manifest["files"].items():
            if sha256_file(self.path / rel) != meta["sha256"]:
                bad.append(rel)
        return bad


def _load_array(root: Path, rel: str, mmap: bool) -> np.ndarray:
    path = root / rel
    if not path.is_file():
        raise BundleError(f"bundle {root} lacks {rel}")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        raise BundleError(f"bundle file {rel} is not a valid .npy array: {exc}") from exc
    if mmap and hasattr(array, "_mmap") and hasattr(_mmap_module, "MADV_RANDOM"):
        # SwC reads one cell's slice at a random place: without this the kernel reads ahead
        # megabytes around every slice and fills the page cache with rows nobody asked for.
        array._mmap.madvise(_mmap_module.MADV_RANDOM)
    return array


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Open a bundle without reading the background: O(M) work, O(1) in N."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a bundle: no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: unsupported bundle format {manifest.get('format')!r} v{manifest.get('format_version')!r}"
        )
    if not (root / MODEL).is_file():
        raise BundleError(f"bundle {root} lacks {MODEL}")
    centres = _load_array(root, CELLS, mmap=False)
    offsets = _load_array(root, OFFSETS, mmap=False)
    features = _load_array(root, FEATURES, mmap=True)
    labels = _load_array(root, LABELS, mmap=True)
    row_ids = _load_array(root, ROW_IDS, mmap=True)
    check_arrays(centres, offsets, features, labels, row_ids)
    m, n = centres.shape[0], features.shape[0]
    if manifest.get("num_cells") != m or manifest.get("num_background") != n:
        raise BundleError(
            f"manifest says M={manifest.get('num_cells')}, N={manifest.get('num_background')}; "
            f"the arrays hold M={m}, N={n}"
        )
    return Bundle(root, manifest, centres, offsets, features, labels, row_ids)


def check_arrays(centres, offsets, features, labels, row_ids) -> None:
    """Shapes, dtypes and CSR consistency (O(M)); raises :class:`BundleError`."""
    if centres.ndim != 2 or centres.shape[1] != 2 or centres.dtype != np.float64:
        raise BundleError(f"{CELLS} must be float64 [M, 2], got {centres.dtype} {centres.shape}")
    m = centres.shape[0]
    if offsets.shape != (m + 1,) or offsets.dtype != np.int64:
        raise BundleError(f"{OFFSETS} must be int64 [{m + 1}], got {offsets.dtype} {offsets.shape}")
    if features.ndim != 2 or features.dtype not in (np.float16, np.float32):
        raise BundleError(f"{FEATURES} must be float16/float32 [N, D], got {features.dtype} {features.shape}")
    n = features.shape[0]
    if labels.shape != (n, 2) or labels.dtype != np.float64:
        raise BundleError(f"{LABELS} must be float64 [{n}, 2], got {labels.dtype} {labels.shape}")
    if row_ids.shape != (n,) or row_ids.dtype != np.int64:
        raise BundleError(f"{ROW_IDS} must be int64 [{n}], got {row_ids.dtype} {row_ids.shape}")
    if offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 0):
        raise BundleError(f"{OFFSETS} must rise from 0 to N={n}")


class BundleWriter:
    """Write a bundle into a temporary sibling directory, then rename it into place.

    Use as a context manager; nothing appears at ``out`` unless :meth:`commit` ran.
    """

    def __init__(self, out: str | os.PathLike[str], *, overwrite: bool = False):
        self.out = Path(out).resolve()
        if self.out.exists() and not overwrite:
            raise BundleError(f"{self.out} exists; bundles are immutable (pass overwrite to replace)")
        self.overwrite = overwrite
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        (self.tmp / "background").mkdir()
        self._committed = False

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self._committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, rel: str) -> Path:
        return self.tmp / rel

    def save(self, rel: str, array: np.ndarray) -> None:
        np.save(self.tmp / rel, np.ascontiguousarray(array), allow_pickle=False)

    def open_array(self, rel: str, dtype, shape: tuple[int, ...]) -> np.memmap:
        """A writable memory-mapped ``.npy`` to fill in chunks (for arrays larger than RAM)."""
        return np.lib.format.open_memmap(self.tmp / rel, mode="w+", dtype=dtype, shape=shape)

    def commit(self, *, source: str, tool: str, extra: dict[str, Any] | None = None) -> Bundle:
        """Check the arrays, hash every file, write the manifest and move the bundle into place."""
        if not (self.tmp / MODEL).is_file():
            raise BundleError(f"bundle has no {MODEL}")
        arrays = [np.load(self.tmp / rel, mmap_mode="r") for rel in ARRAY_FILES]
        check_arrays(*arrays)
        files = {}
        optional = tuple(rel for rel in OPTIONAL_FILES if (self.tmp / rel).is_file())
        for rel in (MODEL, *ARRAY_FILES, *optional):
            p = self.tmp / rel
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        bundle_id = hashlib.sha256(
            "".join(f"{k}:{v['sha256']}\n" for k, v in sorted(files.items())).encode()
        ).hexdigest()[:12]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "bundle_id": bundle_id,
            "source": source,
            "num_cells": int(arrays[0].shape[0]),
            "num_background": int(arrays[2].shape[0]),
            "embedding_dim": int(arrays[2].shape[1]),
            "features_dtype": str(arrays[2].dtype),
            "model": {
                "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["B", "H", "W", 3]},
                "outputs": {
                    OUTPUT_PROBS: {"dtype": "float32", "shape": ["B", int(arrays[0].shape[0])]},
                    OUTPUT_EMBEDDING: {"dtype": "float32", "shape": ["B", int(arrays[2].shape[1])]},
                },
            },
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tool": tool,
            "files": files,
            **(extra or {}),
        }
        del arrays
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for p in self.tmp.rglob("*"):
            if p.is_file():
                p.chmod(0o444)
        self.tmp.chmod(0o755)  # mkdtemp made it private
        if self.out.exists() and self.overwrite:
            shutil.rmtree(self.out)
        os.rename(self.tmp, self.out)
        self._committed = True
        return load_bundle(self.out)
