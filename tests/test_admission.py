"""Admission control (swc_service.admission): a fake clock and explicit event-loop steps decide
every outcome; no real time passes between a cause and its checked effect."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from swc_service.admission import (
    CALLER_LIMIT,
    DEADLINE_UNMEETABLE,
    EXPIRED_IN_QUEUE,
    QUEUE_FULL,
    QUEUE_TIMEOUT,
    AdmissionConfig,
    AdmissionController,
    DeliveryLimit,
)
from swc_service.errors import DeadlineExceeded, Overloaded, Unavailable


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def shed(self, caller: str, reason: str) -> None:
        self.events.append(("shed", caller, reason))

    def queue_wait(self, caller: str, seconds: float) -> None:
        self.events.append(("wait", caller, seconds))

    def in_flight(self, caller: str, delta: int) -> None:
        self.events.append(("in_flight", caller, delta))

    def limit(self, value: int) -> None:
        self.events.append(("limit", value))


def fixed(limit: int = 2, **kw) -> AdmissionConfig:
    kw.setdefault("timers", False)
    return AdmissionConfig(initial_limit=limit, min_limit=1, max_limit=max(limit, 64), adaptive=False, **kw)


async def steps(n: int = 5) -> None:
    """Let queued tasks run (loop iterations, not time)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def serve_one(ac: AdmissionController, clock: Clock, seconds: float, caller: str = "a") -> None:
    """One call alone that takes ``seconds``: the controller's measured service time."""
    slot = await ac.acquire(caller)
    clock.t += seconds
    ac.release(slot)


async def cancel(*tasks: asyncio.Task) -> None:
    """Cancel waiting calls (as their callers going away) and let the controller see it."""
    for t in tasks:
        t.cancel()
    await steps()


def run(coro):
    return asyncio.run(coro)


def test_admits_up_to_the_limit_then_queues_fifo_and_releases_in_order():
    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(2), clock=clock)
        a = await ac.acquire("x")
        b = await ac.acquire("x")
        t3 = asyncio.create_task(ac.acquire("x"))
        t4 = asyncio.create_task(ac.acquire("x"))
        await steps()
        assert not t3.done() and not t4.done()
        assert ac.stats().in_flight == 2 and ac.stats().queued == 2
        clock.t += 0.01  # within codel_interval_s: FIFO
        ac.release(a)
        await steps()
        assert t3.done() and not t4.done()
        ac.release(b)
        await steps()
        assert t4.done()
        s3 = t3.result()
        assert s3.queue_wait_s == pytest.approx(0.01)
        ac.release(s3)
        ac.release(t4.result())
        st = ac.stats()
        assert (st.in_flight, st.queued, st.admitted, st.completed, st.queue_waits) == (0, 0, 4, 4, 2)

    run(go())


def test_double_release_is_an_error():
    async def go():
        ac = AdmissionController(fixed(1), clock=Clock())
        s = await ac.acquire()
        ac.release(s)
        with pytest.raises(RuntimeError):
            ac.release(s)
        assert ac.stats().in_flight == 0

    run(go())


def test_deadline_unmeetable_is_refused_at_once_with_resource_exhausted():
    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(1), clock=clock)
        s = await ac.acquire("a", clock.t + 10)
        clock.t += 0.5  # one measured service time: 0.5 s
        ac.release(s)
        assert ac.stats().service_s == pytest.approx(0.5)
        held = await ac.acquire("a", clock.t + 10)
        queued = [asyncio.create_task(ac.acquire("a", clock.t + 10)) for _ in range(3)]
        await steps()
        # 3 queued ahead, limit 1, 0.5 s each: waits ~2 s, then 0.5 s of service.
        assert ac.estimated_wait_s("a") == pytest.approx(2.0)
        with pytest.raises(Overloaded) as ei:
            await ac.acquire("a", clock.t + 2.4)
        assert ei.value.reason == DEADLINE_UNMEETABLE and ei.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        meetable = asyncio.create_task(ac.acquire("a", clock.t + 2.6))
        await steps()
        assert not meetable.done()  # queued, not refused
        assert ac.stats().shed == {DEADLINE_UNMEETABLE: 1}
        await cancel(*queued, meetable)
        ac.release(held)
        assert ac.stats().queued == 0

    run(go())


