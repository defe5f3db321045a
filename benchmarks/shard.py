"""Shard-stage throughput: ldmflow's shard flow vs a plain Pillow loop doing the same work.

Generates a few thousand JPEGs (camera-like 640x480, smooth content plus noise), then
times, in one run on the same files:

- baseline: a plain single-process Pillow loop (open, EXIF transpose, RGB, resize the
  short side to 256 with bicubic, centre crop, PNG encode), writing nothing;
- ldmflow ``shard`` with ``--workers 1`` and ``--workers 2`` (listing, dedupe, decode,
  validation, resize, encode, tar writing, manifest: the whole stage under Prefect).

Prints images/s, images/s per core used, and ratios against the baseline.
Usage: python benchmarks/shard.py [--images 2000] [--resolution 256]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LDMFLOW_HOME", tempfile.mkdtemp(prefix="ldmflow-bench-"))

from ldmflow.flows import runtime  # noqa: E402

runtime.configure()


def make_jpegs(folder: Path, count: int, width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        phase = rng.uniform(0, 6.28, size=3)
        base = np.stack([np.sin(xs / (40 + 7 * c) + ys / (55 + 5 * c) + phase[c]) for c in range(3)], axis=-1)
        pixels = np.clip((base * 0.5 + 0.5) * 255 + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def plain_pillow_loop(paths: list[Path], resolution: int) -> float:
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            scale = resolution / min(image.size)
            size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
            left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
            image.save(io.BytesIO(), format="PNG", compress_level=6)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    args = parser.parse_args()

    from ldmflow.data.sharding import ShardConfig
    from ldmflow.flows import shard as shard_flow

    work = Path(tempfile.mkdtemp(prefix="ldmflow-bench-shard-"))
    raw = work / "raw"
    raw.mkdir()
    print(f"generating {args.images} JPEGs of {args.width}x{args.height} in {raw} ...", flush=True)
    make_jpegs(raw, args.images, args.width, args.height)
    paths = sorted(raw.iterdir())

    # Warm up Prefect's local API and imports outside the timed runs.
    shard_flow.run("builtin:digits", str(work / "warmup"), ShardConfig(resolution=8, limit=10), progress=False)

    baseline = plain_pillow_loop(paths, args.resolution)
    rows = [("plain Pillow loop (1 process)", 1, baseline)]
    for workers in (1, 2):
        config = ShardConfig(resolution=args.resolution, shard_size=250, workers=workers)
        started = time.perf_counter()
        outcome = shard_flow.run(str(raw), str(work / f"out-{workers}"), config, progress=False)
        assert outcome.manifest.num_samples == args.images, outcome.summary()
        rows.append((f"ldmflow shard --workers {workers}", workers, time.perf_counter() - started))

    print(f"\nmachine: {os.cpu_count()} cores; {args.images} JPEGs {args.width}x{args.height} -> {args.resolution}px PNG")
    print(f"{'':34s} {'seconds':>8s} {'images/s':>9s} {'per core':>9s} {'vs baseline':>12s}")
    for name, cores, seconds in rows:
        rate = args.images / seconds
        print(f"{name:34s} {seconds:8.2f} {rate:9.1f} {rate / cores:9.1f} {baseline / seconds:11.2f}x")


if __name__ == "__main__":
    main()
