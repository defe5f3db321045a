"""Latent precompute throughput: the Ray Data pipeline vs a plain loop, per core and on two.

Same autoencoder (the ``tiny`` preset, or ``--preset base``), same image shards
(``builtin:mnist`` at ``--resolution``), in one run. The plain loop is what one would write
without ldmflow: one process reads each shard, decodes the images and encodes them in
batches, writing nothing; it runs on 1 torch thread (the per-core baseline) and on 2. The
pipeline does the whole stage: sha256 check of every input shard, decode tasks, encoder
actors, fp16 latent shards written atomically, part records and the manifest; it runs as 1
actor × 1 thread, 2 actors × 1 thread (the 1 → 2 scaling) and 1 actor × 2 threads.

Two figures per run: whole-stage wall time (start-up included: Ray Data's executor, actors
importing torch and loading the model) and the steady rate, images/s between the first
shard finished and the last (start-up excluded, as for the loop).

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
runtime.prefect_api()  # the local API the CLI starts and keeps, not an ephemeral server per run


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

    model, _ = autoencoders.load(folder)
    shards = [[s.image for s in shard_stream.ShardStream([url], shuffle_buffer=0)] for url in urls[:1]]
    count = sum(image_shards.read_manifest(images).shards[i].num_samples for i in range(len(urls)))

    def plain_loop(threads: int) -> tuple[float, float]:
        torch.set_num_threads(threads)
        started, finished = time.perf_counter(), []
        with torch.no_grad():
            for url in urls:
                batch = [s.image for s in shard_stream.ShardStream([url], shuffle_buffer=0)]
                for start in range(0, len(batch), args.batch_size):
                    x = torch.from_numpy(np.stack(batch[start : start + args.batch_size]))
                    model.encode(x).latent_dist.mean.half()
                finished.append(time.perf_counter())
        return finished[-1] - started, (count - len(shards[0])) / (finished[-1] - finished[0])

    rows = [(f"plain loop, {threads} thread(s)", *plain_loop(threads)) for threads in (1, 2)]
    cluster.ensure_ray()
    for actors, threads in ((1, 1), (2, 1), (1, 2)):
        config = PrecomputeConfig(actors=actors, threads=threads, batch_size=args.batch_size)
        dest = work / f"latents-{actors}x{threads}"
        started = time.perf_counter()
        outcome = precompute(images, str(dest), folder, ref, config, progress=False)
        seconds = time.perf_counter() - started
        assert outcome.manifest.num_samples == count and not outcome.manifest.failed_shards
        done = sorted(part.stat().st_mtime for part in (dest / "_parts").glob("*.json"))
        rows.append((f"ldmflow precompute, {actors} actor(s) x {threads} thread(s)", seconds,
                     (count - len(shards[0])) / (done[-1] - done[0])))

    whole, steady = rows[0][1], rows[0][2]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\nmachine: {os.cpu_count()} cores, {device}; {count} images at {args.resolution}px, preset {args.preset}, "
          f"{len(urls)} shards; ratios against the 1-thread loop")
    print(f"{'':46s} {'seconds':>8s} {'vs loop':>8s} {'steady img/s':>13s} {'vs loop':>8s}")
    for name, seconds, rate in rows:
        print(f"{name:46s} {seconds:8.2f} {whole / seconds:7.2f}x {rate:13.1f} {rate / steady:7.2f}x")
    one, two = rows[2], rows[3]
    print(f"1 -> 2 actors (1 thread each): {one[1] / two[1]:.2f}x whole stage, {two[2] / one[2]:.2f}x steady")

if __name__ == "__main__":
    main()
