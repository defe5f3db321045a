"""Diffusion training throughput, as ratios measured in one run on the same model and data.

1. Overhead: ldmflow's training step (Ray Train worker, streamed latent shards, checkpoints,
   MLflow logging, EMA) vs a bare PyTorch loop on the same UNet, batch and latents held in
   memory (both fp32 on CPU; the bare loop at 1 thread like a Ray worker with 1 CPU, and at
   the machine's thread count).
2. Scaling: ldmflow with 1 vs 2 Ray Train workers (latents/s over all workers), DDP and
   FSDP, and its loader in the training process (0 loader workers) vs one loader worker
   process per rank; the share of step time spent waiting for data (``data_wait_fraction``)
   for each.
3. Precompute's payoff: a bare loop training from precomputed latents vs one that encodes
   each image batch with the autoencoder on the fly.

ldmflow's rates are its own ``latents_per_s`` metric (MLflow), averaged after the first
logging window, so start-up is excluded as it is for the bare loops.
Usage: python benchmarks/train.py [--steps 150] [--batch-size 64] [--runs 1,0,ddp 1,1,ddp 2,1,ddp 2,1,fsdp]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import training_config  # noqa: E402 - after the checkout is on the path
os.environ.setdefault("LDMFLOW_HOME", tempfile.mkdtemp(prefix="ldmflow-bench-"))

from ldmflow.flows import runtime  # noqa: E402

runtime.configure()
runtime.prefect_api()  # the local API the CLI starts and keeps, not an ephemeral server per run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--runs", nargs="+", default=["1,0,ddp", "1,1,ddp", "2,1,ddp", "2,1,fsdp"],
                        help="ldmflow runs as WORKERS,LOADER_WORKERS,PARALLEL")
    args = parser.parse_args()

    import numpy as np
    import torch

    from ldmflow.data import cluster, image_shards, latent_shards, shard_stream
    from ldmflow.data.precompute import PrecomputeConfig, precompute
    from ldmflow.data.sharding import ShardConfig
    from ldmflow.flows import shard as shard_flow
    from ldmflow.model import autoencoders, schedules, unets
    from ldmflow.registry import tracking
    from ldmflow.training import bare_loop
    from ldmflow.training.stage_configs import DiffusionConfig
    from ldmflow.training.train import train

    work = Path(tempfile.mkdtemp(prefix="ldmflow-bench-train-"))
    images = str(work / "images")
    shard_flow.run("builtin:digits", images, ShardConfig(resolution=32, shard_size=250), progress=False)
    torch.manual_seed(0)
    vae = autoencoders.build("tiny", 32).eval()
    folder = work / "autoencoder"
    info = autoencoders.save(vae, folder, scale_factor=1.0, resolution=32, config={}, lineage={})
    cluster.ensure_ray()
    latent_dir = str(work / "latents")
    precompute(images, latent_dir, folder, latent_shards.AutoencoderRef(str(folder), info.weights_sha256, 1.0),
               PrecomputeConfig(), progress=False)

    config = training_config(DiffusionConfig, steps=args.steps, batch_size=args.batch_size, log_every=25, checkpoint_every=args.steps,
                             sample_steps=2, experiment="bench")
    scheduler = schedules.training_scheduler(config.noise)
    stream = shard_stream.ShardStream(image_shards.shard_urls(images), shuffle_buffer=0)
    image_samples = list(stream)
    image_batches, latent_batches = [], []
    for start in range(0, len(image_samples) - args.batch_size + 1, args.batch_size):
        chunk = image_samples[start : start + args.batch_size]
        x = torch.from_numpy(np.stack([s.image for s in chunk]))
        labels = torch.tensor([s.label for s in chunk])
        image_batches.append((x, labels))
        with torch.no_grad():
            latent_batches.append((vae.encode(x).latent_dist.sample(), labels))

    def fresh_unet():
        torch.manual_seed(0)
        return unets.build("tiny", "class", (4, 8, 8), 10)

    threads = torch.get_num_threads()
    rows = {}
    torch.set_num_threads(1)
    rows["bare loop, 1 thread"] = bare_loop.latents_per_second(fresh_unet(), scheduler, config, latent_batches,
                                                               args.steps)
    rows["bare loop, encoding images on the fly, 1 thread"] = bare_loop.latents_per_second(
        fresh_unet(), scheduler, config, image_batches, args.steps, encode=lambda x: vae.encode(x).latent_dist.sample())
    torch.set_num_threads(threads)
    rows[f"bare loop, {threads} threads"] = bare_loop.latents_per_second(fresh_unet(), scheduler, config,
                                                                         latent_batches, args.steps)

    waits = {}
    for run in args.runs:
        workers, loader_workers, parallel = int(run.split(",")[0]), int(run.split(",")[1]), run.split(",")[2]
        # Each run in a checkpoint folder of its own: `parallel` is an execution field, so an FSDP run
        # would otherwise resume from the finished DDP run's last checkpoint.
        run_config = dataclasses.replace(config, parallel=parallel, ray_train=dataclasses.replace(
            config.ray_train, workers=workers, loader_workers=loader_workers))
        trained = train(latent_dir, run_config, storage_path=str(work / "ray" / run), progress=False)

        def after_first_window(metric: str) -> float:
            history = sorted(tracking.client().get_metric_history(trained.run_id, metric), key=lambda m: m.step)
            return float(np.mean([m.value for m in history[1:]]))

        name = f"ldmflow train, {workers} worker(s) ({parallel.upper()}), {loader_workers} loader worker(s)"
        rows[name] = after_first_window("latents_per_s")
        waits[name] = after_first_window("data_wait_fraction")

    baseline = rows["bare loop, 1 thread"]
    print(f"\nmachine: {os.cpu_count()} cores, {'cuda' if torch.cuda.is_available() else 'cpu'}; tiny UNet on 8x8x4 latents, "
          f"batch {args.batch_size} per worker, {args.steps} steps")
    print(f"{'':60s} {'latents/s':>10s} {'vs bare loop (1 thread)':>24s} {'data wait':>10s}")
    for name, rate in rows.items():
        wait = f"{waits[name]:10.1%}" if name in waits else ""
        print(f"{name:60s} {rate:10.1f} {rate / baseline:23.2f}x {wait}")


if __name__ == "__main__":
    main()
