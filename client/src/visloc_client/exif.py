"""GPS coordinates from a photo's EXIF (needs the optional ``exif`` extra: Pillow).

The one EXIF GPS reader of the project: ``visloc evaluate`` takes its ground truth from it when
no metadata file is given, and ``visloc-export index`` places photos with it. Pillow reads the
EXIF block without decoding the pixels, so this is cheap next to locating the photo.
"""

from __future__ import annotations

import io
import math
from typing import Any

INSTALL_HINT = "EXIF GPS needs Pillow: pip install 'visloc-client[exif]'"

_GPS_IFD = 0x8825
_LAT_REF, _LAT, _LON_REF, _LON = 1, 2, 3, 4


class GPSError(ValueError):
    """A photo has no usable GPS position; the message says why (for reports)."""


def require_pillow() -> None:
    """Fail before a long run rather than on its first photo."""
    try:
        import PIL  # noqa: F401
    except ImportError as err:
        raise RuntimeError(INSTALL_HINT) from err


def _degrees(value: Any, what: str) -> float:
    """EXIF (degrees, minutes, seconds) rationals -> decimal degrees."""
    try:
        parts = [float(x) for x in value]
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise GPSError(f"EXIF {what} {value!r} is not a list of numbers") from exc
    if not 1 <= len(parts) <= 3 or not all(math.isfinite(p) and p >= 0 for p in parts):
        raise GPSError(f"EXIF {what} {value!r} is not (degrees, minutes, seconds)")
    return sum(p / 60**i for i, p in enumerate(parts))


def _ref(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip("\x00 ").upper()


def check_range(lat: float, lon: float) -> tuple[float, float]:
    """(lat, lon) when finite and within [-90, 90] x [-180, 180], else :class:`GPSError`."""
    if not (math.isfinite(lat) and math.isfinite(lon)):
        raise GPSError(f"coordinates ({lat}, {lon}) are not finite")
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise GPSError(f"coordinates ({lat}, {lon}) are out of range")
    return lat, lon


def gps_from_bytes(data: bytes) -> tuple[float, float]:
    """(lat, lon) in degrees from the EXIF GPS block of an image file's bytes.

    Raises :class:`GPSError` when the bytes are not an image, carry no GPS position, or one
    out of range.
    """
    require_pillow()
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            gps = img.getexif().get_ifd(_GPS_IFD)
    except UnidentifiedImageError as exc:
        raise GPSError("unreadable: not an image in a supported format") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise GPSError(f"unreadable: {exc}") from exc
    if not gps or _LAT not in gps or _LON not in gps:
        raise GPSError("no GPS position in EXIF")
    lat = _degrees(gps[_LAT], "GPSLatitude")
    lon = _degrees(gps[_LON], "GPSLongitude")
    if _ref(gps.get(_LAT_REF)) == "S":
        lat = -lat
    if _ref(gps.get(_LON_REF)) == "W":
        lon = -lon
    return check_range(lat, lon)
