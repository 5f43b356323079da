"""The data plane, the batcher and the interceptors in process, with a fake inference.

The real-stack tests (test_service.py and others) run Triton; these run the same Locator,
servicer and interceptors on real gRPC over loopback with an :class:`Inference` that answers
from the image's colour, so each failure mode can be produced on demand.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from swc_service.admission import AdmissionController
from swc_service.batcher import ShapeBatcher
from swc_service.bundle import CELLS, FEATURES, LABELS, MODEL, OFFSETS, ROW_IDS, BundleWriter, load_bundle
from swc_service.callers import with_shared
from swc_service.config import Settings
from swc_service.errors import InferenceFailed, InvalidArgument, Unavailable, classify
from swc_service.inference import Inference
from swc_service.interceptors import AuthInterceptor, StatusInterceptor
from swc_service.locator import Locator
from swc_service.metrics import AdmissionMetrics
from swc_service.reload import BundleReloader
from swc_service.server import SERVICE_NAME
from swc_service.servicer import LocatorServicer
from swc_service.triton_infer import TritonInference
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc

DIM = 8
CENTRES = np.array([[48.0, 2.0], [40.0, -74.0], [-33.9, 151.2], [35.7, 139.7]])
ROWS_PER_CELL = (4, 2, 0, 4)  # cell 2 has no background: answered by the cell centre
TOKEN = "s3cret"


class FakeInference:
    """Cell ``v % 4`` with probability 0.7 and embedding axis ``v % DIM`` for an image of grey
    value ``v``; or raises ``fail`` when set. Records the shape of every batch it gets."""

    def __init__(self, cells: int = len(CENTRES)):
        self.cells = cells
        self.fail: Exception | None = None
        self.batches: list[tuple[int, ...]] = []
        self.versions: list[str] = []  # the model version each batch asked for
        self.closed = False

    async def infer(
        self, batch: np.ndarray, timeout_s: float | None = None, *, model_version: str = ""
    ) -> tuple[np.ndarray, np.ndarray]:
        self.batches.append(batch.shape)
        self.versions.append(model_version)
        if self.fail is not None:
            raise self.fail
        values = batch.reshape(batch.shape[0], -1)[:, 0].astype(int)
        probs = np.full((len(values), self.cells), 0.3 / (self.cells - 1), dtype=np.float32)
        probs[np.arange(len(values)), values % self.cells] = 0.7
        emb = np.zeros((len(values), DIM), dtype=np.float32)
        emb[np.arange(len(values)), values % DIM] = 1.0
        return probs, emb

    async def ready(self, timeout_s: float = 1.0, *, model_version: str | None = "") -> bool:
        return self.fail is None

    async def close(self) -> None:
        self.closed = True


def grey(value: int, size: tuple[int, int] = (400, 300)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """Four cells, ten background rows, 8-d unit embeddings; the model file is a placeholder."""
    return write_tiny(tmp_path_factory.mktemp("bundles") / "tiny")


def write_tiny(out: Path, model: bytes = b"placeholder: the fake inference runs no model") -> Path:
    rng = np.random.default_rng(0)
    offsets = np.concatenate([[0], np.cumsum(ROWS_PER_CELL)]).astype(np.int64)
    cell_of_row = np.repeat(np.arange(len(CENTRES)), ROWS_PER_CELL)
    labels = CENTRES[cell_of_row] + rng.normal(0, 0.05, (len(cell_of_row), 2))
    features = np.eye(DIM, dtype=np.float32)[np.arange(len(cell_of_row)) % DIM]
    with BundleWriter(out) as writer:
        writer.path(MODEL).write_bytes(model)
        for rel, array in ((CELLS, CENTRES), (OFFSETS, offsets), (FEATURES, features), (LABELS, labels),
                           (ROW_IDS, np.arange(100, 100 + len(cell_of_row), dtype=np.int64))):  # fmt: skip
            writer.save(rel, array)
        writer.commit(source="test", tool="test_dataplane")
    return out


def make_locator(bundle: Path, inference: Inference, **settings) -> Locator:
    return Locator(Settings(bundle=str(bundle), batch_window_ms=1.0, **settings), load_bundle(bundle), inference)


def count(method: str, code: str) -> float:
    return REGISTRY.get_sample_value("visloc_requests_total", {"method": method, "code": code}) or 0.0


# --- the data plane -------------------------------------------------------------------------


def test_fake_and_triton_inference_satisfy_the_protocol():
    async def triton() -> TritonInference:  # the asyncio client is made inside a running loop
        inference = TritonInference("127.0.0.1:1", "visloc")
        await inference.close()
        return inference

    assert isinstance(FakeInference(), Inference)
    assert isinstance(asyncio.run(triton()), Inference)


def test_locate_runs_swc_in_the_top_cell_and_builds_the_reply(tiny_bundle):
    async def run():
        fake = FakeInference()
        locator = make_locator(tiny_bundle, fake)
        opts = pb.LocateOptions(top_k=3, return_neighbours=2, return_top_cells=2, conf_threshold=0.0)
        try:
            return await locator.locate(pb.LocateRequest(image=grey(4), request_id="r1", options=opts)), fake
        finally:
            await locator.close()

    r, fake = asyncio.run(run())
    assert fake.batches == [(1, 300, 400, 3)] and fake.closed
    assert r.request_id == "r1" and r.method == pb.METHOD_SWC and r.top_cell.id == 0
    assert r.top_cell.probability == pytest.approx(0.7) and r.localizable
    assert abs(r.lat - 48.0) < 1 and abs(r.lon - 2.0) < 1
    assert len(r.neighbours) == 2 and all(100 <= n.row_id < 104 for n in r.neighbours)
    assert [c.id for c in r.top_cells] == [0, 1]
    assert len(r.prediction_density) == len(Settings(bundle="-").pd_scales_km)
    assert (r.image_width, r.image_height, r.input_width, r.input_height) == (400, 300, 400, 300)
    assert r.model_version == load_bundle(tiny_bundle).model_version and r.batch_size == 1
    assert fake.versions == [load_bundle(tiny_bundle).triton_version]  # the exact version, never "latest"
    assert r.timings.total_ms >= r.timings.swc_ms >= 0


def test_a_cell_without_background_answers_with_its_centre(tiny_bundle):
    async def run():
        locator = make_locator(tiny_bundle, FakeInference(), preprocessing="center_crop_300")
        try:
            return await locator.locate(pb.LocateRequest(image=grey(2), request_id="c"))
        finally:
            await locator.close()

    r = asyncio.run(run())
    assert r.method == pb.METHOD_CELL and (r.lat, r.lon) == tuple(CENTRES[2]) and not r.neighbours
    assert (r.input_width, r.input_height) == (300, 300)


def test_model_and_bundle_that_disagree_fail_as_internal(tiny_bundle):
    async def run():
        locator = make_locator(tiny_bundle, FakeInference(cells=5))
        try:
            await locator.locate(pb.LocateRequest(image=grey(1), request_id="x"))
        finally:
            await locator.close()

    with pytest.raises(InferenceFailed, match="model and bundle disagree"):
        asyncio.run(run())


def test_classify_is_the_one_mapping():
    assert classify(InvalidArgument("top_k")) == (grpc.StatusCode.INVALID_ARGUMENT, "top_k")
    assert classify(Unavailable("down"))[0] == grpc.StatusCode.UNAVAILABLE
    assert classify(asyncio.CancelledError())[0] == grpc.StatusCode.CANCELLED
    assert classify(KeyError("secret detail"), "r9") == (grpc.StatusCode.INTERNAL, "internal error (request_id r9)")


# --- bundle reload (SIGHUP) ------------------------------------------------------------------


def repoint(link: Path, target: Path) -> None:
    tmp = link.with_name(link.name + ".new")
    tmp.symlink_to(target)
    os.replace(tmp, link)


def test_reload_swaps_the_state_and_keeps_it_when_the_new_bundle_is_bad(tiny_bundle, tmp_path):
    other = write_tiny(tmp_path / "other", model=b"another placeholder: another model version")
    link = tmp_path / "current"
    link.symlink_to(tiny_bundle)

    async def run():
        fake = FakeInference()
        locator = make_locator(link, fake)
        reloader = BundleReloader(locator, fake, str(link), allow_without_probes=True)  # placeholder models
        try:
            same = await reloader.reload()
            repoint(link, tmp_path / "absent")
            bad = await reloader.reload()
            kept = await locator.locate(pb.LocateRequest(image=grey(4)))
            repoint(link, other)
            good = await reloader.reload()
            swapped = await locator.locate(pb.LocateRequest(image=grey(4)))
            return same, bad, kept, good, swapped, fake
        finally:
            await locator.close()

    before = REGISTRY.get_sample_value("visloc_bundle_reload_total", {"result": "ok"}) or 0.0
    same, bad, kept, good, swapped, fake = asyncio.run(run())
    old, new = load_bundle(tiny_bundle), load_bundle(other)
    assert same.result == "unchanged" and same.ok
    assert bad.result == "bundle_error" and not bad.ok and "still serving bundle " + old.bundle_id in bad.message
    assert kept.model_version == old.model_version
    assert good.result == "ok" and good.bundle_id == new.bundle_id and swapped.model_version == new.model_version
    # Each call asks for its bundle's version: Locate on A, the reload's shape check of B (a bundle
    # without probes, allowed), Locate on B.
    assert fake.versions == [old.triton_version, new.triton_version, new.triton_version]
    assert REGISTRY.get_sample_value("visloc_bundle_reload_total", {"result": "ok"}) == before + 1
    info = {"bundle_id": new.bundle_id, "source": "test", "model_version": new.model_version, "num_cells": "4",
            "num_background": "10"}  # fmt: skip
    assert REGISTRY.get_sample_value("visloc_bundle_info", info) == 1


def test_reloads_run_one_at_a_time_and_signals_during_one_queue_one_more(tiny_bundle):
    async def run():
        fake = FakeInference()
        locator = make_locator(tiny_bundle, fake)
        reloader = BundleReloader(locator, fake, str(tiny_bundle), allow_without_probes=True)
        running, peak, runs = 0, 0, 0
        inner = reloader._reload

        async def counted():
            nonlocal running, peak, runs
            running, runs = running + 1, runs + 1
            peak = max(peak, running)
            await asyncio.sleep(0.05)
            try:
                return await inner()
            finally:
                running -= 1

        reloader._reload = counted
        for _ in range(3):  # three SIGHUPs in a row: one reload now, ONE more queued
            reloader.request()
        await reloader.wait()
        await locator.close()
        return peak, runs

    assert asyncio.run(run()) == (1, 2)


# --- the batcher ----------------------------------------------------------------------------


def test_batcher_groups_equal_shapes_and_separates_others():
    fake = FakeInference()

    async def run():
        batcher = ShapeBatcher(fake.infer, window_s=3600, max_batch=3)  # only max_batch/drain flush
        wide = [asyncio.ensure_future(batcher.submit(np.full((300, 400, 3), v, np.uint8))) for v in (0, 1, 2)]
        tall = asyncio.ensure_future(batcher.submit(np.full((400, 300, 3), 3, np.uint8)))
        outs = await asyncio.gather(*wide)
        assert not tall.done()
        await batcher.drain()
        return outs, await tall

    outs, tall = asyncio.run(run())
    assert fake.batches == [(3, 300, 400, 3), (1, 400, 300, 3)]
    assert [int(np.argmax(o.cell_probs)) for o in outs] == [0, 1, 2] and {o.batch_size for o in outs} == {3}
    assert int(np.argmax(tall.cell_probs)) == 3 and tall.batch_size == 1


def test_batcher_never_mixes_model_versions_in_one_batch():
    fake = FakeInference()

    async def run():
        batcher = ShapeBatcher(fake.infer, window_s=3600, max_batch=2)
        image = np.zeros((300, 400, 3), np.uint8)
        old = [asyncio.ensure_future(batcher.submit(image, None, "11")) for _ in range(2)]
        new = asyncio.ensure_future(batcher.submit(image, None, "22"))
        await asyncio.gather(*old)
        assert not new.done()  # same shape, other version: its own group
        await batcher.drain()
        return await new

    out = asyncio.run(run())
    assert fake.versions == ["11", "22"] and fake.batches == [(2, 300, 400, 3), (1, 300, 400, 3)]
    assert out.batch_size == 1


def test_batcher_gives_every_waiter_the_failure():
    fake = FakeInference()
    fake.fail = Unavailable("Triton is down")

    async def run():
        batcher = ShapeBatcher(fake.infer, window_s=3600, max_batch=2)
        image = np.zeros((300, 300, 3), np.uint8)
        return await asyncio.gather(batcher.submit(image), batcher.submit(image), return_exceptions=True)

    results = asyncio.run(run())
    assert len(fake.batches) == 1 and all(isinstance(r, Unavailable) for r in results)


# --- servicer and interceptors over real gRPC on loopback -----------------------------------


class AbortingServicer(LocatorServicer):
    async def GetInfo(self, request, context):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not now")


@asynccontextmanager
async def serving(bundle: Path, fake: Inference, token: str | None = None, servicer=LocatorServicer,
                  callers: dict[str, str] | None = None, locator: Locator | None = None):  # fmt: skip
    """Locator + servicer + interceptors on loopback; ``callers`` ({token: name}) or ``token``
    turn auth on (the same wiring as swc_service.server)."""
    locator = locator or make_locator(bundle, fake)
    if token:
        callers = with_shared(callers or {}, token)
    interceptors = [StatusInterceptor(SERVICE_NAME), AuthInterceptor(SERVICE_NAME, callers)]
    server = grpc.aio.server(interceptors=interceptors)
    pb_grpc.add_LocatorServicer_to_server(servicer(locator), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.LocatorStub(channel)
    finally:
        await server.stop(None)
        await locator.close()


async def status_of(call) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_unary_statuses_come_from_classify(tiny_bundle, caplog):
    fake = FakeInference()

    async def run():
        async with serving(tiny_bundle, fake) as stub:
            ok = await stub.Locate(pb.LocateRequest(image=grey(1)))
            bad = await status_of(stub.Locate(pb.LocateRequest(image=b"not an image")))
            options = await status_of(stub.Locate(pb.LocateRequest(image=grey(1), options=pb.LocateOptions(top_k=0))))
            fake.fail = Unavailable("Triton at x is unavailable")
            down = await status_of(stub.Locate(pb.LocateRequest(image=grey(1))))
            fake.fail = KeyError("a detail callers must not see")
            bug = await status_of(stub.Locate(pb.LocateRequest(image=grey(1), request_id="bug-1")))
            return ok, bad, options, down, bug

    before = count("Locate", "INTERNAL")
    with caplog.at_level(logging.INFO, logger="swc_service.access"):
        ok, bad, options, down, bug = asyncio.run(run())
    assert len(ok.request_id) == 32 and ok.top_cell.id == 1  # a fresh id for a request without one
    assert bad[0] == grpc.StatusCode.INVALID_ARGUMENT and "not an image" in bad[1]
    assert options[0] == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in options[1]
    assert down == (grpc.StatusCode.UNAVAILABLE, "Triton at x is unavailable")
    assert bug == (grpc.StatusCode.INTERNAL, "internal error (request_id bug-1)")
    assert count("Locate", "INTERNAL") == before + 1
    assert any(f'"request_id": "{ok.request_id}"' in r.getMessage() for r in caplog.records)


def test_stream_items_fail_alone_and_all_carry_request_ids(tiny_bundle):
    async def run():
        async with serving(tiny_bundle, FakeInference()) as stub:
            requests = [pb.LocateRequest(image=grey(0), request_id="a"), pb.LocateRequest(image=b"junk"),
                        pb.LocateRequest(image=grey(3))]  # fmt: skip
            return [item async for item in stub.LocateStream(iter(requests))]

    items = sorted(asyncio.run(run()), key=lambda item: item.index)
    assert [item.WhichOneof("outcome") for item in items] == ["result", "error", "result"]
    assert items[0].request_id == "a" and len(items[1].request_id) == 32 and len(items[2].request_id) == 32
    assert items[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_authentication_is_checked_before_the_data_plane(tiny_bundle):
    fake = FakeInference()

    async def run():
        async with serving(tiny_bundle, fake, token=TOKEN) as stub:
            refused = await status_of(stub.Locate(pb.LocateRequest(image=grey(1))))
            stream = stub.LocateStream(iter([pb.LocateRequest(image=grey(1))]))
            refused_stream = await status_of(stream.read())
            auth = (("authorization", f"Bearer {TOKEN}"),)
            ok = await stub.Locate(pb.LocateRequest(image=grey(1)), metadata=auth)
            return refused, refused_stream, ok

    before = count("Locate", "UNAUTHENTICATED")
    refused, refused_stream, ok = asyncio.run(run())
    assert refused[0] == refused_stream[0] == grpc.StatusCode.UNAUTHENTICATED
    assert count("Locate", "UNAUTHENTICATED") == before + 1
    assert ok.top_cell.id == 1 and fake.batches == [(1, 300, 400, 3)]  # refused calls never reached it


def test_an_abort_is_counted_with_its_own_status(tiny_bundle):
    async def run():
        async with serving(tiny_bundle, FakeInference(), servicer=AbortingServicer) as stub:
            return await status_of(stub.GetInfo(pb.GetInfoRequest()))

    before = count("GetInfo", "FAILED_PRECONDITION"), count("GetInfo", "CANCELLED")
    assert asyncio.run(run()) == (grpc.StatusCode.FAILED_PRECONDITION, "not now")
    assert (count("GetInfo", "FAILED_PRECONDITION"), count("GetInfo", "CANCELLED")) == (before[0] + 1, before[1])


# --- admission control and named callers (issue 17) ------------------------------------------


class GatedInference(FakeInference):
    """The fake inference, held at ``gate`` until the test opens it (overload on demand)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.entered = 0
        self.values: list[int] = []  # grey value of each image inferred, in order

    async def infer(self, batch: np.ndarray, timeout_s: float | None = None, **kw) -> tuple[np.ndarray, np.ndarray]:
        self.entered += 1
        await self.gate.wait()
        self.values.append(int(batch[0, 0, 0, 0]))
        return await super().infer(batch, timeout_s, **kw)


