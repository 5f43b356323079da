"""Admission control: bound the work in flight to Triton, queue the rest knowing each deadline.

Why: offered ten times its capacity, a service that accepts everything finishes every call too
late (issue 17). Following the Google SRE book ("Handling Overload"), Netflix's
concurrency-limits and Facebook's adaptive LIFO + CoDel queues:

* at most ``limit`` calls are in flight; ``limit`` adapts to the measured latency (a gradient
  limit in the style of Netflix's Gradient2) or is fixed;
* the rest wait in a queue that knows every call's deadline. A call whose deadline cannot be met
  given the measured service time and the queue ahead of it is refused at once
  (:class:`~swc_service.errors.Overloaded`, RESOURCE_EXHAUSTED); one that expires while queued is
  dropped (:class:`~swc_service.errors.DeadlineExceeded`) and never reaches Triton;
* the queue is FIFO while it drains; once it has stood non-empty for ``codel_interval_s`` it
  turns LIFO (fresh calls first, they still have time) and refuses calls that waited longer
  than ``codel_target_s``;
* callers are named: each has a cap on calls in flight and queued, and free slots go round-robin
  to the callers with queued work, so one caller's burst cannot starve the others.

Pure asyncio + stdlib; the clock is injectable so the tests step time by hand.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from .callers import ANONYMOUS as DEFAULT_CALLER
from .errors import DeadlineExceeded, Overloaded

# Why a call was shed (the ``reason`` label of the metrics, Overloaded.reason).
DEADLINE_UNMEETABLE = "deadline_unmeetable"  # refused: the queue ahead + service time pass the deadline
EXPIRED_IN_QUEUE = "expired_in_queue"  # dropped: the deadline passed while it waited
QUEUE_FULL = "queue_full"  # refused: the service's queue is full
CALLER_LIMIT = "caller_limit"  # refused: this caller already has its share queued
QUEUE_TIMEOUT = "queue_timeout"  # dropped: waited past the CoDel target under a standing queue
# A queued call cancelled this close to its deadline expired in the queue (its caller's cancel
# arrives a little before the server's own deadline timer: the call's transit time).
_EXPIRY_SLACK_S = 0.05
REASONS = (DEADLINE_UNMEETABLE, EXPIRED_IN_QUEUE, QUEUE_FULL, CALLER_LIMIT, QUEUE_TIMEOUT)


class AdmissionObserver(Protocol):
    """Receives what metrics need (swc_service.metrics.AdmissionMetrics implements it)."""

    def shed(self, caller: str, reason: str) -> None: ...
    def queue_wait(self, caller: str, seconds: float) -> None: ...
    def in_flight(self, caller: str, delta: int) -> None: ...
    def limit(self, value: int) -> None: ...


@dataclass(frozen=True)
class AdmissionConfig:
    """Limits of the controller; every time is in seconds of its clock."""

    initial_limit: int = 8  # calls in flight to start with (e.g. the batcher's max batch x endpoints)
    min_limit: int = 1
    max_limit: int = 256
    adaptive: bool = True  # False: the limit stays initial_limit
    max_queue: int = 256  # calls waiting, all callers together
    caller_max_in_flight: int | None = None  # per caller; None: no cap beyond the limit
    caller_max_queued: int | None = None  # per caller; None: max_queue
    codel_interval_s: float = 0.1  # a queue non-empty this long is "standing": LIFO + codel_target_s
    codel_target_s: float | None = 0.5  # under a standing queue, max wait before refusal; None: off
    service_alpha: float = 0.2  # EWMA weight of a new service-time sample
    timers: bool = True  # expire queued calls by loop timers (tests call sweep() instead)

    def __post_init__(self) -> None:
        if not 1 <= self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError(f"need 1 <= min_limit <= initial_limit <= max_limit, got {self}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        for name in ("caller_max_in_flight", "caller_max_queued"):
            v = getattr(self, name)
            if v is not None and v < (1 if name == "caller_max_in_flight" else 0):
                raise ValueError(f"{name} must be positive, got {v}")
        if self.codel_interval_s < 0 or (self.codel_target_s is not None and self.codel_target_s < 0):
            raise ValueError("codel_interval_s and codel_target_s must be >= 0")
        if not 0 < self.service_alpha <= 1:
            raise ValueError(f"service_alpha must be in (0, 1], got {self.service_alpha}")


class GradientLimit:
    """Netflix Gradient2-style concurrency limit from observed latencies.

    The long-term latency (slow EWMA) is the baseline; while a sample stays within ``tolerance``
    times it the limit grows by ~sqrt(limit) (smoothed), and when latency grows beyond it the
    limit shrinks in proportion (never below half per step). Drops (timeouts, Triton
    unavailable) shrink it by ``backoff``. No growth while the limit is not the bottleneck.
    """

    def __init__(self, initial: int, min_limit: int, max_limit: int, *, smoothing: float = 0.2,
                 tolerance: float = 1.5, long_window: int = 600, backoff: float = 0.9) -> None:  # fmt: skip
        self.value = float(initial)
        self.min, self.max = min_limit, max_limit
        self.smoothing, self.tolerance, self.backoff = smoothing, tolerance, backoff
        self._long_alpha = 2.0 / (long_window + 1)
        self.long_rtt: float | None = None

    def sample(self, rtt: float, in_flight: int) -> float:
        if rtt <= 0:
            return self.value
        if self.long_rtt is None:
            self.long_rtt = rtt
        else:
            self.long_rtt += self._long_alpha * (rtt - self.long_rtt)
            if self.long_rtt / rtt > 2:  # latency fell for good: let the baseline follow faster
                self.long_rtt *= 0.95
        if in_flight < self.value / 2:  # app-limited: the samples say nothing about the limit
            return self.value
        gradient = max(0.5, min(1.0, self.tolerance * self.long_rtt / rtt))
        target = self.value * gradient + math.sqrt(self.value)
        self.value = self._clamp((1 - self.smoothing) * self.value + self.smoothing * target)
        return self.value

    def drop(self) -> float:
        self.value = self._clamp(self.value * self.backoff)
        return self.value

    def _clamp(self, v: float) -> float:
        return min(float(self.max), max(float(self.min), v))


@dataclass(eq=False)
class Slot:
    """One admitted call: hand it back with :meth:`AdmissionController.release`."""

    caller: str
    deadline: float | None
    enqueued_at: float
    granted_at: float = math.nan
    released: bool = False

    @property
    def queue_wait_s(self) -> float:
        return self.granted_at - self.enqueued_at


@dataclass(eq=False)
class _Waiter:
    slot: Slot
    future: asyncio.Future[Slot]
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Caller:
    in_flight: int = 0
    queue: deque[_Waiter] = field(default_factory=deque)


@dataclass(frozen=True)
class AdmissionStats:
    """A snapshot for metrics and tests."""

    limit: int
    in_flight: int
    queued: int
    standing: bool  # the queue has been non-empty for longer than codel_interval_s (LIFO)
    service_s: float | None  # EWMA of the service time of one call
    admitted: int
    completed: int
    shed: dict[str, int]  # by reason
    shed_by_caller: dict[tuple[str, str], int]  # by (caller, reason)
    queue_waits: int  # calls granted after waiting (count, total and max seconds)
    queue_wait_sum_s: float
    queue_wait_max_s: float
    callers: dict[str, tuple[int, int]]  # caller -> (in flight, queued)


class AdmissionController:
    """Bounds the calls in flight; see the module docstring. One per event loop (not thread-safe)."""

    def __init__(self, config: AdmissionConfig | None = None, *, clock: Callable[[], float] = time.monotonic,
                 observer: AdmissionObserver | None = None) -> None:  # fmt: skip
        self.config = config or AdmissionConfig()
        self._clock = clock
        self._observer = observer
        c = self.config
        self._limiter = GradientLimit(c.initial_limit, c.min_limit, c.max_limit) if c.adaptive else None
        self._limit = c.initial_limit
        self._callers: OrderedDict[str, _Caller] = OrderedDict()  # round-robin order: next first
        self._in_flight = 0
        self._granted: set[Slot] = set()  # the slots in flight (their start times time the queue)
        self._queued = 0
        self._nonempty_since: float | None = None
        self._service_s: float | None = None
        self._service_dev = 0.0  # EWMA of |sample - mean| (as TCP's RTO estimator, RFC 6298)
        self._admitted = self._completed = 0
        self._shed: Counter[tuple[str, str]] = Counter()
        self._waits = 0
        self._wait_sum = self._wait_max = 0.0
        if observer is not None:
            observer.limit(self._limit)

    # ------------------------------------------------------------------ public API

    @property
    def limit(self) -> int:
        return self._limit

    @asynccontextmanager
    async def admit(self, caller: str = DEFAULT_CALLER, deadline: float | None = None) -> AsyncIterator[Slot]:
        """``async with controller.admit(caller, deadline) as slot:`` around the work to bound.

        A body that raises DeadlineExceeded counts as a drop (the limit backs off: work took too
        long). Any other exception, Unavailable included, still releases the slot but gives no
        latency sample: a backend that is down or refuses says nothing about how much work is
        too much, and backing off on it would leave the limit at its minimum once it returns.
        """
        slot = await self.acquire(caller, deadline)
        ok: bool | None = True
        try:
            yield slot
        except DeadlineExceeded:
            ok = False
            raise
        except asyncio.CancelledError:  # at its deadline (the caller's timer): a drop, too
            ok = False if self._expired(slot) else None
            raise
        except BaseException:
            ok = None
            raise
        finally:
            self.release(slot, ok)

    async def acquire(self, caller: str = DEFAULT_CALLER, deadline: float | None = None) -> Slot:
        """Wait for a slot. ``deadline`` is absolute, on this controller's clock (None: none).

        Raises Overloaded (refused: RESOURCE_EXHAUSTED) or DeadlineExceeded (expired queued).
        """
        if not caller:
            raise ValueError("caller must be a non-empty name")
        now = self._clock()
        slot = Slot(caller, deadline, now)
        if deadline is not None and deadline <= now:
            self._refuse(slot, EXPIRED_IN_QUEUE)
        state = self._callers.get(caller)
        if state is None:  # never served: first in the round
            state = self._callers[caller] = _Caller()
            self._callers.move_to_end(caller, last=False)
        cap = self.config.caller_max_in_flight
        # After every dispatch either no slot is free or every queued call's caller is at its cap.
        # A free slot is taken unless the measured service time says the call would finish too
        # late; with nothing in flight it is always taken (a probe: the measurement cannot go
        # stale and lock every call out).
        free = self._in_flight < self._limit and not state.queue and (cap is None or state.in_flight < cap)
        if free and (self._in_flight == 0 or self._meetable(deadline, now, first=state.in_flight == 0)):
            self._grant(slot, now)
            return slot
        self._check_admissible(slot, state, now)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(slot, loop.create_future())
        state.queue.append(waiter)
        self._queued += 1
        if self._nonempty_since is None:
            self._nonempty_since = now
        self._arm(waiter, now)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self.release(slot, None)  # granted, but the caller left before it resumed
            else:
                if waiter in state.queue and self._expired(slot):
                    # The caller's own deadline timer (asyncio.timeout_at) beat ours: it expired here.
                    self._count_shed(caller, EXPIRED_IN_QUEUE)
                self._remove(waiter)
            raise

    def release(self, slot: Slot, ok: bool | None = True) -> None:
        """Hand a slot back. ok=True: a latency sample; False: a drop (the limit backs off);
        None: neither (e.g. the caller's own error or cancellation)."""
        if slot.released:
            raise RuntimeError("slot released twice")
        slot.released = True
        now = self._clock()
        state = self._callers[slot.caller]
        in_flight = self._in_flight
        self._in_flight -= 1
        self._granted.discard(slot)
        state.in_flight -= 1
        self._completed += 1
        if self._observer is not None:
            self._observer.in_flight(slot.caller, -1)
        rtt = max(0.0, now - slot.granted_at)
        if ok is True:
            self._sample_service(rtt)
            if self._limiter is not None:
                self._set_limit(self._limiter.sample(rtt, in_flight))
        elif ok is False:
            if self._service_s is None or rtt > self._service_s:
                self._sample_service(rtt)  # a drop took at least this long: a slowdown must show
            if self._limiter is not None:
                self._set_limit(self._limiter.drop())
        self._dispatch()

    def sweep(self) -> None:
        """Drop queued calls that expired (or outwaited the CoDel target) and fill free slots."""
        now = self._clock()
        for state in list(self._callers.values()):
            for waiter in list(state.queue):
                reason = self._stale(waiter.slot, now)
                if reason is not None:
                    self._remove(waiter)
                    self._fail(waiter, reason, now)
        self._dispatch()

    def estimated_wait_s(self, caller: str = DEFAULT_CALLER) -> float | None:
        """How long a call from ``caller`` arriving now would wait (None: no measurement yet)."""
        return self._wait_estimate(self._callers.get(caller) or _Caller())

    def stats(self) -> AdmissionStats:
        by_reason: Counter[str] = Counter()
        for (_, reason), n in self._shed.items():
            by_reason[reason] += n
        return AdmissionStats(
            limit=self._limit, in_flight=self._in_flight, queued=self._queued,
            standing=self._standing(self._clock()), service_s=self._service_s,
            admitted=self._admitted, completed=self._completed,
            shed=dict(by_reason), shed_by_caller=dict(self._shed),
            queue_waits=self._waits, queue_wait_sum_s=self._wait_sum, queue_wait_max_s=self._wait_max,
            callers={name: (s.in_flight, len(s.queue)) for name, s in self._callers.items()},
        )  # fmt: skip

    # ------------------------------------------------------------------ internals

    def _sample_service(self, rtt: float) -> None:
        a = self.config.service_alpha
        if self._service_s is None:
            self._service_s = rtt
            return
        self._service_dev += a * (abs(rtt - self._service_s) - self._service_dev)
        self._service_s += a * (rtt - self._service_s)

    def _service_bound(self) -> float | None:
        """How long one call admitted now will take, pessimistically: mean + 2 deviations (a
        call whose deadline is only met by the mean would miss it about half the time)."""
        return None if self._service_s is None else self._service_s + 2.0 * self._service_dev

    def _meetable(self, deadline: float | None, now: float, *, first: bool = False) -> bool:
        """Whether a call starting now ends by ``deadline``: pessimistically (mean + 2 deviations),
        or by the mean for a caller's first call (nothing of it in flight or queued: fairness
        needs each caller's first call to get its turn) and for calls already queued."""
        bound = self._service_s if first else self._service_bound()
        return deadline is None or bound is None or now + bound <= deadline

    def _expired(self, slot: Slot) -> bool:
        return slot.deadline is not None and slot.deadline - self._clock() <= _EXPIRY_SLACK_S

    def _standing(self, now: float) -> bool:
        return self._nonempty_since is not None and now - self._nonempty_since > self.config.codel_interval_s

    def _wait_estimate(self, state: _Caller) -> float | None:
        """Until the oldest call in flight should finish (service time less its age), then the
        queue ahead x service time / limit: with ``limit`` calls in flight one slot frees every
        service_s / limit seconds (Little's law). Round-robin serves at most (own position + 1) of
        every other caller's calls first (own position, for those after it in the round). The
        position is the FIFO one even while the queue is LIFO: admitting only what the queue can
        serve in time keeps it short, so the excess is refused at once (cheap for the caller)
        rather than pushed out of the queue later."""
        if self._service_s is None:
            return None
        if self._queued == 0 and self._in_flight < self._limit:
            return 0.0
        own = len(state.queue)
        ahead, before = own, state in self._callers.values()
        for other in self._callers.values():  # the round's order: who is served next first
            if other is state:
                before = False
            else:  # a caller before this one in the round is served once more than it
                ahead += min(len(other.queue), own + (1 if before else 0))
        first = self._service_s / self._limit
        if self._granted and self._in_flight >= self._limit:
            oldest = min(slot.granted_at for slot in self._granted)
            first = min(first, max(0.0, self._service_s - (self._clock() - oldest)))
        return first + ahead * self._service_s / self._limit

    def _check_admissible(self, slot: Slot, state: _Caller, now: float) -> None:
        c = self.config
        caller_cap = c.max_queue if c.caller_max_queued is None else c.caller_max_queued
        if len(state.queue) >= caller_cap:
            self._refuse(slot, CALLER_LIMIT)
        if self._queued >= c.max_queue:
            self._refuse(slot, QUEUE_FULL)
        if slot.deadline is not None:
            wait = self._wait_estimate(state)
            if wait is not None and not self._meetable(
                slot.deadline, now + wait, first=not (state.in_flight or state.queue)
            ):
                self._refuse(slot, DEADLINE_UNMEETABLE)

    def _stale(self, slot: Slot, now: float) -> str | None:
        if slot.deadline is not None and slot.deadline <= now:
            return EXPIRED_IN_QUEUE
        if slot.deadline is not None and not self._meetable(slot.deadline, now, first=True):
            return DEADLINE_UNMEETABLE  # it would finish too late: refuse now, while it can retry
        target = self.config.codel_target_s
        if target is not None and self._standing(now) and now - slot.enqueued_at > target:
            return QUEUE_TIMEOUT
        return None

    def _arm(self, waiter: _Waiter, now: float) -> None:
        """A loop timer at the last instant the call could still start and finish by its deadline
        (its deadline less the service time; re-armed if the loop wakes a little early)."""
        if waiter.slot.deadline is None or not self.config.timers:
            return
        loop = waiter.future.get_loop()
        due = waiter.slot.deadline - (self._service_s or 0.0)
        waiter.timer = loop.call_later(max(0.0, due - now) + 0.001, self._on_timer, waiter)

    def _on_timer(self, waiter: _Waiter) -> None:
        waiter.timer = None
        now = self._clock()
        if self._stale(waiter.slot, now) is None:
            self._arm(waiter, now)
        else:
            self.sweep()

    def _trim(self, now: float) -> None:
        """Drop the stale calls at the old end of each caller's queue (cheap, on every dispatch:
        under LIFO the oldest would otherwise wait for their timers)."""
        for state in list(self._callers.values()):
            while state.queue:
                reason = self._stale(state.queue[0].slot, now)
                if reason is None:
                    break
                waiter = state.queue.popleft()
                self._dequeued(waiter, now)
                self._fail(waiter, reason, now)

    def _dispatch(self) -> None:
        """Fill free slots: round-robin over callers with queued work (and room under their cap);
        within a caller FIFO, or LIFO while the queue stands."""
        cap = self.config.caller_max_in_flight
        self._trim(self._clock())
        while self._in_flight < self._limit and self._queued:
            now = self._clock()
            lifo = self._standing(now)
            picked = None
            for name, state in self._callers.items():
                if state.queue and (cap is None or state.in_flight < cap):
                    picked = name
                    break
            if picked is None:
                return
            state = self._callers[picked]
            waiter = state.queue.pop() if lifo else state.queue.popleft()
            self._dequeued(waiter, now)
            reason = self._stale(waiter.slot, now)
            if reason is not None:
                self._fail(waiter, reason, now)
                continue
            self._grant(waiter.slot, now)
            self._waits += 1
            self._wait_sum += waiter.slot.queue_wait_s
            self._wait_max = max(self._wait_max, waiter.slot.queue_wait_s)
            if self._observer is not None:
                self._observer.queue_wait(waiter.slot.caller, waiter.slot.queue_wait_s)
            waiter.future.set_result(waiter.slot)

    def _grant(self, slot: Slot, now: float) -> None:
        slot.granted_at = now
        self._granted.add(slot)
        self._callers.move_to_end(slot.caller)  # served: last in the round
        self._in_flight += 1
        self._callers[slot.caller].in_flight += 1
        self._admitted += 1
        if self._observer is not None:
            self._observer.in_flight(slot.caller, +1)

    def _dequeued(self, waiter: _Waiter, now: float) -> None:
        self._queued -= 1
        if waiter.timer is not None:
            waiter.timer.cancel()
        if self._queued == 0:
            self._nonempty_since = None

    def _remove(self, waiter: _Waiter) -> None:
        state = self._callers[waiter.slot.caller]
        if waiter in state.queue:
            state.queue.remove(waiter)
            self._dequeued(waiter, self._clock())
            self._dispatch()

    def _fail(self, waiter: _Waiter, reason: str, now: float) -> None:
        self._count_shed(waiter.slot.caller, reason)
        waited = now - waiter.slot.enqueued_at
        if reason == EXPIRED_IN_QUEUE:
            exc: Exception = DeadlineExceeded(f"the deadline passed after {waited:.3f} s in the admission queue")
        else:
            exc = Overloaded(f"overloaded ({reason}) after {waited:.3f} s queued; retry later", reason)
        if not waiter.future.done():
            waiter.future.set_exception(exc)

    def _refuse(self, slot: Slot, reason: str) -> None:
        self._count_shed(slot.caller, reason)
        if reason == EXPIRED_IN_QUEUE:
            raise DeadlineExceeded("the deadline passed before the call was admitted")
        raise Overloaded(f"overloaded ({reason}); retry later", reason)

    def _count_shed(self, caller: str, reason: str) -> None:
        self._shed[(caller, reason)] += 1
        if self._observer is not None:
            self._observer.shed(caller, reason)

    def _set_limit(self, value: float) -> None:
        new = max(self.config.min_limit, int(value))
        if new != self._limit:
            self._limit = new
            if self._observer is not None:
                self._observer.limit(new)
