"""Group concurrent requests by image shape and send each group to Triton as one batch.

Exact preprocessing keeps every photo's aspect ratio, so shapes vary, and Triton's dynamic
batcher only merges requests of equal shape, closing a batch at every change (SPEC.md 7).
Holding requests for a short window per shape restores batching without changing a single
pixel; Triton still merges the groups of many service replicas. Groups are keyed by (model
version, shape): during a bundle swap, images of the old and the new bundle never share a batch.
While tracing, each Triton request is one span linked to the span of every image it carries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from . import tracing


class InferFn(Protocol):
    """:meth:`swc_service.inference.Inference.infer`."""

    def __call__(
        self, batch: np.ndarray, timeout_s: float | None = None, *, model_version: str = ""
    ) -> Awaitable[tuple[np.ndarray, np.ndarray]]: ...


_Key = tuple[str, tuple[int, ...]]  # (model version, image shape)


@dataclass
class BatchedOutput:
    cell_probs: np.ndarray  # [M]
    embedding: np.ndarray  # [D]
    batch_size: int
    queue_s: float
    infer_s: float
    call: Any = None  # the SpanContext of the Triton request's span while tracing


@dataclass
class _Group:
    # (image, its future, when it was queued, its deadline, its caller's SpanContext or None)
    items: list[tuple[np.ndarray, asyncio.Future, float, float | None, Any]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class ShapeBatcher:
    """``await submit(image)`` -> that image's outputs, inferred together with equal shapes."""

    def __init__(
        self,
        infer: InferFn,
        window_s: float = 0.002,
        max_batch: int = 16,
        on_batch: Callable[[int], None] | None = None,
    ):
        self._infer = infer
        self.window_s = window_s
        self.max_batch = max_batch
        self._on_batch = on_batch
        self._pending: dict[_Key, _Group] = {}
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, image: np.ndarray, deadline: float | None = None, model_version: str = "") -> BatchedOutput:
        """``deadline`` is a ``time.monotonic()`` instant; the Triton call gets the latest one.
        ``model_version`` is the exact model version the image is inferred with ("" = default)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        key = (model_version, image.shape)
        group = self._pending.get(key)
        if group is None:
            group = self._pending[key] = _Group()
            group.timer = loop.call_later(self.window_s, self._flush, key)
        group.items.append((image, fut, time.monotonic(), deadline, tracing.context()))
        if len(group.items) >= self.max_batch:
            self._flush(key)
        return await fut

    def _flush(self, key: _Key) -> None:
        group = self._pending.pop(key, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._run(key[0], group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, model_version: str, group: _Group) -> None:
        live = [item for item in group.items if not item[1].done()]  # callers may have given up
        if not live:
            return
        batch = np.stack([item[0] for item in live])
        deadlines = [item[3] for item in live]
        timeout = None if any(d is None for d in deadlines) else max(deadlines) - time.monotonic()
        sent = time.monotonic()
        if self._on_batch is not None:
            self._on_batch(len(live))
        try:
            with tracing.triton_call([item[4] for item in live], model_version) as call:
                probs, emb = await self._infer(batch, timeout, model_version=model_version)
        except Exception as exc:  # noqa: BLE001 - every waiter gets the same failure
            for item in live:
                if not item[1].done():
                    item[1].set_exception(exc)
            return
        done = time.monotonic()
        for i, (_, fut, queued, _, _) in enumerate(live):
            if not fut.done():
                fut.set_result(BatchedOutput(probs[i], emb[i], len(live), sent - queued, done - sent, call))

    async def drain(self) -> None:
        """Send whatever is waiting now and wait for the batches in flight (graceful stop)."""
        for key in list(self._pending):
            self._flush(key)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