def test_no_service_time_measured_yet_admits_to_the_queue():
    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(1), clock=clock)
        held = await ac.acquire("a", clock.t + 0.1)
        t = asyncio.create_task(ac.acquire("a", clock.t + 0.001))
        await steps()
        assert not t.done() and ac.stats().queued == 1
        t.cancel()
        await steps()
        ac.release(held)

    run(go())


def test_expired_deadline_is_refused_before_queueing():
    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(1), clock=clock)
        with pytest.raises(DeadlineExceeded):
            await ac.acquire("a", clock.t)
        assert ac.stats().shed == {EXPIRED_IN_QUEUE: 1} and ac.stats().in_flight == 0

    run(go())


def test_call_expiring_in_the_queue_is_dropped_and_never_admitted():
    async def go():
        clock = Clock()
        rec = Recorder()
        ac = AdmissionController(fixed(1), clock=clock, observer=rec)
        held = await ac.acquire("a")
        t = asyncio.create_task(ac.acquire("b", clock.t + 1.0))
        await steps()
        clock.t += 1.0
        ac.sweep()
        await steps()
        with pytest.raises(DeadlineExceeded):
            t.result()
        ac.release(held)
        st = ac.stats()
        assert st.shed_by_caller == {("b", EXPIRED_IN_QUEUE): 1}
        assert st.admitted == 1 and st.queued == 0
        assert ("shed", "b", EXPIRED_IN_QUEUE) in rec.events

    run(go())


def test_expired_call_is_dropped_when_a_slot_frees_even_without_sweep():
    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(1, codel_target_s=None), clock=clock)
        held = await ac.acquire("a")
        late = asyncio.create_task(ac.acquire("a", clock.t + 1.0))
        fine = asyncio.create_task(ac.acquire("a", clock.t + 100.0))
        await steps()
        clock.t += 1.0  # the queue stands (LIFO): fine is served, late is dropped on the way
        ac.release(held)
        await steps()
        assert isinstance(late.exception(), DeadlineExceeded)
        assert fine.done() and fine.exception() is None
        ac.release(fine.result())

    run(go())


def test_timer_expires_a_queued_call_on_the_real_loop():
    """timers=True with the real clock: the only way the call can end is its deadline timer."""

    async def go():
        import time

        ac = AdmissionController(AdmissionConfig(initial_limit=1, adaptive=False))
        held = await ac.acquire("a")
        with pytest.raises(DeadlineExceeded):
            await ac.acquire("a", time.monotonic() + 0.02)
        assert ac.stats().queued == 0 and ac.stats().shed == {EXPIRED_IN_QUEUE: 1}
        ac.release(held)

    run(go())


def test_queue_full_and_caller_queue_cap():
    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(1, max_queue=3, caller_max_queued=2), clock=clock)
        held = await ac.acquire("a")
        ts = [asyncio.create_task(ac.acquire("a")) for _ in range(2)]
        await steps()
        with pytest.raises(Overloaded) as ei:
            await ac.acquire("a")
        assert ei.value.reason == CALLER_LIMIT
        tb = asyncio.create_task(ac.acquire("b"))
        await steps()
        with pytest.raises(Overloaded) as ei:
            await ac.acquire("c")
        assert ei.value.reason == QUEUE_FULL
        assert ac.stats().shed_by_caller == {("a", CALLER_LIMIT): 1, ("c", QUEUE_FULL): 1}
        await cancel(*ts, tb)
        assert ac.stats().queued == 0
        ac.release(held)

    run(go())


