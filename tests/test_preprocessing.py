"""The one preprocessing: reference resize rule, PIL antialiased bilinear, RGB conversion."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from visloc_client.preprocessing import (
    MEAN,
    STD,
    ImageError,
    Limits,
    preprocess,
    resized_size,
    to_rgb,
)


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((640, 480), (400, 300)),
        ((480, 640), (300, 400)),
        ((1000, 333), (900, 300)),  # 300 * 1000 / 333 = 900.9 -> truncated
        ((301, 1000), (300, 996)),  # 996.67 -> 996
        ((1920, 1080), (533, 300)),  # 533.33
        ((7, 3), (700, 300)),  # upscaling follows the same rule
        ((300, 300), (300, 300)),
        ((300, 451), (300, 451)),  # short side already 300: untouched
        ((451, 300), (451, 300)),
    ],
)
def test_resized_size_matches_hand_computation(size, expected):
    assert resized_size(*size) == expected


def test_preprocess_output_shape_and_identity_when_short_side_is_300():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (300, 451, 3), dtype=np.uint8)
    out = preprocess(_png(Image.fromarray(arr))).array
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, arr)  # no resize, no rounding
    odd = preprocess(_png(Image.fromarray(rng.integers(0, 256, (333, 1000, 3), dtype=np.uint8))))
    assert odd.array.shape == (300, 900, 3)
    assert (odd.source_width, odd.source_height) == (1000, 333)


def _triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """PIL's antialiased bilinear kernel as a dense [n_out, n_in] float matrix."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    w = np.zeros((n_out, n_in))
    for x in range(n_out):
        centre = (x + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        taps = np.arange(lo, hi)
        k = np.maximum(0.0, 1.0 - np.abs((taps - centre + 0.5) / support))
        w[x, lo:hi] = k / k.sum()
    return w


@pytest.mark.parametrize("size", [(640, 480), (333, 1000), (150, 120), (1000, 301)])
def test_resize_equals_independent_float_implementation(size):
    """PIL (fixed point, rounding per pass) vs a float separable triangle filter: <= 1 level."""
    rng = np.random.default_rng(size[0])
    w, h = size
    base = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
    src = np.asarray(Image.fromarray(base).resize((w, h), Image.NEAREST), dtype=np.float64)
    src += rng.normal(0, 10, src.shape)
    src = np.clip(src, 0, 255).astype(np.uint8)
    out = preprocess(_png(Image.fromarray(src))).array.astype(np.float64)
    new_w, new_h = resized_size(w, h)
    ref = np.einsum("oh,hwc->owc", _triangle_weights(h, new_h), src.astype(np.float64))
    ref = np.einsum("pw,owc->opc", _triangle_weights(w, new_w), ref)
    assert out.shape == ref.shape
    diff = np.abs(out - ref)
    assert diff.max() <= 1.5
    assert diff.mean() < 0.35


def test_graph_normalisation_matches_float_reference():
    """The model's in-graph normalisation is ToTensor + Normalize, in float32."""
    torch = pytest.importorskip("torch")
    from visloc_export.model import Normalize

    x = np.random.default_rng(2).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    got = Normalize()(torch.from_numpy(x)).numpy()
    ref = (x.astype(np.float32) / np.float32(255) - np.float32(MEAN)) / np.float32(STD)
    np.testing.assert_array_equal(got, ref.transpose(0, 3, 1, 2))


def test_rgb_conversions():
    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    rgb = np.asarray(to_rgb(grey))
    assert rgb.shape == (16, 16, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [10, 20, 30]  # alpha dropped, as the reference
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([200, 100, 50] + [0] * 765)
    assert np.asarray(to_rgb(pal))[0, 0].tolist() == [200, 100, 50]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    deep = Image.fromarray(np.full((4, 4), 0x8000, dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    assert np.asarray(to_rgb(deep))[0, 0].tolist() == [128, 128, 128]  # scaled, not clipped


def test_16bit_png_round_trip_is_scaled():
    arr = np.full((320, 300), 40000, dtype=np.uint16)
    out = preprocess(_png(Image.fromarray(arr))).array
    assert out.shape == (320, 300, 3)
    assert int(out[0, 0, 0]) == 40000 >> 8


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"hello, this is text", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "not an image"),
        (_png(Image.new("RGB", (400, 300), (1, 2, 3)))[:80], "could not be decoded"),
    ],
)
def test_bad_bytes_are_refused_precisely(data, reason):
    with pytest.raises(ImageError, match=reason):
        preprocess(data)


def test_truncated_jpeg_is_refused():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(buf, format="JPEG")
    with pytest.raises(ImageError, match="could not be decoded"):
        preprocess(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_pixel_limit_is_checked_before_decoding():
    data = _png(Image.new("RGB", (2000, 2000)))
    with pytest.raises(ImageError, match="over the limit"):
        preprocess(data, Limits(max_pixels=1_000_000))
    # Only the header left: decoding first would fail as undecodable, the size check first says why.
    with pytest.raises(ImageError, match="over the limit"):
        preprocess(data[:64], Limits(max_pixels=1_000_000))
    with pytest.raises(ImageError, match="could not be decoded"):
        preprocess(data[:64], Limits(max_pixels=5_000_000))


def test_extreme_aspect_ratio_is_refused():
    with pytest.raises(ImageError, match="aspect ratio"):
        preprocess(_png(Image.new("RGB", (10000, 1))))
    assert math.isclose(preprocess(_png(Image.new("RGB", (3000, 300)))).array.shape[1], 3000)


def test_a_view_reads_as_bytes_read_through_bytesio():
    """``as_file`` over a view of a larger buffer answers every read, seek and tell as
    ``io.BytesIO`` over the same bytes does (Pillow and pillow-heif use all three)."""
    import io
    import random

    from visloc_client.preprocessing import as_file

    rng = random.Random(5)
    for _ in range(200):
        data = rng.randbytes(rng.randrange(0, 3000))
        around = rng.randbytes(7) + data + rng.randbytes(5)
        ours, reference = as_file(memoryview(around)[7 : 7 + len(data)]), io.BytesIO(data)
        for _ in range(30):
            op = rng.randrange(5)
            if op == 0:
                n = rng.choice([-1, 0, 1, 17, 4096])
                assert ours.read(n) == reference.read(n)
            elif op == 1:
                whence = rng.choice([io.SEEK_SET, io.SEEK_CUR, io.SEEK_END])
                offset = rng.randrange(0, len(data) + 10) if whence == io.SEEK_SET else rng.randrange(-5, 10)
                base = {io.SEEK_SET: 0, io.SEEK_CUR: reference.tell(), io.SEEK_END: len(data)}[whence]
                if base + offset < 0:  # refused by both (a ValueError), tested below
                    continue
                assert ours.seek(offset, whence) == reference.seek(offset, whence)
            elif op == 2:
                a = bytearray(rng.randrange(0, 50))
                b = bytearray(len(a))
                assert ours.readinto(a) == reference.readinto(b) and a == b
            elif op == 3:
                assert ours.read() == reference.read()
            assert ours.tell() == reference.tell()
    with pytest.raises(ValueError):
        as_file(memoryview(b"abc")).seek(-1)
