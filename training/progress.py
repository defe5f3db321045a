"""A live progress line for a training run that Ray Train runs elsewhere.

The workers log their metrics to the run's MLflow run (rank 0: ``loss`` every ``log_every``
steps, ``checkpoint`` when a checkpoint is reported, ``resumed_from_step`` after a
restart); the driver reads them every couple of seconds and shows step, loss, steps/s, the
time left and the last checkpoint. On a terminal that is one line redrawn in place; in a log
(CI, a Prefect worker) a plain line every ``LDMFLOW_PROGRESS_SECONDS`` (default 30).
"""

from __future__ import annotations

import threading
import time
from typing import TextIO

from ldmflow.console import StatusLine, duration
from ldmflow.registry import tracking


class TrainingProgress:
    """``with TrainingProgress(run_id, steps, "train"):`` around a blocking ``fit()``."""

    def __init__(self, run_id: str, steps: int, label: str, *, enabled: bool = True, poll_seconds: float = 2.0,
                 stream: TextIO | None = None) -> None:
        self.run_id, self.steps, self.label = run_id, steps, label
        self.enabled = enabled
        self.poll_seconds = poll_seconds
        self.status = StatusLine(stream)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TrainingProgress:
        if self.enabled:
            self._started = time.monotonic()
            self._thread = threading.Thread(target=self._run, name=f"{self.label}-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self.status.close()

    def line(self, state: dict) -> str:
        """``LABEL step S/N  loss L  R steps/s  ETA T  checkpoint C`` from the run's metrics."""
        if "step" not in state:
            return f"{self.label}: starting the workers ({duration(time.monotonic() - self._started)})"
        parts = [f"{self.label}: step {state['step']}/{self.steps}", f"loss {state['loss']:.4g}"]
        rate = state.get("rate")
        if rate:
            parts.append(f"{rate:.2f} steps/s")
            parts.append(f"ETA {duration(max(self.steps - state['step'], 0) / rate)}")
        if "checkpoint" in state:
            parts.append(f"checkpoint at step {state['checkpoint']}")
        if "resumed" in state:
            parts.append(f"resumed from step {state['resumed']}")
        return "  ".join(parts)

    def read(self) -> dict:
        """The run's latest metrics: step and loss, the rate over the recent history, the last
        checkpoint and restart."""
        client = tracking.client()
        state: dict = {}
        losses = client.get_metric_history(self.run_id, "loss")
        if losses:
            last = max(losses, key=lambda m: (m.step, m.timestamp))
            state.update(step=last.step, loss=last.value)
            recent = sorted(losses, key=lambda m: m.timestamp)[-5:]
            if len(recent) > 1 and recent[-1].timestamp > recent[0].timestamp:
                state["rate"] = (recent[-1].step - recent[0].step) / ((recent[-1].timestamp - recent[0].timestamp) / 1000)
        for key, metric in (("checkpoint", "checkpoint"), ("resumed", "resumed_from_step")):
            history = client.get_metric_history(self.run_id, metric)
            if history:
                state[key] = int(max(history, key=lambda m: m.timestamp).value)
        return state

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                text = self.line(self.read())
            except Exception:  # the tracking store hiccuped: the next poll tries again
                continue
            self.status.show(text)
