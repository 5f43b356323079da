"""The one image preprocessing of the project: decode, RGB, resize short side to 300.

It lives in the client package (Pillow and numpy from its ``preprocess`` extra) so that a
caller can run exactly what the service runs and send the model input instead of the file
(:func:`to_pixels`); the service checks such input with :func:`from_pixels`.

It matches the reference's ``transforms.Resize(300)`` on a PIL image exactly: the shorter
side becomes 300 px, the longer ``int(300 * long / short)`` (truncation), PIL bilinear
(which antialiases), no crop, and an image whose output size equals its input size is
left untouched. Scaling to [0, 1] and mean/std normalisation happen inside the ONNX graph,
so the result here is the resized image as uint8 ``[H, W, 3]``.

Used by the service, the client, the exporter's parity check, the tests and the benchmarks alike.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError

try:  # HEIC/HEIF, what phones save: decoded by pillow-heif where installed (the service has it)
    from pillow_heif import register_heif_opener
except ImportError:  # pragma: no cover - a client without the extra
    HEIF = False
else:
    register_heif_opener()
    HEIF = True
# AVIF: Pillow's own plugin (Pillow >= 11.3).

SHORT_SIDE = 300
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

DEFAULT_MAX_PIXELS = 50_000_000  # decoded source pixels
DEFAULT_MAX_SIDE = 3_000  # preprocessed long side (an aspect ratio of 10:1 at 300 px)


__all__ = [
    "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_SIDE", "MEAN", "SHORT_SIDE", "STD", "ImageError", "Limits", "PreparedImage",
    "Recipe", "as_file", "center_crop", "decode", "from_pixels", "prepare_image", "preprocess", "resize",
    "resized_size", "to_pixels", "to_rgb",
]  # fmt: skip


@dataclass(frozen=True)
class Limits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = DEFAULT_MAX_SIDE


@dataclass(frozen=True)
class PreparedImage:
    """The model input and what the caller may want to know about how it was made."""

    array: np.ndarray  # uint8 [H, W, 3], C-contiguous: what Triton gets
    source_width: int  # of the decoded image
    source_height: int
    source_format: str
    decode_s: float  # seconds spent decoding
    preprocess_s: float  # seconds spent converting, resizing (and cropping)

    @property
    def shape(self) -> tuple[int, int]:
        return self.array.shape[0], self.array.shape[1]


def resized_size(width: int, height: int, short_side: int = SHORT_SIDE) -> tuple[int, int]:
    """(width, height) after the reference resize rule (torchvision ``Resize(int)``)."""
    if width <= 0 or height <= 0:
        raise ImageError(f"image has a zero-sized dimension ({width}x{height})")
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Most modes follow ``Image.convert("RGB")`` as the reference does (alpha dropped, palette
    expanded, CMYK converted). 16- and 32-bit integer greyscale is scaled to 8 bits
    (value >> 8) instead of being clipped at 255, which would turn most of the image white.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        if arr.dtype.itemsize >= 4:  # mode "I" holding 16-bit data (e.g. from PNG)
            arr = np.clip(arr, 0, 65535)
        arr8 = (arr.astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32))
        arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    return img.convert("RGB")


def resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The reference's resize (PIL bilinear with antialiasing) of an RGB image to ``size``, which
    :func:`resized_size` gives from the source's size (a draft decode's image is smaller)."""
    return img if img.size == size else img.resize(size, Image.BILINEAR)


DRAFT_MARGIN = 2  # a draft decode keeps at least twice the model input's size


