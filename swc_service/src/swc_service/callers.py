"""Named callers: a token file maps bearer tokens to caller names (issue 17).

The caller name labels metrics and logs and keys the per-caller admission limits
(swc_service.admission). File format, one caller token a line::

    # comments and blank lines are ignored
    mapper:3f9c0b2e6d1a4f7e8c5b9a0d2e4f6a8c
    batch-jobs:Zx81...        # a name may have several tokens (rotation)

* ``name:token``, split at the first ``:`` (a token may itself contain ``:``);
* names: 1-63 of ``A-Z a-z 0-9 _ . -``, starting with a letter or digit (they become metric
  labels); ``anonymous`` is reserved for calls when auth is off;
* tokens: at least 16 printable ASCII characters, no whitespace, each used once in the file.

The single shared token (``--auth-token-file`` / ``VISLOC_AUTH_TOKEN``) still works: it is the
caller :data:`SHARED_CALLER` (see :func:`with_shared`).
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path

SHARED_CALLER = "default"
ANONYMOUS = "anonymous"  # every call when auth is off
RESERVED = frozenset({ANONYMOUS})
# The caller of the RPC being served: set by the auth interceptor (swc_service.interceptors) in
# the call's own task, read once by the servicer, which hands it to the data plane explicitly.
# None: not identified (yet, or refused).
current_caller: ContextVar[str | None] = ContextVar("visloc_caller", default=None)
MIN_TOKEN_CHARS = 16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_TOKEN = re.compile(r"[!-~]+")  # printable ASCII, no space


class CallerFileError(ValueError):
    """The token file is malformed; the message names the file and line."""


def parse_callers(text: str, source: str = "<callers>") -> dict[str, str]:
    """Parse the token file's text into {token: caller name}."""
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        name, sep, token = line.partition(":")
        name, token = name.strip(), token.strip()
        if not sep:
            raise CallerFileError(f"{where}: expected 'name:token', found no ':'")
        if not name:
            raise CallerFileError(f"{where}: empty caller name")
        if not _NAME.fullmatch(name):
            raise CallerFileError(f"{where}: caller name {name!r} must be 1-63 of A-Za-z0-9_.- (alnum first)")
        if name in RESERVED:
            raise CallerFileError(f"{where}: caller name {name!r} is reserved")
        if not token:
            raise CallerFileError(f"{where}: empty token for caller {name!r}")
        if not _TOKEN.fullmatch(token):
            raise CallerFileError(f"{where}: the token of {name!r} must be printable ASCII without whitespace")
        if len(token) < MIN_TOKEN_CHARS:
            raise CallerFileError(f"{where}: the token of {name!r} is shorter than {MIN_TOKEN_CHARS} characters")
        if token in out:
            raise CallerFileError(f"{where}: duplicate token (also on line {first_line[token]}, caller {out[token]!r})")
        out[token] = name
        first_line[token] = number
    if not out:
        raise CallerFileError(f"{source}: no callers (expected lines 'name:token')")
    return out


def load_callers(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a token file into {token: caller name}; CallerFileError when it is malformed."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CallerFileError(f"{p}: cannot read the callers file: {exc}") from exc
    return parse_callers(text, str(p))


def with_shared(callers: Mapping[str, str], token: str | None, name: str = SHARED_CALLER) -> dict[str, str]:
    """Add the single shared token as caller ``name`` (no-op for None/empty)."""
    out = dict(callers)
    if not token:
        return out
    if token in out and out[token] != name:
        raise CallerFileError(f"the shared token is also caller {out[token]!r}'s token in the callers file")
    out[token] = name
    return out


def identify(callers: Mapping[str, str], presented: str) -> str | None:
    """The caller whose token is ``presented``, or None. Every token is compared in constant time
    and all of them are compared, so timing reveals neither a token nor which one matched."""
    got = presented.encode()
    found: str | None = None
    for token, name in callers.items():
        if hmac.compare_digest(got, token.encode()):
            found = name
    return found
