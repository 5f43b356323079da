"""Every case of the generated bad-input corpus through the live service: a precise status or a
correct answer, and the server keeps serving."""

from __future__ import annotations

import grpc
import pytest
from corpus.cases import CASES, OK, _exif, _photo, _save

from swc_service.config import Settings
from visloc_client.preprocessing import Limits, preprocess
from visloc_client.v1 import locator_pb2 as pb
from visloc_client.v1 import locator_pb2_grpc as pb_grpc
from visloc_export import samples


@pytest.fixture(scope="module")
def stub(live_target):
    options = [("grpc.max_send_message_length", -1)]  # let oversize messages reach the server
    with grpc.insecure_channel(live_target, options=options) as channel:
        yield pb_grpc.LocatorStub(channel)


def test_corpus_has_at_least_25_cases():
    assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case(stub, case):
    request = pb.LocateRequest(image=case.make(), options=pb.LocateOptions(**(case.options or {})))
    if case.expect == OK:
        r = stub.Locate(request, timeout=60)
        assert f"{r.input_height}x{r.input_width}" == case.reason
        assert -90 <= r.lat <= 90 and -180 <= r.lon <= 180 and 0 < r.confidence <= 1
    else:
        with pytest.raises(grpc.RpcError) as err:
            stub.Locate(request, timeout=60)
        assert err.value.code().name == case.expect, err.value.details()
        assert case.reason in err.value.details()
    # The server keeps serving.
    assert stub.Locate(pb.LocateRequest(image=samples.photo_bytes(1)), timeout=60).top_cell.probability > 0


def test_exif_orientation_applied_when_enabled():
    data = _save(_photo(), "JPEG", exif=_exif(orientation=6))  # stored 400x300, displayed 300x400
    as_stored = preprocess(data, Limits(), exif_transpose=Settings(bundle="-").exif_transpose)
    rotated = preprocess(data, Limits(), exif_transpose=True)
    assert as_stored.array.shape[:2] == (300, 400)
    assert rotated.array.shape[:2] == (400, 300)
