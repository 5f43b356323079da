"""The Locate request deserializer (swc_service.wire) against protobuf's own parser: for every
message, well formed or not, it gives what protobuf gives (the image as a view of the received
bytes, every other field as parsed by protobuf) or protobuf's error."""

from __future__ import annotations

import random

import pytest
from google.protobuf.message import DecodeError

from swc_service.wire import Received, read_locate_request
from visloc_client.v1 import locator_pb2 as pb


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire_type)
    return key + (_varint(len(payload)) + payload if wire_type == 2 else payload)


def _random_request(rng: random.Random) -> pb.LocateRequest:
    request = pb.LocateRequest()
    if rng.random() < 0.8:
        request.image = rng.randbytes(rng.choice([0, 1, 127, 128, 300, 20_000]))
    if rng.random() < 0.5:
        request.request_id = rng.choice(["", "r-1", "ü-ñ", "x" * 200])
    if rng.random() < 0.5:
        opts = request.options
        opts.return_neighbours = rng.randrange(0, 1000)
        if rng.random() < 0.5:
            opts.top_k = rng.randrange(0, 5)
            opts.eps_km = rng.uniform(0, 10)
        for _ in range(rng.randrange(0, 3)):
            opts.claims.add(lat=rng.uniform(-90, 90), lon=rng.uniform(-180, 180))
    if rng.random() < 0.3:
        request.pixels.data = rng.randbytes(rng.randrange(0, 600))
        request.pixels.height = rng.randrange(0, 400)
        request.pixels.preprocessing = "resize_300"
    return request


def _messages(rng: random.Random) -> bytes:
    """A serialized request, often rearranged the ways other clients write them: fields in
    another order, the image twice (the last wins), unknown fields of every wire type,
    non-minimal varints, the image sent with the wrong wire type."""
    request = _random_request(rng)
    fields = []
    for descriptor, value in request.ListFields():
        one = pb.LocateRequest()
        getattr(one, descriptor.name).MergeFrom(value) if descriptor.message_type else setattr(
            one, descriptor.name, value
        )
        fields.append(one.SerializeToString())
    rng.shuffle(fields)
    extra = []
    if rng.random() < 0.3:
        extra.append(_field(1, 2, rng.randbytes(rng.randrange(0, 50))))  # a second image
    if rng.random() < 0.3:
        extra.append(_field(rng.choice([15, 99, 1000, (1 << 29) - 1]), 0, _varint(rng.randrange(1 << 64))))
    if rng.random() < 0.2:
        extra.append(_field(77, 1, rng.randbytes(8)) + _field(78, 5, rng.randbytes(4)))
    if rng.random() < 0.2:
        extra.append(_field(79, 2, rng.randbytes(rng.randrange(0, 30))))
    if rng.random() < 0.1:
        extra.append(_field(80, 3, b"") + _field(80, 4, b""))  # an empty group
    if rng.random() < 0.1:
        extra.append(_field(1, 0, _varint(5)))  # the image's number with a varint: unknown to protobuf
    if rng.random() < 0.1:
        extra.append(bytes([0x9A, 0x80, 0x00, 0x01, 0x41]))  # the request id (3), a 3-byte key: "A"
    for chunk in extra:
        fields.insert(rng.randrange(0, len(fields) + 1), chunk)
    return b"".join(fields)


def _mutated(rng: random.Random, data: bytes) -> bytes:
    """The message truncated, or with a byte changed, inserted or removed."""
    if not data:
        return bytes([rng.randrange(256)])
    i = rng.randrange(len(data))
    kind = rng.randrange(4)
    if kind == 0:
        return data[:i]
    if kind == 1:
        return data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]
    if kind == 2:
        return data[:i] + bytes([rng.randrange(256)]) + data[i:]
    return data[:i] + data[i + 1 :]


def _protobuf(data: bytes) -> tuple[pb.LocateRequest, bytes] | type[DecodeError]:
    try:
        request = pb.LocateRequest.FromString(data)
    except DecodeError:
        return DecodeError
    image = request.image
    request.ClearField("image")
    return request, image


def _ours(data: bytes) -> tuple[pb.LocateRequest, bytes] | type[DecodeError]:
    try:
        received = read_locate_request(data)
    except DecodeError:
        return DecodeError
    assert isinstance(received.image, memoryview)
    return received.request, bytes(received.image)


def _same(a, b) -> bool:
    if a is DecodeError or b is DecodeError:
        return a is b
    # Unknown fields included: the request's bytes as protobuf writes them back.
    return a[1] == b[1] and a[0] == b[0] and a[0].SerializeToString() == b[0].SerializeToString()


def test_well_formed_requests_read_as_protobuf_reads_them():
    rng = random.Random(20261206)
    for _ in range(3000):
        data = _messages(rng)
        assert _same(_ours(data), _protobuf(data)), data[:80]


def test_malformed_requests_read_or_refused_as_protobuf_does():
    rng = random.Random(7)
    refused = 0
    for _ in range(6000):
        data = _mutated(rng, _messages(rng))
        expected = _protobuf(data)
        refused += expected is DecodeError
        assert _same(_ours(data), expected), data[:80]
    assert refused > 500  # the corpus does reach protobuf's refusals


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a\x05abc",  # the image runs past the end
        b"\x0a\xff\xff\xff\xff\x0fab",  # a length over 2 GiB
        b"\x0a" + b"\x80" * 10 + b"\x00",  # an over-long length
        b"\x00\x01",  # field number 0
        b"\x0e",  # wire type 6
        b"\x0a\x01",  # truncated image
    ],
)
def test_malformed_edges(data: bytes):
    assert _same(_ours(data), _protobuf(data))


def test_the_image_is_a_view_of_the_received_message_not_a_copy():
    image = bytes(range(256)) * 4096
    data = pb.LocateRequest(image=image, request_id="r").SerializeToString()
    received = read_locate_request(data)
    assert received.image.obj is data  # gRPC's bytes, not a copy
    assert received.image == image
    assert not received.request.image and received.request.request_id == "r"


def test_an_in_process_request_keeps_its_image():
    request = pb.LocateRequest(image=b"jpeg", request_id="q")
    received = Received.of(request)
    assert bytes(received.image) == b"jpeg" and received.request is request


def test_the_decode_reads_a_view_as_it_reads_bytes():
    """Every case of the bad-input corpus and the phone formats, decoded from a view of a larger
    message (as the service does): the same model input, or the same refusal, as from bytes."""
    from corpus.cases import CASES

    from visloc_client.errors import ImageError
    from visloc_client.preprocessing import Limits, preprocess

    def outcome(data, **kw):
        try:
            image = preprocess(data, Limits(), **kw)
        except ImageError as exc:
            return str(exc)
        return image.array.tobytes(), image.source_width, image.source_height, image.source_format

    for case in CASES:
        data = case.make()
        message = pb.LocateRequest(image=data, request_id="around").SerializeToString()
        view = read_locate_request(message).image
        assert view.obj is message
        for kw in ({}, {"draft": True, "exif_transpose": True}):
            assert outcome(view, **kw) == outcome(data, **kw), case.name
