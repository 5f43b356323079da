"""Swap the served bundle while serving (``kill -HUP``): load, check, then one assignment.

The operator re-points ``--bundle`` (typically a symlink to an immutable bundle directory) and
sends SIGHUP. :class:`BundleReloader` resolves the path anew, loads and memory-maps the new
bundle (in a thread: the event loop keeps answering on the old one), and sends the new bundle's
probes through the inference with the new bundle's EXACT model version
(:func:`swc_service.model_check.check_model`). Only when that passes is ``locator.state``
replaced, in one assignment: calls that already read the old state finish on it (and on the
old model version, still served by Triton next to the new one), later calls get the new one.
The old bundle's memory maps are released when the last of those calls drops its reference.
A bundle that does not load or does not pass the check changes nothing: the old one keeps
serving, and the log, the result and ``visloc_bundle_reload_total{result}`` say why.

Reloads are serialised: a SIGHUP during a reload queues one more (several coalesce into one),
so the last re-pointing always wins.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

from . import metrics
from .bundle import BundleError, load_bundle
from .inference import Inference
from .locator import Locator
from .model_check import ModelCheck, check_model
from .prediction import ServingState

log = logging.getLogger("swc_service.reload")

RESULTS = ("ok", "unchanged", "bundle_error", "mismatch", "no_probes", "error")  # metric label values


@dataclass(frozen=True)
class ReloadResult:
    result: str  # one of RESULTS
    ok: bool  # the service now serves the bundle at the path (swapped, or already did)
    message: str
    bundle_id: str | None = None  # of the bundle now served
    seconds: float = 0.0


@dataclass(eq=False)
class BundleReloader:
    """Reloads ``path`` into ``locator.state``; :meth:`request` is the SIGHUP handler."""

    locator: Locator
    inference: Inference
    path: str
    _: KW_ONLY
    precision: str = "fp32"
    allow_without_probes: bool = False
    model_name: str = "visloc"
    max_batch: int | None = None
    prefetch: bool = True
    last: ReloadResult | None = field(default=None, init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)
    _again: bool = field(default=False, init=False, repr=False)
    _task: asyncio.Task | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # Every result's series exists at 0 from the start, so a first failure is an increase
        # that alerts can see (a series born at 1 has no increase).
        for result in RESULTS:
            metrics.BUNDLE_RELOADS.labels(result)

    def request(self) -> None:
        """Start a reload, or queue one more when one is running (signal handler: never blocks)."""
        if self._task is not None and not self._task.done():
            self._again = True
            log.info("reload: SIGHUP during a reload; one more reload queued")
            return
        self._task = asyncio.get_running_loop().create_task(self._run_queued())

    async def _run_queued(self) -> None:
        await self.reload()
        while self._again:  # SIGHUPs since this task was started: one more reload reads them all
            self._again = False
            await self.reload()

    async def wait(self) -> None:
        """Until the running (and queued) reloads are done (graceful stop)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def cancel(self) -> None:
        """Stop a running reload (at shutdown): before its one assignment it has changed nothing."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def reload(self) -> ReloadResult:
        """One reload, serialised with the others; never raises for a bad bundle or a failed check."""
        async with self._lock:
            started = time.perf_counter()
            result = await self._reload()
            result = ReloadResult(result.result, result.ok, result.message, result.bundle_id,
                                  time.perf_counter() - started)  # fmt: skip
            metrics.BUNDLE_RELOADS.labels(result.result).inc()
            (log.info if result.ok else log.error)("reload %s after %.2f s: %s", result.result, result.seconds,
                                                   result.message)  # fmt: skip
            self.last = result
            return result

    async def _reload(self) -> ReloadResult:
        old = self.locator.state
        target = Path(self.path).resolve()  # the symlink as it points NOW
        try:
            state = await asyncio.to_thread(self._load, target)
        except (BundleError, OSError, ValueError) as exc:
            return ReloadResult("bundle_error", False, f"bundle {self.path} (-> {target}) not loaded: {exc}; "
                                f"still serving bundle {old.bundle.bundle_id}", old.bundle.bundle_id)  # fmt: skip
        new = state.bundle
        if new.bundle_id == old.bundle.bundle_id and new.triton_version == old.triton_version:
            return ReloadResult("unchanged", True, f"{target} is bundle {new.bundle_id}, already served",
                                new.bundle_id)  # fmt: skip
        check = await self._check(state)
        if not check.ok:
            return ReloadResult(check.result, False, f"bundle {new.bundle_id} from {target} refused: {check.message}; "
                                f"still serving bundle {old.bundle.bundle_id}", old.bundle.bundle_id)  # fmt: skip
        if check.result == "no_probes":
            log.warning("%s", check.message)
        if self.prefetch:
            new.prefetch()
        self.locator.state = state  # the swap: one assignment, read once per call
        metrics.set_bundle_info(old.bundle, False)
        metrics.set_bundle_info(new, True)
        return ReloadResult(
            "ok",
            True,
            f"now serving bundle {new.bundle_id} ({new.source}, model {new.model_version} = Triton version "
            f"{state.triton_version}, M={new.num_cells}, N={new.num_background}) from {target}; bundle "
            f"{old.bundle.bundle_id} is released when its calls in flight finish. {check.message}",
            new.bundle_id,
        )

    async def _check(self, state: ServingState) -> ModelCheck:
        """The new bundle's model check. A Triton pool checks every ready endpoint (and keeps the
        verdicts, so they take the new bundle's calls at once); one passing endpoint suffices,
        the others are checked again before they get the new bundle's calls. Any other inference
        is checked through its ``infer`` with the new bundle's exact model version."""
        verify = getattr(self.inference, "verify", None)
        if verify is not None:
            verdicts = await verify(state)
            passed = [v for v in verdicts if v.ok]
            if passed:
                return passed[0]
            if verdicts:
                return verdicts[0]
            return ModelCheck("error", False, "no ready Triton endpoint to check the new bundle against",
                              state.bundle.model_version, None, self.precision)  # fmt: skip
        return await check_model(
            functools.partial(self.inference.infer, model_version=state.triton_version),
            state.bundle,
            self.precision,
            scales_km=state.density.scales_km,
            backend_version=f"{self.model_name} version {state.triton_version}",
            allow_without_probes=self.allow_without_probes,
            max_batch=self.max_batch,
        )

    def _load(self, target: Path) -> ServingState:
        """Load and memory-map the bundle and build its PD index (O(M); in a worker thread)."""
        return ServingState.of(load_bundle(target), self.locator.settings.pd_scales_km)
