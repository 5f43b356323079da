"""The model bundle: one immutable directory the service loads in O(1).

Layout (format version 1)::

    manifest.json                  what it is, where it came from, sha256 of every file
    model.onnx                     uint8 image [B, H, W, 3] -> cell_probs [B, M], embedding [B, D]
    cells.npy                      float64 [M, 2] cell centres (lat, lon) degrees ("mus")
    background/offsets.npy         int64 [M + 1] CSR offsets: rows of cell c are [off[c], off[c+1])
    background/features.npy        float16 (default) or float32 [N, D] embeddings, grouped by cell
    background/labels.npy          float64 [N, 2] (lat, lon) of each row
    background/row_ids.npy         int64 [N] the row's index in the upstream collection
    probes/image_<i>.npy           uint8 [H, W, 3] probe image i, preprocessed (the model's input)
    probes/cell_probs.npy          float32 [P, M] the model's cell_probs for the P probes
    probes/embeddings.npy          float32 [P, D] the model's embeddings for the P probes
    probes/reference_cell_probs.npy  float64 [P, M] the network's float64 cell_probs for the probes
    probes/reference_embeddings.npy  float64 [P, D] the network's float64 embeddings for the probes
    parity.json                    (optional) the exporter's ONNX-vs-PyTorch parity report

The probes (optional: bundles written before them have none) prove which model a backend
serves: the service sends them through Triton and measures the answers' distance from the
network's float64 outputs, against the float32 noise envelope measured at export
(``swc_service.parity``, ``swc_service.model_check``). Bundles written before the float64
reference existed have probes without it. Probes are derived from the model, so they do not
enter ``bundle_id``; like every file they are listed with their sha256 in the manifest,
under ``files``, and described under ``probes``.

Rows of one cell are contiguous and ordered by upstream row id, so SwC reads one slice.
Every array is a plain ``.npy`` file memory-mapped read-only: no copy, no transpose, and the
page cache is shared by every worker process on the host.

The writer builds the bundle in a temporary sibling directory and renames it into place.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
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
PROBES_DIR = "probes"
PROBE_PROBS = "probes/cell_probs.npy"
PROBE_EMBEDDINGS = "probes/embeddings.npy"
REFERENCE_PROBS = "probes/reference_cell_probs.npy"
REFERENCE_EMBEDDINGS = "probes/reference_embeddings.npy"
PARITY = "parity.json"  # optional, derived from the model like the probes: listed, not in bundle_id

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


def probe_image_file(index: int) -> str:
    return f"{PROBES_DIR}/image_{index}.npy"


@dataclass(frozen=True)
class ProbeReference:
    """The bundle's network in float64 on the probes, and how far known arithmetics land from it.

    ``envelope[arithmetic][quantity]`` is the largest distance from float64 (as
    :mod:`swc_service.parity` measures it) that the arithmetic showed on the photos measured
    at export: ``fp32`` (PyTorch float32 there), ``tf32``, ``fp16`` (emulated).
    """

    cell_probs: np.ndarray  # float64 [P, M]
    embeddings: np.ndarray  # float64 [P, D]
    envelope: dict[str, dict[str, float]]
    info: dict[str, Any]  # how it was measured: runtime, photos, CPU, threads
    # The same distances on each probe, and their median over all the photos measured: the model
    # check allows each probe a multiple of its own (at least the median), which tells a wrong
    # model from noise far better than the largest distance any photo showed.
    per_probe: dict[str, dict[str, list[float]]] | None = None
    typical: dict[str, dict[str, float]] | None = None


@dataclass(frozen=True)
class Probes:
    """Probe images and the outputs the bundle's own model gave for them at export."""

    images: tuple[np.ndarray, ...]  # uint8 [H, W, 3] each, preprocessed: sent to the model as is
    cell_probs: np.ndarray  # float32 [P, M] (onnxruntime at export)
    embeddings: np.ndarray  # float32 [P, D]
    info: dict[str, Any]  # the manifest's "probes" entry
    reference: ProbeReference | None = None  # None: probes recorded before the float64 reference

    @property
    def names(self) -> list[str]:
        """Labels for reports: ``probe i (WxH)``."""
        return [f"probe {i} ({a.shape[1]}x{a.shape[0]})" for i, a in enumerate(self.images)]

    def batches(self, max_batch: int | None = None) -> list[tuple[list[int], np.ndarray]]:
        """The probes as the model is called on them: see :func:`batches_by_shape`."""
        return batches_by_shape(self.images, max_batch)


