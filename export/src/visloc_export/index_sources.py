"""The photos to index: every file under a folder (GPS from EXIF) or a ``path,lat,lon`` CSV.

Sources are listed in a fixed order (sorted walk, or the CSV's order) so that an interrupted
run resumes at a position in the same list; the list's digest is kept in the checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

CSV_HEADER = ("path", "lat", "lon")


@dataclass(frozen=True)
class Source:
    """One photo to index; ``latlon`` None means: read it from the photo's EXIF."""

    path: Path
    latlon: tuple[float, float] | None = None


@dataclass(frozen=True)
class Skip:
    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


def walk_photos(root: str | os.PathLike[str], exclude: tuple[Path, ...] = ()) -> list[Source]:
    """Every regular file under ``root``, recursively, in sorted order.

    All files are tried (a JPEG without an extension is still a photo); what is not an image
    ends up in the report as unreadable, never silently dropped.
    """
    top = Path(root)
    if not top.is_dir():
        raise NotADirectoryError(f"--photos: not a directory: {top}")
    excluded = {p.resolve() for p in exclude}
    out: list[Source] = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if (Path(dirpath) / d).resolve() not in excluded)
        out += [Source(Path(dirpath) / f) for f in sorted(filenames) if (Path(dirpath) / f).is_file()]
    return out


def _coordinate(text: str, low: float, high: float) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and low <= value <= high else None


def read_list(path: str | os.PathLike[str]) -> tuple[list[Source], list[Skip]]:
    """Sources of a CSV with the header ``path,lat,lon`` (relative paths: from the CSV's folder).

    Rows with a missing path or coordinates that are not numbers in range are returned as
    skips with the reason; a wrong header raises ``ValueError``.
    """
    csv_path = Path(path)
    base = csv_path.parent
    sources: list[Source] = []
    skipped: list[Skip] = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip().lower() for h in header) != CSV_HEADER:
            raise ValueError(f"{csv_path}: the first line must be the header path,lat,lon, got {header!r}")
        for line, row in enumerate(reader, start=2):
            if not row or not any(cell.strip() for cell in row):
                continue  # blank line
            if len(row) != 3 or not row[0].strip():
                skipped.append(Skip(f"{csv_path}:{line}", f"expected path,lat,lon, got {row!r}"))
                continue
            photo = Path(row[0].strip())
            photo = photo if photo.is_absolute() else base / photo
            lat, lon = _coordinate(row[1], -90, 90), _coordinate(row[2], -180, 180)
            if lat is None or lon is None:
                skipped.append(Skip(str(photo), f"coordinates ({row[1]!r}, {row[2]!r}) are not numbers in range"))
                continue
            sources.append(Source(photo, (lat, lon)))
    return sources, skipped


def digest(sources: list[Source]) -> str:
    """sha256 over the ordered list: a checkpoint only resumes the run it was made for."""
    h = hashlib.sha256()
    for s in sources:
        h.update(f"{s.path}\t{s.latlon!r}\n".encode())
    return h.hexdigest()
