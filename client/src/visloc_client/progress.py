"""A tiny progress bar for stderr (count, rate, ETA) so the client needs no tqdm."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Redraws one line in place on a terminal (at most every ``interval`` s); elsewhere (a
    log file, CI) prints a plain line every ``log_interval`` s so logs stay readable."""

    def __init__(
        self,
        total: int,
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        interval: float = 0.1,
        log_interval: float = 10.0,
        width: int = 30,
    ) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = enabled
        self._tty = self._stream.isatty()
        self._interval = interval if self._tty else log_interval
        self._width = width
        self._start = time.monotonic()
        self._drawn = 0.0

    def update(self, n: int = 1, *, failed: int = 0) -> None:
        self.done += n
        self.failed += failed
        now = time.monotonic()
        if now - self._drawn >= self._interval or self.done >= self.total:
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        frac = self.done / self.total if self.total else 1.0
        filled = int(frac * self._width)
        bar = "#" * filled + "." * (self._width - filled)
        eta = _clock((self.total - self.done) / rate) if rate > 0 else "?"
        text = f"[{bar}] {self.done}/{self.total} {frac * 100:3.0f}% {rate:.1f} img/s"
        text += f" elapsed {_clock(elapsed)} ETA {eta}"
        return text + (f" ({self.failed} failed)" if self.failed else "")

    def _draw(self, now: float) -> None:
        if not self._enabled:
            return
        self._drawn = now
        if self._tty:
            self._stream.write("\r" + self.line(now) + "\x1b[K")
        else:
            self._stream.write(self.line(now) + "\n")
        self._stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        if not self._enabled:
            return
        self._draw(time.monotonic())
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()
