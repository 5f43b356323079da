"""Admission control: bound the work in flight to Triton, queue the rest knowing each deadline.

Why: offered ten times its capacity, a service that accepts everything finishes every call too
late (issue 17). Following the Google SRE book ("Handling Overload"), Netflix's
concurrency-limits and Facebook's adaptive LIFO + CoDel queues:

* at most ``limit`` calls are in flight; ``limit`` adapts to what the backend delivers (4 x its
  delivery rate x its unloaded latency, after TCP BBR's window; :class:`DeliveryLimit`) or is
  fixed;
* the rest wait in a queue that knows every call's deadline. A call whose deadline cannot be met
  given the measured service time and the queue ahead of it is refused at once
  (:class:`~swc_service.errors.Overloaded`, RESOURCE_EXHAUSTED); one that expires while queued is
  dropped (:class:`~swc_service.errors.DeadlineExceeded`) and never reaches Triton;
* the queue is FIFO while it drains; once it has stood non-empty for ``codel_interval_s`` it
  turns LIFO for interactive calls (fresh calls first, they still have time) and refuses
  interactive calls that waited longer than ``codel_target_s`` or a quarter of their deadline budget,
  whichever is longer. Interactive: a deadline at most ``interactive_budget_s`` away. Batch
  work (a longer deadline, e.g. the client library's 30 s default, or none) has said it can
  wait: it stays FIFO and is refused only when its deadline cannot be met, so an evaluation at
  a concurrency above the limit is slower, not failed (under LIFO the oldest calls of a closed
  loop would never be served);
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
    interactive_budget_s: float = 5.0  # LIFO + CoDel for calls with a deadline at most this far
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
        if self.interactive_budget_s < 0:
            raise ValueError(f"interactive_budget_s must be >= 0, got {self.interactive_budget_s}")
        if not 0 < self.service_alpha <= 1:
            raise ValueError(f"service_alpha must be in (0, 1], got {self.service_alpha}")


class DeliveryLimit:
    """The in-flight limit from what the backend delivers: ``gain`` x its delivery rate x its
    unloaded latency (after TCP BBR's window, a multiple of the bandwidth-delay product).

    Why not a latency gradient (Netflix Gradient2): its baseline is an average of the latencies
    it causes, so under sustained saturation it drifts up with them; on the 2-core demo stack it
    settled at 8-13 calls in flight where 2-3 already give the full rate (one call alone: 76 ms,
    12.5 img/s; 3 in flight: 15.3 img/s; 8: 595 ms, 13.1 img/s).

    Once per round trip (as many completions as the limit) the delivery rate is taken by Little's
    law, the time-averaged calls in flight over the round / their mean latency (a count of
    completions would jump with every batch), and the limit becomes ``gain`` x rate x the
    unloaded latency, at most doubling or halving. While the backend has room the limit doubles
    every round; once it is saturated latency grows instead of the rate, and the limit settles
    where latency is about ``gain`` x the unloaded latency, on any hardware (one CPU, a GPU with
    large batches, several Triton pods). Slow calls and drops lengthen the mean: the limit falls.

    The limit stays within [``min_limit``, ``max_limit``] (``--admission-min-limit``, e.g. the
    batcher's max batch where Triton's batches must stay whole).

    The unloaded latency is that of the last call that ran alone, or any lower latency seen
    since. Under sustained load no call runs alone: when none has refreshed it for ``window_s``,
    the limit drops to one call, below the floor, until one has (BBR's ProbeRTT: one round trip
    alone every ``window_s``). BBR probes every 10 s, but a probe here drains a pipeline of
    batches (about a second at reduced rate on the CPU demo stack), and a stale unloaded latency
    only errs low (a smaller limit, never below the floor): every 5 minutes.
    """

    def __init__(self, initial: int, min_limit: int, max_limit: int, *, gain: float = 4.0,
                 window_s: float = 300.0, clock_start: float = 0.0) -> None:  # fmt: skip
        self.value = float(initial)
        self.min, self.max = min_limit, max_limit
        self.gain, self.window_s = gain, window_s
        self.min_rtt: float | None = None
        self._min_rtt_at = 0.0
        self.probing = False
        self._resume = self.value  # the limit to return to after a probe
        self.rate: float | None = None  # calls/s over the last round
        self._in_flight, self._changed_at = 0, clock_start
        self._reset_round(clock_start)

    @property
    def steady(self) -> float:
        """The limit outside a probe (a probe is one call alone for a round trip)."""
        return self._resume if self.probing else self.value

    def _reset_round(self, now: float) -> None:
        self._round_start, self._area, self._rtt_sum, self._samples = now, 0.0, 0.0, 0

    def in_flight(self, now: float, n: int) -> None:
        """The number of calls in flight changed to ``n`` (grant or release)."""
        self._area += self._in_flight * max(0.0, now - self._changed_at)
        self._in_flight, self._changed_at = n, now

    def sample(self, now: float, rtt: float, most_in_flight: int) -> float:
        """One completed call took ``rtt``; at most ``most_in_flight`` calls (itself included)
        were in flight during it."""
        if rtt <= 0:
            return self.value
        quiet = most_in_flight <= 1
        # Unknown (the first calls may all have come at once) or not refreshed for a window.
        expired = self.min_rtt is None or now - self._min_rtt_at > self.window_s
        # A call that ran alone measures the unloaded latency as it is now (it rises when other
        # work shares the CPU, e.g. a flood of refusals); a lower latency anywhere is lower still.
        if quiet or (self.min_rtt is not None and rtt <= self.min_rtt):
            self.min_rtt, self._min_rtt_at = rtt, now
            if self.probing:  # probed: back to where it was, a fresh round
                self.probing, self.value = False, self._resume
                self._reset_round(now)
                return self.value
        elif expired and not self.probing:
            self.probing, self._resume, self.value = True, self.value, 1.0
            return self.value  # let the calls in flight drain to one
        if self.probing:
            return self.value
        self._rtt_sum += rtt
        self._samples += 1
        if self._samples >= self.value:
            self.in_flight(now, self._in_flight)  # the area up to now
            elapsed = now - self._round_start
            mean_rtt = self._rtt_sum / self._samples
            if elapsed > 0:
                self.rate = self._area / elapsed / mean_rtt  # Little's law: L = rate x latency
                window = self.gain * self.rate * self.min_rtt
                target = math.ceil(window - 1e-9)  # 20.000000000000004 is 20
                self.value = self._clamp(min(2 * self.value, max(math.ceil(self.value / 2), target)))
            self._reset_round(now)
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
    in_flight_at_grant: int = 0  # calls in flight when it began, itself included
    admitted_at_grant: int = 0  # the controller's count of granted calls then, itself included
    interactive: bool = False  # a short deadline: LIFO and CoDel apply (see the module docstring)

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
        self._limiter = (
            DeliveryLimit(c.initial_limit, c.min_limit, c.max_limit, clock_start=clock()) if c.adaptive else None
        )
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

        A body that raises DeadlineExceeded counts as a drop (work took too long: its latency is
        a sample, as a completed call's). Any other exception, Unavailable included, still
        releases the slot but gives no sample: a backend that is down or refuses says nothing
        about how fast it delivers, and counting it would leave the limit at its minimum once it
        returns.
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
        budget = self.config.interactive_budget_s
        slot = Slot(caller, deadline, now, interactive=deadline is not None and deadline - now <= budget)
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
        if free and (self._in_flight == 0 or self._meetable(deadline, now, by_mean=self._within_share(state))):
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
        """Hand a slot back. ok=True: completed; False: a drop (it took too long); both are
        samples of the backend's rate and latency. None: no sample (e.g. the caller's own error,
        its cancellation, or the backend refusing)."""
        if slot.released:
            raise RuntimeError("slot released twice")
        slot.released = True
        now = self._clock()
        state = self._callers[slot.caller]
        self._in_flight -= 1
        if self._limiter is not None:
            self._limiter.in_flight(now, self._in_flight)
        self._granted.discard(slot)
        state.in_flight -= 1
        self._completed += 1
        if self._observer is not None:
            self._observer.in_flight(slot.caller, -1)
        rtt = max(0.0, now - slot.granted_at)
        if ok is not None:  # completed, or took too long: both say how fast the backend delivers
            if ok or self._service_s is None or rtt > self._service_s:
                self._sample_service(rtt)  # a drop took at least this long: a slowdown must show
            if self._limiter is not None:
                # Those in flight when it began and all granted since: at most this many shared the backend.
                most = slot.in_flight_at_grant + self._admitted - slot.admitted_at_grant
                self._set_limit(self._limiter.sample(now, rtt, most))
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

    def _meetable(self, deadline: float | None, now: float, *, by_mean: bool = False) -> bool:
        """Whether a call starting now ends by ``deadline``: pessimistically (mean + 2 deviations),
        or ``by_mean`` for a caller within its fair share (fairness needs each caller's share to
        get its turn) and for calls already queued."""
        bound = self._service_s if by_mean else self._service_bound()
        return deadline is None or bound is None or now + bound <= deadline

    def _within_share(self, state: _Caller, *, queued: bool = False) -> bool:
        """Whether a caller holds (in flight and queued) less than its fair share of the limit,
        split evenly between the callers with work: its calls are judged by the mean service
        time and never refused for the queue's length, so a small caller keeps being served
        while a flooding one is refused. ``queued``: asked for a call already in its queue."""
        active = sum(1 for other in self._callers.values() if other.in_flight or other.queue)
        if not (state.in_flight or state.queue):
            active += 1
        held = state.in_flight + len(state.queue) - (1 if queued else 0)
        return held < max(1, self._steady_limit() // max(1, active))

    def _steady_limit(self) -> int:
        """The limit outside the adaptive limit's one-call probe (about a second every few
        minutes): a caller's fair share does not shrink for the probe. (Waits are estimated with
        the limit as it is: a call queued during the probe does wait for it.)"""
        return self._limit if self._limiter is None else max(self._limit, int(self._limiter.steady))

    def _expired(self, slot: Slot) -> bool:
        return slot.deadline is not None and slot.deadline - self._clock() <= _EXPIRY_SLACK_S

    def _codel_target(self, slot: Slot) -> float | None:
        """The longest an interactive call may wait under a standing queue: ``codel_target_s``,
        or a quarter of its deadline budget if that is longer (a refusal then still leaves the
        caller three quarters of its time to go elsewhere; a 5 s call is not held to a target
        made for 2 s ones). None: CoDel does not apply (off, or batch work)."""
        if self.config.codel_target_s is None or not slot.interactive or slot.deadline is None:
            return None
        return max(self.config.codel_target_s, (slot.deadline - slot.enqueued_at) / 4)

    def _oldest_wait(self, now: float) -> float:
        """How long the longest-waiting queued call has waited (0 with none queued)."""
        starts = [state.queue[0].slot.enqueued_at for state in self._callers.values() if state.queue]
        return now - min(starts) if starts else 0.0

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
        wait = self._wait_estimate(state)
        if wait is None:
            return
        if slot.deadline is not None and not self._meetable(
            slot.deadline, now + wait, by_mean=self._within_share(state)
        ):
            self._refuse(slot, DEADLINE_UNMEETABLE)
        target = self._codel_target(slot)
        if (target is not None and self._standing(now) and wait > target and self._queued >= self._limit
                and self._oldest_wait(now) >= target / 2 and not self._within_share(state)):  # fmt: skip
            # It would outwait the target and be refused then: refuse it now, while that is cheap.
            # Not on the estimate alone: only while calls are seen to wait (CoDel acts on
            # sojourn times it observes) and at least a round of them (a shorter queue drains
            # within about one service time). Right after a load the service time measured
            # under it is stale, and the estimate alone refused calls of a healthy 4-client loop.
            self._refuse(slot, QUEUE_TIMEOUT)

    def _stale(self, slot: Slot, now: float, *, in_queue: bool = True) -> str | None:
        if slot.deadline is not None and slot.deadline <= now:
            return EXPIRED_IN_QUEUE
        if slot.deadline is not None and not self._meetable(slot.deadline, now, by_mean=True):
            return DEADLINE_UNMEETABLE  # it would finish too late: refuse now, while it can retry
        target = self._codel_target(slot)
        if target is not None and self._standing(now) and now - slot.enqueued_at > target:
            # CoDel sheds the excess of a standing queue; a caller within its share is not excess.
            state = self._callers.get(slot.caller)
            if state is None or not self._within_share(state, queued=in_queue):
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
            waiter = state.queue.pop() if lifo and state.queue[-1].slot.interactive else state.queue.popleft()
            self._dequeued(waiter, now)
            if waiter.future.done():  # its caller was cancelled this very loop step: gone
                continue
            reason = self._stale(waiter.slot, now, in_queue=False)
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
        if self._limiter is not None:
            self._limiter.in_flight(now, self._in_flight)
        slot.in_flight_at_grant = self._in_flight
        self._callers[slot.caller].in_flight += 1
        self._admitted += 1
        slot.admitted_at_grant = self._admitted
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
        new = max(1, int(value))  # the limiter keeps it >= min_limit, except for its one-call probe
        if new != self._limit:
            self._limit = new
            if self._observer is not None:
                self._observer.limit(new)
