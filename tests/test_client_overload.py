"""The client does not amplify overload: the retry budget and the adaptive throttle.

Unit tests drive both with an injected clock and random source (nothing here depends on
timing); the rest run the real clients against a loopback gRPC server (the fake Locator of
``test_client_grpc``, whose ``busy;`` images are always refused with RESOURCE_EXHAUSTED) and
count what reached the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from typing import get_type_hints

import grpc
import pytest
from test_client_grpc import img, serve_fake

from visloc_client import (
    AdaptiveThrottle,
    AsyncLocatorClient,
    LocateError,
    LocateOptionArgs,
    LocateOptions,
    LocatorClient,
    RetryBudget,
    RetryPolicy,
)

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
# Retries refusals too, many times, quickly: what the budget is there to hold back.
EAGER = RetryPolicy(
    retries=10,
    initial_backoff=0.001,
    max_backoff=0.002,
    retry_on=frozenset({grpc.StatusCode.UNAVAILABLE, EXHAUSTED}),
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server():
    with serve_fake() as served:
        yield served


def _refusals(client: LocatorClient, n: int) -> list[LocateError]:
    errors = []
    for i in range(n):
        with pytest.raises(LocateError) as info:
            client.locate(img(i, i, prefix="busy;"))
        errors.append(info.value)
    return errors


# --- the retry budget ------------------------------------------------------------------------


def test_budget_spends_a_token_per_failure_and_refills_a_tenth_per_success():
    budget = RetryBudget(max_tokens=10, token_ratio=0.1)
    assert budget.tokens == 10 and budget.allows_retry()
    for _ in range(4):
        budget.on_failure()
    assert budget.tokens == 6 and budget.allows_retry()
    budget.on_failure()
    assert budget.tokens == 5 and not budget.allows_retry()  # at half: no more retries
    for _ in range(10):
        budget.on_failure()
    assert budget.tokens == 0  # never below empty
    for _ in range(51):
        budget.on_success()
    assert budget.tokens == pytest.approx(5.1) and budget.allows_retry()
    for _ in range(100):
        budget.on_success()
    assert budget.tokens == 10  # never above full
    with pytest.raises(ValueError, match="token_ratio"):
        RetryBudget(token_ratio=0)
    with pytest.raises(ValueError, match="max_tokens"):
        RetryBudget(max_tokens=-1)


# --- the adaptive throttle -------------------------------------------------------------------


def test_throttle_refuses_with_the_sre_probability():
    draw = [0.0]
    throttle = AdaptiveThrottle(k=2, window_s=60, min_requests=0, clock=Clock(), random=lambda: draw[0])
    for _ in range(10):
        assert throttle.admit()  # all accepted: p = 0, whatever the draw
        throttle.record(accepted=True)
    for _ in range(11):
        assert throttle.admit()  # p stays 0 while requests <= 2 * accepts (20 of 10 accepted)
        throttle.record(accepted=False)
    assert throttle.reject_probability() == pytest.approx((21 - 2 * 10) / 22)
    draw[0] = 0.99
    for _ in range(19):
        assert throttle.admit()  # a draw above p lets the call through
        throttle.record(accepted=False)
    assert throttle.counts() == (40, 10)
    assert throttle.reject_probability() == pytest.approx((40 - 2 * 10) / 41)
    assert throttle.admit()
    throttle.record(accepted=False)
    draw[0] = 0.48
    assert not throttle.admit()  # below p = (41 - 20) / 42 = 0.5: refused
    # Refused attempts count as requests, so the probability keeps rising while refusals last.
    assert throttle.counts() == (42, 10)
    assert throttle.reject_probability() == pytest.approx((42 - 20) / 43)


def test_calls_in_flight_are_neither_accepts_nor_refusals():
    """A client that starts many calls at once is not throttled for answers it has not had yet
    (a healthy service, 16 calls in flight: no local refusals)."""
    throttle = AdaptiveThrottle(k=2, window_s=30, min_requests=0, clock=Clock(), random=lambda: 0.0)
    assert all(throttle.admit() for _ in range(64))
    assert throttle.counts() == (0, 0) and throttle.reject_probability() == 0.0
    for _ in range(64):
        throttle.record(accepted=True)
    assert throttle.counts() == (64, 64) and throttle.admit()


def test_throttle_waits_for_min_requests_and_forgets_after_the_window():
    clock = Clock()
    throttle = AdaptiveThrottle(k=2, window_s=30, min_requests=20, buckets=10, clock=clock, random=lambda: 0.0)
    for _ in range(19):
        assert throttle.admit()  # all refused by the service, but too few to judge
        throttle.record(accepted=False)
    assert throttle.reject_probability() == 0.0
    assert throttle.admit()
    throttle.record(accepted=False)
    assert throttle.reject_probability() == pytest.approx(20 / 21)
    assert not throttle.admit()
    clock.now += 15  # half a window: still remembered
    assert throttle.counts() == (21, 0)
    clock.now += 16  # past the window: forgotten
    assert throttle.counts() == (0, 0) and throttle.admit()
    with pytest.raises(ValueError, match="k must be"):
        AdaptiveThrottle(k=0.5)


# --- against a real server -------------------------------------------------------------------


def test_retries_against_refusals_stay_within_the_budget(server):
    servicer, target = server
    calls = 30
    with LocatorClient(target, retries=EAGER, throttle=False, retry_budget=False) as client:
        _refusals(client, calls)
    unbudgeted = servicer.calls
    assert unbudgeted == calls * (1 + EAGER.retries)  # what the budget prevents

    servicer.calls = 0
    budget = RetryBudget(max_tokens=10, token_ratio=0.1)
    with LocatorClient(target, retries=EAGER, throttle=False, retry_budget=budget) as client:
        errors = _refusals(client, calls)
    assert all(e.code == EXHAUSTED and e.reason == "over capacity" for e in errors)
    # Tokens 10 -> 5 in the first call's failures; from then on no retry is allowed.
    assert servicer.calls == calls + 4
    assert budget.tokens == 0


def test_retries_stay_within_a_tenth_of_the_successes(server):
    servicer, target = server
    budget = RetryBudget()
    ok = 0
    with LocatorClient(target, retries=EAGER, throttle=False, retry_budget=budget) as client:
        for i in range(300):
            busy = i % 4 == 0  # a quarter of the calls are refused, however often retried
            try:
                client.locate(img(i, i, prefix="busy;" if busy else ""))
                ok += 1
            except LocateError as err:
                assert busy and err.code == EXHAUSTED
    assert ok == 225
    retries = servicer.calls - 300
    assert 0 < retries <= 0.1 * ok + budget.max_tokens / 2


def test_the_throttle_keeps_refusals_off_the_server(server):
    servicer, target = server
    throttle = AdaptiveThrottle(clock=Clock(), random=random.Random(7).random)  # the defaults otherwise
    with LocatorClient(target, retries=0, throttle=throttle) as client:
        errors = _refusals(client, 200)
    local = [e for e in errors if "throttled client-side" in e.reason]
    assert all(e.code == EXHAUSTED for e in errors)  # the same status as the server's refusal
    assert servicer.calls == 200 - len(local)
    # Past min_requests almost every call is refused locally: p = n / (n + 1) with no accepts.
    assert throttle.min_requests <= servicer.calls < 40
    assert "accepted 0 of the last 200 calls" in local[-1].reason

    # A service that answers gets every call through.
    servicer.calls = 0
    with LocatorClient(target, retries=0, throttle=AdaptiveThrottle(clock=Clock(), random=lambda: 0.0)) as client:
        for i in range(100):
            client.locate(img(i, i))
    assert servicer.calls == 100


def test_throttle_and_budget_can_be_turned_off(server):
    servicer, target = server
    with LocatorClient(target, retries=0, throttle=False) as client:
        _refusals(client, 60)
    assert servicer.calls == 60
    with pytest.raises(TypeError, match="RetryBudget"):
        LocatorClient(target, retry_budget=3)


def test_async_client_is_throttled_and_budgeted_alike(server):
    servicer, target = server
    throttle = AdaptiveThrottle(min_requests=0, clock=Clock(), random=lambda: 0.0)

    async def run() -> list[LocateError]:
        errors = []
        async with AsyncLocatorClient(target, retries=EAGER, throttle=throttle) as client:
            for i in range(5):
                with pytest.raises(LocateError) as info:
                    await client.locate(img(i, i, prefix="busy;"))
                errors.append(info.value)
        return errors

    errors = asyncio.run(run())
    # The first attempt goes out (p = 0); every later one, retries included, is refused locally.
    assert servicer.calls == 1
    assert all(e.code == EXHAUSTED for e in errors)
    assert "throttled client-side" in errors[0].reason and "throttled client-side" in errors[-1].reason


def test_locate_many_items_are_throttled_and_budgeted(server):
    servicer, target = server
    throttle = AdaptiveThrottle(min_requests=0, clock=Clock(), random=lambda: 0.0)
    for _ in range(10):
        throttle.admit()
        throttle.record(accepted=False)  # ten refusals already on record
    with LocatorClient(target, throttle=throttle) as client:
        items = list(client.locate_many([img(i, i) for i in range(5)]))
    assert all(i.error.code == EXHAUSTED and "throttled client-side" in i.error.reason for i in items)
    assert servicer.received == 0

    # Per-image retries in a stream draw on the same budget: one image the service keeps
    # refusing (flaky=100: UNAVAILABLE) is retried four times, then the budget is at half
    # (one image at a time, so that the other's success comes after).
    flaky = img(9, 9, prefix="flaky=100;")
    budget = RetryBudget()
    with LocatorClient(target, retries=EAGER, throttle=False, retry_budget=budget) as client:
        items = list(client.locate_many([flaky, img(1, 1)], concurrency=1))
    assert items[0].error.code == grpc.StatusCode.UNAVAILABLE and items[1].ok
    assert servicer.attempts[flaky] == 5


def test_option_keywords_are_the_options_fields():
    fields = {f.name for f in dataclasses.fields(LocateOptions)}
    assert set(get_type_hints(LocateOptionArgs)) == fields
    assert set(LocateOptionArgs.__optional_keys__) == fields
