"""The bad-input corpus: each case is generated here (nothing downloaded) with its expected outcome.

``python tests/corpus/cases.py OUTDIR`` writes the files; ``--markdown`` prints the table that
docs/reliability.md carries. tests/test_corpus.py sends every case through the live service.
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

OK = "OK"
INVALID = "INVALID_ARGUMENT"
TOO_BIG = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    make: Callable[[], bytes]
    expect: str  # OK or a status code name
    reason: str = ""  # a substring of the status details, or for OK the expected input HxW
    options: dict | None = None


def _photo(w: int = 400, h: int = 300, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 10 + 1, w // 10 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BILINEAR)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int, rows: int = 10) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` (a decompression bomb when large)."""
    raw = zlib.compress(b"\x00" * (1 + width) * rows, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _exif(orientation: int | None = None, blob: int = 0) -> bytes:
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    if blob:
        exif[0x010E] = "x" * blob  # ImageDescription: a large EXIF block
    return exif.tobytes()


def _animated(fmt: str) -> bytes:
    frames = [_photo(320, 240, seed) for seed in range(3)]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _heic_like() -> bytes:
    """An ISO-BMFF 'ftyp heic' box and nothing else: no image in it."""
    ftyp = b"ftypheic" + b"\x00\x00\x00\x00" + b"mif1heic"
    return struct.pack(">I", len(ftyp) + 4) + ftyp + b"\x00" * 64


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _claims(data: bytes, side: int) -> bytes:
    """An ISO-BMFF image whose 'ispe' (image spatial extents) box claims ``side`` x ``side``."""
    at = data.index(b"ispe") + 8  # box type, then version/flags, then width and height
    return data[:at] + struct.pack(">II", side, side) + data[at + 8 :]


CASES: list[Case] = [
    Case("empty", "0 bytes", lambda: b"", INVALID, "empty"),
    Case(
        "random_bytes", "4 KiB of random bytes", lambda: np.random.default_rng(1).bytes(4096), INVALID, "not an image"
    ),
    Case("text", "a text file", lambda: b"Paris, France\n" * 20, INVALID, "not an image"),
    Case(
        "svg",
        "an SVG drawing (vector, unsupported)",
        lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="400" height="300"/>',
        INVALID,
        "not an image",
    ),
    Case("heic", "HEIC container header and no image", _heic_like, INVALID, "not an image"),
    Case("heic_photo", "HEIC photo (as phones save it)", lambda: _save(_photo(), "HEIF", quality=80), OK, "300x400"),
    Case("avif_photo", "AVIF photo", lambda: _save(_photo(), "AVIF", quality=80), OK, "300x400"),
    Case(
        "truncated_heic",
        "a HEIC photo cut in half",
        lambda: _half(_save(_photo(), "HEIF")),
        INVALID,
        "could not be decoded",
    ),  # fmt: skip
    Case(
        "truncated_avif", "an AVIF photo cut in half", lambda: _half(_save(_photo(), "AVIF")), INVALID, "not an image"
    ),
    Case(
        "heic_oversized",
        "HEIC whose header claims 8000 x 8000",
        lambda: _claims(_save(_photo(), "HEIF"), 8000),
        INVALID,
        "over the limit",
    ),  # fmt: skip
    Case(
        "heic_bomb",
        "HEIC whose header claims 100000 x 100000",
        lambda: _claims(_save(_photo(), "HEIF"), 100_000),
        INVALID,
        "decompression bomb",
    ),  # fmt: skip
    Case(
        "truncated_jpeg", "a JPEG cut in half", lambda: _save(_photo(), "JPEG")[:1500], INVALID, "could not be decoded"
    ),
    Case(
        "truncated_png",
        "a PNG cut after its header",
        lambda: _save(_photo(), "PNG")[:100],
        INVALID,
        "could not be decoded",
    ),
    Case(
        "png_bomb",
        "PNG claiming 60000x60000 pixels in a few KB",
        lambda: _png_header_only(60000, 60000),
        INVALID,
        "decompression bomb",
    ),
    Case(
        "over_pixel_limit",
        "PNG of 8000x8000 (64 MP > 50 MP limit)",
        lambda: _png_header_only(8000, 8000),
        INVALID,
        "over the limit",
    ),
    Case("zero_width", "PNG header with width 0", lambda: _png_header_only(0, 10), INVALID, "not an image"),
    Case(
        "one_by_one",
        "1x1 pixel PNG (upscaled to 300x300)",
        lambda: _save(Image.new("RGB", (1, 1), "red"), "PNG"),
        OK,
        "300x300",
    ),
    Case(
        "one_by_10000",
        "1x10000 PNG: 300x3000000 model input",
        lambda: _save(Image.new("L", (1, 10000)), "PNG"),
        INVALID,
        "aspect ratio",
    ),
    Case(
        "aspect_10_to_1",
        "3000x300 panorama: the longest input allowed",
        lambda: _save(_photo(3000, 300), "PNG"),
        OK,
        "300x3000",
    ),
    Case("cmyk_jpeg", "CMYK JPEG", lambda: _save(_photo().convert("CMYK"), "JPEG"), OK, "300x400"),
    Case("grey_jpeg", "greyscale JPEG", lambda: _save(_photo().convert("L"), "JPEG"), OK, "300x400"),
    Case(
        "png_16bit_grey",
        "16-bit greyscale PNG (scaled to 8 bits)",
        lambda: _save(Image.fromarray(np.full((300, 400), 40000, np.uint16)), "PNG"),
        OK,
        "300x400",
    ),
    Case("png_16bit_rgb", "16-bit RGB PNG (raw, written by hand)", lambda: _png16_rgb(400, 300), OK, "300x400"),
    Case(
        "palette_transparency",
        "palette PNG with a transparent index",
        lambda: _save(_photo().convert("P"), "PNG", transparency=0),
        OK,
        "300x400",
    ),
    Case("rgba_png", "RGBA PNG (alpha dropped)", lambda: _save(_photo().convert("RGBA"), "PNG"), OK, "300x400"),
    Case("animated_gif", "animated GIF, 3 frames (first frame used)", lambda: _animated("GIF"), OK, "300x400"),
    Case("animated_webp", "animated WebP, 3 frames (first frame used)", lambda: _animated("WEBP"), OK, "300x400"),
    Case(
        "exif_rotated",
        "JPEG 400x300 with EXIF orientation 6 (not applied by default, as the reference)",
        lambda: _save(_photo(), "JPEG", exif=_exif(orientation=6)),
        OK,
        "300x400",
    ),
    Case("progressive_jpeg", "progressive JPEG", lambda: _save(_photo(), "JPEG", progressive=True), OK, "300x400"),
    Case(
        "huge_exif",
        "JPEG with a 60 KB EXIF block",
        lambda: _save(_photo(), "JPEG", exif=_exif(blob=60000)),
        OK,
        "300x400",
    ),
    Case(
        "trailing_garbage",
        "JPEG followed by 10 KB of junk",
        lambda: _save(_photo(), "JPEG") + np.random.default_rng(2).bytes(10240),
        OK,
        "300x400",
    ),
    Case("bmp", "BMP", lambda: _save(_photo(), "BMP"), OK, "300x400"),
    Case("tiff", "TIFF", lambda: _save(_photo(), "TIFF"), OK, "300x400"),
    Case(
        "oversize_message",
        "21 MB message (limit 20 MB)",
        lambda: b"\xff\xd8" + b"\x00" * (21 * 1024 * 1024),
        TOO_BIG,
        "",
    ),
    Case("top_k_zero", "top_k = 0", lambda: _save(_photo(), "JPEG"), INVALID, "top_k must be in", {"top_k": 0}),
    Case("top_k_huge", "top_k = 10^6", lambda: _save(_photo(), "JPEG"), INVALID, "top_k must be in", {"top_k": 10**6}),
    Case("eps_negative", "eps_km = -1", lambda: _save(_photo(), "JPEG"), INVALID, "eps_km", {"eps_km": -1.0}),
    Case("eps_nan", "eps_km = NaN", lambda: _save(_photo(), "JPEG"), INVALID, "eps_km", {"eps_km": float("nan")}),
    Case(
        "unknown_scale",
        "conf_scale_km = 30 (not served)",
        lambda: _save(_photo(), "JPEG"),
        INVALID,
        "not a served PD scale",
        {"conf_scale_km": 30.0},
    ),
    Case(
        "threshold_above_one",
        "conf_threshold = 2",
        lambda: _save(_photo(), "JPEG"),
        INVALID,
        "conf_threshold",
        {"conf_threshold": 2.0},
    ),
]


def _png16_rgb(w: int, h: int) -> bytes:
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 65535, (h, w, 3), dtype=np.uint16).astype(">u2").tobytes()
    stride = w * 6
    raw = b"".join(b"\x00" + rows[i * stride : (i + 1) * stride] for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def markdown(outcomes: dict[str, str] | None = None) -> str:
    lines = ["| case | input | expected |", "| --- | --- | --- |"]
    for c in CASES:
        expected = c.expect if c.expect != OK else f"OK, model input {c.reason}"
        if c.expect not in (OK,) and c.reason:
            expected += f' ("…{c.reason}…")'
        lines.append(f"| `{c.name}` | {c.what} | {outcomes.get(c.name, expected) if outcomes else expected} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        print(markdown())
    else:
        out = Path(sys.argv[1] if len(sys.argv) > 1 else "corpus")
        out.mkdir(parents=True, exist_ok=True)
        for case in CASES:
            (out / f"{case.name}.bin").write_bytes(case.make())
        print(f"wrote {len(CASES)} cases to {out}")