def test_round_robin_between_callers_keeps_a_small_caller_served():
    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(1), clock=clock)
        held = await ac.acquire("a")
        big = [asyncio.create_task(ac.acquire("a")) for _ in range(10)]
        await steps()
        small = asyncio.create_task(ac.acquire("b"))
        await steps()
        # One slot frees: B has waited behind 10 of A's calls but is served right after one of A's.
        order = []
        cur = held
        for _ in range(3):
            ac.release(cur)
            await steps()
            done = [t for t in [*big, small] if t.done() and t not in order]
            assert len(done) == 1
            order.append(done[0])
            cur = done[0].result()
        assert small in order[:2]
        ac.release(cur)
        await cancel(*big)

    run(go())


def test_caller_in_flight_cap_lets_other_callers_through():
    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(4, caller_max_in_flight=2), clock=clock)
        a1, a2 = await ac.acquire("a"), await ac.acquire("a")
        a3 = asyncio.create_task(ac.acquire("a"))
        await steps()
        assert not a3.done()  # A is at its cap though two slots are free
        b1 = await ac.acquire("b")  # B goes straight in
        assert ac.stats().callers == {"a": (2, 1), "b": (1, 0)}
        ac.release(a1)
        await steps()
        assert a3.done()
        for s in (a2, b1, a3.result()):
            ac.release(s)

    run(go())


def test_standing_queue_turns_lifo_and_times_out_old_calls():
    async def go():
        clock = Clock()
        cfg = fixed(1, codel_interval_s=0.1, codel_target_s=0.5)
        ac = AdmissionController(cfg, clock=clock)
        held = await ac.acquire("a")
        old = asyncio.create_task(ac.acquire("a", clock.t + 1.0))
        await steps()
        clock.t += 0.3
        mid = asyncio.create_task(ac.acquire("a", clock.t + 1.0))
        new = asyncio.create_task(ac.acquire("a", clock.t + 1.0))
        await steps()
        assert ac.stats().standing  # non-empty for 0.3 s > 0.1 s
        ac.release(held)  # LIFO: the freshest call is served first
        await steps()
        assert new.done() and not old.done() and not mid.done()
        clock.t += 0.3  # old has waited 0.6 s > 0.5 s under a standing queue
        ac.release(new.result())
        await steps()
        assert isinstance(old.exception(), Overloaded) and old.exception().reason == QUEUE_TIMEOUT
        assert mid.done() and mid.exception() is None
        ac.release(mid.result())
        st = ac.stats()
        assert not st.standing and st.shed == {QUEUE_TIMEOUT: 1}

    run(go())


def test_standing_queue_refuses_at_once_what_would_outwait_the_target():
    """Under a standing queue a call whose estimated wait passes the CoDel target is refused on
    arrival (fast, for the caller) instead of after waiting it out; one that would be served in
    time (a caller next in the round) still queues."""

    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(1, codel_interval_s=0.1, codel_target_s=0.5), clock=clock)
        await serve_one(ac, clock, 0.3)  # the service time: 0.3 s
        held = await ac.acquire("a")
        queued = [asyncio.create_task(ac.acquire("a", clock.t + 1.2)) for _ in range(2)]
        await steps()
        clock.t += 0.3  # the calls queued have waited 0.3 s: more than half the target
        assert ac.stats().standing
        with pytest.raises(Overloaded) as refused:
            await ac.acquire("a", clock.t + 1.2)  # the call in flight due now + 2 x 0.3 s ahead
        assert refused.value.reason == QUEUE_TIMEOUT
        other = asyncio.create_task(ac.acquire("b", clock.t + 1.2))  # first in the round: ~0.1 s
        await steps()
        assert not other.done() and ac.stats().queued == 3
        ac.release(held)
        await steps()
        assert other.done() and other.exception() is None  # round-robin: b before a's queue
        assert ac.stats().shed == {QUEUE_TIMEOUT: 1}
        for task in queued:
            task.cancel()
        ac.release(other.result())

    run(go())


