"""The service's one long-lived connection to Triton (KServe v2 gRPC, asyncio)."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

from . import metrics, tracing
from .bundle import INPUT_NAME, OUTPUT_EMBEDDING, OUTPUT_PROBS
from .errors import DeadlineExceeded, InferenceFailed, Unavailable

_MAX_MESSAGE = 2**31 - 1

# Passing channel_args replaces tritonclient's defaults, message-size limits included, so
# they are set again here. Short reconnect backoff: a restarted Triton is found within ~1 s.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


def _status(exc: InferenceServerException) -> str:
    return str(exc.status() or "")


class TritonInference:
    """One Triton endpoint as an :class:`~swc_service.inference.Inference`."""

    def __init__(self, url: str, model: str, timeout_s: float = 30.0):
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self._client = triton.InferenceServerClient(url, channel_args=CHANNEL_ARGS)

    async def infer(
        self, batch: np.ndarray, timeout_s: float | None = None, *, model_version: str = ""
    ) -> tuple[np.ndarray, np.ndarray]:
        inp = triton.InferInput(INPUT_NAME, list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch)
        outputs = [triton.InferRequestedOutput(OUTPUT_PROBS), triton.InferRequestedOutput(OUTPUT_EMBEDDING)]
        timeout = self.timeout_s if timeout_s is None else max(0.001, min(timeout_s, self.timeout_s))
        try:
            # timeout: Triton's own (microseconds); its queue policy (allow_timeout_override,
            # timeout_action REJECT) drops the batch once its callers' deadlines have passed.
            result = await self._client.infer(
                self.model,
                [inp],
                model_version=model_version,
                outputs=outputs,
                timeout=max(1, int(timeout * 1e6)),
                client_timeout=timeout,
                headers=tracing.headers(),  # traceparent: Triton's own trace joins the call's
            )
        except InferenceServerException as exc:
            status = _status(exc)
            metrics.TRITON_ERRORS.labels(status.removeprefix("StatusCode.") or "UNKNOWN").inc()
            if "UNAVAILABLE" in status:
                raise Unavailable(f"Triton at {self.url} is unavailable: {exc.message()}") from exc
            if "DEADLINE_EXCEEDED" in status:
                raise DeadlineExceeded(f"Triton did not answer within {timeout:.3f} s") from exc
            if "NOT_FOUND" in status or "not found" in (exc.message() or ""):
                raise Unavailable(
                    f"Triton at {self.url} does not serve model {self.model!r} version {model_version or '(default)'}: "
                    f"{exc.message()}"
                ) from exc
            raise InferenceFailed(f"Triton error {status}: {exc.message()}") from exc
        return result.as_numpy(OUTPUT_PROBS), result.as_numpy(OUTPUT_EMBEDDING)

    async def max_batch(self, timeout_s: float = 5.0, *, model_version: str = "") -> int | None:
        """The model config's ``max_batch_size`` (None: no limit, or Triton would not say): the
        model check sends its probes in batches that fit it."""
        try:
            config = await self._client.get_model_config(
                self.model, model_version, as_json=True, client_timeout=timeout_s
            )
        except InferenceServerException:
            return None
        size = int(config.get("config", config).get("max_batch_size", 0) or 0)
        return size or None

    async def ready(self, timeout_s: float = 1.0, *, model_version: str | None = "") -> bool:
        """Server ready and the model (that exact version, when given) ready, for health; never
        raises. ``model_version=None``: the server live only (Triton's server readiness is strict:
        false while any model reloads; see TritonPool's health check)."""
        try:
            if model_version is None:
                return bool(await self._client.is_server_live(client_timeout=timeout_s))
            if not await self._client.is_server_ready(client_timeout=timeout_s):
                return False
            return bool(await self._client.is_model_ready(self.model, model_version, client_timeout=timeout_s))
        except InferenceServerException:
            return False

    async def close(self) -> None:
        await self._client.close()
