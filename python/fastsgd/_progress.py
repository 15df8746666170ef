"""Progress display for the command line: a redrawn bar on a terminal, plain lines elsewhere.

A bar redrawn with carriage returns is unreadable in a log file or a CI transcript, so when
the stream is not a terminal the caller's milestones are written as ordinary lines instead.
"""

from __future__ import annotations

import sys
from typing import Optional, TextIO


class Progress:
    """Reports ``done`` out of ``total`` steps on ``stream`` (stderr by default)."""

    def __init__(self, total: int, stream: Optional[TextIO] = None, width: int = 28) -> None:
        self.total = max(int(total), 1)
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        isatty = getattr(self.stream, "isatty", None)
        self.interactive = bool(isatty and isatty())
        self._drawn = 0

    def update(self, done: int, label: str = "", milestone: bool = False) -> None:
        """Redraws the bar on a terminal; elsewhere writes one line, only when ``milestone``."""
        if self.interactive:
            filled = int(self.width * done / self.total)
            line = f"  [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {label}"
            self.stream.write("\r" + line.ljust(self._drawn))
            self._drawn = len(line)
        elif milestone:
            self.stream.write(f"  {done}/{self.total} {label}\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erases the bar (a terminal only), so that the next line starts clean."""
        if self.interactive and self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self.stream.flush()
            self._drawn = 0
