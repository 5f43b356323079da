"""The Triton endpoint pool in process: targets, selection, retry, membership and the model check,
with fake endpoints (no network, no clock): every step is driven by ``refresh()``."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import REGISTRY

from swc_service import bundle as B
from swc_service.errors import DeadlineExceeded, InferenceFailed, Unavailable
from swc_service.prediction import ServingState
from swc_service.triton_pool import TritonPool, parse_target, read_endpoint_file, resolve

M, D = 6, 4


def fake_model(seed: int, batch: np.ndarray, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic 'model': outputs are a function of (seed, image content); float64 is its reference."""
    probs, emb = [], []
    for image in batch:
        rng = np.random.default_rng([seed, int(image.astype(np.int64).sum())])
        probs.append(rng.dirichlet(np.ones(M)).astype(dtype))
        emb.append(rng.standard_normal(D).astype(dtype))
    return np.stack(probs), np.stack(emb)


# Its float32 outputs are its float64 ones rounded: a float32 envelope of rounding's size.
ENVELOPE = {a: {"cell_probs": 1e-7, "pd": 1e-7, "embedding": 1e-6} for a in ("fp32", "tf32", "onnx", "fp16")}


def make_bundle(out, seed: int, probes: bool = True) -> B.Bundle:
    rng = np.random.default_rng(99)
    with B.BundleWriter(out) as w:
        w.path(B.MODEL).write_bytes(f"model of seed {seed}".encode())
        if probes:
            images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((5, 7, 3), (5, 7, 3), (6, 4, 3))]
            got = [fake_model(seed, image[None]) for image in images]
            ref = [fake_model(seed, image[None], np.float64) for image in images]
            reference = B.ProbeReference(np.concatenate([p for p, _ in ref]), np.concatenate([e for _, e in ref]),
                                         ENVELOPE, {"t": 1})  # fmt: skip
            w.add_probes(images, np.concatenate([p for p, _ in got]), np.concatenate([e for _, e in got]), {"t": 1},
                         reference)  # fmt: skip
        w.save(B.CELLS, np.column_stack([np.linspace(-50, 50, M), np.linspace(-100, 100, M)]))
        w.save(B.OFFSETS, np.array([0, 1, 2, 3, 4, 5, 6], dtype=np.int64))
        w.save(B.FEATURES, np.ones((M, D), dtype=np.float16))
        w.save(B.LABELS, np.zeros((M, 2)))
        w.save(B.ROW_IDS, np.arange(M, dtype=np.int64))
        return w.commit(source="demo", tool="test_triton_pool")


class FakeEndpoint:
    """An Inference running ``fake_model(seed)``; ``healthy``, ``fail`` and ``gate`` are set by tests."""

    def __init__(self, address: str, seed: int = 0):
        self.address, self.seed = address, seed
        self.healthy = True
        self.fail: list[Exception] = []  # raised by the next calls, in order
        self.gate: asyncio.Event | None = None  # batches wait on it when set
        self.calls: list[tuple[int, ...]] = []
        self.kwargs: list[dict] = []
        self.closed = False

    async def infer(self, batch, timeout_s=None, **kw):
        self.calls.append(batch.shape)
        self.kwargs.append(kw)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise self.fail.pop(0)
        return fake_model(self.seed, batch)

    async def ready(self, timeout_s: float = 1.0, *, model_version: str | None = "") -> bool:
        return self.healthy

    async def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    return make_bundle(root / "a", 0), make_bundle(root / "b", 1), make_bundle(root / "old", 0, probes=False)


def pool_of(target: str, state: ServingState, seeds: dict[str, int] | None = None, **kw):
    fakes: dict[str, FakeEndpoint] = {}

    def connect(address: str) -> FakeEndpoint:
        fakes[address] = FakeEndpoint(address, (seeds or {}).get(address, 0))
        return fakes[address]

    return TritonPool(target, "visloc", lambda: state, connect=connect, **kw), fakes


async def settle(pool: TritonPool) -> None:
    await pool.refresh()
    await pool.wait_checks()


IMAGE = np.zeros((1, 3, 3, 3), np.uint8)


def image_calls(fake: FakeEndpoint) -> int:
    """Calls other than the model check's probes (those are 5x7 and 6x4)."""
    return sum(1 for shape in fake.calls if shape[1:3] == (3, 3))


