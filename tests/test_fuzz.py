"""Fuzzing the request path that runs before Triton: >= 10,000 mutated images and option sets.

Every outcome must be a prepared model input or INVALID_ARGUMENT; any other exception would
reach the caller as INTERNAL, and fails the test.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from swc_service.config import Settings
from swc_service.errors import InvalidArgument
from swc_service.method import DEFAULT_SCALES_KM
from swc_service.options import resolve_options
from visloc_client.preprocessing import ImageError, Limits, preprocess
from visloc_client.v1 import locator_pb2 as pb

EXAMPLES = 10_000
SETTINGS = Settings(bundle="unused")
LIMITS = Limits(max_pixels=4_000_000, max_side=3000)
COUNT = {"images": 0, "options": 0}


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bases() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    frames = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
    return [
        _encode(rgb, "JPEG", quality=80),
        _encode(rgb, "JPEG", progressive=True),
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(rgb, "PNG"),
        _encode(rgb.convert("P"), "PNG", transparency=0),
        _encode(Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)), "PNG"),
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        _encode(rgb, "BMP"),
        _encode(rgb, "TIFF"),
    ]


BASES = _bases()


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "duplicate", "zero"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "duplicate":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
        elif op == "zero" and data:
            data[pos : pos + draw(st.integers(1, 8))] = b"\x00" * len(data[pos : pos + 8])
    return bytes(data)


def _opt_double(draw, wide) -> float | None:
    return draw(st.one_of(st.none(), wide))


@st.composite
def option_sets(draw) -> pb.LocateOptions:
    wide = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(DEFAULT_SCALES_KM))
    kwargs = {}
    if (v := draw(st.one_of(st.none(), st.integers(0, 2**32 - 1)))) is not None:
        kwargs["top_k"] = v
    for name in ("eps_km", "conf_scale_km", "conf_threshold"):
        if (v := _opt_double(draw, wide)) is not None:
            kwargs[name] = v
    kwargs["return_neighbours"] = draw(st.integers(0, 2**32 - 1))
    kwargs["return_top_cells"] = draw(st.integers(0, 2**32 - 1))
    return pb.LocateOptions(**kwargs)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on the corrupt metadata we feed it
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=mutated_images(), options=option_sets())
def test_mutated_images_and_options_never_escape_as_internal(data, options):
    COUNT["images"] += 1
    try:
        prepared = preprocess(data, LIMITS, exif_transpose=SETTINGS.exif_transpose)
    except ImageError as exc:
        assert str(exc)  # a reason, always
    else:
        h, w, c = prepared.array.shape
        assert c == 3 and prepared.array.dtype == np.uint8 and min(h, w) == 300 and max(h, w) <= 3000
    COUNT["options"] += 1
    try:
        opts = resolve_options(options, SETTINGS, DEFAULT_SCALES_KM)
    except InvalidArgument as exc:
        assert str(exc)
    else:
        assert 1 <= opts.top_k <= 1000 and math.isfinite(opts.eps_km) and opts.eps_km > 0
        assert opts.conf_scale_km in DEFAULT_SCALES_KM and 0 <= opts.conf_threshold <= 1
        assert opts.return_neighbours <= opts.top_k and opts.return_top_cells <= 100


def test_fuzzing_ran_at_least_ten_thousand_cases():
    if COUNT["images"] == 0:
        pytest.skip("run together with the fuzz test")
    assert COUNT["images"] >= EXAMPLES and COUNT["options"] >= EXAMPLES
