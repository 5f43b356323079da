"""Ground truth for evaluation: metadata files and the upstream image-id matching rule."""

from __future__ import annotations

import csv
import math
import os
import re
import struct
from collections.abc import Container
from pathlib import Path
from typing import Any

from visloc_client import safe_pickle

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def match_id(file_name: str, ids: Container[str]) -> str | None:
    """The metadata id an image file belongs to, by the reference's rule, or None.

    The whole name is tried first (upstream YFCC metadata keys keep the ``.jpg``), then the
    name without its extension; then, recursively: split at the first ``_``, take the prefix
    if it is an id, else go on with the remainder. ``abc_123_456.jpg`` tries ``abc_123_456``,
    ``abc``, ``123_456``, ``123``, ``456``.
    """
    name = os.path.basename(file_name)
    if name in ids:
        return name
    key = os.path.splitext(name)[0]
    while True:
        if key in ids:
            return key
        parts = key.split("_", 1)
        if len(parts) < 2:
            return None
        if parts[0] in ids:
            return parts[0]
        key = parts[1]


def list_images(directory: str | os.PathLike[str]) -> list[Path]:
    """Image files directly in ``directory`` (by extension, any case), sorted by name."""
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _coordinate(value: Any, low: float, high: float, what: str, image_id: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metadata for {image_id!r}: {what} {value!r} is not a number") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise ValueError(f"metadata for {image_id!r}: {what} {number} is out of range")
    return number


def _entry(image_id: str, lat: Any, lon: Any) -> tuple[float, float]:
    return _coordinate(lat, -90, 90, "lat", image_id), _coordinate(lon, -180, 180, "lon", image_id)


def load_metadata(path: str | os.PathLike[str]) -> dict[str, tuple[float, float]]:
    """``id -> (lat, lon)`` from an upstream pickle (``.pkl``/``.pickle``: a dict of
    ``{"lat": str, "lon": str}``) or a CSV with an ``id,lat,lon`` header. Invalid entries raise
    ``ValueError`` naming the id: bad ground truth must not become a silent error in the table.
    """
    path = Path(path)
    if path.suffix.lower() in (".pkl", ".pickle"):
        with open(path, "rb") as f:
            data = _MetadataUnpickler(f).load()
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a dict of id -> {{'lat', 'lon'}}")
        out = {}
        for key, value in data.items():
            image_id = str(key)
            if not isinstance(value, dict) or "lat" not in value or "lon" not in value:
                raise ValueError(f"metadata for {image_id!r}: expected {{'lat': ..., 'lon': ...}}")
            out[image_id] = _entry(image_id, value["lat"], value["lon"])
        return out
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"id", "lat", "lon"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: the CSV header needs id,lat,lon (missing {', '.join(sorted(missing))})")
        return {row["id"]: _entry(row["id"], row["lat"], row["lon"]) for row in reader}


# --- numpy scalars without numpy -------------------------------------------------------------
# Upstream's metadata_yfcc4k.pkl stores lat/lon as numpy unicode scalars (np.str_), pickled as
# numpy.core.multiarray.scalar(numpy.dtype("U10"), <utf-32 bytes>). The client does not depend
# on numpy, and the restricted unpickler (rightly) refuses numpy globals, so these two are
# stood in for by inert decoders: a dtype record and a function that decodes the raw bytes of
# a string or number scalar. Nothing else is admitted.

_DTYPE = re.compile(r"^[<>=|]?(U\d+|f4|f8|i4|i8)$")


class _Dtype:
    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(spec, str) or not _DTYPE.match(spec):
            raise safe_pickle.UnsafePickleError(f"refused numpy dtype {spec!r}")
        self.kind = spec.lstrip("<>=|")
        self.byteorder = "<"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = "<" if state[1] in ("|", "=") else state[1]


def _scalar(dtype: Any, data: Any) -> str | float | int:
    if not isinstance(dtype, _Dtype) or not isinstance(data, bytes):
        raise safe_pickle.UnsafePickleError("refused a numpy scalar that is not a plain string or number")
    big = dtype.byteorder == ">"
    if dtype.kind.startswith("U"):
        return data.decode("utf-32-be" if big else "utf-32-le").rstrip("\x00")
    fmt = {"f4": "f", "f8": "d", "i4": "i", "i8": "q"}[dtype.kind]
    return struct.unpack((">" if big else "<") + fmt, data)[0]


_NUMPY = {
    ("numpy", "dtype"): _Dtype,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
}


class _MetadataUnpickler(safe_pickle.RestrictedUnpickler):
    def find_class(self, module: str, name: str) -> Any:
        stand_in = _NUMPY.get((module, name))
        return stand_in if stand_in is not None else super().find_class(module, name)
