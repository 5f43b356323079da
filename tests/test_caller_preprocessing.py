"""Preprocessing on the caller's side: the model input sent instead of the file gives the same
answer, bit for bit; the service checks what it is sent; the client picks what to send.

The in-process tests run the real Locator and servicer over loopback with the fake inference
of test_dataplane; the live ones run the real model in the local Triton on the photo mix
(bench/photos.py: 12 MP and 8 MP JPEGs, an EXIF-rotated portrait, 2 MP, 640 x 480, a PNG
screenshot), with exact preprocessing and with centre crop and EXIF orientation on."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
from PIL import Image
from test_dataplane import FakeInference, make_locator, write_tiny

from bench import photos
from swc_service.errors import RecipeMismatch, classify
from swc_service.interceptors import StatusInterceptor
from swc_service.server import SERVICE_NAME
from swc_service.servicer import LocatorServicer
from visloc_client import LocatorClient
from visloc_client.errors import ImageError
from visloc_client.preprocessing import Limits, Recipe, from_pixels, preprocess, to_pixels
from visloc_client.upload import Upload, file_request, recipe_of
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc

EXACT = Recipe()
CROP_EXIF = Recipe(crop=True, exif_transpose=True)


def jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photos.pixels(width, height, seed)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="module")
def mix() -> dict[str, bytes]:
    return photos.mix(seed=7)


# --- the check of what a caller sends ------------------------------------------------------


@pytest.mark.parametrize("recipe", [EXACT, CROP_EXIF], ids=["exact", "crop+exif"])
def test_pixels_made_by_the_recipe_pass_the_check_unchanged(recipe, mix):
    for name, data in mix.items():
        made = preprocess(data, recipe.limits, exif_transpose=recipe.exif_transpose, crop=recipe.crop)
        h, w = made.shape
        back = from_pixels(to_pixels(made), h, w, made.source_width, made.source_height, recipe)
        assert np.array_equal(back.array, made.array), name
        assert (back.source_width, back.source_height) == (made.source_width, made.source_height)


def test_the_check_says_what_differs():
    made = preprocess(jpeg(800, 600))
    data, (h, w) = to_pixels(made), made.shape
    cases = {
        "gives 400x300": (data, h, w + 1, 800, 600, EXACT),  # not the resize rule's shape
        "pixels hold 359999 bytes": (data[:-1], h, w, 800, 600, EXACT),  # one byte short
        "a side is 0": (data, 0, w, 800, 600, EXACT),
        "center_crop_300 preprocessing": (data, h, w, 800, 600, Recipe(crop=True)),
        "over the limit of 1000 px": (
            to_pixels(preprocess(jpeg(1600, 300))),
            300,
            1600,
            1600,
            300,
            Recipe(limits=Limits(max_side=1000)),
        ),  # fmt: skip
        "over the limit of 100000": (data, h, w, 800, 600, Recipe(limits=Limits(max_pixels=100_000))),
    }
    for message, args in cases.items():
        with pytest.raises(ImageError, match=message):
            from_pixels(*args)


def test_an_image_error_is_invalid_argument_and_a_recipe_mismatch_failed_precondition():
    assert classify(ImageError("bad"))[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert classify(RecipeMismatch("other"))[0] is grpc.StatusCode.FAILED_PRECONDITION


# --- what the client sends --------------------------------------------------------------


def test_auto_sends_pixels_only_where_they_are_smaller_than_the_file(mix):
    auto, client, server = (Upload(mode, EXACT) for mode in ("auto", "client", "server"))
    big, small = mix["12mp_jpeg"], mix["640x480_jpeg"]
    assert "pixels" in auto.fields(big) and "image" in auto.fields(small)
    assert len(auto.fields(big)["pixels"].data) * 3 <= len(big)  # a third of the file, at most
    assert "pixels" in client.fields(small)
    assert server.fields(big) == {"image": big} and Upload("auto", None).fields(big) == {"image": big}
    for junk in (b"", b"not an image", big[: len(big) // 2]):  # the service gives its own answer
        assert client.fields(junk) == {"image": junk}


def test_the_recipe_comes_from_getinfo():
    info = pb.GetInfoResponse(preprocessing="center_crop_300", exif_transpose=True, max_image_pixels=123,
                              max_input_side=456, accepts_pixels=True)  # fmt: skip
    assert recipe_of(info) == Recipe(crop=True, exif_transpose=True, limits=Limits(max_pixels=123, max_side=456))
    assert recipe_of(pb.GetInfoResponse(preprocessing="exact")) is None  # a service that takes files only


def test_file_request_swaps_pixels_for_the_file():
    request = pb.LocateRequest(pixels=pb.Pixels(data=b"x", height=1), request_id="r",
                               options=pb.LocateOptions(top_k=3))  # fmt: skip
    out = file_request(request, b"file")
    assert not out.HasField("pixels") and out.image == b"file" and out.request_id == "r" and out.options.top_k == 3
    assert request.HasField("pixels")  # the original is left alone


# --- in process: the real Locator over loopback, the fake model ---------------------------


@contextmanager
def served(bundle, **settings) -> Iterator[str]:
    """The Locator (fake inference) and servicer on a loopback port in a thread of its own, so
    that the blocking client can call it."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict = {}

    async def main() -> None:
        locator = make_locator(bundle, FakeInference(), **settings)
        server = grpc.aio.server(interceptors=[StatusInterceptor(SERVICE_NAME)])
        pb_grpc.add_LocatorServicer_to_server(LocatorServicer(locator), server)
        box["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        box["stop"] = asyncio.Event()
        started.set()
        await box["stop"].wait()
        await server.stop(None)
        await locator.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(30)
    try:
        yield f"127.0.0.1:{box['port']}"
    finally:
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join(30)


def test_the_service_refuses_pixels_it_cannot_trust(tiny_bundle):
    made = preprocess(jpeg(800, 600))
    good = pb.Pixels(data=to_pixels(made), height=300, width=400, source_width=800, source_height=600,
                     preprocessing="exact")  # fmt: skip
    with served(tiny_bundle) as target, grpc.insecure_channel(target) as channel:
        stub = pb_grpc.LocatorStub(channel)
        assert stub.Locate(pb.LocateRequest(pixels=good)).input_width == 400
        info = stub.GetInfo(pb.GetInfoRequest())
        assert info.accepts_pixels and info.preprocessing == "exact" and not info.exif_transpose

        def code(**fields) -> tuple[grpc.StatusCode, str]:
            try:
                stub.Locate(pb.LocateRequest(**fields))
            except grpc.RpcError as err:
                return err.code(), err.details()
            return grpc.StatusCode.OK, ""

        other = pb.Pixels()
        other.CopyFrom(good)
        other.exif_transpose = True
        assert code(pixels=other)[0] is grpc.StatusCode.FAILED_PRECONDITION
        short = pb.Pixels()
        short.CopyFrom(good)
        short.data = good.data[:-3]
        assert code(pixels=short) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "pixels hold 359997 bytes; 400x300 RGB is 360000",
        )
        both = code(pixels=good, image=jpeg(800, 600))
        assert both[0] is grpc.StatusCode.INVALID_ARGUMENT and "both" in both[1]