def test_batch_work_stays_fifo_and_is_not_shed_by_codel():
    """Calls with a long deadline (the client library's 30 s default) or none are batch work:
    under a standing queue they keep their order and outwait the CoDel target; a closed loop
    of them above the limit is slower, not failed. Interactive calls are still shed."""

    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(1, codel_interval_s=0.1, codel_target_s=0.5), clock=clock)
        await serve_one(ac, clock, 0.3)  # the service time: 0.3 s
        held = await ac.acquire("a")
        batch = [asyncio.create_task(ac.acquire("a", clock.t + 30.0)), asyncio.create_task(ac.acquire("a"))]
        await steps()
        clock.t += 2.0  # standing, and both waited 4 x the target
        ac.sweep()
        await steps()
        assert not any(t.done() for t in batch)
        with pytest.raises(Overloaded) as refused:  # interactive: 2 x 0.3 s ahead > the target
            await ac.acquire("a", clock.t + 1.0)
        assert refused.value.reason == QUEUE_TIMEOUT and ac.stats().shed == {QUEUE_TIMEOUT: 1}
        for first in batch:  # first in, first out
            ac.release(held)
            await steps()
            assert first.done() and first.exception() is None
            held = first.result()
        ac.release(held)

    run(go())


def test_codel_lets_an_interactive_call_wait_a_quarter_of_its_budget():
    """Under a standing queue a call with a 4 s deadline may wait 1 s (a quarter of its budget),
    one with a 0.6 s deadline the configured target, 0.5 s."""

    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(1, codel_interval_s=0.1, codel_target_s=0.5), clock=clock)
        held = await ac.acquire("a")
        long_, short = (asyncio.create_task(ac.acquire("a", clock.t + d)) for d in (4.0, 0.6))
        await steps()
        clock.t += 0.55
        ac.sweep()
        await steps()
        assert isinstance(short.exception(), Overloaded) and short.exception().reason == QUEUE_TIMEOUT
        assert not long_.done()
        clock.t += 0.5  # 1.05 s > a quarter of 4 s
        ac.sweep()
        await steps()
        assert isinstance(long_.exception(), Overloaded) and long_.exception().reason == QUEUE_TIMEOUT
        ac.release(held)

    run(go())


def test_a_queue_shorter_than_the_limit_is_not_refused_on_an_estimate():
    """Fewer calls queued than in flight: the queue drains within about one service time, so a
    new call is not refused on the estimated wait (after a load the measured service time is
    stale); from a full round queued on, it is."""

    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(4, codel_interval_s=0.1, codel_target_s=0.5), clock=clock)
        await serve_one(ac, clock, 0.6)  # the service time: 0.6 s, so 0.15 s a slot
        held = [await ac.acquire("a") for _ in range(4)]
        queued = [asyncio.create_task(ac.acquire("a", clock.t + 2.0)) for _ in range(3)]
        await steps()
        clock.t += 0.3  # standing, and the calls queued have waited more than half the target
        queued.append(asyncio.create_task(ac.acquire("a", clock.t + 2.0)))  # waits ~0.6 s > 0.5 s
        await steps()
        assert not any(t.done() for t in queued) and ac.stats().queued == 4
        with pytest.raises(Overloaded) as refused:  # 4 queued: a full round ahead
            await ac.acquire("a", clock.t + 2.0)
        assert refused.value.reason == QUEUE_TIMEOUT
        await cancel(*queued)
        for s in held:
            ac.release(s)

    run(go())


def test_no_refusal_on_arrival_while_calls_are_not_seen_to_wait():
    """The estimate says a new call would outwait the target, but the calls queued have waited
    less than half of it so far (the measured service time is stale, e.g. from a past load):
    the call queues; CoDel acts on waits it observes."""

    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(1, codel_interval_s=0.1, codel_target_s=0.5), clock=clock)
        await serve_one(ac, clock, 1.0)  # a slow call under a past load: 1 s
        held = await ac.acquire("a")
        queued = [asyncio.create_task(ac.acquire("a", clock.t + 4.0))]
        await steps()
        clock.t += 0.2  # standing; the queued call has waited 0.2 s, under half the target (1 s)
        queued.append(asyncio.create_task(ac.acquire("a", clock.t + 4.0)))  # estimated wait 1.8 s > 1 s
        await steps()
        assert not any(t.done() for t in queued) and ac.stats().shed == {}
        await cancel(*queued)
        ac.release(held)

    run(go())


