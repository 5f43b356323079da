"""``visloc-export index``: a bundle whose background holds your own geotagged photos.

Two passes, both with bounded memory:

1. **Embed** (resumable). Photos are read, hashed (duplicates by content are indexed once),
   located (CSV or EXIF GPS), preprocessed exactly as Locate does it
   (``visloc_client.preprocessing.preprocess``), batched by shape and embedded by the base
   bundle's model (in-process onnxruntime, or ``--triton``). Every ``checkpoint_every`` photos
   the embeddings go to disk as a chunk (``<out>.index-work/chunk-NNNNNN/*.npy``) and
   ``state.json`` records the position: an interrupted run resumes there.
2. **Assemble.** Each photo goes to the cell whose centre is nearest on the great circle
   (the upstream background was assigned by the training partition; with only the cell
   centres known, nearest centre is the rule available). The bundle is written with the ONE
   bundle writer: per-cell contiguous rows ordered by row id; with ``extend`` the base rows
   keep their row ids and new photos get ids after the base's largest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from swc_service import bundle as B
from swc_service.geo import haversine_km, latlon_to_unit
from visloc_client.exif import GPSError, gps_from_bytes
from visloc_client.preprocessing import ImageError, preprocess

from . import __version__
from .index_embed import EmbedError, OnnxEmbedder, TritonEmbedder
from .index_sources import Skip, Source, digest, read_list, walk_photos

TOOL = f"visloc-export {__version__} index"
REPORT = "index-report.json"
STATE = "state.json"
STATE_VERSION = 1
CELL_RULE = "nearest cell centre on the great circle"


@dataclass(frozen=True)
class Options:
    batch_size: int = 1
    concurrency: int = 2  # batches in flight at the model
    workers: int = 2  # threads reading and preprocessing photos
    checkpoint_every: int = 2048
    features_dtype: str = "float16"
    threads: int = 0  # onnxruntime intra-op threads (0: its default)


@dataclass
class _Photo:
    index: int
    path: str
    sha256: bytes
    latlon: tuple[float, float]
    array: np.ndarray


def work_dir_for(out: Path) -> Path:
    return out.parent / f"{out.name}.index-work"


# --------------------------------------------------------------------------- cells


def nearest_cells(latlon: np.ndarray, centres: np.ndarray, chunk_bytes: int = 32 << 20) -> np.ndarray:
    """Index of the nearest centre (great circle) for each (lat, lon): max dot product of unit
    vectors, in chunks of ``chunk_bytes`` so millions of photos x 31k cells stay small."""
    units = latlon_to_unit(centres)
    out = np.empty(len(latlon), dtype=np.int64)
    step = max(1, chunk_bytes // (8 * max(1, len(centres))))
    for a in range(0, len(latlon), step):
        out[a : a + step] = np.argmax(latlon_to_unit(latlon[a : a + step]) @ units.T, axis=1)
    return out


# --------------------------------------------------------------------------- pass 1


def _read(source: Source) -> _Photo | Skip:
    """Bytes -> hash, position and model input; a Skip with the reason when unusable."""
    try:
        data = source.path.read_bytes()
    except OSError as exc:
        return Skip(str(source.path), f"unreadable: {exc.strerror or exc}")
    try:
        latlon = source.latlon or gps_from_bytes(data)
    except GPSError as exc:
        return Skip(str(source.path), str(exc))
    try:
        array = preprocess(data).array
    except ImageError as exc:
        return Skip(str(source.path), f"unreadable: {exc}")
    return _Photo(-1, str(source.path), hashlib.sha256(data).digest(), latlon, array)


class _Checkpoint:
    """The work directory: committed chunks and the position after the last one."""

    def __init__(self, root: Path, meta: dict[str, Any]):
        self.root = root
        self.meta = meta
        root.mkdir(parents=True, exist_ok=True)
        state_path = root / STATE
        if state_path.is_file():
            state = json.loads(state_path.read_text())
            for key, value in meta.items():
                if state.get(key) != value:
                    raise ValueError(
                        f"{root} holds an interrupted run with another {key} ({state.get(key)!r}, now "
                        f"{value!r}); delete it to start over"
                    )
            self.state = state
        else:
            self.state = {"version": STATE_VERSION, **meta, "position": 0, "chunks": []}
        for stray in root.glob("chunk-*"):  # written but never recorded: redo
            if stray.name not in self.state["chunks"]:
                shutil.rmtree(stray)

    @property
    def position(self) -> int:
        return int(self.state["position"])

    def chunks(self) -> list[Path]:
        return [self.root / name for name in self.state["chunks"]]

    def commit(self, position: int, rows: list[tuple[_Photo, np.ndarray]], skipped, duplicates, dtype, dim) -> None:
        name = f"chunk-{len(self.state['chunks']):06d}"
        tmp = self.root / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        rows.sort(key=lambda r: r[0].index)  # row ids follow the source order
        feats = np.stack([e for _, e in rows]).astype(dtype) if rows else np.empty((0, dim), dtype)
        labels = np.array([p.latlon for p, _ in rows], dtype=np.float64).reshape(-1, 2)
        np.save(tmp / "features.npy", feats)
        np.save(tmp / "labels.npy", labels)
        np.save(tmp / "source_index.npy", np.array([p.index for p, _ in rows], dtype=np.int64))
        np.save(tmp / "sha256.npy", np.frombuffer(b"".join(p.sha256 for p, _ in rows), np.uint8).reshape(-1, 32))
        (tmp / "meta.json").write_text(
            json.dumps(
                {
                    "position": position,
                    "indexed": len(rows),
                    "skipped": [s.to_dict() for s in skipped],
                    "duplicates": duplicates,
                }
            )
        )
        os.rename(tmp, self.root / name)
        self.state["chunks"].append(name)
        self.state["position"] = position
        state_tmp = self.root / f"{STATE}.tmp"
        state_tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(state_tmp, self.root / STATE)


def _prepared(sources: list[Source], start: int, workers: int, lookahead: int) -> Iterator[_Photo | Skip]:
    """``_read`` over ``sources[start:]`` on a thread pool, in order, ``lookahead`` ahead."""
    with ThreadPoolExecutor(workers, thread_name_prefix="index-read") as pool:
        pending: deque[Future] = deque()
        it = iter(range(start, len(sources)))
        for i in it:
            pending.append(pool.submit(_read, sources[i]))
            if len(pending) >= lookahead:
                break
        while pending:
            yield pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(_read, sources[nxt]))


def embed_photos(sources: list[Source], embedder, ckpt: _Checkpoint, opts: Options, dim: int) -> None:
    """Pass 1: every photo from the checkpoint's position on, embedded into chunks."""
    seen: dict[bytes, int] = {}  # content hash -> index of the source indexed with it
    for chunk in ckpt.chunks():
        for digest_row, index in zip(np.load(chunk / "sha256.npy"), np.load(chunk / "source_index.npy")):
            seen[digest_row.tobytes()] = int(index)
    rows: list[tuple[_Photo, np.ndarray]] = []
    skipped: list[Skip] = []
    duplicates: list[dict[str, str]] = []
    groups: dict[tuple[int, ...], list[_Photo]] = {}
    inflight: deque[tuple[list[_Photo], Future]] = deque()

    def take_oldest() -> None:
        photos, future = inflight.popleft()
        emb = future.result()
        if emb.shape != (len(photos), dim):
            raise EmbedError(f"model returned embeddings {emb.shape}, expected {(len(photos), dim)}")
        rows.extend((p, e) for p, e in zip(photos, emb))

    def dispatch(shape: tuple[int, ...]) -> None:
        photos = groups.pop(shape)
        batch = np.stack([p.array for p in photos])
        for p in photos:
            p.array = None  # the batch holds the pixels now
        inflight.append((photos, embedder.submit(batch)))
        while len(inflight) > opts.concurrency:
            take_oldest()

    # Photos of one shape wait to fill a batch; with many aspect ratios that could be thousands
    # of decoded images, so past this many the largest group goes as it is.
    max_waiting = max(2 * opts.batch_size, 64)
    position = ckpt.position
    bar = tqdm(
        total=len(sources),
        initial=position,
        unit="photo",
        desc="index",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    try:
        for i, item in enumerate(_prepared(sources, position, opts.workers, 4 * opts.batch_size + 8), position):
            if isinstance(item, Skip):
                skipped.append(item)
            elif item.sha256 in seen:
                duplicates.append({"path": item.path, "duplicate_of": str(sources[seen[item.sha256]].path)})
            else:
                seen[item.sha256] = i
                item.index = i
                groups.setdefault(item.array.shape, []).append(item)
                if len(groups[item.array.shape]) >= opts.batch_size:
                    dispatch(item.array.shape)
                elif sum(map(len, groups.values())) > max_waiting:  # many shapes: send the largest group
                    dispatch(max(groups, key=lambda k: len(groups[k])))
            while inflight and inflight[0][1].done():
                take_oldest()
            bar.update(1)
            if i + 1 - position >= opts.checkpoint_every or i + 1 == len(sources):
                for shape in list(groups):
                    dispatch(shape)
                while inflight:
                    take_oldest()
                ckpt.commit(i + 1, rows, skipped, duplicates, np.dtype(opts.features_dtype), dim)
                position, rows, skipped, duplicates = i + 1, [], [], []
        if not sources or position < len(sources):  # nothing to read: still one (empty) chunk
            ckpt.commit(len(sources), [], skipped, duplicates, np.dtype(opts.features_dtype), dim)
    finally:
        bar.close()
        for _, future in inflight:
            future.cancel()


# --------------------------------------------------------------------------- pass 2


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def _carry_probes(base: B.Bundle, w: B.BundleWriter) -> None:
    """Same model, same probes and float64 reference: copied from the base, so the service can
    check its backend against the new bundle too. A base written before them passes that on
    (``visloc-export add-probes`` adds them to either bundle)."""
    if base.probes is None:
        print(f"index: base {base.path} has no probes; add them with `visloc-export add-probes`", file=sys.stderr)
        return
    own = ("images", "shapes", "cell_probs", "embeddings", "model_sha256", "reference")
    info = {k: v for k, v in base.probes.info.items() if k not in own} | {"copied_from_bundle": base.bundle_id}
    w.add_probes(list(base.probes.images), base.probes.cell_probs, base.probes.embeddings, info, base.probes.reference)


def assemble(
    base: B.Bundle,
    chunks: list[Path],
    out: Path,
    *,
    extend: bool,
    features_dtype: str,
    report: dict[str, Any],
    provenance: dict[str, Any],
    copy_rows: int = 65536,
) -> B.Bundle:
    """Pass 2: group base (with ``extend``) and new rows by cell into a new bundle."""
    m = base.num_cells
    dim = int(base.features.shape[1])
    chunk_labels = [np.load(c / "labels.npy") for c in chunks]
    new_labels = np.concatenate(chunk_labels) if chunk_labels else np.empty((0, 2))
    k = len(new_labels)
    new_cells = nearest_cells(new_labels, base.centres)
    new_count = np.bincount(new_cells, minlength=m).astype(np.int64)
    base_count = np.diff(base.offsets) if extend else np.zeros(m, np.int64)
    offsets = np.concatenate([[0], np.cumsum(base_count + new_count)]).astype(np.int64)
    n_base = int(base_count.sum())
    first_new_id = int(base.row_ids.max()) + 1 if extend and base.num_background else 0
    # Destination of new row j: after its cell's base rows, in source order within the cell.
    order = np.argsort(new_cells, kind="stable")
    rank = np.empty(k, np.int64)
    rank[order] = np.arange(k) - np.repeat(np.cumsum(new_count) - new_count, new_count)
    dest_new = offsets[new_cells] + base_count[new_cells] + rank
    distances = haversine_km(new_labels[:, 0], new_labels[:, 1], *base.centres[new_cells].T) if k else np.empty(0)

    with B.BundleWriter(out) as w:
        _link_or_copy(base.model_path, w.path(B.MODEL))
        _carry_probes(base, w)
        w.save(B.CELLS, base.centres)
        w.save(B.OFFSETS, offsets)
        total = n_base + k
        feats = w.open_array(B.FEATURES, np.dtype(features_dtype), (total, dim))
        labels = w.open_array(B.LABELS, np.float64, (total, 2))
        row_ids = w.open_array(B.ROW_IDS, np.int64, (total,))
        with tqdm(total=total, unit="row", desc="bundle", file=sys.stderr, dynamic_ncols=True) as bar:
            if n_base:
                shift = offsets[:-1] - base.offsets[:-1]
                cell_of = np.repeat(np.arange(m), base_count)
                for a in range(0, n_base, copy_rows):
                    b = min(n_base, a + copy_rows)
                    dest = np.arange(a, b) + shift[cell_of[a:b]]
                    feats[dest] = base.features[a:b]
                    labels[dest] = base.labels[a:b]
                    row_ids[dest] = base.row_ids[a:b]
                    bar.update(b - a)
            start = 0
            for chunk, lab in zip(chunks, chunk_labels):
                part = np.load(chunk / "features.npy", mmap_mode="r")
                dest = dest_new[start : start + len(lab)]
                feats[dest] = part
                labels[dest] = lab
                row_ids[dest] = first_new_id + np.arange(start, start + len(lab))
                start += len(lab)
                bar.update(len(lab))
        for array in (feats, labels, row_ids):
            array.flush()
        del feats, labels, row_ids
        report["cells"] = {
            "rule": CELL_RULE,
            "cells_with_new_photos": int(np.count_nonzero(new_count)),
            "distance_to_centre_km": {
                "median": float(np.median(distances)) if k else None,
                "max": float(np.max(distances)) if k else None,
            },
        }
        report["row_ids"] = {"base_kept": n_base, "first_new": first_new_id if k else None, "new": k}
        text = json.dumps(report, indent=1) + "\n"
        w.path(REPORT).write_text(text)
        extra = {
            "index": provenance | {"report": {"file": REPORT, "sha256": hashlib.sha256(text.encode()).hexdigest()}}
        }
        if "warning" in base.manifest:
            extra["warning"] = base.manifest["warning"]
        return w.commit(source="index", tool=TOOL, extra=extra)


# --------------------------------------------------------------------------- the command


def build_index(
    base_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    photos: str | os.PathLike[str] | None = None,
    photo_list: str | os.PathLike[str] | None = None,
    extend: bool = False,
    triton_url: str | None = None,
    triton_model: str = "visloc",
    options: Options = Options(),
) -> B.Bundle:
    """Index photos against a base bundle into a new bundle at ``out`` (see the module doc)."""
    if (photos is None) == (photo_list is None):
        raise ValueError("give exactly one of photos (a folder) or photo_list (a CSV)")
    if options.batch_size < 1 or options.concurrency < 1 or options.workers < 1 or options.checkpoint_every < 1:
        raise ValueError(f"batch size, concurrency, workers and checkpoint interval must be >= 1: {options}")
    base = B.load_bundle(base_dir)
    out = Path(out).resolve()
    if out.exists():
        raise B.BundleError(f"{out} exists; bundles are immutable (choose another --out)")
    work = work_dir_for(out)
    if photos is not None:
        sources, list_skips = walk_photos(photos, exclude=(out, work)), []
        source_desc = {"kind": "photos", "path": str(Path(photos).resolve())}
    else:
        sources, list_skips = read_list(photo_list)
        source_desc = {
            "kind": "list",
            "path": str(Path(photo_list).resolve()),
            "sha256": B.sha256_file(Path(photo_list)),
        }
    dim = int(base.features.shape[1])
    ckpt = _Checkpoint(
        work,
        {
            "base_bundle_id": base.bundle_id,
            "sources_sha256": digest(sources),
            "features_dtype": options.features_dtype,
        },
    )
    if ckpt.position:
        print(f"index: resuming at photo {ckpt.position} of {len(sources)} from {work}", file=sys.stderr)
    if ckpt.position < len(sources) or not ckpt.chunks():
        embedder = _embedder(base, triton_url, triton_model, options)
        ckpt.state["embedder"] = embedder.name
        try:
            embed_photos(sources, embedder, ckpt, options, dim)
        finally:
            embedder.close()
    embedder_name = ckpt.state.get("embedder", "")
    metas = [json.loads((c / "meta.json").read_text()) for c in ckpt.chunks()]
    skipped = [s.to_dict() for s in list_skips] + [s for meta in metas for s in meta["skipped"]]
    duplicates = [d for meta in metas for d in meta["duplicates"]]
    indexed = sum(meta["indexed"] for meta in metas)
    report = {
        "base": {"bundle_id": base.bundle_id, "source": base.source, "path": str(base.path)},
        "photos": source_desc,
        "extend": extend,
        "embedder": embedder_name,
        "counts": {
            "sources": len(sources) + len(list_skips),
            "indexed": indexed,
            "skipped": len(skipped),
            "duplicates": len(duplicates),
        },
        "skipped": skipped,
        "duplicates": duplicates,
    }
    provenance = {
        "base": report["base"],
        "photos": source_desc,
        "extend": extend,
        "embedder": embedder_name,
        "cell_rule": CELL_RULE,
        "counts": report["counts"],
    }
    result = assemble(
        base,
        ckpt.chunks(),
        out,
        extend=extend,
        features_dtype=options.features_dtype,
        report=report,
        provenance=provenance,
    )
    shutil.rmtree(work)
    return result


def _embedder(base: B.Bundle, triton_url: str | None, triton_model: str, options: Options):
    if triton_url is None:
        return OnnxEmbedder(base.model_path, options.threads)
    embedder = TritonEmbedder(triton_url, triton_model)
    try:
        embedder.check(base)
    except BaseException:
        embedder.close()
        raise
    return embedder


def summary_line(bundle: B.Bundle) -> str:
    counts = bundle.manifest["index"]["counts"]
    return (
        f"bundle {bundle.bundle_id} written to {bundle.path} (M={bundle.num_cells}, N={bundle.num_background}): "
        f"{counts['indexed']} photos indexed, {counts['skipped']} skipped, {counts['duplicates']} duplicates "
        f"(report: {bundle.path / REPORT})"
    )
