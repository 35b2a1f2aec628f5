"""A tiny stderr progress line with rate and ETA, shared by every long-running command.

On a terminal the line is redrawn in place (at most 10 times a second). When stderr is a file or a
pipe (Slurm logs, CI) it prints one line every `interval_s` seconds and a final line, so logs stay short.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """Count work units towards `total`; `update(n)` after each unit, or use as a context manager.

    `enabled=False` silences it completely (for library calls with `progress=False`).
    """

    def __init__(self, total: int | None, desc: str = "", *, stream: TextIO | None = None,
                 enabled: bool = True, interval_s: float = 5.0, unit: str = "it"):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.count = 0
        self.enabled = enabled
        self.interval_s = interval_s
        self._stream = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._start = time.monotonic()
        self._last_draw = -float("inf") if self._tty else self._start
        self._closed = False

    def line(self) -> str:
        """The progress text as it would be printed now (count, percent, rate, elapsed, ETA)."""
        elapsed = time.monotonic() - self._start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            pct = 100.0 * self.count / self.total
            eta = (self.total - self.count) / rate if rate > 0 else float("nan")
            eta_txt = _duration(eta) if eta == eta else "?"
            width = 20
            filled = int(width * min(self.count, self.total) / self.total)
            bar = "#" * filled + "." * (width - filled)
            return (f"{head}[{bar}] {self.count}/{self.total} {pct:5.1f}% "
                    f"{rate:.2f} {self.unit}/s elapsed {_duration(elapsed)} eta {eta_txt}")
        return f"{head}{self.count} {self.unit} {rate:.2f} {self.unit}/s elapsed {_duration(elapsed)}"

    def update(self, n: int = 1) -> None:
        self.count += n
        if not self.enabled or self._closed:
            return
        now = time.monotonic()
        if now - self._last_draw >= (0.1 if self._tty else self.interval_s):
            self._draw(final=False)
            self._last_draw = now

    def _draw(self, final: bool) -> None:
        if self._tty:
            self._stream.write("\r" + self.line() + "\x1b[K" + ("\n" if final else ""))
        else:
            self._stream.write(self.line() + "\n")
        self._stream.flush()

    def close(self) -> None:
        """Print the final line once (also when stderr is not a terminal)."""
        if self.enabled and not self._closed:
            self._draw(final=True)
        self._closed = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
