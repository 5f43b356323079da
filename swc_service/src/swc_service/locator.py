"""The data plane: one image from bytes to a LocateResponse.

decode -> preprocess (thread pool) -> infer (shape-grouped batches) -> SwC -> PD -> reply.
Everything that can fail raises a :class:`~swc_service.errors.LocateFailure` subclass; the
gRPC layer maps it to a status in one place (:func:`~swc_service.errors.classify`).

The model server is injected (any :class:`~swc_service.inference.Inference`), and what an image
is answered against is one immutable :class:`~swc_service.prediction.ServingState` in
``Locator.state``, read once per image: assigning a new one swaps bundle and model version
atomically (in-flight images finish on the state they started with).
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor

from visloc_client.v1 import locator_pb2 as pb

from . import metrics
from .batcher import ShapeBatcher
from .bundle import Bundle
from .config import Settings
from .inference import Inference
from .options import resolve_options
from .prediction import ServingState, predict
from .preprocessing import Limits, PreparedImage, preprocess
from .reply import info_response, locate_response


class Locator:
    """Holds the serving state, the thread pool and the batcher in front of the inference."""

    def __init__(self, settings: Settings, bundle: Bundle, inference: Inference):
        self.settings = settings
        self.inference = inference
        self.state = ServingState.of(bundle, settings.pd_scales_km)
        self._preprocess = functools.partial(
            preprocess,
            limits=Limits(max_pixels=settings.max_image_pixels, max_side=settings.max_input_side),
            exif_transpose=settings.exif_transpose,
            crop=settings.preprocessing == "center_crop_300",
        )
        self.pool = ThreadPoolExecutor(max_workers=settings.preprocess_threads, thread_name_prefix="preprocess")
        self.batcher = ShapeBatcher(
            inference.infer,
            window_s=settings.batch_window_ms / 1000.0,
            max_batch=settings.max_batch,
            on_batch=metrics.TRITON_BATCH.observe,
        )
        metrics.BATCH_WINDOW.set(settings.batch_window_ms / 1000.0)
        metrics.set_bundle_info(bundle, True)

    async def locate(self, request: pb.LocateRequest, deadline: float | None = None) -> pb.LocateResponse:
        """Locate one image. ``deadline`` is a ``time.monotonic()`` instant, or None."""
        started = time.perf_counter()
        state = self.state
        opts = resolve_options(request.options, self.settings, state.density.scales_km)
        metrics.IMAGE_BYTES.observe(len(request.image))
        image = await self.prepare(request.image)
        out = await self.batcher.submit(image.array, deadline, state.triton_version)
        pred = predict(state, out.cell_probs, out.embedding, opts)
        stages = {
            "decode": image.decode_s,
            "preprocess": image.preprocess_s,
            "queue": out.queue_s,
            "triton": out.infer_s,
            "swc": pred.swc_s,
            "pd": pred.pd_s,
            "total": time.perf_counter() - started,
        }
        metrics.observe_located(image.source_width * image.source_height, stages, pred.method, pred.localizable)
        return locate_response(request.request_id, state, image, out, pred, stages)

    async def prepare(self, data: bytes) -> PreparedImage:
        """Decode and preprocess in the thread pool (the event loop keeps serving)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._preprocess, data)

    def info(self) -> pb.GetInfoResponse:
        return info_response(self.settings, self.state)

    async def close(self) -> None:
        await self.batcher.drain()
        self.pool.shutdown(wait=False, cancel_futures=True)
        await self.inference.close()
