"""The memory budget: what a call will hold is reserved before it is decoded or queued, and a
call that would go over the worker's budget is refused at once (RESOURCE_EXHAUSTED, reason
memory_budget), holding nothing; the model input sent by the caller costs a fraction of a file.
The burst of 12 MP photos against the live stack is bench/burst.py (`make bench`)."""

from __future__ import annotations

import asyncio
import io

import grpc
import pytest
from PIL import Image
from test_dataplane import GatedInference, gated_locator, shed, until, write_tiny

from swc_service import memory
from swc_service.config import Settings
from swc_service.errors import Overloaded, classify
from visloc_client.preprocessing import preprocess, to_pixels
from visloc_client.v1 import locator_pb2 as pb

MB = 1 << 20


def photo(width: int, height: int, fmt: str = "PNG", value: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (value, value, value)).save(buf, format=fmt)
    return buf.getvalue()


def test_a_file_costs_its_message_twice_and_its_pixels_twice():
    data = photo(1200, 800)
    assert memory.file_cost(data) == 2 * len(data) + 2 * 3 * 1200 * 800
    jpeg = photo(4000, 3000, "JPEG")
    drafted = memory.file_cost(jpeg, draft=True)  # 4000x3000 -> 1000x750 at a quarter, >= 2 x 400x300
    assert drafted == 2 * len(jpeg) + 2 * 3 * 1000 * 750 < memory.file_cost(jpeg)
    small = photo(640, 480, "JPEG")  # too small to reduce: decoded in full, fast or not
    assert memory.file_cost(small, draft=True) == memory.file_cost(small) == 2 * len(small) + 2 * 3 * 640 * 480
    assert memory.file_cost(b"not an image") == 2 * len(b"not an image")  # the decode says why
    assert memory.pixels_cost(b"x" * 360_000) == 720_000


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
