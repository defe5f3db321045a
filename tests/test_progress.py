"""The training progress line: read from the run's MLflow metrics while the workers log them."""

import io
import threading
import time

from ldmflow.registry import tracking
from ldmflow.training.progress import TrainingProgress


def test_progress_follows_the_runs_metrics(monkeypatch):
    from mlflow.entities import Metric

    monkeypatch.setenv("LDMFLOW_PROGRESS_SECONDS", "0")  # a plain line at every change
    client = tracking.client()
    run_id = client.create_run(tracking.experiment_id("progress")).info.run_id
    out = io.StringIO()  # not a terminal: plain lines

    def worker():  # what rank 0 logs: loss every 10 steps, a checkpoint at 20, a restart
        for step in (10, 20, 30):
            time.sleep(0.3)
            now = int(time.time() * 1000)
            metrics = [Metric("loss", 1.0 / step, now, step)]
            if step == 20:
                metrics.append(Metric("checkpoint", 20, now, step))
            client.log_batch(run_id, metrics=metrics)
        client.log_batch(run_id, metrics=[Metric("resumed_from_step", 20, int(time.time() * 1000), 20)])
        time.sleep(0.5)

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
