"""Progress lines: a count with its rate and ETA (sampling, evaluation, precompute, shards),
and the training line read from the run's MLflow metrics while the workers log them."""

import io
import threading
import time

from ldmflow.console import Progress
from ldmflow.registry import tracking
from ldmflow.training.progress import TrainingProgress
from tests import helpers


def test_progress_follows_the_runs_metrics(monkeypatch):
    from mlflow.entities import Metric

    monkeypatch.setenv("LDMFLOW_PROGRESS_SECONDS", "0")  # a plain line at every change
    client = tracking.client()
    run_id = client.create_run(tracking.experiment_id("progress")).info.run_id
    out = io.StringIO()  # not a terminal: plain lines

    def shown(text: str) -> bool:
        return text in out.getvalue()

    def worker():  # what rank 0 logs: loss every 10 steps, a checkpoint at 20, a restart
        helpers.wait_until(lambda: shown("train: starting the workers"), 30, "the line before the first step")
        for step in (10, 20, 30):
            now = int(time.time() * 1000)
            metrics = [Metric("loss", 1.0 / step, now, step)]
            if step == 20:
                metrics.append(Metric("checkpoint", 20, now, step))
            client.log_batch(run_id, metrics=metrics)
            helpers.wait_until(lambda: shown(f"train: step {step}/100"), 30, f"the line of step {step}")
        client.log_batch(run_id, metrics=[Metric("resumed_from_step", 20, int(time.time() * 1000), 20)])
        helpers.wait_until(lambda: shown("resumed from step 20"), 30, "the restart on the line")

    with TrainingProgress(run_id, 100, "train", poll_seconds=0.1, stream=out):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train: starting the workers")
    assert any(line.startswith("train: step 10/100  loss 0.1") for line in lines), lines
    last = lines[-1]
    assert last.startswith("train: step 30/100  loss 0.03333") and "checkpoint at step 20" in last, lines
    assert "resumed from step 20" in last and " steps/s  ETA " in last, lines


def test_progress_is_off_when_asked():
    out = io.StringIO()
    with TrainingProgress("no-such-run", 10, "train", enabled=False, poll_seconds=0.01, stream=out):
        time.sleep(0.1)
    assert out.getvalue() == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_first_and_a_last_plain_line_and_one_per_period_between(monkeypatch):
    monkeypatch.setenv("LDMFLOW_PROGRESS_SECONDS", "3600")
    out = io.StringIO()
    with Progress("sample", 50, "step", stream=out) as bar:
        for _ in range(50):
            bar.advance()
    first, last = out.getvalue().splitlines()
    assert first == "sample: 0/50 steps"
    assert last.startswith("sample: 50/50 steps  ") and " steps/s  in 0m0" in last, last
    assert "\r" not in out.getvalue()

    monkeypatch.setenv("LDMFLOW_PROGRESS_SECONDS", "0.05")
    out = io.StringIO()
    with Progress("evaluate", 4, "image", stream=out) as bar:
        for _ in range(4):
            time.sleep(0.06)
            bar.advance()
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == [f"evaluate: {i}/4 images" for i in range(5)], lines
    assert "ETA" in lines[2] and "in 0m00s" in lines[-1]


def test_a_terminal_gets_one_line_redrawn_in_place():
    out = Terminal()
    with Progress("latent shards", 3, "shard", stream=out) as bar:
        for _ in range(3):
            time.sleep(0.25)  # longer than the redraw interval: every step is drawn
            bar.advance()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert text.count("\r") == 4 and "\rlatent shards: 3/3 shards" in text


def test_progress_that_is_off_writes_nothing():
    out = io.StringIO()
    with Progress("sample", 5, "step", enabled=False, stream=out) as bar:
        bar.advance(5)
    assert out.getvalue() == "" and bar.done == 5


NATIVE = "[2026-12-07 16:14:02,710 E 9156 9156] core_worker.cc:2465: Actor with class name: 'MapWorker' ..."
WRITER = f"""
import os, sys, time
from pathlib import Path
from ldmflow import console
console.set_quiet(sys.argv[2] == "quiet")
print("before", file=sys.stderr, flush=True)
with console.native_lines_to(Path(sys.argv[1])):
    os.write(2, b"precompute: 0/4 shards\\n[not one of Ray's] kept\\n")
    os.write(2, {NATIVE[:20]!r}.encode())  # a native line in three writes, as a C++ stream may
    time.sleep(0.2)
    os.write(2, {NATIVE[20:70]!r}.encode())
    os.write(2, {NATIVE[70:]!r}.encode() + b"\\n\\rprecompute: 4/4 shards")
    print("\\ndone [1/1]", file=sys.stderr, flush=True)
print("after", file=sys.stderr, flush=True)
"""


def test_rays_native_lines_leave_a_quiet_stderr_for_a_file_and_everything_else_passes_in_order(tmp_path):
    import subprocess
    import sys

    log = tmp_path / "logs" / "ray-driver.log"
    kept = "before\nprecompute: 0/4 shards\n[not one of Ray's] kept\n\rprecompute: 4/4 shards\ndone [1/1]\nafter\n"
    quiet = subprocess.run([sys.executable, "-c", WRITER, str(log), "quiet"], capture_output=True, timeout=60)
    assert quiet.returncode == 0 and quiet.stderr.decode() == kept, quiet.stderr
    assert log.read_text() == NATIVE + "\n"

    log.unlink()
    verbose = subprocess.run([sys.executable, "-c", WRITER, str(log), "verbose"], capture_output=True, timeout=60)
    assert verbose.stderr.decode() == kept.replace("kept\n", "kept\n" + NATIVE + "\n") and not log.exists()
