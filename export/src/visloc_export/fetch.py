"""``visloc-export fetch``: download the upstream model files, resumable and verified.

The files are large (the background collection is ~5.5 GB) and the links slow, so a fetch
resumes a partial download with an HTTP Range request, starts again from zero when the server
ignores Range, retries transient failures with backoff, checks the size against
Content-Length, and renames a file into place only when complete. ``DIR/SOURCES.json`` records
where each file came from, its size and sha256: a later fetch verifies what is there and
downloads only what is missing or wrong. Every failure is one :class:`FetchError` line that
names the URL and what to do about it.

HTTP is urllib3's (``visloc-export[fetch]``): connection pooling, redirects and connect/status
retries with backoff; resuming a body cut off mid-stream is done here.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from . import __version__

UPSTREAM_SITE = "https://mever.iti.gr/visloc/"
UPSTREAM_REPO_DATA = "https://github.com/mever-team/visloc-estimation/raw/HEAD/data/"

# name -> where upstream publishes it (src/modules.py model_urls, its README, its data/ folder).
UPSTREAM_FILES: dict[str, str] = {
    "efficientnet_backbone.pt": UPSTREAM_SITE + "efficientnet_backbone.pt",
    "mvmf_head.pt": UPSTREAM_SITE + "mvmf_head.pt",
    "rrm_head.pt": UPSTREAM_SITE + "rrm_head.pt",
    "back_coll_features.hdf5": UPSTREAM_SITE + "back_coll_features.hdf5",
    "cells_assignments.pkl": UPSTREAM_REPO_DATA + "cells_assignments.pkl",
    "metadata_im2gps.pkl": UPSTREAM_REPO_DATA + "metadata_im2gps.pkl",
    "metadata_im2gps3k.pkl": UPSTREAM_REPO_DATA + "metadata_im2gps3k.pkl",
    "metadata_yfcc4k.pkl": UPSTREAM_REPO_DATA + "metadata_yfcc4k.pkl",
    "metadata_yfcc25k.pkl": UPSTREAM_REPO_DATA + "metadata_yfcc25k.pkl",
}
SOURCES = "SOURCES.json"
PART_SUFFIX = ".part"
DISK_MARGIN = 64 * 1024 * 1024  # leave this much free after a download
CHUNK = 1024 * 1024
RETRYABLE_STATUS = (429, 500, 502, 503, 504)


class FetchError(RuntimeError):
    """One line: the URL, what went wrong, and what to do."""


def _remedy(name: str, out: Path) -> str:
    return f"use --base-url MIRROR, or place the file at {out / name} by hand and run fetch again"


@dataclass
class Fetcher:
    """Downloads into ``out``; ``retries`` and ``backoff`` (seconds, doubling) per file."""

    out: Path
    base_url: str | None = None
    retries: int = 4
    backoff: float = 1.0
    timeout: float = 30.0
    progress: bool = True
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        import urllib3  # the optional extra; imported here so the error below is the message

        self._urllib3 = urllib3
        retry = urllib3.Retry(
            total=self.retries,
            connect=min(2, self.retries),  # offline fails in about a second, not a minute
            read=self.retries,  # (waiting for headers; a body cut off mid-stream is resumed below)
            status=self.retries,
            backoff_factor=self.backoff / 2,  # urllib3 sleeps factor * 2**(n-1): backoff, 2*backoff...
            status_forcelist=RETRYABLE_STATUS,
            allowed_methods=frozenset({"GET"}),
            raise_on_status=False,
            respect_retry_after_header=True,
        )
        self.http = urllib3.PoolManager(
            retries=retry,
            timeout=urllib3.Timeout(connect=min(self.timeout, 10.0), read=self.timeout),
            headers={"User-Agent": f"visloc-export/{__version__}"},
        )
        self.out = Path(self.out)

    # ------------------------------------------------------------------ public

    def url_of(self, name: str) -> str:
        if self.base_url:
            return self.base_url.rstrip("/") + "/" + name
        return UPSTREAM_FILES[name]

    def fetch(self, names: Iterable[str]) -> dict[str, dict]:
        """Fetch ``names`` (verified or downloaded); returns their SOURCES.json records."""
        self.out.mkdir(parents=True, exist_ok=True)
        sources = self._read_sources()
        done = {}
        for name in names:
            record = sources.get(name)
            if self._present_and_good(name, record):
                self._log(f"{name}: present, {record['bytes']} bytes, sha256 verified")
                done[name] = record
                continue
            if record is None and (self.out / name).is_file():
                record = self._adopt(name)  # placed by hand: record it, nothing to download
                self._log(f"{name}: found in {self.out} (placed by hand), recorded its sha256")
            else:
                record = self._download(name, expected_sha=record["sha256"] if record else None)
            sources[name] = done[name] = record
            self._write_sources(sources)
        return done

    # ------------------------------------------------------------------ SOURCES.json

    def _read_sources(self) -> dict[str, dict]:
        path = self.out / SOURCES
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
            files = data["files"]
            if not isinstance(files, dict):
                raise TypeError("files is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            raise FetchError(f"{path} is not a valid {SOURCES} ({exc}): move it away and run fetch again") from exc
        return files

    def _write_sources(self, sources: dict[str, dict]) -> None:
        path = self.out / SOURCES
        tmp = path.with_name(SOURCES + ".tmp")
        tmp.write_text(json.dumps({"tool": f"visloc-export {__version__}", "files": sources}, indent=2) + "\n")
        os.replace(tmp, path)

    def _present_and_good(self, name: str, record: dict | None) -> bool:
        """The file exists and matches its record; a file that does not is removed."""
        path = self.out / name
        if record is None or not path.is_file():
            return False
        if path.stat().st_size == record.get("bytes") and _sha256(path) == record.get("sha256"):
            return True
        self._log(f"{name}: differs from {SOURCES} (size or sha256); downloading it again")
        path.unlink()
        return False

    def _adopt(self, name: str) -> dict:
        path = self.out / name
        return _record("placed by hand", path.stat().st_size, _sha256(path))

    # ------------------------------------------------------------------ download

    def _download(self, name: str, expected_sha: str | None) -> dict:
        url = self.url_of(name)
        final = self.out / name
        part = self.out / (name + PART_SUFFIX)
        sizes: list[int] = []  # the full size the server declared, first time it did
        attempt = 0
        while True:
            offset = part.stat().st_size if part.exists() else 0
            try:
                self._get_into(url, name, part, offset, sizes)
                break
            except _Transient as exc:
                attempt += 1
                if attempt > self.retries:
                    raise FetchError(
                        f"{url}: {exc} (gave up after {self.retries} retries; run fetch again to resume "
                        f"from byte {part.stat().st_size if part.exists() else 0}): {_remedy(name, self.out)}"
                    ) from None
                delay = self.backoff * 2 ** (attempt - 1)
                self._log(f"{name}: {exc}; retry {attempt}/{self.retries} in {delay:g} s (resuming)")
                self.sleep(delay)
        size = part.stat().st_size
        total = sizes[0] if sizes else None
        if total is not None and size != total:
            part.unlink()
            raise FetchError(
                f"{url}: size mismatch, got {size} bytes, Content-Length said {total}: {_remedy(name, self.out)}"
            )
        digest = _sha256(part)
        if expected_sha is not None and digest != expected_sha:
            part.unlink()
            raise FetchError(
                f"{url}: checksum mismatch, sha256 {digest[:16]}... differs from {expected_sha[:16]}... "
                f"recorded in {self.out / SOURCES}: the server has another file; check the mirror, or "
                f"remove the entry from {SOURCES} to accept it"
            )
        os.replace(part, final)
        self._log(f"{name}: {size} bytes from {url}, sha256 {digest[:16]}...")
        return _record(url, size, digest)

    def _get_into(self, url: str, name: str, part: Path, offset: int, sizes: list[int]) -> None:
        """One GET appended to ``part`` from ``offset``; the first declared full size goes in ``sizes``."""
        u3 = self._urllib3
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            resp = self.http.request("GET", url, headers=headers, preload_content=False, redirect=True)
        except u3.exceptions.MaxRetryError as exc:
            reason = exc.reason
            if isinstance(reason, u3.exceptions.ResponseError):
                raise FetchError(f"{url}: {reason} (gave up after retries): {_remedy(name, self.out)}") from None
            raise FetchError(f"{url}: cannot connect ({_reason(reason)}): {_remedy(name, self.out)}") from None
        except u3.exceptions.HTTPError as exc:
            raise FetchError(f"{url}: {_reason(exc)}: {_remedy(name, self.out)}") from None
        total = sizes[0] if sizes else None
        try:
            status = resp.status
            if status == 416 and offset:
                declared = _content_range_total(resp.headers.get("Content-Range", ""))
                if declared is not None and declared == offset and total in (None, declared):
                    sizes[:] = [declared]
                    return  # the part file is already complete
                if total is not None and declared is not None and declared != total:
                    part.unlink()
                    raise FetchError(
                        f"{url}: size mismatch, the server first said {total} bytes, now {declared}: "
                        f"{_remedy(name, self.out)}"
                    )
                self._log(f"{name}: server refused to resume at byte {offset}; starting again from zero")
                part.unlink()
                raise _Transient("range not satisfiable")
            if status == 200 and offset:
                self._log(f"{name}: server ignores Range; starting again from zero")
                offset = 0
            elif status == 206 and offset:
                start = _content_range_start(resp.headers.get("Content-Range", ""))
                if start != offset:
                    self._log(f"{name}: server resumed at {start}, not {offset}; starting again from zero")
                    part.unlink()
                    raise _Transient("bad Content-Range")
            elif status != 200:
                if status in RETRYABLE_STATUS:
                    raise FetchError(f"{url}: HTTP {status} (gave up after retries): {_remedy(name, self.out)}")
                raise FetchError(f"{url}: HTTP {status} {resp.reason or ''}".rstrip() + f": {_remedy(name, self.out)}")
            length = resp.headers.get("Content-Length")
            remaining = int(length) if length and length.isdigit() else None
            full = _content_range_total(resp.headers.get("Content-Range", "")) if status == 206 else remaining
            if total is not None and full is not None and full != total:
                part.unlink(missing_ok=True)
                raise FetchError(
                    f"{url}: size mismatch, the server first said {total} bytes, now {full}: {_remedy(name, self.out)}"
                )
            if total is None and full is not None:
                sizes[:] = [total := full]
            if remaining is not None:
                self._check_space(url, name, remaining)
            self._stream(resp, name, part, offset, total)
        finally:
            resp.release_conn()

    def _stream(self, resp, name: str, part: Path, offset: int, total: int | None) -> None:
        u3 = self._urllib3
        mode = "ab" if offset else "wb"
        bar = tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=name,
            file=sys.stderr,
            disable=not self.progress,
            mininterval=0.5,
            dynamic_ncols=True,
        )
        got = offset
        with bar, open(part, mode) as f:
            try:
                for block in resp.stream(CHUNK, decode_content=False):
                    f.write(block)
                    got += len(block)
                    bar.update(len(block))
            except (u3.exceptions.ProtocolError, u3.exceptions.ReadTimeoutError, ConnectionError) as exc:
                raise _Transient(f"connection lost at byte {got} ({_reason(exc)})") from None

    def _check_space(self, url: str, name: str, needed: int) -> None:
        free = shutil.disk_usage(self.out).free
        if needed + DISK_MARGIN > free:
            raise FetchError(
                f"{url}: needs {_gb(needed)} but {self.out} has {_gb(free)} free: free some space "
                f"or choose another --out"
            )

    def _log(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)


class _Transient(Exception):
    """A download attempt ended early; the caller waits and resumes."""


def _record(url: str, size: int, digest: str) -> dict:
    return {
        "url": url,
        "bytes": size,
        "sha256": digest,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


_RANGE = re.compile(r"bytes\s+(\d+|\*)(?:-(\d+))?/(\d+|\*)")


def _content_range_start(value: str) -> int | None:
    m = _RANGE.match(value.strip())
    return int(m.group(1)) if m and m.group(1) != "*" else None


def _content_range_total(value: str) -> int | None:
    m = _RANGE.match(value.strip())
    return int(m.group(3)) if m and m.group(3) != "*" else None


def _reason(exc: BaseException | None) -> str:
    """The innermost readable cause, on one line."""
    text = str(exc) if exc is not None else "unknown error"
    for marker in ("Connection refused", "Name or service not known", "Temporary failure in name resolution",
                   "timed out", "Network is unreachable", "IncompleteRead"):  # fmt: skip
        if marker in text:
            return marker
    return " ".join(text.split())[:200]


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def resolve_names(only: list[str] | None) -> list[str]:
    """``--only`` names checked against the known files (all of them by default)."""
    if not only:
        return list(UPSTREAM_FILES)
    unknown = [n for n in only if n not in UPSTREAM_FILES]
    if unknown:
        raise FetchError(f"unknown file(s) {', '.join(unknown)}; known: {', '.join(UPSTREAM_FILES)}")
    return list(dict.fromkeys(only))
