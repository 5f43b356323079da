"""The data plane: one image from bytes to a LocateResponse.

admission -> decode -> preprocess (thread pool) -> infer (shape-grouped batches) -> SwC -> PD
-> reply; while tracing (:mod:`swc_service.tracing`) each stage is a span of the call's trace.
A request that carries the model input made by the caller (``pixels``) skips the decode: its
shape is checked against the recipe instead.
Everything that can fail raises a :class:`~swc_service.errors.LocateFailure` subclass; the
gRPC layer maps it to a status in one place (:func:`~swc_service.errors.classify`).

Admission control (:class:`~swc_service.admission.AdmissionController`, one per event loop)
bounds the images being worked on (decode to model answer): a call whose deadline the queue
cannot meet is refused (RESOURCE_EXHAUSTED) before any CPU is spent on it, and an image that
expires while queued is never decoded nor sent to Triton.

The model server is injected (any :class:`~swc_service.inference.Inference`), and what an image
is answered against is one immutable :class:`~swc_service.prediction.ServingState` in
``Locator.state``, read once per image: assigning a new one swaps bundle and model version
atomically (in-flight images finish on the state they started with).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from visloc_client.preprocessing import Limits, PreparedImage, Recipe, from_pixels, preprocess
from visloc_client.v1 import locator_pb2 as pb

from . import metrics, tracing
from .admission import DEFAULT_CALLER, AdmissionController
from .batcher import ShapeBatcher
from .bundle import Bundle
from .claim import check_claim
from .config import Settings
from .errors import InvalidArgument, RecipeMismatch
from .inference import Inference
from .memory import MemoryBudget, file_cost, pixels_cost
from .options import resolve_options
from .prediction import ServingState, predict
from .reply import info_response, locate_response


class Locator:
    """Holds the serving state, the thread pool and the batcher in front of the inference."""

    def __init__(
        self,
        settings: Settings,
        bundle: Bundle,
        inference: Inference,
        model_status: Callable[[], tuple[bool, str]] | None = None,
        admission: AdmissionController | None = None,
    ):
        """``model_status()``: (the model check confirmed the current state's model, a warning
        for GetInfo); None (a test fake) means confirmed, no warning. ``admission``: the
        worker's admission controller (one per event loop); None makes one from the settings."""
        self.settings = settings
        self.inference = inference
        self.model_status = model_status
        self.admission = admission or AdmissionController(settings.admission_config())
        self.memory = MemoryBudget(settings.memory_budget_mb << 20, settings.max_message_bytes)
        self.state = ServingState.of(bundle, settings.pd_scales_km)
        self.recipe = Recipe(
            crop=settings.preprocessing == "center_crop_300",
            exif_transpose=settings.exif_transpose,
            limits=Limits(max_pixels=settings.max_image_pixels, max_side=settings.max_input_side),
        )
        self.fast_decode = settings.fast_decode
        self._preprocess = functools.partial(
            preprocess,
            limits=self.recipe.limits,
            exif_transpose=self.recipe.exif_transpose,
            crop=self.recipe.crop,
            draft=self.fast_decode,
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

    async def locate(
        self,
        request: pb.LocateRequest,
        deadline: float | None = None,
        caller: str = DEFAULT_CALLER,
        image_bytes: memoryview | None = None,
    ) -> pb.LocateResponse:
        """Locate one image for ``caller`` (its name keys the admission limits). ``deadline`` is a
        ``time.monotonic()`` instant, or None. ``image_bytes``: the request's image where gRPC
        received it (:mod:`~swc_service.wire`); None: ``request.image``."""
        started = time.perf_counter()
        state = self.state
        opts = resolve_options(request.options, self.settings, state.density.scales_km)
        pixels = request.pixels if request.HasField("pixels") else None
        # Read once: each read of a bytes field is a copy of the message's.
        data = request.image if image_bytes is None else image_bytes
        if pixels is not None and data:
            raise InvalidArgument("the request carries both image and pixels; set one")
        metrics.IMAGE_BYTES.observe(len(pixels.data) if pixels is not None else len(data))
        # The memory it will hold is reserved, then the call admitted (or refused at once) before
        # any CPU is spent on the image; a queued call holds only its bytes, and no image is
        # decoded only to lose the race for a slot.
        async with contextlib.AsyncExitStack() as held:
            with tracing.span("visloc.admission") as span:
                cost = pixels_cost(pixels.data) if pixels is not None else file_cost(data, draft=self.fast_decode)
                if span is not None:
                    span.set_attribute("visloc.memory.reserved_bytes", cost)
                held.enter_context(self.memory.hold(cost, caller))
                await held.enter_async_context(self.admission.admit(caller, deadline))
            image = self.checked(pixels) if pixels is not None else await self.prepare(data)
            submitted = tracing.now_ns()
            out = await self.batcher.submit(image.array, deadline, state.triton_version)
        tracing.record(
            "visloc.batch_wait",
            submitted,
            submitted + int(out.queue_s * 1e9),
            {"visloc.batch.size": out.batch_size},
            links=[out.call],  # the Triton request this image went in (shared with the batch)
        )
        with tracing.span("visloc.swc_pd") as span:
            pred = predict(state, out.cell_probs, out.embedding, opts)
            if span is not None:
                span.set_attributes({"visloc.method": pred.method, "visloc.localizable": pred.localizable})
        claims, claim_s = (), 0.0
        if opts.claims:
            with tracing.span("visloc.claims", {"visloc.claims": len(opts.claims)}):
                t0 = time.perf_counter()
                claims = tuple(
                    check_claim(state, out.cell_probs, out.embedding, c, (pred.lat, pred.lon), opts.claim_radius_km,
                                opts.claim_neighbours, at)
                    for c, at in zip(opts.claims, pred.claimed, strict=True)
                )  # fmt: skip
                claim_s = time.perf_counter() - t0
        stages = {
            "decode": image.decode_s,
            "preprocess": image.preprocess_s,
            "queue": out.queue_s,
            "triton": out.infer_s,
            "swc": pred.swc_s,
            "pd": pred.pd_s,
            **({"claim": claim_s} if opts.claims else {}),
            "total": time.perf_counter() - started,
        }
        metrics.observe_located(
            image.source_width * image.source_height, stages, pred.method, pred.localizable, tracing.exemplar()
        )
        return locate_response(request.request_id, state, image, out, pred, stages, claims)

    async def prepare(self, data: bytes | memoryview) -> PreparedImage:
        """Decode and preprocess in the thread pool (the event loop keeps serving)."""
        with tracing.span("visloc.decode", {"visloc.image.bytes": len(data)}) as span:
            image = await asyncio.get_running_loop().run_in_executor(self.pool, self._preprocess, data)
            if span is not None:
                span.set_attributes(
                    {
                        "visloc.image.source_size": f"{image.source_width}x{image.source_height}",
                        "visloc.decode_ms": round(image.decode_s * 1e3, 3),
                        "visloc.preprocess_ms": round(image.preprocess_s * 1e3, 3),
                    }
                )
            return image

    def checked(self, pixels: pb.Pixels) -> PreparedImage:
        """A caller's model input: made with this service's recipe, of the shape it gives."""
        recipe = self.recipe
        if (pixels.preprocessing, pixels.exif_transpose) != (recipe.preprocessing, recipe.exif_transpose):
            raise RecipeMismatch(
                f"pixels made with preprocessing {pixels.preprocessing or '(unset)'!r}, exif_transpose "
                f"{pixels.exif_transpose}; this service uses {recipe.preprocessing!r}, exif_transpose "
                f"{recipe.exif_transpose} (GetInfo): send the image file, or preprocess as GetInfo says"
            )
        return from_pixels(pixels.data, pixels.height, pixels.width, pixels.source_width, pixels.source_height, recipe)

    def info(self) -> pb.GetInfoResponse:
        confirmed, warning = self.model_status() if self.model_status is not None else (True, "")
        return info_response(self.settings, self.state, confirmed, warning)

    async def close(self) -> None:
        await self.batcher.drain()
        self.pool.shutdown(wait=False, cancel_futures=True)
        await self.inference.close()
