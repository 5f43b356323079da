"""The data plane: one image from bytes to a LocateResponse.

decode -> preprocess (thread pool) -> infer (shape-grouped Triton batches) -> SwC -> PD -> reply.
Everything that can fail raises a :class:`~swc_service.errors.LocateFailure` subclass; the
gRPC layer maps it to a status in one place.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from visloc_client.v1 import locator_pb2 as pb

from . import __version__, metrics
from .batcher import ShapeBatcher
from .bundle import Bundle
from .config import Settings
from .errors import InferenceFailed, InvalidArgument, LocateFailure
from .method import DensityIndex, search_within_cell, top_cell
from .preprocessing import ImageError, Limits, center_crop, decode, prepare_image
from .triton_infer import TritonInference

MAX_TOP_K = 1000
MAX_TOP_CELLS = 100
MAX_EPS_KM = 20_015.1  # half the Earth's circumference


@dataclass(frozen=True)
class Options:
    top_k: int
    eps_km: float
    conf_scale_km: float
    conf_threshold: float
    return_neighbours: int
    return_top_cells: int


def resolve_options(req: pb.LocateOptions, settings: Settings, scales: tuple[float, ...]) -> Options:
    """Apply defaults and check ranges; a bad value is an INVALID_ARGUMENT naming it."""
    top_k = req.top_k if req.HasField("top_k") else settings.top_k
    if not 1 <= top_k <= MAX_TOP_K:
        raise InvalidArgument(f"top_k must be in [1, {MAX_TOP_K}], got {top_k}")
    eps = req.eps_km if req.HasField("eps_km") else settings.eps_km
    if not (math.isfinite(eps) and 0 < eps <= MAX_EPS_KM):
        raise InvalidArgument(f"eps_km must be in (0, {MAX_EPS_KM}], got {eps}")
    scale = req.conf_scale_km if req.HasField("conf_scale_km") else settings.conf_scale_km
    if scale not in scales:
        raise InvalidArgument(f"conf_scale_km {scale} is not a served PD scale; choose one of {list(scales)}")
    thres = req.conf_threshold if req.HasField("conf_threshold") else settings.conf_threshold
    if not (math.isfinite(thres) and 0 <= thres <= 1):
        raise InvalidArgument(f"conf_threshold must be in [0, 1], got {thres}")
    if req.return_neighbours > top_k:
        raise InvalidArgument(f"return_neighbours ({req.return_neighbours}) cannot exceed top_k ({top_k})")
    if req.return_top_cells > MAX_TOP_CELLS:
        raise InvalidArgument(f"return_top_cells must be in [0, {MAX_TOP_CELLS}], got {req.return_top_cells}")
    return Options(top_k, eps, scale, thres, req.return_neighbours, req.return_top_cells)


def _top_cells(probs: np.ndarray, n: int) -> np.ndarray:
    """The n most probable cells, most probable first (lower id first on ties)."""
    n = min(n, probs.shape[0])
    part = np.argpartition(-probs, n - 1)[:n] if n < probs.shape[0] else np.arange(probs.shape[0])
    kth = probs[part].min()
    pool = np.flatnonzero(probs >= kth)
    return pool[np.argsort(-probs[pool], kind="stable")][:n]


@dataclass(frozen=True)
class PreparedInput:
    array: np.ndarray  # uint8 [H, W, 3], what Triton gets
    width: int  # of the decoded image
    height: int
    decode_s: float
    preprocess_s: float


def prepare_input(data: bytes, settings: Settings, limits: Limits) -> PreparedInput:
    """Decode and preprocess one image (runs in the thread pool); bad bytes -> INVALID_ARGUMENT."""
    if len(data) == 0:
        raise InvalidArgument("image is empty (0 bytes)")
    try:
        t0 = time.perf_counter()
        img = decode(data, limits, exif_transpose=settings.exif_transpose)
        t1 = time.perf_counter()
        arr = prepare_image(img, limits)
        if settings.preprocessing == "center_crop_300":
            arr = center_crop(arr)
    except ImageError as exc:
        raise InvalidArgument(str(exc)) from exc
    return PreparedInput(arr, img.size[0], img.size[1], t1 - t0, time.perf_counter() - t1)


class Locator:
    """Holds the bundle, the PD index, the thread pool and the Triton batcher."""

    def __init__(self, settings: Settings, bundle: Bundle, inference: TritonInference):
        self.settings = settings
        self.bundle = bundle
        self.inference = inference
        self.density = DensityIndex(bundle.centres, settings.pd_scales_km)
        self.limits = Limits(max_pixels=settings.max_image_pixels, max_side=settings.max_input_side)
        self.pool = ThreadPoolExecutor(max_workers=settings.preprocess_threads, thread_name_prefix="preprocess")
        self.batcher = ShapeBatcher(
            inference.infer,
            window_s=settings.batch_window_ms / 1000.0,
            max_batch=settings.max_batch,
            on_batch=metrics.TRITON_BATCH.observe,
        )
        metrics.BATCH_WINDOW.set(settings.batch_window_ms / 1000.0)
        metrics.BUNDLE_INFO.labels(
            bundle.bundle_id, bundle.source, bundle.model_version, str(bundle.num_cells), str(bundle.num_background)
        ).set(1)

    async def locate(self, request: pb.LocateRequest, deadline: float | None = None) -> pb.LocateResponse:
        """Locate one image. ``deadline`` is a ``time.monotonic()`` instant, or None."""
        t_start = time.perf_counter()
        request_id = request.request_id or uuid.uuid4().hex
        opts = resolve_options(request.options, self.settings, self.density.scales_km)
        metrics.IMAGE_BYTES.observe(len(request.image))
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self.pool, prepare_input, request.image, self.settings, self.limits)
        arr, w, h = prepared.array, prepared.width, prepared.height
        t_decode, t_pre = prepared.decode_s, prepared.preprocess_s
        metrics.IMAGE_PIXELS.observe(w * h)

        out = await self.batcher.submit(arr, deadline)
        probs = out.cell_probs
        emb = out.embedding
        if probs.shape != (self.bundle.num_cells,) or emb.shape != (self.bundle.features.shape[1],):
            raise InferenceFailed(
                f"Triton's model returned {probs.shape[0]} cells / {emb.shape[0]}-d embeddings; the bundle "
                f"has {self.bundle.num_cells} / {self.bundle.features.shape[1]}: model and bundle disagree"
            )

        t0 = time.perf_counter()
        c = top_cell(probs)
        feats, labels, row_ids = self.bundle.cell_slice(c)
        swc = search_within_cell(emb, feats, labels, opts.top_k, opts.eps_km) if feats.shape[0] else None
        t_swc = time.perf_counter() - t0

        t0 = time.perf_counter()
        pd = self.density.density(c, probs)
        t_pd = time.perf_counter() - t0
        confidence = float(pd[self.density.scales_km.index(opts.conf_scale_km)])

        centre = self.bundle.centres[c]
        resp = pb.LocateResponse(
            request_id=request_id,
            method=pb.METHOD_SWC if swc else pb.METHOD_CELL,
            top_cell=pb.Cell(id=c, lat=float(centre[0]), lon=float(centre[1]), probability=float(probs[c])),
            confidence=confidence,
            localizable=confidence > opts.conf_threshold,
            model_version=self.bundle.model_version,
            background_version=self.bundle.bundle_id,
            image_width=w,
            image_height=h,
            input_width=arr.shape[1],
            input_height=arr.shape[0],
            batch_size=out.batch_size,
        )
        if swc:
            resp.lat, resp.lon = swc.lat, swc.lon
            for pos, sim, lab in list(zip(swc.candidates, swc.similarities, swc.cluster_labels))[
                : opts.return_neighbours
            ]:
                resp.neighbours.add(
                    row_id=int(row_ids[pos]),
                    similarity=float(sim),
                    lat=float(labels[pos, 0]),
                    lon=float(labels[pos, 1]),
                    cluster=int(lab),
                    in_prediction=bool(lab == swc.chosen_cluster),
                )
        else:
            resp.lat, resp.lon = float(centre[0]), float(centre[1])
        for scale, value in zip(self.density.scales_km, pd):
            resp.prediction_density.add(scale_km=scale, density=float(value))
        if opts.return_top_cells:
            for cell in _top_cells(probs, opts.return_top_cells):
                cc = self.bundle.centres[cell]
                resp.top_cells.add(id=int(cell), lat=float(cc[0]), lon=float(cc[1]), probability=float(probs[cell]))

        total = time.perf_counter() - t_start
        resp.timings.CopyFrom(
            pb.StageTimings(
                decode_ms=t_decode * 1e3,
                preprocess_ms=t_pre * 1e3,
                queue_ms=out.queue_s * 1e3,
                triton_ms=out.infer_s * 1e3,
                swc_ms=t_swc * 1e3,
                pd_ms=t_pd * 1e3,
                total_ms=total * 1e3,
            )
        )
        for stage, seconds in (
            ("decode", t_decode),
            ("preprocess", t_pre),
            ("queue", out.queue_s),
            ("triton", out.infer_s),
            ("swc", t_swc),
            ("pd", t_pd),
            ("total", total),
        ):
            metrics.STAGE_SECONDS.labels(stage).observe(seconds)
        metrics.PREDICTIONS.labels("swc" if swc else "cell", str(resp.localizable).lower()).inc()
        return resp

    def info(self) -> pb.GetInfoResponse:
        s = self.settings
        return pb.GetInfoResponse(
            service_version=__version__,
            model_name=s.triton_model,
            model_version=self.bundle.model_version,
            bundle_id=self.bundle.bundle_id,
            bundle_source=self.bundle.source,
            background_version=self.bundle.bundle_id,
            num_cells=self.bundle.num_cells,
            num_background=self.bundle.num_background,
            embedding_dim=int(self.bundle.features.shape[1]),
            pd_scales_km=list(self.density.scales_km),
            defaults=pb.LocateOptions(
                top_k=s.top_k, eps_km=s.eps_km, conf_scale_km=s.conf_scale_km, conf_threshold=s.conf_threshold
            ),
            max_image_bytes=s.max_message_bytes,
            max_image_pixels=s.max_image_pixels,
            preprocessing=s.preprocessing,
            bundle_warning=str(self.bundle.manifest.get("warning", "")),
        )

    async def close(self) -> None:
        await self.batcher.drain()
        self.pool.shutdown(wait=False, cancel_futures=True)
        await self.inference.close()


__all__ = ["Locator", "Options", "resolve_options", "LocateFailure"]
