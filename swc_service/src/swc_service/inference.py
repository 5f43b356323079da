"""The seam between the data plane and whatever runs the model.

:class:`Inference` is all the service needs from a model server: a batch in, two arrays out,
a readiness probe and a close. :class:`~swc_service.triton_infer.TritonInference` is the
production one; tests pass a fake. Anything else that runs batches (several Triton endpoints:
:class:`~swc_service.triton_pool.TritonPool`; an admission queue in front of one) implements the
same three methods and is injected into :class:`~swc_service.locator.Locator` in its place.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Inference(Protocol):
    """``infer(uint8 [B, H, W, 3], timeout) -> (cell_probs [B, M], embedding [B, D])``.

    ``infer`` raises :class:`~swc_service.errors.LocateFailure` subclasses only (UNAVAILABLE:
    retry elsewhere; DEADLINE_EXCEEDED; INTERNAL); ``timeout_s`` None means the server's default.
    ``model_version`` is the EXACT model version to run (the serving state's
    ``triton_version``, so old and new models can be served at once); "" means the model's default.
    """

    async def infer(
        self, batch: np.ndarray, timeout_s: float | None = None, *, model_version: str = ""
    ) -> tuple[np.ndarray, np.ndarray]: ...

    async def ready(self, timeout_s: float = 1.0, *, model_version: str | None = "") -> bool:
        """The model (that exact version, when given) can be called now; never raises (for health)."""
        ...

    async def close(self) -> None: ...
