"""Embeddings of preprocessed batches: in-process onnxruntime, or a running Triton.

Both return a ``concurrent.futures.Future`` per batch so the indexer keeps the model busy
while it decodes the next photos: onnxruntime runs in one worker thread (it releases the GIL
and uses its own intra-op threads); Triton calls go through the service's own asyncio client
on a private event loop, several in flight at once, so a GPU fleet stays fed.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from swc_service.bundle import INPUT_NAME, OUTPUT_EMBEDDING, Bundle
from swc_service.errors import LocateFailure


class EmbedError(RuntimeError):
    """The model could not embed a batch (Triton down, wrong model); the run stops resumably."""


class OnnxEmbedder:
    """The bundle's ``model.onnx`` in this process."""

    name = "onnxruntime"

    def __init__(self, model_path: str | os.PathLike[str], threads: int = 0):
        from .parity import onnx_session

        self.session = onnx_session(model_path, threads)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="onnx")
        self.run(np.zeros((1, 300, 300, 3), np.uint8))  # first-run allocations, before the clock starts

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_EMBEDDING], {INPUT_NAME: batch})[0]

    def submit(self, batch: np.ndarray) -> Future:
        return self._pool.submit(self.run, batch)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class TritonEmbedder:
    """A Triton serving the bundle's model, through ``swc_service.triton_infer``."""

    def __init__(self, url: str, model: str, timeout_s: float = 120.0):
        from swc_service.triton_infer import TritonInference

        self.name = f"triton {url} model {model}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="triton-loop", daemon=True)
        self._thread.start()

        async def make() -> TritonInference:
            return TritonInference(url, model, timeout_s)

        self._client = asyncio.run_coroutine_threadsafe(make(), self._loop).result()

    async def _one(self, batch: np.ndarray) -> np.ndarray:
        try:
            return (await self._client.infer(batch))[1]
        except LocateFailure as exc:
            raise EmbedError(str(exc)) from exc

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.submit(batch).result()

    def submit(self, batch: np.ndarray) -> Future:
        return asyncio.run_coroutine_threadsafe(self._one(batch), self._loop)

    def check(self, bundle: Bundle) -> None:
        """Refuse a Triton whose model is not the bundle's: the bundle's probes through it, held to
        the service's own model check (the background must come from the model that serves it)."""
        from swc_service.model_check import check_model

        verdict = asyncio.run_coroutine_threadsafe(check_model(self._client.infer, bundle), self._loop).result()
        if not verdict.ok:
            raise EmbedError(f"{self.name}: {verdict.message}")

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
