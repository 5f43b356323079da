"""Caller-side preprocessing on the real model (local Triton, demo bundle) and the photo mix:
the model input sent instead of the file gives the same LocateResponse, bit for bit."""

from __future__ import annotations

import grpc
import pytest
from conftest import running_service
from test_caller_preprocessing import CROP_EXIF, EXACT

from bench import photos
from visloc_client import LocatorClient
from visloc_client.errors import LocateError
from visloc_client.preprocessing import Recipe
from visloc_client.upload import Upload, recipe_of
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def mix() -> dict[str, bytes]:
    return photos.mix(seed=7)


def answer(stub, **fields) -> pb.LocateResponse:
    options = pb.LocateOptions(return_neighbours=10, return_top_cells=20)
    response = stub.Locate(pb.LocateRequest(options=options, request_id="same", **fields), timeout=120)
    response.ClearField("timings")  # the only field that may differ
    return response


def assert_bit_identical(target: str, recipe: Recipe, mix: dict[str, bytes]) -> None:
    upload = Upload("client", recipe)
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.LocatorStub(channel)
        for name, data in mix.items():
            fields = upload.fields(data)
            assert "pixels" in fields, name
            from_file, from_pixels_ = answer(stub, image=data), answer(stub, **fields)
            assert from_pixels_.SerializeToString(deterministic=True) == from_file.SerializeToString(
                deterministic=True
            ), f"{name}: {from_file} != {from_pixels_}"
            assert len(from_file.top_cells) == 20 and (from_file.neighbours or from_file.method == pb.METHOD_CELL)


def test_caller_and_server_preprocessing_answer_bit_identically(live_service, mix):
    assert_bit_identical(live_service.target, EXACT, mix)


def test_bit_identical_with_centre_crop_and_exif_orientation(demo_bundle, local_triton, mix):
    with running_service(demo_bundle, local_triton.grpc_url, "--preprocessing", "center_crop_300",
                         "--exif-transpose") as svc:  # fmt: skip
        with grpc.insecure_channel(svc.target) as channel:
            info = pb_grpc.LocatorStub(channel).GetInfo(pb.GetInfoRequest())
        assert recipe_of(info) == CROP_EXIF
        assert_bit_identical(svc.target, CROP_EXIF, mix)


def test_the_client_library_preprocesses_a_phone_photo_by_itself(live_service, mix):
    with LocatorClient(live_service.target) as auto, LocatorClient(live_service.target, preprocess="server") as files:
        for name in ("12mp_portrait_exif", "640x480_jpeg"):
            a, f = auto.locate(mix[name], neighbours=5), files.locate(mix[name], neighbours=5)
            assert (a.lat, a.lon, a.top_cell, a.confidence, a.neighbours) == (
                f.lat,
                f.lon,
                f.top_cell,
                f.confidence,
                f.neighbours,
            ), name
        assert auto._upload == Upload("auto", EXACT)
        with pytest.raises(LocateError) as err:  # bad bytes still get the service's own answer
            auto.locate(b"\xff\xd8\xff not really a jpeg")
        assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_heic_and_avif_photos_are_located_through_the_cli(live_target, tmp_path, capsys):
    """What phones save: HEIC (pillow-heif) and AVIF (Pillow), located on either side; malformed
    ones get INVALID_ARGUMENT with the decoder's reason, and the service keeps answering."""
    import io
    import json

    from PIL import Image

    from visloc_client.cli import main

    image = Image.fromarray(photos.pixels(800, 600, seed=3))
    for fmt in ("HEIF", "AVIF"):
        buf = io.BytesIO()
        image.save(buf, format=fmt, quality=80)
        path = tmp_path / f"photo.{fmt.lower()}"
        path.write_bytes(buf.getvalue())
        answers = []
        for where in ("server", "client"):
            capsys.readouterr()
            assert main(["--target", live_target, "--preprocess", where, "locate", str(path), "--json"]) == 0, fmt
            answers.append(json.loads(capsys.readouterr().out))
        assert answers[0]["image_width"] == 800 and answers[0]["input_width"] == 400
        assert (answers[0]["lat"], answers[0]["lon"]) == (answers[1]["lat"], answers[1]["lon"]), fmt
        bad = tmp_path / f"cut.{fmt.lower()}"
        bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        capsys.readouterr()
        assert main(["--target", live_target, "locate", str(bad)]) == 1
        assert "INVALID_ARGUMENT" in capsys.readouterr().err
    assert main(["--target", live_target, "locate", str(tmp_path / "photo.heif"), "--json"]) == 0