def test_codel_sheds_the_flooding_callers_old_calls_not_a_caller_within_its_share():
    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(2, codel_interval_s=0.1, codel_target_s=0.5), clock=clock)
        await serve_one(ac, clock, 0.1)  # the service time: 0.1 s
        held = [await ac.acquire("a"), await ac.acquire("a")]
        a_old = [asyncio.create_task(ac.acquire("a", clock.t + 1.0)) for _ in range(3)]
        b_call = asyncio.create_task(ac.acquire("b", clock.t + 1.0))  # b holds 1 of its share of 2 // 2 callers
        await steps()
        clock.t += 0.6  # everything queued has waited past the target under a standing queue
        ac.sweep()
        await steps()
        assert all(isinstance(t.exception(), Overloaded) for t in a_old)
        assert {t.exception().reason for t in a_old} == {QUEUE_TIMEOUT}
        assert not b_call.done()  # still queued: next in the round
        ac.release(held[0])
        await steps()
        assert b_call.done() and b_call.exception() is None
        ac.release(held[1])
        ac.release(b_call.result())

    run(go())


def test_drained_queue_returns_to_fifo():
    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(1, codel_interval_s=0.1, codel_target_s=None), clock=clock)
        held = await ac.acquire("a")
        first = asyncio.create_task(ac.acquire("a"))
        await steps()
        clock.t += 1
        assert ac.stats().standing
        ac.release(held)
        await steps()
        cur = first.result()
        assert not ac.stats().standing  # empty again
        t1 = asyncio.create_task(ac.acquire("a"))
        await steps()
        t2 = asyncio.create_task(ac.acquire("a"))
        await steps()
        ac.release(cur)
        await steps()
        assert t1.done() and not t2.done()  # FIFO
        ac.release(t1.result())
        await steps()
        ac.release(t2.result())

    run(go())


def test_cancelled_waiter_leaves_the_queue_and_a_cancelled_grant_is_released():
    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(1), clock=clock)
        held = await ac.acquire("a")
        t = asyncio.create_task(ac.acquire("a"))
        await steps()
        t.cancel()
        await steps()
        assert ac.stats().queued == 0
        # granted and cancelled in the same loop iteration: the slot must come back
        t2 = asyncio.create_task(ac.acquire("a"))
        await steps()
        ac.release(held)  # grants t2 (future resolved) ...
        t2.cancel()  # ... but the task is cancelled before it resumes
        await steps()
        assert t2.cancelled()
        assert ac.stats().in_flight == 0

    run(go())


def test_admit_context_manager_releases_and_reports_drops():
    async def go():
        clock = Clock()
        cfg = AdmissionConfig(initial_limit=10, min_limit=1, max_limit=20, timers=False)
        ac = AdmissionController(cfg, clock=clock)
        async with ac.admit("a", clock.t + 5) as slot:
            assert slot.caller == "a" and ac.stats().in_flight == 1
            clock.t += 0.1
        assert ac.stats().in_flight == 0
        assert ac.stats().service_s == pytest.approx(0.1)
        with pytest.raises(DeadlineExceeded):
            async with ac.admit("a"):
                clock.t += 1.0
                raise DeadlineExceeded("too slow")
        slower = ac.stats().service_s
        assert slower > 0.1  # a drop is a sample: the service got slower
        with pytest.raises(Unavailable):
            async with ac.admit("a"):
                clock.t += 5.0
                raise Unavailable("triton down")
        # A backend that is down says nothing about its speed: no sample.
        assert ac.stats().service_s == slower
        with pytest.raises(ValueError):
            async with ac.admit("a"):
                raise ValueError("bad input")
        assert ac.stats().service_s == slower and ac.stats().in_flight == 0

    run(go())


def test_empty_caller_name_is_rejected():
    async def go():
        ac = AdmissionController(fixed(1), clock=Clock())
        with pytest.raises(ValueError):
            await ac.acquire("")
        assert ac.stats().admitted == 0

    run(go())


