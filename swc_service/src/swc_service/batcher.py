"""Group concurrent requests by image shape and send each group to Triton as one batch.

Exact preprocessing keeps every photo's aspect ratio, so shapes vary, and Triton's dynamic
batcher only merges requests of equal shape, closing a batch at every change (SPEC.md 7).
Holding requests for a short window per shape restores batching without changing a single
pixel; Triton still merges the groups of many service replicas.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

InferFn = Callable[[np.ndarray, "float | None"], Awaitable[tuple[np.ndarray, np.ndarray]]]


@dataclass
class BatchedOutput:
    cell_probs: np.ndarray  # [M]
    embedding: np.ndarray  # [D]
    batch_size: int
    queue_s: float
    infer_s: float


@dataclass
class _Group:
    items: list[tuple[np.ndarray, asyncio.Future, float, float | None]] = field(default_factory=list)
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
        self._pending: dict[tuple[int, ...], _Group] = {}
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, image: np.ndarray, deadline: float | None = None) -> BatchedOutput:
        """``deadline`` is a ``time.monotonic()`` instant; the Triton call gets the latest one."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        group = self._pending.get(image.shape)
        if group is None:
            group = self._pending[image.shape] = _Group()
            group.timer = loop.call_later(self.window_s, self._flush, image.shape)
        group.items.append((image, fut, time.monotonic(), deadline))
        if len(group.items) >= self.max_batch:
            self._flush(image.shape)
        return await fut

    def _flush(self, shape: tuple[int, ...]) -> None:
        group = self._pending.pop(shape, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._run(group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, group: _Group) -> None:
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
            probs, emb = await self._infer(batch, timeout)
        except Exception as exc:  # noqa: BLE001 - every waiter gets the same failure
            for _, fut, _, _ in live:
                if not fut.done():
                    fut.set_exception(exc)
            return
        done = time.monotonic()
        for i, (_, fut, queued, _) in enumerate(live):
            if not fut.done():
                fut.set_result(BatchedOutput(probs[i], emb[i], len(live), sent - queued, done - sent))

    async def drain(self) -> None:
        """Send whatever is waiting now and wait for the batches in flight (graceful stop)."""
        for shape in list(self._pending):
            self._flush(shape)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
