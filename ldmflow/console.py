"""What reaches the terminal: how much of the libraries' own output, and progress lines.

The command line is quiet unless ``-v`` (:func:`ldmflow.flows.runtime.configure` says so):
Ray's worker output and its warnings, Prefect's and MLflow's log lines stay out of the
terminal (Ray's still go to its log folder and dashboard). Used as a library (a test, a
notebook, the flow run a Prefect worker starts) nothing is hidden.

Ray's core worker writes its own log lines straight to the process's stderr, past Python's
logging; where ldmflow knows one comes that says nothing to the user (Ray Data's actors raise
one at every start), :func:`native_lines_to` sends such lines to a file instead.

Every long step shows a progress line on stderr (:class:`Progress`, and
:class:`~ldmflow.training.progress.TrainingProgress` for training): on a terminal one line
redrawn in place; in a log (CI, a Prefect worker) a plain line every
``LDMFLOW_PROGRESS_SECONDS`` (default 30) and one at the end.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import select
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

ENV_PLAIN_SECONDS = "LDMFLOW_PROGRESS_SECONDS"
REDRAW_SECONDS = 0.2  # a terminal's line is redrawn at most this often
# A line of Ray's C++ logging: "[2026-12-07 16:14:02,710 E 9156 9156] core_worker.cc:2465: …"
NATIVE_LINE = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] ")
NATIVE_PREFIX = 64  # a line start held longer than this, not matching, is not one of them

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


@contextlib.contextmanager
def native_lines_to(path: Path) -> Iterator[None]:
    """Quiet: for the block, lines in Ray's C++ format that anything writes to file
    descriptor 2 are appended to ``path``; everything else written to stderr passes through,
    in order. Not quiet: nothing changes.

    Ray's core worker logs at ERROR, straight to the process's stderr, that an actor "has
    constructor arguments in the object store and max_restarts > 0" for every actor Ray Data
    starts, its own arguments among them (ray-project/ray#57733): said to nobody who can act."""
    if not quiet():
        yield
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    stop = threading.Event()
    router = threading.Thread(target=_route, args=(read, terminal, path, stop), name="native-lines", daemon=True)
    router.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # the pipe's last write end closed, unless a child holds a copy
        stop.set()
        router.join(timeout=5)  # it closes the pipe and its copy of the terminal


def _route(read: int, terminal: int, path: Path, stop: threading.Event) -> None:
    """Copy the pipe ``read`` to ``terminal``, each line that opens with :data:`NATIVE_LINE`
    to ``path`` instead, until the pipe is closed, or is idle once ``stop`` is set; then
    close both. The start of a line that opens with ``[`` is held until it can be told. It
    never stops draining the pipe: where ``path`` cannot be written, the lines go through."""
    held, native, at_start = b"", False, True
    log = _open_log(path)
    while True:
        if not select.select([read], [], [], 0.1)[0]:
            if stop.is_set():
                break
            continue
        chunk = os.read(read, 1 << 16)
        if not chunk:
            break
        data, held = held + chunk, b""
        while data:
            end = min((i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0), default=-1)
            piece, data = (data, b"") if end < 0 else (data[: end + 1], data[end + 1 :])
            if at_start:
                if end < 0 and piece.startswith(b"[") and len(piece) < NATIVE_PREFIX:
                    held = piece  # may be the start of one of Ray's lines: wait for more
                    break
                native = log is not None and bool(NATIVE_LINE.match(piece))
            _write_all(log if native else terminal, piece)
            at_start = end >= 0
    _write_all(terminal, held)
    for fd in (read, terminal, log):
        if fd is not None:
            os.close(fd)


def _open_log(path: Path) -> int | None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return None


def _write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd``; what it refuses (a closed reader, a full disk) is dropped."""
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(fd, data):]