def checks(result: str, endpoint: str) -> float:
    return REGISTRY.get_sample_value("visloc_model_check_total", {"result": result, "endpoint": endpoint}) or 0.0


# --- targets --------------------------------------------------------------------------------


def test_targets_parse_and_bad_ones_say_why(tmp_path):
    assert parse_target("triton:8001").addresses == ("triton:8001",)
    assert parse_target(" a:1, b:2 ,[::1]:3").addresses == ("a:1", "b:2", "[::1]:3")
    t = parse_target("dns:///triton-headless.ns.svc.cluster.local:8001")
    assert (t.kind, t.name, t.port, t.dynamic) == ("dns", "triton-headless.ns.svc.cluster.local", 8001, True)
    assert parse_target("file:///etc/visloc/endpoints").name == "/etc/visloc/endpoints"
    for bad, why in (("triton", "HOST:PORT"), ("a:1,b:x", "HOST:PORT"), ("dns://8.8.8.8/t:1", "no DNS authority"),
                     ("file://rel/path", "absolute"), ("a:70000", "HOST:PORT"), (" , ", "empty")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            parse_target(bad)
    f = tmp_path / "endpoints"
    f.write_text("# sidecar output\n127.0.0.1:1\n\n127.0.0.1:2  # second\n")
    assert read_endpoint_file(str(f)) == ["127.0.0.1:1", "127.0.0.1:2"]
    f.write_text("127.0.0.1:1\nnot-an-endpoint\n")
    with pytest.raises(ValueError, match="endpoints:2"):
        read_endpoint_file(str(f))


def test_dns_target_resolves_every_address_with_the_port():
    got = asyncio.run(resolve(parse_target("dns:///localhost:8123")))
    assert "127.0.0.1:8123" in got and all(a.endswith(":8123") for a in got)


# --- selection and retry --------------------------------------------------------------------


def test_batches_go_to_the_least_outstanding_endpoint_and_ties_round_robin(bundles):
    state = ServingState.of(bundles[0])

    async def run():
        pool, fakes = pool_of("e1:1,e2:2,e3:3", state)
        await settle(pool)
        assert await pool.ready() and pool.confirmed().result == "ok"
        for _ in range(6):
            await pool.infer(IMAGE, 5.0)
        sequential = {a: image_calls(f) for a, f in fakes.items()}
        gate = asyncio.Event()
        fakes["e1:1"].gate = gate  # e1 holds its batches: the next ones go elsewhere
        held = asyncio.ensure_future(pool.infer(IMAGE, 5.0))
        await asyncio.sleep(0)
        more = [asyncio.ensure_future(pool.infer(IMAGE, 5.0)) for _ in range(4)]
        await asyncio.gather(*more)
        outstanding = {a: ep.outstanding for a, ep in pool.endpoints.items()}
        during = {a: image_calls(f) for a, f in fakes.items()}
        gate.set()
        await held
        await pool.close()
        return sequential, outstanding, during, fakes

    sequential, outstanding, during, fakes = asyncio.run(run())
    assert sequential == {"e1:1": 2, "e2:2": 2, "e3:3": 2}
    assert outstanding == {"e1:1": 1, "e2:2": 0, "e3:3": 0}
    assert during == {"e1:1": 3, "e2:2": 4, "e3:3": 4}  # nothing queued behind the held batch
    assert sum(image_calls(f) for f in fakes.values()) == 11 and all(f.closed for f in fakes.values())


def test_an_unavailable_or_exiting_endpoint_is_skipped_and_the_batch_sent_once_more(bundles):
    state = ServingState.of(bundles[0])

    async def run():
        pool, fakes = pool_of("e1:1,e2:2", state)
        await settle(pool)
        e1, e2 = fakes["e1:1"], fakes["e2:2"]
        e1.fail = [Unavailable("Triton at e1:1 is unavailable")]
        results = [await pool.infer(IMAGE, 5.0)]  # e1 first (never picked yet), then once more on e2
        after_unavailable = pool.endpoints["e1:1"].ready
        with pytest.raises(Unavailable, match=r"no Triton endpoint .*e1:1: not ready; e2:2: failed this call"):
            e2.fail = [Unavailable("e2 down")]
            await pool.infer(IMAGE, 5.0)  # e2 fails, and e1 is not used until its health check passes
        await settle(pool)  # health passes again: the model is checked again, then traffic returns
        e1.fail = [InferenceFailed("Triton error StatusCode.INTERNAL: Server exiting")]
        results.append(await pool.infer(IMAGE, 5.0))  # e1 is the least recently picked
        after_exiting = pool.endpoints["e1:1"].ready
        await settle(pool)
        probes_before = len(e1.calls)
        e1.fail = [InferenceFailed("Triton error StatusCode.INVALID_ARGUMENT: bad input")]
        with pytest.raises(InferenceFailed, match="bad input"):  # not retried: another endpoint would fail too
            for _ in range(2):
                await pool.infer(IMAGE, 5.0)
        e1.fail, e2.fail = [Unavailable("e1 down")], [Unavailable("e2 down")]
        with pytest.raises(Unavailable, match="e2 down|e1 down"):  # once more, not forever
            await pool.infer(IMAGE, 5.0)
        await settle(pool)
        e1.fail, e2.fail = [Unavailable("e1 down")], []
        with pytest.raises(Unavailable, match="e1 down"):  # no time left in the call: no second try
            for _ in range(2):
                await pool.infer(IMAGE, 0.0)
        await pool.close()
        return results, (after_unavailable, after_exiting), probes_before, e1, e2

    results, after_failures, probes_before, e1, e2 = asyncio.run(run())
    assert len(results) == 2 and after_failures == (False, False)
    assert probes_before > 4  # the probes went through e1 twice: on joining and after its failure
    assert REGISTRY.get_sample_value("visloc_triton_endpoint_failures_total", {"endpoint": "e1:1"}) >= 3


# --- the model check ------------------------------------------------------------------------


def test_an_endpoint_serving_another_model_gets_no_traffic_and_the_refusal_names_both(bundles):
    a, b, _ = bundles
    state = ServingState.of(a)
    before = checks("mismatch", "e2:2")

    async def run():
        pool, fakes = pool_of("e1:1,e2:2", state, seeds={"e2:2": 1})
        await settle(pool)
        for _ in range(4):
            await pool.infer(IMAGE, 5.0)
        one = (image_calls(fakes["e1:1"]), image_calls(fakes["e2:2"]), [ep.address for ep in pool.refused()])
        fakes["e1:1"].healthy = False
        await settle(pool)
        with pytest.raises(Unavailable) as err:
            await pool.infer(IMAGE, 5.0)
        status = (await pool.ready(), pool.model_status())
        await pool.close()
        return one, str(err.value), status

    (n1, n2, refused), message, (ready, (confirmed, warning)) = asyncio.run(run())
    assert (n1, n2, refused) == (4, 0, ["e2:2"])
    assert a.model_version in message and "Triton model 'visloc' version (default) at e2:2" in message
    assert "model check FAILED" in message and "worst ratio" in message  # the measured deviation
    assert "e1:1: not ready" in message
    assert not ready and not confirmed and a.model_version in warning
    assert checks("mismatch", "e2:2") == before + 1  # checked once, not at every refresh


def test_a_backend_restarted_with_another_model_is_checked_again_and_refused(bundles):
    state = ServingState.of(bundles[0])

    async def run():
        pool, fakes = pool_of("e1:1", state)
        await settle(pool)
        ok = (await pool.ready(), pool.confirmed().result)
        fakes["e1:1"].healthy = False
        await settle(pool)
        down = await pool.ready()
        fakes["e1:1"].healthy, fakes["e1:1"].seed = True, 1  # back, with another model under the same name
        await settle(pool)
        await settle(pool)
        after = (await pool.ready(), pool.refused()[0].verdict(state).result)
        await pool.close()
        return ok, down, after

    assert asyncio.run(run()) == ((True, "ok"), False, (False, "mismatch"))


def test_fp16_backend_and_bundles_without_probes(bundles):
    a, _, old = bundles

    async def run(bundle, **kw):
        pool, fakes = pool_of("e1:1", ServingState.of(bundle), **kw)
        await settle(pool)
        out = (await pool.ready(), pool.model_status(), pool.endpoints["e1:1"].verdict(pool.state))
        await pool.close()
        return out

    ready, _, verdict = asyncio.run(run(a, precision="fp16"))
    assert ready and verdict.result == "ok" and verdict.precision == "fp16" and "worst ratio" in verdict.message
    ready, (confirmed, warning), verdict = asyncio.run(run(old))
    assert not ready and not confirmed and verdict.result == "no_probes" and "add-probes" in verdict.message
    ready, (confirmed, warning), verdict = asyncio.run(run(old, allow_without_probes=True))
    assert ready and confirmed and warning.startswith("WARNING") and verdict.result == "no_probes"


def test_verify_checks_a_candidate_without_switching_and_the_switch_needs_no_new_check(bundles):
    a, b, _ = bundles
    sa, sb = ServingState.of(a), ServingState.of(b)

    async def run():
        pool, fakes = pool_of("e1:1,e2:2", sa, seeds={"e2:2": 1})
        await settle(pool)
        verdicts = await pool.verify(sb)  # e1 runs a's model, e2 b's: e2 passes for b
        served_a = [ep.address for ep in pool.endpoints.values() if ep.usable(sa)]
        calls = {k: len(f.calls) for k, f in fakes.items()}
        pool.set_state(sb)
        await pool.refresh()  # no check needed on e2, e1's verdict for b is already known
        switched = [ep.address for ep in pool.endpoints.values() if ep.usable(sb)]
        rechecked = {k: len(f.calls) - calls[k] for k, f in fakes.items()}
        await pool.close()
        return verdicts, served_a, switched, rechecked

    verdicts, served_a, switched, rechecked = asyncio.run(run())
    assert [v.result for v in verdicts] == ["mismatch", "ok"] and all(v.bundle_model_version == b.model_version
                                                                      for v in verdicts)  # fmt: skip
    assert served_a == ["e1:1"] and switched == ["e2:2"] and rechecked == {"e1:1": 0, "e2:2": 0}


# --- membership -----------------------------------------------------------------------------


def test_file_target_endpoints_join_and_leave_after_their_batches(bundles, tmp_path):
    state = ServingState.of(bundles[0])
    f = tmp_path / "endpoints"
    f.write_text("e1:1\n")

    async def run():
        pool, fakes = pool_of(f"file://{f}", state, resolve_interval_s=0.0)
        await settle(pool)
        first = sorted(pool.endpoints)
        f.write_text("e1:1\ne2:2\n")
        await settle(pool)
        both = sorted(ep.address for ep in pool.endpoints.values() if ep.usable(state))
        fakes["e1:1"].gate = gate = asyncio.Event()
        fakes["e2:2"].gate = gate
        flying = [asyncio.ensure_future(pool.infer(IMAGE, 5.0)) for _ in range(2)]
        await asyncio.sleep(0)
        f.write_text("e2:2\n")
        await pool.refresh()
        leaving = (pool.endpoints["e1:1"].leaving, fakes["e1:1"].closed)
        gate.set()
        await asyncio.gather(*flying)
        gone = ("e1:1" not in pool.endpoints, fakes["e1:1"].closed)
        f.unlink()  # an unreadable target keeps the endpoints it had
        await settle(pool)
        kept = sorted(pool.endpoints)
        await pool.close()
        return first, both, leaving, gone, kept

    first, both, leaving, gone, kept = asyncio.run(run())
    assert first == ["e1:1"] and both == ["e1:1", "e2:2"]
    assert leaving == (True, False) and gone == (True, True) and kept == ["e2:2"]


def test_model_version_is_passed_to_the_endpoint(bundles):
    state = ServingState.of(bundles[0])

    async def run():
        pool, fakes = pool_of("e1:1", state, backend_model_version=lambda s: "7")
        await settle(pool)
        await pool.infer(IMAGE, 5.0, model_version="7")
        await pool.close()
        return fakes["e1:1"].kwargs

    kwargs = asyncio.run(run())
    assert kwargs and all(kw == {"model_version": "7"} for kw in kwargs)  # the probes asked for "7" too


def test_deadline_exceeded_is_not_retried(bundles):
    state = ServingState.of(bundles[0])

    async def run():
        pool, fakes = pool_of("e1:1,e2:2", state)
        await settle(pool)
        for fake in fakes.values():
            fake.fail = [DeadlineExceeded("Triton did not answer")]
        with pytest.raises(DeadlineExceeded):
            await pool.infer(IMAGE, 5.0)
        n = sum(image_calls(f) for f in fakes.values())
        await pool.close()
        return n

    assert asyncio.run(run()) == 1