def test_observer_sees_limit_in_flight_and_queue_wait():
    async def go():
        clock = Clock()
        rec = Recorder()
        ac = AdmissionController(fixed(1), clock=clock, observer=rec)
        held = await ac.acquire("a")
        t = asyncio.create_task(ac.acquire("b"))
        await steps()
        clock.t += 0.05
        ac.release(held)
        await steps()
        ac.release(t.result())
        assert rec.events[0] == ("limit", 1)
        assert ("wait", "b", pytest.approx(0.05)) in rec.events
        deltas = [e for e in rec.events if e[0] == "in_flight"]
        assert sum(d for *_, d in deltas) == 0 and len(deltas) == 4

    run(go())


@pytest.mark.parametrize(
    "kw",
    [
        {"initial_limit": 0},
        {"min_limit": 5, "initial_limit": 4},
        {"max_queue": -1},
        {"caller_max_in_flight": 0},
        {"service_alpha": 0},
        {"codel_target_s": -1},
    ],
)
def test_bad_config_is_refused(kw):
    with pytest.raises(ValueError):
        AdmissionConfig(**kw)


# ---------------------------------------------------------------- the adaptive limit


def _saturate(lim: DeliveryLimit, t: float, seconds: float, base_s: float, rate: float) -> float:
    """Drive ``lim`` as a closed loop always at its limit would: a backend whose one call alone
    takes ``base_s`` and that completes at most ``rate`` calls/s (with L in flight a call takes
    max(base_s, L / rate)). Returns the clock at the end."""
    end = t + seconds
    while t < end:
        n = int(lim.value)
        for k in range(n):  # n calls granted together
            lim.in_flight(t, k + 1)
        rtt = max(base_s, n / rate)
        t += rtt
        for k in range(n):
            lim.in_flight(t, n - k - 1)
            lim.sample(t, rtt, most_in_flight=n)
    return t


def test_delivery_limit_grows_to_gain_times_the_bandwidth_delay_product_and_no_further():
    lim = DeliveryLimit(1, 1, 256, gain=2.0)
    t = _saturate(lim, 0.0, 0.1, base_s=0.1, rate=150.0)  # one call alone: 0.1 s
    assert lim.value == 2 and lim.min_rtt == pytest.approx(0.1)
    values = []
    for _ in range(10):
        t = _saturate(lim, t, 0.5, base_s=0.1, rate=150.0)  # 15 calls fill the pipe
        values.append(lim.value)
    assert values[-3:] == [30, 30, 30]  # ceil(2 x 150/s x 0.1 s): latency twice the unloaded one
    assert lim.rate == pytest.approx(150.0)


def test_delivery_limit_on_a_slow_backend_stays_small():
    """The CPU demo stack: 76 ms alone, ~15 calls/s at most -> 5 in flight (the default gain, 4:
    latency up to ~0.3 s), where a latency gradient settled at 8-13 (~1 s)."""
    lim = DeliveryLimit(8, 1, 32)
    _saturate(lim, 0.0, 8.0, base_s=0.076, rate=15.0)
    assert lim.value == math.ceil(lim.gain * 15.0 * 0.076) == 5


def test_delivery_limit_follows_a_slower_backend():
    lim = DeliveryLimit(1, 1, 256, gain=2.0, window_s=10.0)
    t = _saturate(lim, 0.0, 5.0, base_s=0.1, rate=150.0)
    assert lim.value == 30
    _saturate(lim, t, 3.0, base_s=0.1, rate=50.0)  # one of three backends gone
    assert lim.value == 10


def test_delivery_limit_probes_the_unloaded_latency_once_a_window():
    lim = DeliveryLimit(1, 1, 256, gain=2.0, window_s=10.0)
    t = _saturate(lim, 0.0, 2.0, base_s=0.1, rate=150.0)
    assert lim.value == 30
    # The backend got slower for every call (0.2 s alone): no sample lowers the old minimum.
    lim.sample(t + 10.5, 0.4, most_in_flight=30)
    assert lim.probing and lim.value == 1  # drain to one call in flight
    lim.sample(t + 10.8, 0.3, most_in_flight=30)  # still draining
    assert lim.probing and lim.value == 1
    lim.sample(t + 11.0, 0.2, most_in_flight=1)  # alone: the new unloaded latency
    assert not lim.probing and lim.min_rtt == 0.2 and lim.value == 30  # back where it was
    _saturate(lim, t + 11.0, 3.0, base_s=0.2, rate=150.0)
    assert lim.value == 60  # ceil(2 x 150/s x 0.2 s)


