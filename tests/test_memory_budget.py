"""The memory budget: what a call will hold is reserved before it is decoded or queued, and a
call that would go over the worker's budget is refused at once (RESOURCE_EXHAUSTED, reason
memory_budget), holding nothing; the model input sent by the caller costs a fraction of a file.
The burst of 12 MP photos against the live stack is bench/burst.py (`make bench`)."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time

import grpc
import pytest
from PIL import Image
from test_dataplane import GatedInference, gated_locator, shed, until, write_tiny

from swc_service import memory
from swc_service.config import Settings
from swc_service.errors import DeadlineExceeded, Overloaded, classify
from swc_service.interceptors import MemoryDoor, StatusInterceptor
from swc_service.server import SERVICE_NAME
from swc_service.servicer import LocatorServicer
from visloc_client.preprocessing import preprocess, to_pixels
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc

MB = 1 << 20


def photo(width: int, height: int, fmt: str = "PNG", value: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (value, value, value)).save(buf, format=fmt)
    return buf.getvalue()


def test_a_file_costs_its_message_three_times_and_its_pixels_twice():
    data = photo(1200, 800)
    assert memory.file_cost(data) == memory.MESSAGE_COPIES * len(data) + 2 * 3 * 1200 * 800
    jpeg = photo(4000, 3000, "JPEG")
    drafted = memory.file_cost(jpeg, draft=True)  # 4000x3000 -> 1000x750 at a quarter, >= 2 x 400x300
    assert drafted == memory.MESSAGE_COPIES * len(jpeg) + 2 * 3 * 1000 * 750 < memory.file_cost(jpeg)
    small = photo(640, 480, "JPEG")  # too small to reduce: decoded in full, fast or not
    assert (
        memory.file_cost(small, draft=True)
        == memory.file_cost(small)
        == memory.MESSAGE_COPIES * len(small) + 2 * 3 * 640 * 480
    )
    assert memory.file_cost(b"not an image") == memory.MESSAGE_COPIES * len(b"not an image")  # the decode says why
    assert memory.pixels_cost(b"x" * 360_000) == memory.MESSAGE_COPIES * 360_000


def test_hold_reserves_refuses_beyond_and_gives_back():
    budget = memory.MemoryBudget(10 * MB)
    with budget.hold(6 * MB, "a"):
        before = shed(memory.MEMORY_BUDGET, "a")
        with pytest.raises(Overloaded) as err, budget.hold(5 * MB, "a"):
            pass
        assert err.value.reason == memory.MEMORY_BUDGET and classify(err.value)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "6 MB of the worker's 10 MB" in str(err.value) and budget.held == 6 * MB
        assert shed(memory.MEMORY_BUDGET, "a") == before + 1
        with budget.hold(4 * MB, "a"):
            assert budget.held == 10 * MB
    assert budget.held == 0
    with budget.hold(30 * MB, "a"), pytest.raises(Overloaded), budget.hold(1, "a"):  # larger than the whole
        pass  # budget: alone, it goes ahead
    assert memory.MemoryBudget(0).limit == 0  # no budget
    with pytest.raises(ValueError, match=">= 0"):
        memory.MemoryBudget(-1)
    with pytest.raises(ValueError, match="memory_budget_mb"):
        Settings(bundle="b", memory_budget_mb=-1).validate()


def test_over_budget_calls_are_refused_before_decode_and_pixels_still_fit(tmp_path):
    bundle = write_tiny(tmp_path / "tiny")
    big = photo(600, 400, value=1)  # ~1.44 MB of pixels: two fit in 4 MiB, three do not
    made = preprocess(photo(400, 300, value=2))
    pixels = pb.Pixels(data=to_pixels(made), height=300, width=400, source_width=400, source_height=300,
                       preprocessing="exact")  # fmt: skip

    async def scenario() -> None:
        fake = GatedInference()
        loc = gated_locator(bundle, fake, memory_budget_mb=4)
        first = asyncio.ensure_future(loc.locate(pb.LocateRequest(image=big)))
        await until(lambda: fake.entered == 1, "the first call in the model")
        second = asyncio.ensure_future(loc.locate(pb.LocateRequest(image=big)))  # queued for the slot
        await until(lambda: loc.memory.held == 2 * memory.file_cost(big), "two files held")
        held = loc.memory.held
        with pytest.raises(Overloaded) as err:
            await loc.locate(pb.LocateRequest(image=big))
        assert err.value.reason == memory.MEMORY_BUDGET and loc.memory.held == held and fake.entered == 1
        third = asyncio.ensure_future(loc.locate(pb.LocateRequest(pixels=pixels)))  # the model input: small
        await until(lambda: loc.memory.held == held + memory.pixels_cost(pixels.data), "the pixels held")
        fake.gate.set()
        answers = await asyncio.gather(first, second, third)
        assert [a.input_width for a in answers] == [450, 450, 400]
        assert loc.memory.held == 0
        assert (await loc.locate(pb.LocateRequest(image=big))).input_width == 450  # room again
        await loc.close()

    asyncio.run(scenario())


def test_the_door_waits_for_readers_and_refuses_when_calls_already_read_fill_the_budget():
    async def scenario() -> None:
        budget = memory.MemoryBudget(10 * MB, message_limit=MB)  # a reader counts 3 MB
        for _ in range(3):
            await budget.enter("a")  # 3 readers: 9 MB
        assert budget.reading == 3
        fourth = asyncio.ensure_future(budget.enter("a"))  # 12 MB > 10: it waits, unread
        await asyncio.sleep(0.05)
        assert not fourth.done()
        budget.read()  # one message read: room for the fourth
        await asyncio.wait_for(fourth, 5)
        assert budget.reading == 3
        for _ in range(3):
            budget.read()
        with budget.hold(8 * MB, "a"):  # calls already read hold 8 MB: no room for 3 more
            with pytest.raises(Overloaded) as err:
                await budget.enter("a")
            assert err.value.reason == memory.MEMORY_BUDGET and budget.reading == 0
        with budget.hold(6 * MB, "a"):  # room for one reader, not two: the second waits past its deadline
            await budget.enter("a")
            with pytest.raises(DeadlineExceeded):
                await budget.enter("a", deadline=time.monotonic() + 0.05)
            budget.read()
        await budget.enter("a")  # nothing held or read: one always goes
        budget.read()

    asyncio.run(scenario())


def test_a_call_refused_at_the_door_is_never_read(tmp_path):
    """Over real gRPC on loopback: the door serves unary Locate, and while a call holds the
    budget a new one is refused with RESOURCE_EXHAUSTED before its message is deserialized."""
    bundle = write_tiny(tmp_path / "tiny")
    big = photo(600, 400, value=1)
    read: list[int] = []

    def deserialize(raw: bytes) -> pb.LocateRequest:
        read.append(len(raw))
        return pb.LocateRequest.FromString(raw)

    async def scenario() -> None:
        fake = GatedInference()
        loc = gated_locator(bundle, fake, memory_budget_mb=4, max_message_bytes=MB)
        handler = grpc.unary_unary_rpc_method_handler(
            LocatorServicer(loc).Locate, request_deserializer=deserialize,
            response_serializer=pb.LocateResponse.SerializeToString,
        )  # fmt: skip
        server = grpc.aio.server(
            interceptors=[MemoryDoor(SERVICE_NAME, loc.memory, None), StatusInterceptor(SERVICE_NAME)]
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Locate": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.LocatorStub(channel)
                first = asyncio.ensure_future(stub.Locate(pb.LocateRequest(image=big)))
                await until(lambda: fake.entered == 1, "the first call in the model")
                before = shed(memory.MEMORY_BUDGET)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Locate(pb.LocateRequest(image=big, request_id="refused"))
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "memory budget" in err.value.details()
                assert read == [len(pb.LocateRequest(image=big).SerializeToString())]  # only the first was read
                assert shed(memory.MEMORY_BUDGET) == before + 1 and loc.memory.reading == 0
                fake.gate.set()
                assert (await first).input_width == 450
                assert (await stub.Locate(pb.LocateRequest(image=big))).input_width == 450  # room again
                assert len(read) == 2 and loc.memory.held == 0
        finally:
            await server.stop(None)
            await loc.close()

    asyncio.run(scenario())


FRAGMENTS = """
import sys
from swc_service.memory import bound_allocator
bounded = sys.argv[1] == "1" and bound_allocator()
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS"))
freed = bytearray(30 << 20)  # an mmapped buffer freed: glibc raises its threshold to its size
del freed
base, keep, frames = rss(), [], []
for _ in range(8):  # 20 MB buffers, each followed by a small one that lives on
    frames.append(bytearray(20 << 20))
    keep.append(bytearray(100_000))
del frames
print(int(bounded), (rss() - base) >> 20)
"""


@pytest.mark.parametrize("bounded", [False, True])
def test_a_bounded_allocator_gives_freed_frames_back(bounded):
    """What the service's main() sets: after a large buffer is freed, glibc keeps later freed
    frames resident (the RSS of a burst grew past the memory budget); with the threshold fixed,
    they go back to the OS."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run(
        [sys.executable, "-c", FRAGMENTS, "1" if bounded else "0"], env=env, capture_output=True, text=True, check=True
    )
    applied, retained_mb = map(int, out.stdout.split())
    assert applied == bounded
    if bounded:
        assert retained_mb <= 20  # at most one frame's worth of noise
    else:
        assert retained_mb >= 100  # the eight frames, kept
