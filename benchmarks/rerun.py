"""What a shard rerun costs: nothing changed, and one image added, against a first run.

Small PNGs with ``.cls`` labels (the issue's reproduction: 64×64 noise, 2,000 and 20,000
of them) on the local S3 server (moto's, started here), behind a proxy that counts every
request by kind. For each size, in one run:

- the first run (``shard_flow.run``, 500 inputs a shard, 32 px): the baseline;
- an unchanged rerun: its time and its requests beyond the listings;
- one image added whose key sorts first: shards rewritten, requests, time.

Prints seconds, the ratio to the first run and the request counts.
Usage: python benchmarks/rerun.py [--sizes 2000 20000] [--shard-size 500]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def upload(source: str, count: int) -> None:
    from ldmflow.data import storage

    def put(i: int) -> None:
        storage.write_bytes(f"{source}/img{i:06d}.png", png(i))
        storage.write_bytes(f"{source}/img{i:06d}.cls", str(i % 10).encode())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(count)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--shard-size", type=int, default=500)
    args = parser.parse_args()

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs each request

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    from tests.helpers import CountingProxy

    proxy = CountingProxy(f"http://{host}:{port}")
    os.environ.update(AWS_ENDPOINT_URL=proxy.endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    from ldmflow.data import storage
    from ldmflow.data.sharding import ShardConfig
    from ldmflow.flows import runtime
    from ldmflow.flows import shard as shard_flow

    runtime.configure()
    runtime.prefect_api()
    config = ShardConfig(resolution=32, shard_size=args.shard_size, workers=2)
    print(f"{'images':>7} {'run':<26} {'seconds':>8} {'vs first':>9} {'shards written':>15}  requests (beyond LIST)")
    for size in args.sizes:
        bucket = f"bench-{size}"
        storage.s3_client().create_bucket(Bucket=bucket)
        source, dest = f"s3://{bucket}/raw", f"s3://{bucket}/shards"
        upload(source, size)
        proxy.take()

        def timed(label: str, first: float | None = None) -> float:
            started = time.perf_counter()
            outcome = shard_flow.run(source, dest, config, progress=False)
            seconds = time.perf_counter() - started
            sent = proxy.take()
            lists = sent.pop("ListObjectsV2", 0)
            shown = ", ".join(f"{k} {v}" for k, v in sorted(sent.items())) or "none"
            ratio = f"{seconds / first:.3f}×" if first else "1.000×"
            print(f"{size:>7} {label:<26} {seconds:>8.2f} {ratio:>9} {outcome.shards_written:>15}  {shown} "
                  f"(+{lists} LIST)", flush=True)
            return seconds

        first = timed("first run")
        timed("unchanged rerun", first)
        storage.write_bytes(f"{source}/img-added.png", png(size + 1))
        storage.write_bytes(f"{source}/img-added.cls", b"3")
        timed("one image added (first)", first)
    proxy.close()
    server.stop()


if __name__ == "__main__":
    main()