def test_delivery_limit_stays_within_its_bounds_and_halves_at_most_per_round():
    lim = DeliveryLimit(4, 3, 8, window_s=100.0)
    t = _saturate(lim, 0.0, 2.0, base_s=0.1, rate=1000.0)
    assert lim.value == 8  # ceil(2 x 1000/s x 0.1 s) = 200, capped
    values = []
    for _ in range(4):  # the backend all but stops: 8 s a call at 8 in flight
        t = _saturate(lim, t, 0.01, base_s=0.1, rate=1.0)
        values.append(lim.value)
    # Halved, then the floor, and never below it.
    assert values[:2] == [4, 3] and all(3 <= v <= 8 for v in values)


def test_delivery_limit_floored_at_the_max_batch_keeps_it_and_probes_alone():
    """A floor (``--admission-min-limit``, e.g. the batcher's max batch to keep batches whole):
    on the CPU demo stack, where 5 would do, it stays 8; the probe of the unloaded latency still
    goes down to one call in flight, and only a call alone counts as unloaded."""
    lim = DeliveryLimit(8, 8, 32, window_s=10.0)
    t = _saturate(lim, 0.0, 8.0, base_s=0.076, rate=15.0)
    assert lim.value == 8
    lim.sample(t, 0.05, most_in_flight=8)  # fast but not alone: lowers the minimum (any lower is)
    assert lim.min_rtt == 0.05
    lim.sample(t + 10.5, 0.6, most_in_flight=8)  # 10 s without a call alone or a lower latency
    assert lim.probing and lim.value == 1
    lim.sample(t + 10.6, 0.5, most_in_flight=2)  # two in flight: not the unloaded latency
    assert lim.probing and lim.value == 1
    lim.sample(t + 10.7, 0.08, most_in_flight=1)
    assert not lim.probing and lim.min_rtt == 0.08 and lim.value == 8


def test_controller_limit_follows_what_the_backend_delivers_on_the_fake_clock():
    async def go():
        clock = Clock()
        cfg = AdmissionConfig(initial_limit=4, min_limit=1, max_limit=64, timers=False)
        rec = Recorder()
        ac = AdmissionController(cfg, clock=clock, observer=rec)

        async def round_(base_s: float, rate: float) -> None:
            """As many calls as the limit, granted together; the backend takes them as
            DeliveryLimit's tests' backend does."""
            slots = [await ac.acquire("a") for _ in range(ac.limit)]
            clock.t += max(base_s, len(slots) / rate)
            for s in slots:
                ac.release(s)

        for _ in range(30):
            await round_(0.1, 100.0)
        assert ac.limit == 40  # ceil(4 x 100/s x 0.1 s), the default gain
        assert ("limit", 40) in rec.events

    run(go())


def test_prometheus_observer_counts_shed_waits_in_flight_and_limit():
    from prometheus_client import REGISTRY

    from swc_service.metrics import AdmissionMetrics

    def val(name: str, **labels) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    async def go():
        clock = Clock()
        before_shed = val("visloc_admission_shed_total", reason=QUEUE_FULL, caller="obs-b")
        before_waits = val("visloc_admission_queue_wait_seconds_count", caller="obs-a")
        ac = AdmissionController(fixed(1, max_queue=1), clock=clock, observer=AdmissionMetrics())
        assert val("visloc_admission_limit") == 1
        held = await ac.acquire("obs-a")
        assert val("visloc_admission_in_flight", caller="obs-a") == 1
        t = asyncio.create_task(ac.acquire("obs-a"))
        await steps()
        with pytest.raises(Overloaded):
            await ac.acquire("obs-b")
        assert val("visloc_admission_shed_total", reason=QUEUE_FULL, caller="obs-b") == before_shed + 1
        ac.release(held)
        await steps()
        ac.release(t.result())
        assert val("visloc_admission_queue_wait_seconds_count", caller="obs-a") == before_waits + 1
        assert val("visloc_admission_in_flight", caller="obs-a") == 0

    run(go())


