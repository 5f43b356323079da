"""The web app's log: one line per request on stderr, everything from the client escaped.

Paths, Host headers and exception texts can carry control characters (ANSI escapes, NUL,
backspace, CR/LF) that would rewrite or forge lines on a terminal or in a log pipeline; they
are written as ``\\xNN``. Never bodies, never image bytes, never file names.
"""

from __future__ import annotations

import sys

# C0 controls, DEL and C1 controls (which some terminals also obey), and the backslash itself
# so that an escaped line cannot be mistaken for an escape the client sent.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES[ord("\\")] = "\\\\"


def escape(text: str) -> str:
    """``text`` with every control character as ``\\xNN``."""
    return text.translate(_ESCAPES)


def log(*fields: object) -> None:
    """One log line: ``visloc-web`` and the fields, each escaped."""
    sys.stderr.write(" ".join(["visloc-web", *(escape(str(f)) for f in fields)]) + "\n")
    sys.stderr.flush()
