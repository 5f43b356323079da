"""An asyncio load generator: N calls in flight, measured over a window of steady load (loopback only).

A closed loop that simply stops issuing at the deadline and waits for the calls in flight
counts their drain as measured time: at concurrency 16 and ~0.8 s per call the server runs
half empty for the last second of an 8 s point, and throughput reads several per cent low
(more at higher concurrency, none in-process, so ratios against in-process numbers were
biased). So the load runs in three phases, as perf_analyzer measures: a ramp until every
worker has completed one call (the queues are full), the measured window of ``seconds``
with the load held, then a drain that is not counted. Calls and latencies are those that
complete inside the window; errors are reported from every phase, none hidden.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class LoadResult:
    concurrency: int
    calls: int  # completed inside the window
    errors: dict[str, int]  # ramp, window and drain
    seconds: float  # the window
    per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    def as_dict(self) -> dict:
        return asdict(self)


class Window:
    """The measured window: opened once every worker has completed a call, closed by a timer
    ``seconds`` later; ``on_edge("open"|"close")`` runs at both edges (CPU snapshots)."""

    def __init__(self, workers: int, seconds: float, on_edge: Callable[[str], None] | None) -> None:
        self.workers, self.seconds, self.on_edge = workers, seconds, on_edge
        self.ramped: set[int] = set()
        self.opened: float | None = None
        self.closed: float | None = None
        self.latencies: list[float] = []
        self._timer: asyncio.TimerHandle | None = None

    def completed(self, worker: int, latency: float | None, now: float) -> None:
        """One call ended (``latency`` None: it failed)."""
        if self.opened is None:
            self.ramped.add(worker)
            if len(self.ramped) == self.workers:
                self._edge("open", now)
                self._timer = asyncio.get_running_loop().call_later(self.seconds, self.close)
        elif self.closed is None and latency is not None:
            self.latencies.append(latency)

    def close(self) -> None:
        if self.closed is None and self.opened is not None:
            self._edge("close", time.perf_counter())
        if self._timer is not None:
            self._timer.cancel()

    @property
    def over(self) -> bool:
        return self.closed is not None

    def _edge(self, edge: str, now: float) -> None:
        if self.on_edge:
            self.on_edge(edge)
        if edge == "open":
            self.opened = now
        else:
            self.closed = now


async def run_load(
    call: Callable[[int], Awaitable[object]],
    concurrency: int,
    seconds: float,
    *,
    max_calls: int = 100_000,
    warmup_calls: int = 0,
    on_edge: Callable[[str], None] | None = None,
) -> LoadResult:
    """Keep ``concurrency`` calls of ``call(i)`` in flight; measure ``seconds`` of steady load.

    ``warmup_calls`` run one at a time first (connections, first-shape allocations)."""
    for i in range(warmup_calls):
        await call(i)
    errors: Counter[str] = Counter()
    window = Window(concurrency, seconds, on_edge)
    issued = 0

    async def worker(k: int) -> None:
        nonlocal issued
        while not window.over and issued < max_calls:
            i = issued
            issued += 1
            t = time.perf_counter()
            try:
                await call(i)
            except Exception as exc:  # noqa: BLE001 - counted, reported, never hidden
                code = getattr(exc, "code", None)
                errors[code().name if callable(code) else type(exc).__name__] += 1
                window.completed(k, None, time.perf_counter())  # a worker whose calls fail still ramps
                continue
            now = time.perf_counter()
            window.completed(k, now - t, now)

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    if window.opened is None:
        raise RuntimeError(f"max_calls={max_calls} ran out before all {concurrency} workers had completed a call")
    window.close()  # max_calls may end the load inside the window
    assert window.closed is not None
    elapsed = window.closed - window.opened
    lat = np.asarray(window.latencies) * 1e3 if window.latencies else np.asarray([np.nan])
    return LoadResult(
        concurrency, len(window.latencies), dict(errors), elapsed, len(window.latencies) / elapsed,
        *(float(np.percentile(lat, q)) for q in (50, 95, 99)),
    )  # fmt: skip
