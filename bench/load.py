"""An asyncio load generator: N calls in flight for a bounded time and count (loopback only)."""

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
    calls: int
    errors: dict[str, int]
    seconds: float
    per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    def as_dict(self) -> dict:
        return asdict(self)


async def run_load(
    call: Callable[[int], Awaitable[object]],
    concurrency: int,
    seconds: float,
    *,
    max_calls: int = 100_000,
    warmup_calls: int = 0,
) -> LoadResult:
    """Keep ``concurrency`` calls of ``call(i)`` in flight for ``seconds`` (after warm-up calls)."""
    for i in range(warmup_calls):
        await call(i)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    started = time.perf_counter()
    stop_at = started + seconds
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while time.perf_counter() < stop_at and issued < max_calls:
            i = issued
            issued += 1
            t = time.perf_counter()
            try:
                await call(i)
            except Exception as exc:  # noqa: BLE001 - counted, reported, never hidden
                code = getattr(exc, "code", None)
                errors[code().name if callable(code) else type(exc).__name__] += 1
                continue
            latencies.append(time.perf_counter() - t)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    lat = np.asarray(latencies) * 1e3 if latencies else np.asarray([np.nan])
    return LoadResult(
        concurrency, len(latencies), dict(errors), elapsed, len(latencies) / elapsed,
        *(float(np.percentile(lat, q)) for q in (50, 95, 99)),
    )  # fmt: skip
