"""Generated, varied, photo-like images (seeded): demo images, demo calibration, tests, benchmarks.

Nothing is downloaded: each image is a sky gradient over a ground band with buildings,
blobs and texture, in colours, sizes and aspect ratios that vary with the seed.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Shapes of real photos: 4:3, 3:4, 16:9, square, and a few off-grid ones.
SHAPES = ((400, 300), (300, 400), (533, 300), (300, 300), (640, 480), (480, 640), (1024, 576), (350, 260))


def photo(seed: int, size: tuple[int, int] | None = None) -> Image.Image:
    """One RGB image; ``size`` is (width, height), else chosen from :data:`SHAPES` by the seed."""
    rng = np.random.default_rng(seed)
    w, h = size if size is not None else SHAPES[seed % len(SHAPES)]
    horizon = int(h * rng.uniform(0.3, 0.7))
    sky_top, sky_bottom, ground = (rng.integers(0, 256, 3) for _ in range(3))
    t = np.linspace(0.0, 1.0, max(horizon, 1))[:, None, None]
    sky = (1 - t) * sky_top + t * sky_bottom
    arr = np.empty((h, w, 3), dtype=np.float64)
    arr[:horizon] = sky
    arr[horizon:] = ground
    arr += rng.normal(0, rng.uniform(2, 30), size=arr.shape)  # texture
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 14))):
        x0 = int(rng.integers(0, w))
        bw = int(rng.integers(w // 30 + 1, w // 4 + 2))
        bh = int(rng.integers(h // 10 + 1, h // 2 + 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.6:
            draw.rectangle([x0, horizon - bh, x0 + bw, horizon + 2], fill=colour)
        else:
            y0 = int(rng.integers(0, h))
            draw.ellipse([x0, y0, x0 + bw, y0 + bh], fill=colour)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.5))))
    return img


def encode(img: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}) | params)
    return buf.getvalue()


def photo_bytes(seed: int, size: tuple[int, int] | None = None, fmt: str = "JPEG") -> bytes:
    return encode(photo(seed, size), fmt)


def gps_exif(lat: float, lon: float) -> Image.Exif:
    """An EXIF block holding a GPS position (to 1e-7 degrees), for ``encode(img, exif=...)``:
    geotagged photos for the indexer's and the evaluation's tests and benchmarks."""
    from fractions import Fraction

    from PIL import ExifTags, TiffImagePlugin

    def degrees(value: float) -> tuple[TiffImagePlugin.IFDRational, ...]:
        f = Fraction(round(abs(value) * 10**7), 10**7)
        zero = TiffImagePlugin.IFDRational(0, 1)
        return TiffImagePlugin.IFDRational(f.numerator, f.denominator), zero, zero

    exif = Image.Exif()
    exif[ExifTags.IFD.GPSInfo] = {
        1: "S" if lat < 0 else "N",
        2: degrees(lat),
        3: "W" if lon < 0 else "E",
        4: degrees(lon),
    }
    return exif
