"""Does the backend compute this bundle's model? Send the bundle's probes and measure.

Output shapes alone do not tell two models apart: a Triton serving bundle B's model behind a
service on bundle A answers every call, labelled A, with B's numbers. The bundle records probe
images, its network's float64 outputs for them and the float32 noise envelopes measured at
export (``swc_service.bundle.ProbeReference``); this check sends the probes through the
backend, one batch per shape and at most the backend's max batch per call, and holds the
answers' distance from float64 to the declared precision class of :mod:`swc_service.parity`
(``fp32``: any fp32 implementation, TF32 included; ``fp16``: also a TensorRT FP16 engine).

Bundles written before probes, or before the float64 reference, existed cannot be checked.
They are refused by default (an unproven model can give wrong locations labelled as right);
``allow_without_probes`` serves them with a loud warning, for an operator who has decided to
take that risk (only the output shapes are checked then, with one black image).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .bundle import Bundle, ProbeReference
from .errors import LocateFailure
from .method import DEFAULT_SCALES_KM
from .parity import ParityReport, compare_outputs

# The service's inference protocol: (uint8 [B, H, W, 3], timeout s) -> (cell_probs [B, M], embedding [B, D]).
Infer = Callable[[np.ndarray, float], Awaitable[tuple[np.ndarray, np.ndarray]]]

RESULTS = ("ok", "mismatch", "no_probes", "error")  # the values of ModelCheck.result (a metric label)
ALLOW_FLAG = "--allow-bundle-without-probes"
CHECK_PRECISIONS = ("fp32", "fp16")  # the classes a backend can declare (``export`` is the exporter's)
SHAPE_PROBE = (1, 300, 300, 3)  # bundles without probes: one black image, its output shapes compared


@dataclass(frozen=True)
class ModelCheck:
    """The verdict: ``ok`` says whether the service may serve with this backend."""

    result: str  # one of RESULTS
    ok: bool
    message: str  # one line, for the log, the health detail and UNAVAILABLE refusals
    bundle_model_version: str
    backend_model_version: str | None
    precision: str
    report: ParityReport | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "ok": self.ok,
            "message": self.message,
            "bundle_model_version": self.bundle_model_version,
            "backend_model_version": self.backend_model_version,
            "precision": self.precision,
            "report": self.report.as_dict() if self.report is not None else None,
        }


def no_probes_message(bundle: Bundle, *, allowed: bool) -> str:
    """What the operator reads when the bundle cannot be checked (refused, or served if allowed)."""
    checkpoints = "" if bundle.source == "demo" else " --backbone ... --mvmf ... --rrm ..."
    add = f"visloc-export add-probes {bundle.path}{checkpoints}"
    what = (
        "no probes"
        if bundle.probes is None
        else "probes recorded before the float64 reference, which the check measures against"
    )
    if allowed:
        return (
            f"WARNING: bundle {bundle.path} (model {bundle.model_version}) has {what}, and {ALLOW_FLAG} is set: "
            f"serving WITHOUT checking that the backend computes this bundle's model; answers may come from "
            f"another model while labelled {bundle.model_version}. Add them with `{add}`."
        )
    return (
        f"bundle {bundle.path} (model {bundle.model_version}) has {what}, so the service cannot check that the "
        f"backend computes this bundle's model: refusing to serve. Add them with `{add}` (nothing else in the "
        f"bundle changes), or start with {ALLOW_FLAG} to serve it unchecked."
    )


async def check_model(
    infer: Infer,
    bundle: Bundle,
    precision: str = "fp32",
    *,
    scales_km: Sequence[float] = DEFAULT_SCALES_KM,
    timeout_s: float = 30.0,
    backend_version: str | None = None,
    allow_without_probes: bool = False,
    max_batch: int | None = None,
) -> ModelCheck:
    """Send the bundle's probes through ``infer`` and measure the answers against the float64 reference.

    ``backend_version`` is what the backend says it serves (e.g. Triton's model name and
    version), named in the messages next to the bundle's model version. Failures of the
    backend itself (unreachable, timeout) give ``result="error"``: not a verdict on the model.
    Probes of one shape go in one call, at most ``max_batch`` (the backend's max batch size).
    """
    if precision not in CHECK_PRECISIONS:  # the caller's error: raise before any call
        raise ValueError(f"precision must be one of {CHECK_PRECISIONS}, got {precision!r}")
    version = bundle.model_version
    backend = f"the backend's model {backend_version or '(version not reported)'}"

    def verdict(result: str, ok: bool, message: str, report: ParityReport | None = None) -> ModelCheck:
        return ModelCheck(result, ok, message, version, backend_version, precision, report)

    probes = bundle.probes
    if probes is None or probes.reference is None:
        message = no_probes_message(bundle, allowed=allow_without_probes)
        if not allow_without_probes:
            return verdict("no_probes", False, message)
        # Served unchecked, at the operator's risk: at least the output shapes must be the bundle's.
        try:
            probs, emb = await infer(np.zeros(SHAPE_PROBE, dtype=np.uint8), timeout_s)
        except (LocateFailure, asyncio.TimeoutError) as exc:
            why = str(exc) or type(exc).__name__
            return verdict("error", False, f"model check could not run: shape probe failed: {why}")
        want = ((1, bundle.num_cells), (1, int(bundle.features.shape[1])))
        if (np.shape(probs), np.shape(emb)) != want:
            return verdict(
                "mismatch",
                False,
                f"model check FAILED: {backend} outputs cell_probs {list(np.shape(probs))} and embedding "
                f"{list(np.shape(emb))}; bundle {bundle.bundle_id} (model {version}) needs {list(want[0])} and "
                f"{list(want[1])}",
            )
        return verdict("no_probes", True, message)

    reference = probes.reference
    got_probs: list[np.ndarray | None] = [None] * len(probes.images)
    got_emb: list[np.ndarray | None] = [None] * len(probes.images)
    for idx, batch in probes.batches(max_batch):
        try:
            probs, emb = await infer(batch, timeout_s)
        except (LocateFailure, asyncio.TimeoutError) as exc:
            return verdict(
                "error",
                False,
                f"model check could not run: probe batch {list(batch.shape)} failed: {str(exc) or type(exc).__name__}",
            )
        probs, emb = np.asarray(probs), np.asarray(emb)
        if probs.shape != (len(idx), probes.cell_probs.shape[1]) or emb.shape != (len(idx), probes.embeddings.shape[1]):
            report = compare_outputs(
                _subset(reference, idx), probs, emb, bundle.centres, scales_km,
                precision=precision, names=[probes.names[i] for i in idx],
            )  # fmt: skip
            return verdict("mismatch", False, _mismatch(bundle, backend, report), report)
        for row, i in enumerate(idx):
            got_probs[i], got_emb[i] = probs[row], emb[row]

    report = compare_outputs(
        reference, np.stack(got_probs), np.stack(got_emb), bundle.centres, scales_km,
        precision=precision, names=probes.names,
    )  # fmt: skip
    if not report.ok:
        return verdict("mismatch", False, _mismatch(bundle, backend, report), report)
    return verdict(
        "ok",
        True,
        f"model check passed: {backend} computes bundle {bundle.bundle_id}'s model {version}; {report.summary()}",
        report,
    )


def _subset(reference: ProbeReference, idx: list[int]) -> ProbeReference:
    per_probe = reference.per_probe
    if per_probe is not None:
        per_probe = {a: {q: [v[i] for i in idx] for q, v in d.items()} for a, d in per_probe.items()}
    return dataclasses.replace(
        reference, cell_probs=reference.cell_probs[idx], embeddings=reference.embeddings[idx], per_probe=per_probe
    )


def _mismatch(bundle: Bundle, backend: str, report: ParityReport) -> str:
    more = f" (and {len(report.failures) - 1} more)" if len(report.failures) > 1 else ""
    return (
        f"model check FAILED: {backend} does not compute bundle {bundle.bundle_id}'s model {bundle.model_version}: "
        f"{report.failures[0]}{more}; {report.summary()}"
    )