def batches_by_shape(images, max_batch: int | None = None) -> list[tuple[list[int], np.ndarray]]:
    """Images grouped by shape, first appearance first, at most ``max_batch`` per batch:
    (indices, uint8 [B, H, W, 3]). The exporter records probe outputs batched this way and the
    service's check sends them this way."""
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    out = []
    for idx in groups.values():
        step = max_batch or len(idx)
        for a in range(0, len(idx), step):
            part = idx[a : a + step]
            out.append((part, np.stack([images[i] for i in part])))
    return out


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
    probes: Probes | None = None  # None: a bundle written before probes existed

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

    @property
    def triton_version(self) -> str:
        """The version number the model is served under in Triton: :func:`triton_version`."""
        return triton_version(self.manifest["files"][MODEL]["sha256"])

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


def triton_version(model_sha256: str) -> str:
    """Triton's version number for a model: its sha256's first 12 hex digits as a decimal integer.

    Deterministic (the exporter's ``place`` names the version directory with it, the service
    asks Triton for exactly it), distinct per model (48 bits), and within Triton's int64
    versions. Models of several bundles can so be served side by side, each call answered by
    the model of the caller's bundle and never by "the latest".
    """
    digits = model_sha256.removeprefix("sha256:")[:12]
    if len(digits) != 12:
        raise BundleError(f"a model sha256 has 64 hex digits, got {model_sha256!r}")
    try:
        return str(int(digits, 16))
    except ValueError:
        raise BundleError(f"a model sha256 has 64 hex digits, got {model_sha256!r}") from None


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
    probes = _load_probes(root, manifest) if "probes" in manifest else None
    return Bundle(root, manifest, centres, offsets, features, labels, row_ids, probes)


def _load_probes(root: Path, manifest: dict[str, Any]) -> Probes:
    """Read and check the probes (small: read whole, sha256 checked, since they are the proof)."""
    info = manifest["probes"]
    files = manifest["files"]
    try:
        image_files = list(info["images"])
        probs_file, emb_file, model_sha = info["cell_probs"], info["embeddings"], info["model_sha256"]
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{root / MANIFEST}: the probes entry is incomplete ({exc!r} missing)") from exc
    if model_sha != files[MODEL]["sha256"]:
        raise BundleError(
            f"bundle {root}: the probes were recorded for model sha256:{str(model_sha)[:12]}, the bundle's "
            f"{MODEL} is sha256:{files[MODEL]['sha256'][:12]}"
        )
    arrays = []
    for rel in (*image_files, probs_file, emb_file):
        if rel not in files:
            raise BundleError(f"bundle {root}: probe file {rel} is not listed in the manifest's files")
        array = _load_array(root, rel, mmap=False)
        if sha256_file(root / rel) != files[rel]["sha256"]:
            raise BundleError(f"bundle {root}: probe file {rel} does not match its sha256 in the manifest")
        arrays.append(array)
    *images, probs, emb = arrays
    check_probes(images, probs, emb, int(manifest["num_cells"]), int(manifest["embedding_dim"]))
    reference = _load_reference(root, info["reference"], files, probs.shape, emb.shape) if "reference" in info else None
    return Probes(tuple(images), probs, emb, info, reference)


def _load_reference(
    root: Path, entry: Any, files: dict[str, Any], probs_shape: tuple[int, ...], emb_shape: tuple[int, ...]
) -> ProbeReference:
    try:
        rels = (entry["cell_probs"], entry["embeddings"])
        envelope, measured = entry["envelope"], entry["measured"]
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{root / MANIFEST}: the probes' reference entry is incomplete ({exc!r} missing)") from exc
    arrays = []
    for rel in rels:
        if rel not in files:
            raise BundleError(f"bundle {root}: reference file {rel} is not listed in the manifest's files")
        if sha256_file(root / rel) != files[rel]["sha256"]:
            raise BundleError(f"bundle {root}: reference file {rel} does not match its sha256 in the manifest")
        arrays.append(_load_array(root, rel, mmap=False))
    reference = ProbeReference(arrays[0], arrays[1], envelope, measured, entry.get("per_probe"), entry.get("typical"))
    check_reference(reference, probs_shape, emb_shape)
    return reference


