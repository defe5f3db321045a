"""Shard-stage throughput: the ``ldmflow shard`` command vs a plain Pillow loop doing the same work.

Generates camera-like JPEGs (smooth content plus noise) at two sizes, 640x480 and web-sized
1024x768, and times in one run on the same files:

- baseline: a plain single-process Pillow loop (open, EXIF transpose, RGB, resize the
  short side to 256 with bicubic, centre crop, PNG encode with Pillow's defaults), writing
  nothing;
- the same loop with ldmflow's PNG setting (zlib level 1), to show what the encoder buys;
- the ``ldmflow shard`` command with ``--workers 1`` and ``--workers 2``, as a user runs
  it: a new process each time (imports, Prefect's bookkeeping), with Prefect's local API
  already running as it is after the first command; listing, dedupe, decode, validation,
  resize, encode, tar writing and the manifest.

The web-sized set is also run small (the first 400 images), where the command's fixed cost
shows; the fixed cost itself is the command on one image.

Prints seconds, images/s, images/s per core and ratios against the baseline.
Usage: python benchmarks/shard.py [--images 1500] [--small 400] [--resolution 256]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

CLI = [sys.executable, "-m", "ldmflow.flows.cli"]


def make_jpegs(folder: Path, count: int, width: int, height: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    bases = [np.stack([np.sin(xs / (40 + 7 * c) + ys / (55 + 5 * c) + rng.uniform(0, 6.28)) for c in range(3)], axis=-1)
             for _ in range(8)]
    for i in range(count):
        noise = rng.normal(0, 12, bases[0].shape).astype(np.float32)
        pixels = np.clip((bases[i % 8] * 0.5 + 0.5) * 255 + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def plain_pillow_loop(paths: list[Path], resolution: int, compress_level: int = 6) -> float:
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            scale = resolution / min(image.size)
            size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
            left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
            image.save(io.BytesIO(), format="PNG", compress_level=compress_level)
    return time.perf_counter() - started


def shard_command(source: Path, dest: Path, env: dict[str, str], *args: str) -> float:
    started = time.perf_counter()
    result = subprocess.run([*CLI, "shard", str(source), str(dest), "--no-progress", *args],
                            env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"ldmflow shard failed: {result.stdout}{result.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1500, help="images in each large run")
    parser.add_argument("--small", type=int, default=400, help="images in the small web-sized run")
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ldmflow-bench-shard-"))
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update(LDMFLOW_HOME=str(work / "state"), PREFECT_HOME=str(work / "state" / "prefect"))
    res = ["--resolution", str(args.resolution), "--shard-size", "250"]

    sets = {}
    for width, height in ((640, 480), (1024, 768)):
        folder = work / f"raw-{width}x{height}"
        print(f"generating {args.images} JPEGs of {width}x{height} ...", flush=True)
        make_jpegs(folder, args.images, width, height)
        sets[(width, height)] = folder
    one = work / "raw-one"
    make_jpegs(one, 1, 1024, 768)

    shard_command(one, work / "warmup", env, *res)  # starts Prefect's local API, as any first command does
    fixed = min(shard_command(one, work / f"fixed-{i}", env, *res) for i in range(2))

    cases = [(640, 480, args.images), (1024, 768, args.small), (1024, 768, args.images)]
    report = []
    for width, height, count in cases:
        folder = sets[(width, height)]
        paths = sorted(folder.iterdir())[:count]
        baseline = plain_pillow_loop(paths, args.resolution)
        rows = [("plain Pillow loop (1 process)", 1, baseline),
                ("plain loop, PNG level 1", 1, plain_pillow_loop(paths, args.resolution, compress_level=1))]
        for workers in (1, 2):
            dest = work / f"out-{width}-{count}-{workers}"
            seconds = shard_command(folder, dest, env, *res, "--limit", str(count), "--workers", str(workers))
            assert json.loads((dest / "manifest.json").read_text())["num_samples"] == count
            rows.append((f"ldmflow shard --workers {workers}", workers, seconds))
        report.append((width, height, count, baseline, rows))

    record = work / "state" / "prefect" / "local-api.json"
    if record.exists():
        os.kill(json.loads(record.read_text())["pid"], signal.SIGTERM)

    print(f"\nmachine: {os.cpu_count()} cores; JPEGs -> {args.resolution}px PNG samples")
    print(f"fixed cost of the command (one image, local API running): {fixed:.2f} s")
    for width, height, count, baseline, rows in report:
        print(f"\n{count} JPEGs of {width}x{height}")
        print(f"{'':34s} {'seconds':>8s} {'images/s':>9s} {'per core':>9s} {'vs baseline':>12s}")
        for name, cores, seconds in rows:
            rate = count / seconds
            print(f"{name:34s} {seconds:8.2f} {rate:9.1f} {rate / cores:9.1f} {baseline / seconds:11.2f}x")


if __name__ == "__main__":
    main()
