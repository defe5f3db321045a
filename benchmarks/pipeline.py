"""The pipeline's caching, as ratios measured in one run on the same data.

1. A full run of ``ldmflow pipeline`` (every stage computes) on a small config.
2. The same run again: every stage is skipped by its record (the baseline's cost is the
   listing, Prefect's flow bookkeeping and reading the records).
3. One changed field of ``train:`` (the sampler's guidance): shard, autoencoder and
   precompute are skipped, training and what follows it rerun.

Each run is the CLI in a fresh process, as a user or a scheduled deployment runs it, with
its own state folder. Usage: python benchmarks/pipeline.py [--train-steps 100]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """\
shard: {{resolution: 16, shard_size: 100, limit: 400}}
autoencoder: {{steps: 60, batch_size: 32, ray_train: {{workers: 2, checkpoint_every: 60, log_every: 20}}, scale_samples: 128,
              model_name: bench-autoencoder, experiment: bench-pipeline}}
precompute: {{actors: 1}}
train: {{steps: {steps}, batch_size: 32, ray_train: {{workers: 2, checkpoint_every: {steps}, log_every: 20}}, sample_steps: 10,
        guidance: {guidance}, experiment: bench-pipeline, model_name: bench-model}}
evaluate: {{num_samples: 100, reference_samples: 200, steps: 10}}
pipeline: {{name: bench}}
"""


def run(config: Path, env: dict) -> tuple[float, list[str]]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "ldmflow.flows.cli", "pipeline", "--config", str(config), "--no-progress"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    ran = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ") and " ran in " in line]
    return seconds, ran


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=100)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ldmflow-bench-pipeline-"))
    env = {**os.environ, "LDMFLOW_HOME": str(work / "state"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    config = work / "pipeline.yaml"
    config.write_text(CONFIG.format(steps=args.train_steps, guidance=3.0))
    full, ran_full = run(config, env)
    cached, ran_cached = run(config, env)
    config.write_text(CONFIG.format(steps=args.train_steps, guidance=2.0))
    changed, ran_changed = run(config, env)
    print(f"CPUs {os.cpu_count()}; 400 digits at 16 px, {args.train_steps} training steps on 2 workers")
    print(f"  full run          {full:7.1f} s  ran: {', '.join(ran_full)}")
    print(f"  unchanged rerun   {cached:7.1f} s  ran: {', '.join(ran_cached) or 'nothing'}  -> {cached / full:.3f}x")
    print(f"  train: changed    {changed:7.1f} s  ran: {', '.join(ran_changed)}  -> {changed / full:.3f}x")


if __name__ == "__main__":
    main()
