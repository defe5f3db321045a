"""Resume time against the step reached: how long a resumed rank waits for its first batch.

A resumed run gets back to its data position by replaying each reader's shuffle buffer
(:meth:`ldmflow.data.shard_stream.ShardStream.read` with ``skip``): on sample indices when
the shards' sample counts are known, as they are in training ("replayed": only what is
still in the buffer is read back), else by reading and passing over every sample the
reader had taken ("passed over", the way before, and still the way for a stream with a
``keep`` filter, such as the autoencoder's held-out split). This measures the time
from asking for the batches at a checkpoint's position to holding the first one, through
the training loop's own loader (:func:`ldmflow.training.loop.loader` and
:func:`~ldmflow.training.loop.batches`, one loader worker process), at the positions of
steps 0 (the baseline: a fresh start), 100 and 1,000, all inside one epoch of a latent set
large enough to hold them. Everything else a resume does (Ray Train's restart, loading the
checkpoint's weights and optimizer state) is the same at every step: a checkpoint's size
does not grow with the step.

Usage: python benchmarks/resume.py [--batch-size 64] [--shard-size 1000] [--steps 0 100 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_latent_set(folder: Path, samples: int, shard_size: int) -> list[str]:
    """Latent shards of 4×8×8 moments (fp16, as precompute writes them) with labels."""
    import numpy as np

    from ldmflow.data import image_shards, latent_shards

    rng = np.random.default_rng(0)
    urls = []
    for start in range(0, samples, shard_size):
        url = str(folder / f"latents-{start // shard_size:05d}.tar")
        rows = []
        for i in range(start, min(samples, start + shard_size)):
            moments = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
            rows.append({"__key__": f"{i:08d}", image_shards.KEY_LABEL: str(i % 10).encode()}
                        | latent_shards.latent_sample(moments[0], moments[1]))
        image_shards.write_shard(url, rows)
        urls.append(url)
    return urls


def first_batch_seconds(urls: list[str], batch_size: int, step: int, repeats: int, counts: list[int] | None) -> float:
    """Median seconds from asking for the batches at ``step``'s position to the first batch."""
    import statistics

    from ldmflow.data import latent_shards, shard_stream
    from ldmflow.training import loop
    from ldmflow.training.diffusion_loop import collate_latents

    times = []
    for _ in range(repeats):
        stream = shard_stream.ShardStream(urls, shuffle_buffer=1000, seed=0, decode=latent_shards.decode_latent,
                                          counts=counts)
        batched, loader = loop.loader(stream, batch_size, collate_latents, workers=1, prefetch=4)
        start = {"epoch": 0, "readers": [step * batch_size], "first": 0}
        started = time.perf_counter()
        next(loop.batches(batched, loader, 0, start))
        times.append(time.perf_counter() - started)
        del loader
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="ldmflow-bench-resume-"))
    samples = (max(args.steps) + 10) * args.batch_size + 1000  # every position inside the first epoch
    urls = write_latent_set(folder, samples, args.shard_size)
    counts = [min(args.shard_size, samples - i * args.shard_size) for i in range(len(urls))]
    ways = {"replayed": counts, "passed over": None}  # with the shards' counts (as training has them), without
    rows = {(way, step): first_batch_seconds(urls, args.batch_size, step, args.repeats, known)
            for way, known in ways.items() for step in sorted(args.steps)}

    baseline = rows["replayed", min(args.steps)]
    print(f"\nmachine: {os.cpu_count()} cores; {samples} latents in {len(urls)} shards of {args.shard_size}, "
          f"batch {args.batch_size}, shuffle buffer 1000, 1 loader worker; median of {args.repeats}")
    print(f"{'buffer':>12s} {'resumed at':>12s} {'samples behind':>15s} {'first batch (s)':>16s} {'vs a fresh start':>17s}")
    for (way, step), seconds in rows.items():
        print(f"{way:>12s} {'step ' + str(step):>12s} {step * args.batch_size:15d} {seconds:16.2f} "
              f"{seconds / baseline:16.2f}x")


if __name__ == "__main__":
    main()
