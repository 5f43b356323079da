"""A realistic photo mix, generated (nothing is downloaded): what production callers send.

Phone cameras save 12 MP (4032 x 3024) and 8 MP JPEGs at quality 85-95, full of fine detail
(foliage, texture, sensor noise) that makes them large and slow to decode; messengers and the
web pass on 2 MP and 640 x 480 copies; people also send screenshots (PNG) and portrait photos,
often stored landscape with an EXIF orientation tag. Each class here has that size, format
and detail (a smooth scene plus seeded texture and noise), so that decode cost and bytes on
the wire are those of real photos of the kind.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

ORIENTATION = 0x0112  # the EXIF tag
ROTATED_90 = 6  # "rotate 90 CW to view": stored landscape, shown portrait


@dataclass(frozen=True)
class PhotoClass:
    name: str
    width: int
    height: int
    fmt: str  # "JPEG" or "PNG"
    quality: int = 90
    exif_orientation: int = 0  # 0: no tag
    detail: float = 1.0  # texture amplitude (0: smooth)
    share: float = 0.0  # of the production mix (sums to 1)


# The mix production traffic is priced on (docs/capacity.md): mostly phone originals.
MIX = (
    PhotoClass("12mp_jpeg", 4032, 3024, "JPEG", 90, share=0.35),
    PhotoClass("12mp_portrait_exif", 4032, 3024, "JPEG", 90, exif_orientation=ROTATED_90, share=0.15),
    PhotoClass("8mp_jpeg", 3264, 2448, "JPEG", 88, share=0.10),
    PhotoClass("2mp_jpeg", 1920, 1080, "JPEG", 85, share=0.20),
    PhotoClass("640x480_jpeg", 640, 480, "JPEG", 85, share=0.15),
    PhotoClass("screenshot_png", 1170, 2532, "PNG", detail=0.0, share=0.05),
)


def pixels(width: int, height: int, seed: int, detail: float = 1.0) -> np.ndarray:
    """A photo-like uint8 RGB image: a smooth scene (sky, horizon, ground), texture at several
    scales and per-pixel noise, all seeded."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    horizon = 0.45 + 0.1 * np.sin(2 * np.pi * (x * rng.uniform(1, 3) + rng.uniform()))
    sky = y < horizon
    base = np.empty((height, width, 3), dtype=np.float32)
    top, ground = rng.uniform(60, 230, 3), rng.uniform(30, 180, 3)
    for c in range(3):
        base[..., c] = np.where(sky, top[c] * (1 - 0.4 * y), ground[c] * (0.6 + 0.6 * y))
    if detail > 0:
        for cells in (8, 40, 200):  # texture: upsampled random fields at three scales
            field = rng.standard_normal((cells * height // width + 1, cells + 1)).astype(np.float32)
            up = np.asarray(Image.fromarray(field).resize((width, height), Image.BILINEAR), dtype=np.float32)
            base += (detail * 24.0 / np.sqrt(cells / 8)) * up[..., None] * np.where(sky, 0.3, 1.0)[..., None]
        base += detail * rng.normal(0.0, 6.0, (height, width, 1)).astype(np.float32)  # sensor noise
    return np.clip(base, 0, 255).astype(np.uint8)


def screenshot(width: int, height: int, seed: int) -> np.ndarray:
    """A phone screenshot: flat panels, bars and text-like strokes (what PNG compresses well)."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 245, dtype=np.uint8)
    img[: height // 12] = rng.integers(0, 255, 3)
    for row in range(height // 10, height - 40, 48):
        n = int(rng.integers(5, 40))
        for k in range(n):
            x0 = 40 + k * (width - 80) // 40
            img[row : row + 18, x0 : x0 + int(rng.integers(6, 20))] = 20
    img[height // 3 : height // 3 + width // 2, width // 4 : 3 * width // 4] = pixels(width // 2, width // 2, seed)
    return img


def encode(cls: PhotoClass, seed: int = 0) -> bytes:
    """One photo of ``cls`` as its file's bytes."""
    if cls.fmt == "PNG":
        img = Image.fromarray(screenshot(cls.width, cls.height, seed))
    else:
        img = Image.fromarray(pixels(cls.width, cls.height, seed, cls.detail))
    buf = io.BytesIO()
    kwargs: dict = {"quality": cls.quality} if cls.fmt == "JPEG" else {}
    if cls.exif_orientation:
        exif = Image.Exif()
        exif[ORIENTATION] = cls.exif_orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, format=cls.fmt, **kwargs)
    return buf.getvalue()


def mix(seed: int = 0) -> dict[str, bytes]:
    """One photo of every class of :data:`MIX`."""
    return {cls.name: encode(cls, seed + i) for i, cls in enumerate(MIX)}
