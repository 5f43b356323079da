"""Fetching images by URL on the caller's machine (the service never fetches URLs)."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request

from visloc_client import __version__

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
_CHUNK = 64 * 1024


class FetchError(OSError):
    """The URL could not be fetched, or its body is larger than allowed."""


def is_url(value: str) -> bool:
    return urllib.parse.urlsplit(value).scheme.lower() in ("http", "https")


def fetch_url(url: str, *, max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = 30.0) -> bytes:
    """GET ``url`` (http/https only) and return the body, refusing more than ``max_bytes``.

    The limit is checked against Content-Length up front and enforced while reading, so a
    server that lies about (or omits) the length cannot make us buffer more than the limit.
    """
    if not is_url(url):
        raise FetchError(f"not an http(s) URL: {url}")
    request = urllib.request.Request(url, headers={"User-Agent": f"visloc-client/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise FetchError(f"{url}: body is {declared} bytes, more than the limit of {max_bytes}")
            chunks, size = [], 0
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError(f"{url}: body exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as err:
        raise FetchError(f"{url}: HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise FetchError(f"{url}: {err.reason}") from err
    except TimeoutError as err:
        raise FetchError(f"{url}: timed out after {timeout:g} s") from err