def test_a_queued_call_that_can_no_longer_finish_in_time_is_refused_when_dispatched():
    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(1, codel_target_s=None), clock=clock)
        await serve_one(ac, clock, 1.0)  # service time 1 s
        held = await ac.acquire("a")
        t = asyncio.create_task(ac.acquire("a", clock.t + 2.5))  # meetable on arrival (wait 1 + 1)
        await steps()
        assert not t.done()
        clock.t += 1.8  # only 0.7 s left when the slot frees: less than one service time
        ac.release(held)
        await steps()
        assert isinstance(t.exception(), Overloaded) and t.exception().reason == DEADLINE_UNMEETABLE
        assert ac.stats().in_flight == 0

    run(go())


def test_standing_queue_still_refuses_what_it_cannot_serve_in_time_at_once():
    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(1, codel_target_s=None), clock=clock)
        await serve_one(ac, clock, 0.5)
        held = await ac.acquire("a")
        queued = [asyncio.create_task(ac.acquire("a", clock.t + 100)) for _ in range(4)]
        await steps()
        clock.t += 1  # standing: LIFO, but admission still counts the 4 calls queued ahead
        assert ac.stats().standing
        with pytest.raises(Overloaded) as ei:
            await ac.acquire("a", clock.t + 2.0)  # (4 + 1) x 0.5 s + 0.5 s > 2 s
        assert ei.value.reason == DEADLINE_UNMEETABLE
        await cancel(*queued)
        ac.release(held)

    run(go())


def test_a_free_slot_is_not_taken_by_a_call_that_would_finish_too_late_but_an_idle_one_probes():
    """With a call in flight, a free slot does not go to a call whose deadline is shorter than
    the measured service time; with nothing in flight it does (the measurement is refreshed, so a
    slowdown that has passed cannot lock every call out)."""

    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(2), clock=clock)
        await serve_one(ac, clock, 3.0)  # a slow period: 3 s per call
        probe = await ac.acquire("a", clock.t + 1.0)  # nothing in flight: admitted anyway
        with pytest.raises(Overloaded) as ei:
            await ac.acquire("b", clock.t + 1.0)  # a slot is free, but 3 s > 1 s
        assert ei.value.reason == DEADLINE_UNMEETABLE
        clock.t += 0.2
        ac.release(probe)  # the slowdown passed: 0.2 s
        assert ac.stats().service_s < 3.0 and ac.stats().in_flight == 0
        return ac.stats().shed

    assert run(go()) == {DEADLINE_UNMEETABLE: 1}


def test_a_caller_next_in_the_round_is_queued_where_the_flooding_one_is_refused():
    """Limit 1, 1 s per call, 2 s deadlines: the call in flight has 0.5 s left, so one more call
    fits in the queue. A's second call takes that place and its third is refused; B, next in the
    round, still queues (it goes before A's queued call) and is served next."""

    async def go():
        clock = Clock()
        ac = AdmissionController(fixed(1), clock=clock)
        await serve_one(ac, clock, 1.0)  # service time 1 s
        held = await ac.acquire("a", clock.t + 2)
        clock.t += 0.5
        a2 = asyncio.create_task(ac.acquire("a", clock.t + 2))
        await steps()
        with pytest.raises(Overloaded) as ei:
            await ac.acquire("a", clock.t + 2)  # behind a2: 0.5 + 1 + 1 s > 2 s
        assert ei.value.reason == DEADLINE_UNMEETABLE
        b = asyncio.create_task(ac.acquire("b", clock.t + 2))
        await steps()
        assert not a2.done() and not b.done() and ac.stats().queued == 2
        clock.t += 0.5
        ac.release(held)
        await steps()
        assert b.done() and not a2.done()  # B first
        return ac.stats().shed

    assert run(go()) == {DEADLINE_UNMEETABLE: 1}