def check_reference(reference: ProbeReference, probs_shape: tuple[int, ...], emb_shape: tuple[int, ...]) -> None:
    """float64 arrays of the probes' shapes, and an envelope of finite non-negative distances."""
    for rel, array, shape in (
        (REFERENCE_PROBS, reference.cell_probs, probs_shape),
        (REFERENCE_EMBEDDINGS, reference.embeddings, emb_shape),
    ):
        if array.dtype != np.float64 or array.shape != tuple(shape):
            raise BundleError(f"{rel} must be float64 {list(shape)}, got {array.dtype} {list(array.shape)}")
    env = reference.envelope
    if not isinstance(env, dict) or not env:
        raise BundleError(f"the probes' envelope must map arithmetics to distances, got {env!r}")

    def distance(v: Any) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v) and v >= 0

    for arithmetic, quantities in env.items():
        if not isinstance(quantities, dict) or not all(distance(v) for v in quantities.values()):
            raise BundleError(f"the probes' {arithmetic} envelope must hold finite distances >= 0, got {quantities!r}")
    if (reference.per_probe is None) != (reference.typical is None):
        raise BundleError("the probes' per-probe distances and their typical values go together")
    for name, table, ok in (
        ("per-probe", reference.per_probe or {}, lambda v: isinstance(v, list) and len(v) == probs_shape[0]
                                                            and all(distance(x) for x in v)),
        ("typical", reference.typical or {}, distance),
    ):  # fmt: skip
        for arithmetic, quantities in table.items():
            if arithmetic not in env or not isinstance(quantities, dict) or set(quantities) != set(env[arithmetic]):
                raise BundleError(f"the probes' {name} {arithmetic} distances do not match the envelope's quantities")
            if not all(ok(v) for v in quantities.values()):
                raise BundleError(f"the probes' {name} {arithmetic} distances must be finite, >= 0, one per probe")


