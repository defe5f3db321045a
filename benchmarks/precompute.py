"""Latent precompute throughput: the Ray actor pool (1 and 2 actors) vs a plain loop.

Same autoencoder (the ``tiny`` preset, or ``--preset base``), same image shards
(``builtin:mnist`` at ``--resolution``), in one run. The plain loop is what one would write
without ldmflow: one process reads each shard, decodes the images and encodes them in
batches with torch's default threading, writing nothing. The actor pool does the whole
stage: sha256 check of every input shard, encode, fp16 latent shards written atomically,
part records and the manifest.

Usage: python benchmarks/precompute.py [--resolution 32] [--preset tiny] [--images 5000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LDMFLOW_HOME", tempfile.mkdtemp(prefix="ldmflow-bench-"))

from ldmflow.flows import runtime  # noqa: E402

runtime.configure()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import numpy as np
    import torch

    from ldmflow.data import cluster, image_shards, latent_shards, shard_stream
    from ldmflow.data.precompute import PrecomputeConfig, precompute
    from ldmflow.data.sharding import ShardConfig
    from ldmflow.flows import shard as shard_flow
    from ldmflow.model import autoencoders

    work = Path(tempfile.mkdtemp(prefix="ldmflow-bench-precompute-"))
    images = str(work / "images")
    shard_flow.run("builtin:mnist", images, ShardConfig(resolution=args.resolution, shard_size=500, limit=args.images), progress=False)
    torch.manual_seed(0)
    vae = autoencoders.build(args.preset, args.resolution)
    folder = work / "autoencoder"
    info = autoencoders.save(vae, folder, scale_factor=1.0, resolution=args.resolution, config={}, lineage={})
    ref = latent_shards.AutoencoderRef(str(folder), info.weights_sha256, 1.0)
    urls = image_shards.shard_urls(images)

    started = time.perf_counter()
    model, _ = autoencoders.load(folder)
    count = 0
    with torch.no_grad():
        for url in urls:
            batch = [s.image for s in shard_stream.ShardStream([url], shuffle_buffer=0)]
            for start in range(0, len(batch), args.batch_size):
                x = torch.from_numpy(np.stack(batch[start : start + args.batch_size]))
                model.encode(x).latent_dist.mean.half()
                count += x.shape[0]
    rows = [("plain loop (1 process, torch threads)", time.perf_counter() - started)]

    cluster.ensure_ray()
    for actors in (1, 2):
        config = PrecomputeConfig(actors=actors, batch_size=args.batch_size)
        started = time.perf_counter()
        outcome = precompute(images, str(work / f"latents-{actors}"), folder, ref, config, progress=False)
        assert outcome.manifest.num_samples == count and not outcome.manifest.failed_shards
        rows.append((f"ldmflow precompute, {actors} actor(s)", time.perf_counter() - started))

    baseline = rows[0][1]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\nmachine: {os.cpu_count()} cores, {device}; {count} images at {args.resolution}px, preset {args.preset}, "
          f"{len(urls)} shards")
    print(f"{'':40s} {'seconds':>8s} {'images/s':>9s} {'vs baseline':>12s}")
    for name, seconds in rows:
        print(f"{name:40s} {seconds:8.2f} {count / seconds:9.1f} {baseline / seconds:11.2f}x")


if __name__ == "__main__":
    main()
