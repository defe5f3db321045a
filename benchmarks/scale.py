"""How the data stages grow with the data and with the nodes, on the local cluster stack.

``infra/local/stack`` starts moto's S3 server in its own process, a Prefect server, and a
Ray head with no CPUs of its own; this script grows it from 1 to 3 worker nodes (one CPU
each) with ``add-node``, as an autoscaler would. For each node count and each size (small
PNGs with `.cls` labels, the issue's reproduction), in one run:

- shard: ``runner: ray``, each chunk a Ray task on a worker node; wall time, images/s and
  images/s per node, the driver's peak traced memory (``tracemalloc`` in this process, the
  flow's), S3 requests by kind through a counting proxy (the driver and the tasks go
  through it), then an unchanged rerun's requests;
- precompute (sizes up to ``--precompute-up-to``): the Ray Data pipeline with one encoder
  actor per node (``tiny`` autoencoder), wall time, images/s, driver memory, requests.

The baseline of each ratio is the 1-node run of the same size, measured here. Then a
projection to 100M images on 64 nodes from the measured per-node rates, requests per
image and driver memory per shard. On one machine the nodes share its cores: with more
nodes than cores, per-node rates fall, which says nothing of a real cluster; the 1-node
rate is the one projected.

Usage: python benchmarks/scale.py [--nodes 1 2 3] [--sizes 2000 20000] [--shard-size 500]
       [--precompute-up-to 2000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STACK = [sys.executable, str(ROOT / "infra" / "local" / "stack.py")]
PORTS = ["--s3-port", "9310", "--mlflow-port", "5310", "--prefect-port", "4310", "--ray-port", "6410",
         "--ray-client-port", "20310", "--dashboard-port", "8310"]


def png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


PROXY = """
import json, sys
sys.path.insert(0, sys.argv[2])
from tests.helpers import CountingProxy
proxy = CountingProxy(sys.argv[1])
print(proxy.endpoint, flush=True)
for _ in sys.stdin:
    print(json.dumps(dict(proxy.take())), flush=True)