def check_probes(images, cell_probs, embeddings, num_cells: int, embedding_dim: int) -> None:
    """Probe images uint8 [H, W, 3], outputs float32 [P, M] and [P, D]; raises :class:`BundleError`."""
    p = len(images)
    if p == 0:
        raise BundleError("probes: at least one probe image is needed")
    for i, image in enumerate(images):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) == 0:
            raise BundleError(f"{probe_image_file(i)} must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    if cell_probs.dtype != np.float32 or cell_probs.shape != (p, num_cells):
        raise BundleError(
            f"{PROBE_PROBS} must be float32 [{p}, {num_cells}], got {cell_probs.dtype} {list(cell_probs.shape)}"
        )
    if embeddings.dtype != np.float32 or embeddings.shape != (p, embedding_dim):
        raise BundleError(
            f"{PROBE_EMBEDDINGS} must be float32 [{p}, {embedding_dim}], "
            f"got {embeddings.dtype} {list(embeddings.shape)}"
        )


def content_id(files: dict[str, dict[str, Any]]) -> str:
    """``bundle_id``: sha256 over the model's and the arrays' hashes (probes, derived from the
    model, are left out, so adding them to an older bundle keeps its id)."""
    core = {rel: files[rel] for rel in (MODEL, *ARRAY_FILES)}
    return hashlib.sha256("".join(f"{k}:{v['sha256']}\n" for k, v in sorted(core.items())).encode()).hexdigest()[:12]


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
        self._probes: dict[str, Any] | None = None

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

    def add_probes(
        self,
        images: list[np.ndarray],
        cell_probs: np.ndarray,
        embeddings: np.ndarray,
        info: dict[str, Any],
        reference: ProbeReference | None = None,
    ) -> None:
        """Record probe images and the outputs that the bundle's ``model.onnx`` (already written)
        gave for them, with the network's float64 ``reference``; ``info`` says how they were made
        (tool, runtime, image sources)."""
        if not (self.tmp / MODEL).is_file():
            raise BundleError(f"write {MODEL} before its probes: they are its outputs")
        model_sha = sha256_file(self.tmp / MODEL)
        self._probes = _write_probe_files(self.tmp, images, cell_probs, embeddings, info, model_sha, reference)

    def commit(self, *, source: str, tool: str, extra: dict[str, Any] | None = None) -> Bundle:
        """Check the arrays, hash every file, write the manifest and move the bundle into place."""
        if not (self.tmp / MODEL).is_file():
            raise BundleError(f"bundle has no {MODEL}")
        arrays = [np.load(self.tmp / rel, mmap_mode="r") for rel in ARRAY_FILES]
        check_arrays(*arrays)
        files = {}
        for rel in (MODEL, *ARRAY_FILES):
            p = self.tmp / rel
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        bundle_id = content_id(files)
        if (self.tmp / PARITY).is_file():
            files[PARITY] = {"sha256": sha256_file(self.tmp / PARITY), "bytes": (self.tmp / PARITY).stat().st_size}
        probes_extra: dict[str, Any] = {}
        if self._probes is not None:
            entry, probe_files = _checked_probes(self.tmp, self._probes, files, arrays[0].shape[0], arrays[2].shape[1])
            files |= probe_files
            probes_extra = {"probes": entry}
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
            **probes_extra,
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


def _write_probe_files(
    root: Path,
    images: list[np.ndarray],
    cell_probs: np.ndarray,
    embeddings: np.ndarray,
    info: dict[str, Any],
    model_sha256: str,
    reference: ProbeReference | None = None,
) -> dict[str, Any]:
    """Save the probes under ``root/probes``; returns their manifest entry (without hashes)."""
    images = [np.ascontiguousarray(a) for a in images]
    cell_probs, embeddings = np.asarray(cell_probs), np.asarray(embeddings)
    check_probes(images, cell_probs, embeddings, cell_probs.shape[-1], embeddings.shape[-1])
    (root / PROBES_DIR).mkdir(exist_ok=True)
    rels = [probe_image_file(i) for i in range(len(images))]
    for rel, array in zip((*rels, PROBE_PROBS, PROBE_EMBEDDINGS), (*images, cell_probs, embeddings), strict=True):
        np.save(root / rel, np.ascontiguousarray(array), allow_pickle=False)
    entry = {
        **info,
        "images": rels,
        "shapes": [[int(a.shape[0]), int(a.shape[1])] for a in images],
        "cell_probs": PROBE_PROBS,
        "embeddings": PROBE_EMBEDDINGS,
        "model_sha256": model_sha256,
    }
    if reference is not None:
        entry["reference"] = _write_reference(root, reference, cell_probs.shape, embeddings.shape)
    return entry


def _write_reference(
    root: Path, reference: ProbeReference, probs_shape: tuple[int, ...], emb_shape: tuple[int, ...]
) -> dict[str, Any]:
    """Save the float64 reference next to the probes; returns its manifest entry (without hashes)."""
    check_reference(reference, probs_shape, emb_shape)
    for rel, array in ((REFERENCE_PROBS, reference.cell_probs), (REFERENCE_EMBEDDINGS, reference.embeddings)):
        np.save(root / rel, np.ascontiguousarray(array), allow_pickle=False)
    entry = {
        "cell_probs": REFERENCE_PROBS,
        "embeddings": REFERENCE_EMBEDDINGS,
        "envelope": {a: {q: float(v) for q, v in d.items()} for a, d in reference.envelope.items()},
        "measured": dict(reference.info),
    }
    if reference.per_probe is not None and reference.typical is not None:
        entry["per_probe"] = {
            a: {q: [float(x) for x in v] for q, v in d.items()} for a, d in reference.per_probe.items()
        }
        entry["typical"] = {a: {q: float(v) for q, v in d.items()} for a, d in reference.typical.items()}
    return entry


def _entry_files(entry: dict[str, Any]) -> list[str]:
    """Every file a probes entry names (images, outputs, the reference's arrays)."""
    ref = entry.get("reference")
    own = [*entry["images"], entry["cell_probs"], entry["embeddings"]]
    return own + ([ref["cell_probs"], ref["embeddings"]] if ref else [])


def _checked_probes(
    root: Path, entry: dict[str, Any], files: dict[str, dict[str, Any]], num_cells: int, embedding_dim: int
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The probes entry checked against the bundle's model and shapes, and the probe files' hashes."""
    if entry["model_sha256"] != files[MODEL]["sha256"]:
        raise BundleError(f"{MODEL} changed after its probes were computed: compute them again")
    probs = np.load(root / entry["cell_probs"])
    emb = np.load(root / entry["embeddings"])
    check_probes([np.load(root / rel) for rel in entry["images"]], probs, emb, num_cells, embedding_dim)
    if "reference" in entry:
        ref = entry["reference"]
        arrays = (np.load(root / ref["cell_probs"]), np.load(root / ref["embeddings"]))
        check_reference(
            ProbeReference(*arrays, ref["envelope"], ref["measured"], ref.get("per_probe"), ref.get("typical")),
            probs.shape, emb.shape,
        )  # fmt: skip
    probe_files = {}
    for rel in _entry_files(entry):
        p = root / rel
        probe_files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return entry, probe_files


def add_probes(
    path: str | os.PathLike[str],
    images: list[np.ndarray],
    cell_probs: np.ndarray,
    embeddings: np.ndarray,
    info: dict[str, Any],
    reference: ProbeReference | None = None,
) -> Bundle:
    """Add probes to a bundle written without them; its other files and ``bundle_id`` stay.

    The probe files are written first, then the manifest is replaced in one rename, so a reader
    sees the old bundle or the new one, never a manifest naming missing files. ``cell_probs``
    and ``embeddings`` must be the outputs of this bundle's own ``model.onnx`` for ``images``.
    """
    bundle = load_bundle(path)
    root = bundle.path
    if bundle.probes is not None:
        raise BundleError(f"bundle {root} already has probes")
    model_sha = _checked_model(bundle)
    leftover = root / PROBES_DIR
    if leftover.exists():  # an interrupted earlier run: not in the manifest, so nobody reads it
        shutil.rmtree(leftover)
    try:
        entry = _write_probe_files(root, images, cell_probs, embeddings, info, model_sha, reference)
        files = dict(bundle.manifest["files"])
        entry, probe_files = _checked_probes(root, entry, files, bundle.num_cells, bundle.features.shape[1])
    except BaseException:
        shutil.rmtree(leftover, ignore_errors=True)
        raise
    for p in leftover.rglob("*"):
        p.chmod(0o444)
    return _replace_manifest(root, {**bundle.manifest, "files": files | probe_files, "probes": entry})


def add_reference(path: str | os.PathLike[str], reference: ProbeReference) -> Bundle:
    """Give the probes of a bundle written before the float64 reference existed their reference
    (of the same probe images); every other file and ``bundle_id`` stay. Manifest last, in one rename."""
    bundle = load_bundle(path)
    root = bundle.path
    if bundle.probes is None:
        raise BundleError(f"bundle {root} has no probes to add a reference to")
    if bundle.probes.reference is not None:
        raise BundleError(f"bundle {root}: its probes already have a float64 reference")
    _checked_model(bundle)
    for rel in (REFERENCE_PROBS, REFERENCE_EMBEDDINGS):  # left by an interrupted run: nobody reads them
        (root / rel).unlink(missing_ok=True)
    try:
        entry = _write_reference(root, reference, bundle.probes.cell_probs.shape, bundle.probes.embeddings.shape)
        files = {}
        for rel in (entry["cell_probs"], entry["embeddings"]):
            files[rel] = {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
            (root / rel).chmod(0o444)
    except BaseException:
        for rel in (REFERENCE_PROBS, REFERENCE_EMBEDDINGS):
            (root / rel).unlink(missing_ok=True)
        raise
    manifest = bundle.manifest
    probes = {**manifest["probes"], "reference": entry}
    return _replace_manifest(root, {**manifest, "files": manifest["files"] | files, "probes": probes})


def _checked_model(bundle: Bundle) -> str:
    model_sha = sha256_file(bundle.path / MODEL)
    if model_sha != bundle.manifest["files"][MODEL]["sha256"]:
        raise BundleError(f"bundle {bundle.path}: {MODEL} does not match its sha256 in the manifest")
    return model_sha


def _replace_manifest(root: Path, manifest: dict[str, Any]) -> Bundle:
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=root)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
    os.chmod(tmp, 0o444)
    os.replace(tmp, root / MANIFEST)
    return load_bundle(root)