def gated_locator(bundle: Path, fake: Inference, **settings) -> Locator:
    """One call in flight at a time (fixed limit 1, no batching), admission metrics on."""
    cfg = Settings(bundle=str(bundle), batch_window_ms=1.0, max_batch=1, admission_initial_limit=1,
                   admission_adaptive=False, **settings)  # fmt: skip
    return Locator(
        cfg,
        load_bundle(bundle),
        fake,
        admission=AdmissionController(cfg.admission_config(), observer=AdmissionMetrics()),
    )


async def until(condition, what: str) -> None:
    """Wait (bounded) until ``condition()`` holds: the calls reached the state the test needs."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never reached: {what}")


def shed(reason: str, caller: str = "anonymous") -> float:
    return REGISTRY.get_sample_value("visloc_admission_shed_total", {"reason": reason, "caller": caller}) or 0.0


async def measured_then_held(stub, fake: GatedInference) -> asyncio.Future:
    """One call served in >= 0.3 s (the measured service time), then one holding the only slot
    (in the model until the gate opens); returns the holding call."""
    first = asyncio.ensure_future(stub.Locate(pb.LocateRequest(image=grey(1))))
    await until(lambda: fake.entered == 1, "the first call in the model")
    await asyncio.sleep(0.3)
    fake.gate.set()
    await first
    fake.gate.clear()
    held = asyncio.ensure_future(stub.Locate(pb.LocateRequest(image=grey(1))))
    await until(lambda: fake.entered == 2, "a call holding the only slot")
    return held


def test_an_unmeetable_deadline_is_refused_before_the_image_is_decoded(tiny_bundle):
    fake = GatedInference()

    async def run():
        locator = gated_locator(tiny_bundle, fake)
        async with serving(tiny_bundle, fake, locator=locator) as stub:
            held = await measured_then_held(stub, fake)
            # Junk bytes: an INVALID_ARGUMENT would mean it was decoded; refused first instead.
            unary = await status_of(stub.Locate(pb.LocateRequest(image=b"junk"), timeout=0.2))
            stream = [item async for item in stub.LocateStream(iter([pb.LocateRequest(image=grey(3))]), timeout=0.2)]
            entered = fake.entered
            fake.gate.set()
            await held
            return unary, stream, entered, locator.admission.stats()

    before = shed("deadline_unmeetable")
    unary, stream, entered, stats = asyncio.run(run())
    assert unary[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "deadline_unmeetable" in unary[1]
    assert [item.error.code for item in stream] == [grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
    assert entered == 2 and len(fake.batches) == 2  # the refused calls never reached the model
    assert stats.shed == {"deadline_unmeetable": 2} and shed("deadline_unmeetable") == before + 2


def test_a_call_that_expires_in_the_queue_never_reaches_the_model(tiny_bundle):
    """No service time measured yet: the queued call waits until its deadline, then is dropped."""
    fake = GatedInference()

    async def run():
        locator = gated_locator(tiny_bundle, fake)
        async with serving(tiny_bundle, fake, locator=locator) as stub:
            held = asyncio.ensure_future(stub.Locate(pb.LocateRequest(image=grey(1))))
            await until(lambda: fake.entered == 1, "a call holding the only slot")
            late = asyncio.ensure_future(status_of(stub.Locate(pb.LocateRequest(image=grey(2)), timeout=0.5)))
            await until(lambda: locator.admission.stats().queued == 1, "the second call queued")
            expired = await late
            await until(lambda: locator.admission.stats().queued == 0, "the expired call out of the queue")
            fake.gate.set()
            ok = await held
            return expired, ok, locator.admission.stats()

    expired, ok, stats = asyncio.run(run())
    assert expired[0] == grpc.StatusCode.DEADLINE_EXCEEDED and ok.top_cell.id == 1
    assert fake.values == [1] and fake.entered == 1  # only the first call was inferred
    assert stats.in_flight == 0 and stats.admitted == 1


def test_a_queued_call_is_refused_once_its_deadline_cannot_be_met(tiny_bundle):
    """With a measured service time the queue gives a call up (RESOURCE_EXHAUSTED, the caller may
    retry elsewhere) as soon as it could no longer finish in time, before its deadline."""
    fake = GatedInference()

    async def run():
        locator = gated_locator(tiny_bundle, fake)
        async with serving(tiny_bundle, fake, locator=locator) as stub:
            held = await measured_then_held(stub, fake)
            late = asyncio.ensure_future(status_of(stub.Locate(pb.LocateRequest(image=grey(2)), timeout=3.0)))
            await until(lambda: locator.admission.stats().queued == 1, "the third call queued")
            refused = await late
            fake.gate.set()
            await held
            return refused, locator.admission.stats()

    before = shed("deadline_unmeetable")
    refused, stats = asyncio.run(run())
    assert refused[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "deadline_unmeetable" in refused[1]
    assert fake.values == [1, 1]  # the refused call never reached the model
    assert stats.shed == {"deadline_unmeetable": 1} and shed("deadline_unmeetable") == before + 1


def test_one_callers_flood_does_not_starve_another(tiny_bundle, tmp_path, caplog):
    """Callers from a callers file: A floods (1 in the model, 3 queued, the rest refused by its
    per-caller cap); B's one call is served next, before A's queue."""
    fake = GatedInference()
    callers_file = tmp_path / "callers"
    callers_file.write_text("# two teams\nteam-a:aaaaaaaaaaaaaaaaaaaa\nteam-b:bbbbbbbbbbbbbbbbbbbb\n")
    settings = Settings(bundle=str(tiny_bundle), callers_file=str(callers_file), auth_token=TOKEN)
    a, b = ((("authorization", f"Bearer {t * 20}"),) for t in "ab")

    async def run():
        locator = gated_locator(tiny_bundle, fake, admission_caller_max_queued=3)
        async with serving(tiny_bundle, fake, callers=settings.callers(), locator=locator) as stub:
            flood = [asyncio.ensure_future(status_of(stub.Locate(pb.LocateRequest(image=grey(1)), metadata=a)))]
            await until(lambda: fake.entered == 1, "A's first call in the model")
            flood += [asyncio.ensure_future(status_of(stub.Locate(pb.LocateRequest(image=grey(1)), metadata=a)))
                      for _ in range(5)]  # fmt: skip
            await until(lambda: locator.admission.stats().shed.get("caller_limit") == 2, "A's excess refused")
            mine = asyncio.ensure_future(stub.Locate(pb.LocateRequest(image=grey(2)), metadata=b))
            await until(lambda: locator.admission.stats().callers.get("team-b") == (0, 1), "B's call queued")
            shared = asyncio.ensure_future(
                stub.GetInfo(pb.GetInfoRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),))
            )
            fake.gate.set()
            return [await f for f in flood], await mine, await shared

    before = shed("caller_limit", "team-a")
    with caplog.at_level(logging.INFO, logger="swc_service.access"):
        flood, mine, shared = asyncio.run(run())
    codes = Counter(code for code, _ in flood)
    assert codes == {grpc.StatusCode.OK: 4, grpc.StatusCode.RESOURCE_EXHAUSTED: 2}
    assert mine.top_cell.id == 2 and shared.bundle_id
    assert fake.values == [1, 2, 1, 1, 1]  # B's call right after the one A had in the model
    assert shed("caller_limit", "team-a") == before + 2 and shed("caller_limit", "team-b") == 0
    callers = [json.loads(r.getMessage()).get("caller") for r in caplog.records if r.name == "swc_service.access"]
    assert Counter(callers) == {"team-a": 6, "team-b": 1, "default": 1}