"""


class Proxy:
    """tests.helpers.CountingProxy in a process of its own, so that neither this process's
    ``tracemalloc`` nor its GIL slows the requests it counts."""

    def __init__(self, upstream: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", PROXY, upstream, str(ROOT)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.endpoint = self.process.stdout.readline().strip()

    def take(self) -> dict[str, int]:
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def stack(home: Path, *args: str) -> str:
    result = subprocess.run([*STACK, *args, "--home", str(home)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"stack {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--precompute-up-to", type=int, default=2000)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="ldmflow-scale-"))
    try:
        run(args, home, stack(home / "stack", "up", "--workers", str(args.nodes[0]), *PORTS))
    finally:
        stack(home / "stack", "down")


def run(args, home: Path, exports: str) -> None:
    for line in exports.splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            os.environ[name] = value
    upstream = os.environ["AWS_ENDPOINT_URL"]
    os.environ["LDMFLOW_HOME"] = str(home / "driver")

    from ldmflow.flows import runtime

    runtime.configure()
    runtime.prefect_api()  # the stack's Prefect server (PREFECT_API_URL)

    import ray
    import torch

    from ldmflow.data import cluster, latent_shards, storage
    from ldmflow.data.precompute import PrecomputeConfig, precompute
    from ldmflow.data.sharding import ShardConfig
    from ldmflow.flows import shard as shard_flow
    from ldmflow.model import autoencoders

    for size in [20, *args.sizes]:  # uploaded straight to the store: not counted
        bucket = f"scale-{size}"
        storage.s3_client().create_bucket(Bucket=bucket)

        def put(i: int, bucket: str = bucket) -> None:
            storage.write_bytes(f"s3://{bucket}/raw/img{i:07d}.png", png(i))
            storage.write_bytes(f"s3://{bucket}/raw/img{i:07d}.cls", str(i % 10).encode())

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, range(size)))
    proxy = Proxy(upstream)
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint  # the tasks get it in their runtime environment

    torch.manual_seed(0)
    folder = home / "autoencoder"
    info = autoencoders.save(autoencoders.build("tiny", 32), folder, scale_factor=1.0, resolution=32, config={},
                             lineage={})
    ref = latent_shards.AutoencoderRef(str(folder), info.weights_sha256, 1.0)

    def measured(fn):
        proxy.take()
        tracemalloc.start()
        started = time.perf_counter()
        try:
            result = fn()
            return result, time.perf_counter() - started, tracemalloc.get_traced_memory()[1], proxy.take()
        finally:
            tracemalloc.stop()

    def requests(sent) -> str:
        names = {"GetObject": "GET", "PutObject": "PUT", "ListObjectsV2": "LIST", "HeadObject": "HEAD",
                 "DeleteObject": "DELETE"}
        return ", ".join(f"{n} {names.get(kind, kind)}" for kind, n in sorted(sent.items(), key=lambda kv: -kv[1]))

    rows, base = [], {}
    print(f"{'nodes':>5} {'images':>7} {'stage':<16} {'seconds':>8} {'img/s':>7} {'/node':>6} {'vs 1 node':>9} "
          f"{'driver MB':>9}  requests", flush=True)
    cluster.ensure_ray()
    for nodes in args.nodes:
        while len([n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]) < nodes:
            stack(home / "stack", "add-node")
        # Warm up, unmeasured: worker processes on every node, the driver's own imports.
        warm = ShardConfig(resolution=32, shard_size=2, workers=1, runner="ray")
        shard_flow.run("s3://scale-20/raw", f"s3://scale-20/shards-{nodes}", warm, progress=False)
        precompute(f"s3://scale-20/shards-{nodes}", f"s3://scale-20/latents-{nodes}", folder, ref,
                   PrecomputeConfig(actors=nodes, threads=1, batch_size=64), progress=False)
        for size in args.sizes:
            source, dest = f"s3://scale-{size}/raw", f"s3://scale-{size}/shards-{nodes}"
            config = ShardConfig(resolution=32, shard_size=args.shard_size, workers=1, runner="ray")
            stages = [("shard", lambda: shard_flow.run(source, dest, config, progress=False)),
                      ("shard, unchanged", lambda: shard_flow.run(source, dest, config, progress=False))]
            if size <= args.precompute_up_to:
                latents = f"s3://scale-{size}/latents-{nodes}"
                pconfig = PrecomputeConfig(actors=nodes, threads=1, batch_size=64)
                stages.append(("precompute", lambda: precompute(dest, latents, folder, ref, pconfig, progress=False)))
            for stage, fn in stages:
                _, seconds, peak, sent = measured(fn)
                rate = size / seconds
                base.setdefault((stage, size), rate)
                line = (f"{nodes:>5} {size:>7} {stage:<16} {seconds:>8.2f} {rate:>7.0f} {rate / nodes:>6.0f} "
                        f"{rate / base[(stage, size)]:>8.2f}× {peak / 2**20:>9.1f}  {requests(sent)}")
                print(line, flush=True)
                rows.append((nodes, size, stage, seconds, rate, peak, dict(sent)))
    proxy.close()
    project(rows, args.shard_size)


def project(rows, shard_size: int) -> None:
    """100M images on 64 nodes, from the 1-node rates, the largest size's requests per
    image and the driver's memory growth per shard."""
    target, nodes = 100_000_000, 64
    print(f"\nprojection to {target:,} images on {nodes} nodes (from the 1-node rates measured above):")
    for stage in ("shard", "precompute"):
        one = [r for r in rows if r[0] == 1 and r[2] == stage]
        if not one:
            continue
        largest = max(one, key=lambda r: r[1])
        per_image = {kind: n / largest[1] for kind, n in largest[6].items()}
        hours = target / (largest[4] * nodes) / 3600
        print(f"  {stage}: {largest[4]:.0f} img/s per node -> {hours:.1f} h; requests: "
              + ", ".join(f"{kind} {n * target / 1e6:,.2f}M" for kind, n in sorted(per_image.items(), key=lambda kv: -kv[1])))
    shard_rows = sorted((r for r in rows if r[0] == 1 and r[2] == "shard"), key=lambda r: r[1])
    if len(shard_rows) >= 2:
        (small, large) = shard_rows[0], shard_rows[-1]
        per_shard = (large[5] - small[5]) / max((large[1] - small[1]) / shard_size, 1)
        shards = target / shard_size
        print(f"  shard driver: {small[5] / 2**20:.1f} MB at {small[1]:,}, {large[5] / 2**20:.1f} MB at {large[1]:,} "
              f"({per_shard / 1024:+.2f} KB per shard) -> about "
              f"{(large[5] + per_shard * (shards - large[1] / shard_size)) / 2**20:.0f} MB for {shards:,.0f} shards")


if __name__ == "__main__":
    main()
