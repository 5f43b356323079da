"""A ``LocateRequest`` off the wire without copying its image.

gRPC hands the service a call's message as one ``bytes``. Parsing it with protobuf copies the
image into the parser's arena, and reading ``request.image`` copies it again: for a 12 MP photo
that is two more 3.3 MB buffers per call (fresh pages, under the worker's mmap threshold) and
~2 ms of CPU. Here the message's top-level fields are walked once: the image becomes a view
of the received bytes, and every other field is parsed by protobuf itself, so their meaning
(defaults, unknown fields, UTF-8 checks, errors) stays protobuf's. A message this walk does
not fully understand (a group, an over-long varint, a field running past the end) is parsed
by protobuf whole, with protobuf's result or error: the walk never decides a meaning on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from visloc_client.v1 import locator_pb2 as pb

IMAGE_FIELD = pb.LocateRequest.DESCRIPTOR.fields_by_name["image"].number
_LENGTH_DELIMITED = 2
_MAX_FIELD = (1 << 29) - 1
_MAX_VARINT_BYTES = 10


@dataclass(frozen=True, slots=True)
class Received:
    """A received Locate request: ``request`` holds every field but the image, ``image`` is
    the image's bytes where gRPC received them (empty when the message has none)."""

    request: pb.LocateRequest
    image: memoryview

    @property
    def request_id(self) -> str:
        """The request's id, once the servicer has given it one (the access log names calls by it)."""
        return self.request.request_id

    @classmethod
    def of(cls, request: pb.LocateRequest) -> Received:
        """An in-process request (not off the wire): its image is read once, as protobuf gives it."""
        return cls(request, memoryview(request.image))


def read_locate_request(data: bytes) -> Received:
    """The request deserializer of ``Locate`` and ``LocateStream`` (see the module docstring).
    Raises protobuf's ``DecodeError`` for a message protobuf refuses."""
    split = _split(data)
    if split is None:
        request = pb.LocateRequest.FromString(data)
        image = memoryview(request.image)
        request.ClearField("image")
        return Received(request, image)
    image, others = split
    return Received(pb.LocateRequest.FromString(others), image)


def _split(data: bytes) -> tuple[memoryview, bytes] | None:
    """(the last ``image`` field's value, the other top-level fields' bytes in their order), or
    None where protobuf should read the message itself. The last occurrence of a singular field
    wins, as protobuf merges it."""
    view = memoryview(data)
    image = view[0:0]
    others: list[memoryview] = []
    pos, end = 0, len(data)
    while pos < end:
        start = pos
        key, pos = _varint(data, pos, end)
        if key is None:
            return None
        field, wire_type = key >> 3, key & 7
        if not 1 <= field <= _MAX_FIELD:
            return None
        if wire_type == 0:
            value, pos = _varint(data, pos, end)
            if value is None:
                return None
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == _LENGTH_DELIMITED:
            length, pos = _varint(data, pos, end)
            if length is None:
                return None
            value_start, pos = pos, pos + length
        else:  # groups (3, 4) and the wire types protobuf refuses (6, 7)
            return None
        if pos > end:
            return None
        if field == IMAGE_FIELD and wire_type == _LENGTH_DELIMITED:
            image = view[value_start:pos]
        else:
            others.append(view[start:pos])
    return image, b"".join(others)


def _varint(data: bytes, pos: int, end: int) -> tuple[int | None, int]:
    """A base-128 varint at ``pos``: (its value, the position after it); None for a truncated
    one, one longer than 10 bytes or one over 64 bits."""
    result = shift = 0
    for i in range(pos, min(end, pos + _MAX_VARINT_BYTES)):
        byte = data[i]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (None, pos) if result >> 64 else (result, i + 1)
        shift += 7
    return None, pos