def draft_size(width: int, height: int) -> tuple[int, int]:
    """The size a JPEG of ``width`` x ``height`` decodes to with ``decode(..., draft=True)``: the
    smallest DCT scale (1/2, 1/4, 1/8) that keeps ``DRAFT_MARGIN`` times the model input on each
    side, as Pillow's draft picks it (sides rounded up)."""
    target_w, target_h = resized_size(width, height)
    scale = next(
        (s for s in (8, 4, 2) if width // s >= DRAFT_MARGIN * target_w and height // s >= DRAFT_MARGIN * target_h), 1
    )
    return -(-width // scale), -(-height // scale)


class _BufferFile(io.RawIOBase):
    """A read-only file over a buffer, without copying it (``io.BytesIO`` copies anything but
    ``bytes``): the service decodes an image where gRPC received it."""

    def __init__(self, data: memoryview) -> None:
        super().__init__()
        self._view = data.cast("B") if data.format != "B" else data
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        chunk = bytes(self._view[self._pos : max(end, self._pos)])
        self._pos += len(chunk)
        return chunk

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        target = memoryview(buffer).cast("B")
        chunk = self.read(len(target))
        target[: len(chunk)] = chunk
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def as_file(data: bytes | memoryview) -> io.IOBase:
    """Image bytes as a file for ``Image.open``, without a copy of them."""
    return io.BytesIO(data) if type(data) is bytes else _BufferFile(memoryview(data))


ORIENTATION = 0x0112  # the EXIF tag
SOURCE_SIZE = "visloc_source_size"  # in Image.info of a draft-decoded image


def decode(
    data: bytes | memoryview, limits: Limits = Limits(), *, exif_transpose: bool = False, draft: bool = False
) -> Image.Image:
    """Decode image bytes to a PIL image of the first frame, refusing bombs before decoding.

    ``exif_transpose`` applies the EXIF orientation tag; off by default because the reference
    does not apply it (and the published numbers were measured without it). ``draft`` lets a
    JPEG decode at a reduced DCT scale (1/2, 1/4, 1/8) that still has at least
    ``DRAFT_MARGIN`` times the model input's size on each side: much cheaper for a large
    photo, and NOT the reference's pixels (see :func:`preprocess`).
    """
    if not data:
        raise ImageError("image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(as_file(data))
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageError(f"image has a zero-sized dimension ({w}x{h})")
            if w * h > limits.max_pixels:
                raise ImageError(f"image has {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}")
            drafted = draft and img.format == "JPEG"
            if drafted:
                target_w, target_h = resized_size(w, h)
                img.draft(img.mode, (DRAFT_MARGIN * target_w, DRAFT_MARGIN * target_h))
            img.load()
            if exif_transpose:
                if img.getexif().get(ORIENTATION) in (5, 6, 7, 8):  # a quarter turn: sides swap
                    w, h = h, w
                img = ImageOps.exif_transpose(img)
            if drafted:  # the size as decoded in full, which the output's size follows
                img.info[SOURCE_SIZE] = (w, h)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image refused as a decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageError("bytes are not an image in a supported format") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"image could not be decoded: {exc}") from exc
    return img


def prepare_image(img: Image.Image, limits: Limits = Limits(), source: tuple[int, int] | None = None) -> np.ndarray:
    """RGB + reference resize of a decoded image, as uint8 ``[H, W, 3]``. ``source``: the
    (width, height) the image had before a draft decode reduced it (the output size follows it)."""
    w, h = source or img.size
    new_w, new_h = resized_size(w, h)
    if max(new_w, new_h) > limits.max_side:
        raise ImageError(
            f"image aspect ratio {max(w, h) / min(w, h):.1f}:1 gives a {new_w}x{new_h} input, "
            f"over the limit of {limits.max_side} px on the long side"
        )
    try:
        rgb = resize(to_rgb(img), (new_w, new_h))
    except (OSError, ValueError) as exc:
        raise ImageError(f"image could not be converted: {exc}") from exc
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def preprocess(
    data: bytes | memoryview,
    limits: Limits = Limits(),
    *,
    exif_transpose: bool = False,
    crop: bool = False,
    draft: bool = False,
) -> PreparedImage:
    """Bytes -> model input (uint8 ``[H, W, 3]``); raises :class:`ImageError` on bad input.

    ``crop`` adds the centre 300 x 300 crop after the exact resize (``center_crop_300``).
    ``draft`` (the service's ``--fast-decode``): a large JPEG is decoded at a reduced DCT
    scale first, then resized exactly as otherwise, to the same shape; the pixels differ
    slightly from the reference's (measured in docs/service.md).
    """
    t0 = time.perf_counter()
    img = decode(data, limits, exif_transpose=exif_transpose, draft=draft)
    t1 = time.perf_counter()
    source = img.info.get(SOURCE_SIZE, img.size)
    array = prepare_image(img, limits, source)
    if crop:
        array = center_crop(array)
    return PreparedImage(array, source[0], source[1], img.format or "unknown", t1 - t0, time.perf_counter() - t1)


def center_crop(array: np.ndarray, size: int = SHORT_SIDE) -> np.ndarray:
    """Centre ``size`` x ``size`` crop of a resized image (the batching-friendly, inexact option).

    Every image then has one shape, so Triton batches freely; the model no longer sees the
    whole photo, so predictions may differ from the reference's. Off by default.
    """
    h, w = array.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(array[top : top + size, left : left + size])


# --------------------------------------------------------------------------- model input on the wire


@dataclass(frozen=True)
class Recipe:
    """How the service makes its model input: what a caller must apply to send the result
    instead of the file (GetInfo tells; a request carrying pixels names the recipe it used)."""

    crop: bool = False  # the centre 300 x 300 crop after the exact resize (center_crop_300)
    exif_transpose: bool = False
    limits: Limits = Limits()

    @property
    def preprocessing(self) -> str:
        return "center_crop_300" if self.crop else "exact"


def to_pixels(image: PreparedImage) -> bytes:
    """The model input as sent on the wire: uint8 RGB, row-major ``H x W x 3``, lossless."""
    return image.array.tobytes()


def from_pixels(
    data: bytes, height: int, width: int, source_width: int, source_height: int, recipe: Recipe
) -> PreparedImage:
    """A caller's model input, checked to be what :func:`preprocess` with ``recipe`` makes of
    a ``source_width`` x ``source_height`` image: its shape (the resize rule, the crop, the
    long-side limit) and its exact byte length. Raises :class:`ImageError` saying what differs."""
    t0 = time.perf_counter()
    limits = recipe.limits
    if min(height, width, source_width, source_height) <= 0:
        raise ImageError(f"pixels {width}x{height} of a {source_width}x{source_height} image: a side is 0")
    if source_width * source_height > limits.max_pixels:
        raise ImageError(
            f"image has {source_width}x{source_height} = {source_width * source_height} pixels, "
            f"over the limit of {limits.max_pixels}"
        )
    resized = resized_size(source_width, source_height)
    if max(resized) > limits.max_side:  # as prepare_image refuses it, before any crop
        raise ImageError(f"a {source_width}x{source_height} image gives a {resized[0]}x{resized[1]} input, "
                         f"over the limit of {limits.max_side} px on the long side")  # fmt: skip
    expected = (SHORT_SIDE, SHORT_SIDE) if recipe.crop else resized
    if (width, height) != expected:
        raise ImageError(
            f"pixels are {width}x{height}, but {recipe.preprocessing} preprocessing of a "
            f"{source_width}x{source_height} image gives {expected[0]}x{expected[1]}"
        )
    if len(data) != height * width * 3:
        raise ImageError(f"pixels hold {len(data)} bytes; {width}x{height} RGB is {height * width * 3}")
    array = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    return PreparedImage(array, source_width, source_height, "pixels", 0.0, time.perf_counter() - t0)
