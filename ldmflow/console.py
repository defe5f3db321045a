"""What reaches the terminal: how much of the libraries' own output, and progress lines.

The command line is quiet unless ``-v`` (:func:`ldmflow.flows.runtime.configure` says so):
Ray's worker output and its warnings, Prefect's and MLflow's log lines stay out of the
terminal (Ray's still go to its log folder and dashboard). Used as a library (a test, a
notebook, the flow run a Prefect worker starts) nothing is hidden.

Every long step shows a progress line on stderr (:class:`Progress`, and
:class:`~ldmflow.training.progress.TrainingProgress` for training): on a terminal one line
redrawn in place; in a log (CI, a Prefect worker) a plain line every
``LDMFLOW_PROGRESS_SECONDS`` (default 30) and one at the end.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import TextIO

ENV_PLAIN_SECONDS = "LDMFLOW_PROGRESS_SECONDS"
REDRAW_SECONDS = 0.2  # a terminal's line is redrawn at most this often

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def quiet() -> bool:
    return _quiet


def duration(seconds: float) -> str:
    """``1m05s``, ``2h03m``."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class StatusLine:
    """Where a progress line goes: redrawn in place on a terminal (at most every
    ``REDRAW_SECONDS``), else written as a plain line every ``LDMFLOW_PROGRESS_SECONDS``."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.every = REDRAW_SECONDS if self.interactive else float(os.environ.get(ENV_PLAIN_SECONDS, "30"))
        self._shown, self._last = "", -math.inf

    def show(self, text: str, *, now: bool = False) -> None:
        """Show ``text`` if the last line is old enough (``now``: regardless)."""
        clock = time.monotonic()
        if text == self._shown or not (now or clock - self._last >= self.every):
            return
        if self.interactive:
            self.stream.write("\r" + text.ljust(len(self._shown)))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._shown, self._last = text, clock

    def close(self) -> None:
        if self.interactive and self._shown:
            self.stream.write("\n")
            self.stream.flush()
        self._shown = ""


class Progress:
    """A count towards a total, with its rate and the time left::

        with Progress("sample", total=1000, unit="step") as bar:
            for ...:
                bar.advance()

    shows ``sample: 420/1000 steps  12.3 steps/s  ETA 0m47s`` (nothing when not ``enabled``)."""

    def __init__(self, label: str, total: int, unit: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.done = 0
        self._line = StatusLine(stream) if enabled else None
        self._started = time.monotonic()

    def __enter__(self) -> Progress:
        self._started = time.monotonic()
        if self._line:
            self._line.show(self.text(), now=True)
        return self

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self._line:
            self._line.show(self.text())

    def text(self) -> str:
        elapsed = time.monotonic() - self._started
        parts = [f"{self.label}: {self.done}/{self.total} {self.unit}s"]
        if self.done and elapsed > 0:
            rate = self.done / elapsed
            parts.append(f"{rate:.3g} {self.unit}s/s")
            parts.append(f"ETA {duration((self.total - self.done) / rate)}" if self.done < self.total
                         else f"in {duration(elapsed)}")
        return "  ".join(parts)

    def __exit__(self, *exc) -> None:
        if self._line:
            self._line.show(self.text(), now=True)
            self._line.close()
