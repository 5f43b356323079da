"""bench/load.py counts a window of steady load: not the ramp, not the drain, errors from all."""

from __future__ import annotations

import asyncio

import pytest

from bench.load import Window, run_load


def test_the_window_opens_when_every_worker_has_an_answer_and_counts_until_closed():
    edges: list[str] = []

    async def go() -> Window:
        w = Window(workers=3, seconds=60.0, on_edge=edges.append)
        w.completed(0, 0.1, 1.0)
        w.completed(0, 0.1, 2.0)  # the same worker again: the ramp is not over
        w.completed(1, None, 3.0)  # a failed call still shows the worker has been round once
        assert w.opened is None and edges == [] and w.latencies == []
        w.completed(2, 0.1, 4.0)  # the last worker's first answer opens the window; it is ramp
        assert w.opened == 4.0 and edges == ["open"] and w.latencies == []
        w.completed(0, 0.2, 5.0)
        w.completed(1, None, 5.5)  # failures are never latencies
        w.completed(2, 0.3, 6.0)
        w.close()
        w.close()  # once
        w.completed(0, 0.4, 7.0)  # drain
        return w

    w = asyncio.run(go())
    assert edges == ["open", "close"] and w.over
    assert w.latencies == [0.2, 0.3]


def test_neither_the_ramp_nor_the_drain_is_counted():
    ended: list[int] = []
    edges: list[str] = []

    async def call(i: int) -> None:
        await asyncio.sleep(0.02)
        ended.append(i)

    result = asyncio.run(run_load(call, 4, 0.3, on_edge=edges.append))
    assert edges == ["open", "close"]
    assert result.calls > 0 and result.errors == {}
    # Each worker's first answer is ramp, and the 4 calls in flight when the window closed are
    # drain: at least 8 answers are outside the count.
    assert result.calls <= len(ended) - 8
    assert result.per_s == pytest.approx(result.calls / result.seconds)


def test_errors_are_reported_from_the_ramp_too():
    async def call(i: int) -> None:
        await asyncio.sleep(0.01)
        if i < 4:  # every worker's first call fails: the window still opens
            raise ValueError("refused")

    result = asyncio.run(run_load(call, 4, 0.1))
    assert result.errors == {"ValueError": 4}
    assert result.calls > 0


def test_running_out_of_calls_during_the_ramp_is_an_error_not_a_number():
    async def call(i: int) -> None:
        await asyncio.sleep(0.001)

    with pytest.raises(RuntimeError, match="before all 4 workers had completed a call"):
        asyncio.run(run_load(call, 4, 1.0, max_calls=2))
