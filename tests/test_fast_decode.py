"""The opt-in fast decode (``--fast-decode``): a large JPEG decoded at a reduced DCT scale, then
resized exactly. Same model-input shape and source size as the exact path on every photo of the
mix (EXIF-rotated included); pixels close to the exact ones, not equal; nothing changes for
photos too small to reduce or that are not JPEGs; GetInfo says it is on. Its effect on answers
is measured by ``make bench`` (bench/fast_decode.py), not asserted here."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from test_caller_preprocessing import served
from test_dataplane import write_tiny

from bench import photos
from visloc_client.preprocessing import DRAFT_MARGIN, decode, draft_size, preprocess, resized_size
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def mix() -> dict[str, bytes]:
    return photos.mix(seed=11)


@pytest.mark.parametrize("exif", [False, True], ids=["as-stored", "exif-transposed"])
def test_same_shape_and_source_size_close_pixels(mix, exif):
    for name, data in mix.items():
        exact = preprocess(data, exif_transpose=exif)
        fast = preprocess(data, exif_transpose=exif, draft=True)
        assert fast.array.shape == exact.array.shape, name
        assert (fast.source_width, fast.source_height) == (exact.source_width, exact.source_height), name
        diff = np.abs(fast.array.astype(np.int16) - exact.array.astype(np.int16))
        assert diff.mean() < 1.0, name  # the same picture (a wrong one is tens of levels off)


def test_large_jpegs_are_decoded_reduced_others_in_full(mix):
    for name, data in mix.items():
        full = decode(data)
        reduced = decode(data, draft=True)
        w, h = full.size
        tw, th = resized_size(w, h)
        if full.format == "JPEG" and w >= 2 * DRAFT_MARGIN * tw:  # at least one halving fits
            assert reduced.size[0] < w and reduced.size[0] >= DRAFT_MARGIN * tw, name
            assert reduced.size[1] >= DRAFT_MARGIN * th, name
            assert reduced.size == draft_size(w, h), name  # what the memory budget reserves for
        else:
            assert reduced.size == full.size, name
            np.testing.assert_array_equal(preprocess(data, draft=True).array, preprocess(data).array)


def test_the_service_decodes_fast_when_told_and_says_so(tmp_path, mix):
    bundle = write_tiny(tmp_path / "tiny")
    answers: dict = {}
    for fast in (False, True):
        with served(bundle, fast_decode=fast, exif_transpose=True) as target, grpc.insecure_channel(target) as ch:
            stub = pb_grpc.LocatorStub(ch)
            assert stub.GetInfo(pb.GetInfoRequest()).fast_decode is fast
            for name, data in mix.items():  # every class: large JPEGs reduced, the rest in full
                answers[fast, name] = stub.Locate(pb.LocateRequest(image=data))
    for name in mix:
        for field in ("input_width", "input_height", "image_width", "image_height"):
            assert getattr(answers[True, name], field) == getattr(answers[False, name], field), (name, field)
    portrait = answers[True, "12mp_portrait_exif"]
    assert (portrait.image_width, portrait.image_height) == (3024, 4032)  # as shown
