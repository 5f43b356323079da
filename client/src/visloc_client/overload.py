"""How a client keeps from amplifying an overload: a retry budget and adaptive throttling.

Retrying a refused call adds load exactly when the service has none to spare, and a caller that
keeps sending calls an overloaded service refuses makes the service spend its capacity saying
no. ``RetryBudget`` caps retries (gRPC's ``retryThrottling``); ``AdaptiveThrottle`` refuses calls
locally, before they are sent, in proportion to how many the service has been refusing (the
Google SRE book, "Handling Overload"). Both keep their state per client (or per the objects a
caller shares between clients) and are thread-safe.
"""

from __future__ import annotations

import random as _random
import threading
import time
from collections import deque
from collections.abc import Callable

import grpc

# What an overloaded (or absent) service answers; the adaptive throttle counts these as refusals.
OVERLOAD_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


class RetryBudget:
    """gRPC's retry throttling: a bucket of ``max_tokens`` tokens, full at the start. A failed
    attempt (an overload status or one the retry policy retries) takes one token, a successful
    one gives back ``token_ratio``; a retry may go out only while more than half the bucket is
    left. So however long the service fails, retries stay within ``token_ratio`` (10 %) of the
    successful calls plus ``max_tokens / 2``."""

    def __init__(self, max_tokens: float = 10.0, token_ratio: float = 0.1) -> None:
        if not 0 < max_tokens <= 1000:
            raise ValueError(f"max_tokens must be in (0, 1000], got {max_tokens!r}")
        if not 0 < token_ratio <= 1:
            raise ValueError(f"token_ratio must be in (0, 1], got {token_ratio!r}")
        self.max_tokens = float(max_tokens)
        self.token_ratio = float(token_ratio)
        self._tokens = self.max_tokens
        self._lock = threading.Lock()

    @property
    def tokens(self) -> float:
        return self._tokens

    def on_success(self) -> None:
        with self._lock:
            self._tokens = min(self.max_tokens, self._tokens + self.token_ratio)

    def on_failure(self) -> None:
        with self._lock:
            self._tokens = max(0.0, self._tokens - 1.0)

    def allows_retry(self) -> bool:
        return self._tokens > self.max_tokens / 2


class AdaptiveThrottle:
    """Client-side adaptive throttling (Google SRE book, "Handling Overload").

    Over the last ``window_s`` seconds the client counts ``requests`` (attempts it wanted to send,
    the ones it refused itself included) and ``accepts`` (attempts the service answered with
    anything but UNAVAILABLE or RESOURCE_EXHAUSTED). A new attempt is refused locally with
    probability ``max(0, (requests - k * accepts) / (requests + 1))``: nothing while the service
    accepts at least one call in ``k``, then more the more it refuses, so the calls it would
    refuse mostly never reach it. ``k`` = 2 lets through about twice what the service accepts;
    smaller is stricter. Below ``min_requests`` in the window nothing is refused (a few
    failures, e.g. at start-up, are retries' business, not overload). ``clock`` and ``random``
    are injectable for tests.
    """

    def __init__(
        self,
        k: float = 2.0,
        window_s: float = 30.0,
        min_requests: int = 20,
        *,
        buckets: int = 10,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
    ) -> None:
        if not k >= 1:
            raise ValueError(f"k must be at least 1, got {k!r}")
        if not window_s > 0 or buckets < 1:
            raise ValueError("window_s must be positive and buckets at least 1")
        if min_requests < 0:
            raise ValueError("min_requests must be non-negative")
        self.k = float(k)
        self.window_s = float(window_s)
        self.min_requests = min_requests
        self._buckets = buckets
        self._width = self.window_s / buckets
        self._clock = clock
        self._random = random
        self._lock = threading.Lock()
        # [bucket number, requests, accepts], oldest first; buckets older than the window go.
        self._counts: deque[list[int]] = deque()

    def _current(self) -> list[int]:
        index = int(self._clock() // self._width)
        while self._counts and self._counts[0][0] <= index - self._buckets:
            self._counts.popleft()
        if not self._counts or self._counts[-1][0] != index:
            self._counts.append([index, 0, 0])
        return self._counts[-1]

    def _totals(self) -> tuple[int, int]:
        return sum(c[1] for c in self._counts), sum(c[2] for c in self._counts)

    def _probability(self, requests: int, accepts: int) -> float:
        if requests < self.min_requests:
            return 0.0
        return max(0.0, (requests - self.k * accepts) / (requests + 1))

    def counts(self) -> tuple[int, int]:
        """(requests, accepts) in the window now."""
        with self._lock:
            self._current()
            return self._totals()

    def reject_probability(self) -> float:
        """The probability that the next attempt is refused locally."""
        return self._probability(*self.counts())

    def admit(self) -> bool:
        """False when the next attempt is to be refused locally rather than sent.

        A refused attempt counts as a request now; a sent one counts when :meth:`record` hears
        how it ended, so calls still in flight are neither accepts nor refusals (a client that
        starts 16 calls at once is not throttled for the 16 answers it has not had yet)."""
        with self._lock:
            bucket = self._current()
            probability = self._probability(*self._totals())
            refused = probability > 0 and self._random() < probability
            if refused:
                bucket[1] += 1
        return not refused

    def record(self, accepted: bool) -> None:
        """An attempt admitted earlier was answered; ``accepted``: not with an overload status."""
        with self._lock:
            bucket = self._current()
            bucket[1] += 1
            if accepted:
                bucket[2] += 1

    def describe(self) -> str:
        requests, accepts = self.counts()
        return (
            f"the service accepted {accepts} of the last {requests} calls in {self.window_s:g} s "
            f"(adaptive throttling, k={self.k:g})"
        )
