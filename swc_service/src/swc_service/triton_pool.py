"""Several Triton endpoints as one :class:`~swc_service.inference.Inference`: per-call balancing.

One long-lived gRPC connection to a Kubernetes ClusterIP Service is balanced per CONNECTION by
kube-proxy: Triton pods added by the autoscaler would get no calls until the service restarts.
So the service balances itself, per batch, over every endpoint of its target:

- ``--triton-url`` is ``HOST:PORT``, ``H1:P1,H2:P2,...``, ``dns:///NAME:PORT`` (every address
  of NAME, resolved with the event loop's getaddrinfo: a headless Service gives one A record per
  ready pod) or ``file:///path`` (one ``HOST:PORT`` per line, ``#`` comments; rewritten by hand or
  by a service-discovery sidecar). dns and file targets are re-resolved every
  ``resolve_interval_s``: new endpoints join within seconds; vanished ones leave once their
  batches in flight are done. A failed resolution keeps the endpoints it had.
- One :class:`~swc_service.triton_infer.TritonInference` (connection) per endpoint, health-checked
  by :meth:`TritonPool.refresh` (gRPC is_server_ready + is_model_ready: only port 8001 is needed).
- An endpoint gets traffic only after the bundle's model check
  (:func:`~swc_service.model_check.check_model`) passed on it for the CURRENT serving state, and
  is checked again every time it becomes ready again (restart, reconnect, model reload).
- Each batch goes to the usable endpoint with the fewest batches outstanding (ties: round robin).
  A batch failing with UNAVAILABLE or Triton's "exiting"/"shutting down" is sent once more to
  another endpoint within the call's remaining ``timeout_s``; the failing endpoint is not used
  again until its health check passes (and the model check with it).
- No usable endpoint: :meth:`infer` raises UNAVAILABLE with :meth:`problem` (which endpoints,
  why: not ready, or the check's verdict naming the bundle's and the backend's model versions).

The serving state (for reload): the pool checks against ``state_source()`` (the server passes
``lambda: locator.state``, so assigning ``locator.state`` switches what the pool checks
against); :meth:`set_state` pins a state instead. A reload calls ``await pool.verify(candidate)``
first: every ready endpoint is checked against the candidate WITHOUT switching (the verdicts
are kept, so the switch itself needs no new check on those endpoints), then switches the state.
Endpoints not verified for the new state are checked on the next :meth:`refresh`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import socket
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import metrics, tracing
from .errors import LocateFailure, Unavailable
from .inference import Inference
from .model_check import ModelCheck, check_model
from .prediction import ServingState
from .targets import Target, join_address, parse_target, read_endpoint_file

log = logging.getLogger("swc_service")

RETRY_MARKERS = ("exiting", "shutting down")  # Triton draining (SIGTERM): the batch can go elsewhere


async def resolve(target: Target) -> list[str]:
    """The target's endpoints now (sorted, unique); raises OSError/ValueError when it cannot say."""
    if target.kind == "static":
        return list(dict.fromkeys(target.addresses))
    if target.kind == "file":
        return sorted(set(read_endpoint_file(target.name)))
    infos = await asyncio.get_running_loop().getaddrinfo(target.name, target.port, type=socket.SOCK_STREAM)
    return sorted({join_address(info[4][0], target.port) for info in infos})


# --------------------------------------------------------------------------- endpoints


@dataclass
class Endpoint:
    address: str
    inference: Inference
    ready: bool = False  # the last health check (or a failed batch) said so
    outstanding: int = 0
    picked: int = -1  # when the pool last chose it (ties go to the least recent: round robin)
    leaving: bool = False  # gone from the target: no new batches, closed once idle
    max_batch: int | None = None  # its model config's max_batch_size (read at each check): larger batches split
    # id(state) -> (a WEAK reference to the state, its verdict): a verdict must not keep a
    # replaced bundle (and its memory maps) alive after a reload.
    verdicts: dict[int, tuple[weakref.ref, ModelCheck]] = field(default_factory=dict)
    check_task: asyncio.Task | None = None

    def verdict(self, state: ServingState) -> ModelCheck | None:
        got = self.verdicts.get(id(state))
        return got[1] if got is not None and got[0]() is state else None

    def usable(self, state: ServingState) -> bool:
        verdict = self.verdict(state)
        return self.ready and not self.leaving and verdict is not None and verdict.ok