def test_a_client_whose_recipe_is_stale_falls_back_to_the_file(tiny_bundle, mix):
    """The client learned the recipe from one replica; another has centre crop on: the refusal
    (FAILED_PRECONDITION) makes it send the file, and it asks GetInfo again next time."""
    big = mix["12mp_jpeg"]
    with served(tiny_bundle, preprocessing="center_crop_300") as target, LocatorClient(target) as client:
        client._upload = Upload("auto", EXACT)  # what another replica said
        result = client.locate(big)
        assert (result.input_width, result.input_height) == (300, 300)
        assert client._upload is None  # forgotten: asked again on the next call
        client.locate(big)
        assert client._upload == Upload("auto", Recipe(crop=True))
        # A stream falls back per image the same way.
        client._upload = Upload("auto", EXACT)
        items = list(client.locate_many([big, big], concurrency=2))
        assert [i.error for i in items] == [None, None]
        assert all(i.result.input_width == 300 for i in items)


def test_a_client_without_the_service_recipe_sends_files(tiny_bundle, mix):
    with served(tiny_bundle) as target, LocatorClient(target, preprocess="server") as client:
        assert client.locate(mix["12mp_jpeg"]).image_width == 4032
        assert client._upload == Upload()
    with pytest.raises(ValueError, match="preprocess must be one of"):
        LocatorClient("127.0.0.1:1", preprocess="edge")