def retryable(exc: BaseException) -> bool:
    """UNAVAILABLE, or Triton saying it is exiting: another endpoint may well answer."""
    text = str(exc).lower()
    return isinstance(exc, Unavailable) or any(marker in text for marker in RETRY_MARKERS)


class TritonPool:
    """Endpoints of one target as one :class:`~swc_service.inference.Inference` (module docstring)."""

    def __init__(
        self,
        target: str,
        model: str,
        state_source: Callable[[], ServingState],
        *,
        connect: Callable[[str], Inference] | None = None,
        timeout_s: float = 30.0,
        precision: str = "fp32",
        allow_without_probes: bool = False,
        resolve_interval_s: float = 5.0,
        health_timeout_s: float = 1.0,
        backend_model_version: Callable[[ServingState], str] = lambda state: "",
    ):
        self.target = parse_target(target)
        self._target = target.strip()
        self.model = model
        self.timeout_s = timeout_s
        self.precision = precision
        self.allow_without_probes = allow_without_probes
        self.resolve_interval_s = resolve_interval_s
        self.health_timeout_s = health_timeout_s
        self._state_source = state_source
        self._backend_model_version = backend_model_version  # the exact Triton version ("" = default)
        self._connect = connect or self._triton
        self.endpoints: dict[str, Endpoint] = {}
        self._resolved_at: float | None = None
        self._resolve_error: str | None = None
        self._turn = itertools.count()  # pick sequence numbers

    def _triton(self, address: str) -> Inference:
        from .triton_infer import TritonInference

        return TritonInference(address, self.model, self.timeout_s)

    # -- the serving state
    @property
    def state(self) -> ServingState:
        return self._state_source()

    def set_state(self, state: ServingState) -> None:
        """Pin the state the endpoints must pass the check for (instead of ``state_source``)."""
        self._state_source = lambda: state

    def follow(self, state_source: Callable[[], ServingState]) -> None:
        """Check against whatever ``state_source()`` returns (e.g. ``lambda: locator.state``)."""
        self._state_source = state_source

    # -- Inference
    async def infer(
        self, batch: np.ndarray, timeout_s: float | None = None, *, model_version: str = ""
    ) -> tuple[np.ndarray, np.ndarray]:
        """Least-outstanding usable endpoint; once more elsewhere on UNAVAILABLE/exiting, within timeout_s."""
        budget = self.timeout_s if timeout_s is None else timeout_s
        started = time.monotonic()
        state, tried = self.state, set()
        while True:
            ep = self._pick(state, tried)
            if ep is None:
                raise Unavailable(self.problem(state, tried))
            tried.add(ep.address)
            remaining = budget - (time.monotonic() - started)
            try:
                return await self._send(ep, batch, remaining, model_version)
            except LocateFailure as exc:
                if not retryable(exc):
                    raise
                self._lost(ep, exc)
                if len(tried) > 1 or budget - (time.monotonic() - started) <= 0:
                    raise

    def _pick(self, state: ServingState, tried: set[str]) -> Endpoint | None:
        usable = [ep for ep in self.endpoints.values() if ep.address not in tried and ep.usable(state)]
        if not usable:
            return None
        ep = min(usable, key=lambda ep: (ep.outstanding, ep.picked))  # ties: the least recently picked
        ep.picked = next(self._turn)
        return ep

    async def _send(self, ep: Endpoint, batch: np.ndarray, timeout_s: float, model_version: str):
        ep.outstanding += 1
        tracing.annotate({"server.address": ep.address, "visloc.triton.model": self.model})
        metrics.ENDPOINT_BATCHES.labels(ep.address).inc()
        metrics.ENDPOINT_OUTSTANDING.labels(ep.address).inc()
        try:
            kw = {"model_version": model_version} if model_version else {}
            step = ep.max_batch or batch.shape[0]
            if batch.shape[0] <= step:
                return await ep.inference.infer(batch, max(0.001, timeout_s), **kw)
            parts = await asyncio.gather(
                *(ep.inference.infer(batch[a : a + step], max(0.001, timeout_s), **kw)
                  for a in range(0, batch.shape[0], step))
            )  # fmt: skip
            return np.concatenate([p for p, _ in parts]), np.concatenate([e for _, e in parts])
        except LocateFailure:
            metrics.ENDPOINT_FAILURES.labels(ep.address).inc()
            raise
        finally:
            ep.outstanding -= 1
            metrics.ENDPOINT_OUTSTANDING.labels(ep.address).dec()
            if ep.leaving and ep.outstanding == 0:
                await self._close(ep)

    def _lost(self, ep: Endpoint, exc: BaseException) -> None:
        if ep.ready:
            log.warning("Triton endpoint %s failed a batch (%s): unused until its health check passes", ep.address, exc)
        ep.ready = False
        metrics.ENDPOINT_READY.labels(ep.address).set(0)

    async def ready(self, timeout_s: float = 1.0, *, model_version: str | None = "") -> bool:
        """Some endpoint is ready and passed the model check for the current state (no I/O)."""
        state = self.state
        return any(ep.usable(state) for ep in self.endpoints.values())

    async def close(self) -> None:
        for ep in list(self.endpoints.values()):
            await self._close(ep)

    async def _close(self, ep: Endpoint) -> None:
        if self.endpoints.get(ep.address) is ep:
            del self.endpoints[ep.address]
        if ep.check_task is not None:
            ep.check_task.cancel()
        for gauge in (metrics.ENDPOINT_READY, metrics.ENDPOINT_OUTSTANDING):
            with contextlib.suppress(KeyError):
                gauge.remove(ep.address)
        await ep.inference.close()

    # -- membership, health and the model check
    async def refresh(self) -> None:
        """One maintenance step (the health watcher calls it every interval): re-resolve when
        due, health-check every endpoint, start the model check where one is needed."""
        now = time.monotonic()
        if self._resolved_at is None or (self.target.dynamic and now - self._resolved_at >= self.resolve_interval_s):
            self._resolved_at = now
            await self._resolve()
        members = [ep for ep in self.endpoints.values() if not ep.leaving]
        states = await asyncio.gather(*(self._healthy(ep) for ep in members))
        state = self.state
        for ep, healthy in zip(members, states, strict=True):
            if not healthy:
                if ep.ready:
                    log.warning("Triton endpoint %s is not ready", ep.address)
                ep.ready = False
                ep.verdicts.clear()  # a backend that went away is checked again when it returns
            elif self._needs_check(ep, state) and (ep.check_task is None or ep.check_task.done()):
                ep.check_task = asyncio.get_running_loop().create_task(self._admit(ep, state))
            metrics.ENDPOINT_READY.labels(ep.address).set(1 if ep.usable(state) else 0)
        metrics.MODEL_CHECK_FAILING.set(len(self.refused(state)))

    @staticmethod
    def _needs_check(ep: Endpoint, state: ServingState) -> bool:
        """Newly ready (restart, reconnect, reload), never checked for ``state``, or the check could not run."""
        verdict = ep.verdict(state)
        return not ep.ready or verdict is None or verdict.result == "error"

    def refused(self, state: ServingState | None = None) -> list[Endpoint]:
        """Ready endpoints whose model the check refused (a verdict, not an outage)."""
        state = self.state if state is None else state
        return [
            ep for ep in self.endpoints.values()
            if ep.ready and (v := ep.verdict(state)) is not None and v.result in ("mismatch", "no_probes") and not v.ok
        ]  # fmt: skip

    async def wait_checks(self) -> None:
        """Wait for the model checks under way (tests, start-up)."""
        tasks = [ep.check_task for ep in self.endpoints.values() if ep.check_task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _healthy(self, ep: Endpoint) -> bool:
        try:
            # An endpoint that passed the check for the current bundle stays in while its server is
            # up: loading another version next to it (a rollout) reloads the model, and Triton
            # reports the model not ready meanwhile though it keeps answering; a batch that fails
            # takes the endpoint out (_lost) and it is checked again. Any other: server and model
            # ready; the model check then asks for the exact version and says what is missing.
            version = None if ep.usable(self.state) else ""
            ready = ep.inference.ready(self.health_timeout_s, model_version=version)
            return await asyncio.wait_for(ready, self.health_timeout_s + 1)
        except TimeoutError:
            return False

    async def _resolve(self) -> None:
        try:
            addresses = await resolve(self.target)
        except (OSError, ValueError) as exc:
            message = f"cannot resolve Triton target {self._target_text()}: {exc}; keeping {sorted(self.endpoints)}"
            if message != self._resolve_error:
                log.error("%s", message)
            self._resolve_error = message
            return
        self._resolve_error = None
        wanted = set(addresses)
        for address in addresses:
            if address not in self.endpoints:
                self.endpoints[address] = Endpoint(address, self._connect(address))
                log.info("Triton endpoint %s joined (%s)", address, self._target_text())
        for ep in list(self.endpoints.values()):
            if ep.address not in wanted and not ep.leaving:
                ep.leaving = True
                log.info("Triton endpoint %s left the target (%d batches in flight)", ep.address, ep.outstanding)
                if ep.outstanding == 0:
                    await self._close(ep)

    async def _admit(self, ep: Endpoint, state: ServingState) -> None:
        """Check a (newly) ready endpoint for ``state``; it takes traffic only when the check passes."""
        verdict = await self._check(ep, state)
        ep.ready = True
        if ep.leaving:
            return
        previous = ep.verdict(state)
        self._keep(ep, state, verdict)
        if previous is None or previous.result != verdict.result:
            (log.info if verdict.ok else log.error)("Triton endpoint %s: %s", ep.address, verdict.message)
        metrics.ENDPOINT_READY.labels(ep.address).set(1 if ep.usable(self.state) else 0)

    def _keep(self, ep: Endpoint, state: ServingState, verdict: ModelCheck) -> None:
        current = self.state
        ep.verdicts = {k: v for k, v in ep.verdicts.items() if v[0]() is current}  # the current one and ...
        ep.verdicts[id(state)] = (weakref.ref(state), verdict)  # ... the latest

    async def _check(self, ep: Endpoint, state: ServingState) -> ModelCheck:
        version = self._backend_model_version(state)
        infer = functools.partial(ep.inference.infer, model_version=version) if version else ep.inference.infer
        backend = f"Triton model {self.model!r} version {version or '(default)'} at {ep.address}"
        limit = getattr(ep.inference, "max_batch", None)  # the endpoint's max_batch_size, where it says
        try:
            max_batch = ep.max_batch = await limit(model_version=version or "") if limit is not None else None
            verdict = await check_model(
                infer, state.bundle, self.precision, scales_km=state.density.scales_km, timeout_s=self.timeout_s,
                backend_version=backend, allow_without_probes=self.allow_without_probes, max_batch=max_batch,
            )  # fmt: skip
        except LocateFailure as exc:  # a shape probe of an unchecked bundle failed in the backend
            verdict = ModelCheck("error", False, f"model check could not run: {exc}", state.model_version, backend,
                                 self.precision)  # fmt: skip
        metrics.MODEL_CHECKS.labels(verdict.result, ep.address).inc()
        return verdict

    async def verify(self, state: ServingState) -> list[ModelCheck]:
        """Check every ready endpoint against ``state`` without switching to it (for a reload)."""
        ready = [ep for ep in self.endpoints.values() if ep.ready and not ep.leaving]
        verdicts = await asyncio.gather(*(self._check(ep, state) for ep in ready))
        for ep, verdict in zip(ready, verdicts, strict=True):
            self._keep(ep, state, verdict)
        return list(verdicts)

    # -- what health, GetInfo and refusals say
    def confirmed(self, state: ServingState | None = None) -> ModelCheck | None:
        """A passing verdict of a usable endpoint for ``state`` (default: the current one)."""
        state = self.state if state is None else state
        for ep in self.endpoints.values():
            if ep.usable(state):
                return ep.verdict(state)
        return None

    def model_status(self) -> tuple[bool, str]:
        """For GetInfo: (confirmed, warning). Unconfirmed: why; served unchecked: the loud warning."""
        state = self.state
        verdict = self.confirmed(state)
        if verdict is None:
            return False, f"model not confirmed, not serving: {self.problem(state)}"
        return True, verdict.message if verdict.result == "no_probes" else ""

    def problem(self, state: ServingState | None = None, tried: Sequence[str] = ()) -> str:
        """Why no endpoint can take a batch now: one clause per endpoint."""
        state = self.state if state is None else state
        parts = []
        for ep in self.endpoints.values():
            verdict = ep.verdict(state)
            if ep.address in tried:
                why = "failed this call"
            elif ep.leaving:
                why = "leaving the target"
            elif not ep.ready:
                why = "not ready"
            elif verdict is None:
                why = "model check under way"
            elif not verdict.ok:
                why = verdict.message
            else:
                why = "ready"
            parts.append(f"{ep.address}: {why}")
        where = "; ".join(parts) if parts else "no endpoints"
        if self._resolve_error:
            where += f" ({self._resolve_error})"
        return (
            f"no Triton endpoint of {self._target_text()} can serve bundle {state.bundle.bundle_id}'s model "
            f"{state.model_version}: {where}"
        )

    def _target_text(self) -> str:
        return self._target
