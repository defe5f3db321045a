"""Serving speed, as ratios measured in one run on the same model.

1. HTTP: throughput and p50/p99 latency of ``POST /v1/generate`` on a local Ray Serve
   (127.0.0.1, one replica) at 1 and 16 concurrent clients, with dynamic batching on
   (``max_batch_size`` 16) and off (1). Every request is one class-conditional image,
   classifier-free guidance, DDIM; the number of requests is fixed (bounded).
2. Sampler vs diffusers: ldmflow's sampler against diffusers' own ``LDMPipeline`` on the
   same unconditional UNet, autoencoder, DDIM scheduler and step count (images/s, batch of
   16), and against the exported diffusers pipeline (``ldmflow export``) on the
   class-conditional model with guidance.

The model is the ``tiny`` preset at 32 px with random weights (speed does not depend on
training), or ``--model URI`` for a registered one. Usage:
python benchmarks/serve.py [--steps 25] [--requests 48] [--model models:/ldmflow-digits@production]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LDMFLOW_HOME", tempfile.mkdtemp(prefix="ldmflow-bench-"))

from ldmflow.flows import runtime  # noqa: E402

runtime.configure()


def tiny_model(folder: Path, conditioning: str = "class", resolution: int = 32) -> Path:
    """A model folder with random weights: the tiny autoencoder and UNet of configs/tiny.yaml."""
    import torch

    from ldmflow.model import autoencoders, model_format, unets
    from ldmflow.training.train import DiffusionConfig, model_info

    torch.manual_seed(0)
    vae = autoencoders.build("tiny", resolution)
    vae_info = autoencoders.save(vae, folder.parent / f"{folder.name}-vae", scale_factor=0.4,
                                       resolution=resolution, config={}, lineage={})
    shape = vae_info.latent_shape()
    classes = [str(i) for i in range(10)] if conditioning == "class" else None
    network = unets.build("tiny", conditioning, shape, len(classes or ()))
    info = model_info(DiffusionConfig(conditioning=conditioning), shape, classes, 0.4, vae, autoencoder={}, lineage={})
    model_format.save(folder, network, folder.parent / f"{folder.name}-vae", info)
    return folder


def register(folder: Path, name: str) -> str:
    from ldmflow.registry import models, tracking

    run = tracking.client().create_run(tracking.experiment_id("bench-serve")).info.run_id
    version = models.register(folder, name, run).version
    tracking.client().set_registered_model_alias(name, "production", version)
    return f"models:/{name}@production"


def post(url: str, body: dict) -> float:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
    return time.perf_counter() - start


def load_test(url: str, clients: int, requests: int, steps: int) -> dict:
    bodies = [{"label": i % 10, "seed": i, "steps": steps, "sampler": "ddim"} for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = sorted(pool.map(lambda body: post(url + "/v1/generate", body), bodies))
    wall = time.perf_counter() - start
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {"rps": requests / wall, "p50": pick(0.50), "p99": pick(0.99)}


def http_benchmark(model_uri: str, args) -> dict:
    from ldmflow.serving import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = {}
    for batching, size in (("on", 16), ("off", 1)):
        config = app.ServeConfig(port=port, max_batch_size=size, max_ongoing_requests=32, batch_wait_timeout_s=0.01,
                                 follow_seconds=0, num_cpus=1)
        url = app.run(model_uri, config)
        for _ in range(3):  # warm up
            post(url + "/v1/generate", {"label": 0, "steps": args.steps})
        for clients in (1, 16):
            count = args.requests if clients > 1 else max(8, args.requests // 4)
            results[(batching, clients)] = load_test(url, clients, count, args.steps)
            r = results[(batching, clients)]
            print(f"  batching {batching:3s} {clients:2d} clients: {r['rps']:6.2f} req/s  "
                  f"p50 {r['p50'] * 1000:7.1f} ms  p99 {r['p99'] * 1000:7.1f} ms  ({count} requests)")
    from ray import serve

    serve.shutdown()
    return results


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def sampler_vs_diffusers(work: Path, args) -> None:
    import torch
    from diffusers import DiffusionPipeline, LDMPipeline

    from ldmflow.model import schedules
    from ldmflow.model.sampler import Sampler
    from ldmflow.serving.export import export

    batch = 16
    uncond = Sampler.from_folder(tiny_model(work / "uncond", conditioning="none"))
    scheduler = schedules.sampling_scheduler(uncond.schedule, "ddim")
    stock = LDMPipeline(vqvae=uncond.vae, unet=uncond.unet, scheduler=scheduler)
    stock.set_progress_bar_config(disable=True)
    ours = timed(lambda: uncond.generate(n=batch, steps=args.steps, sampler="ddim"))
    theirs = timed(lambda: stock(batch_size=batch, num_inference_steps=args.steps, output_type="np",
                                 generator=torch.Generator().manual_seed(0)))
    print(f"  unconditional, {batch} images, {args.steps} DDIM steps: ldmflow {batch / ours:7.1f} img/s, "
          f"diffusers LDMPipeline {batch / theirs:7.1f} img/s -> ratio {theirs / ours:.2f}x")

    cond_folder = tiny_model(work / "cond")
    cond = Sampler.from_folder(cond_folder)
    pipeline = DiffusionPipeline.from_pretrained(export(str(cond_folder), work / "exported"), trust_remote_code=True)
    pipeline.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(batch)]
    ours = timed(lambda: cond.run([cond.job(label=label, seed=i, steps=args.steps, sampler="ddim", guidance=3.0)
                                   for i, label in enumerate(labels)]))
    theirs = timed(lambda: pipeline(class_labels=labels, num_inference_steps=args.steps, guidance_scale=3.0,
                                    output_type="np", generator=[torch.Generator().manual_seed(i) for i in range(batch)]))
    print(f"  class-conditional + CFG, {batch} images: ldmflow {batch / ours:7.1f} img/s, exported diffusers "
          f"pipeline {batch / theirs:7.1f} img/s -> ratio {theirs / ours:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--requests", type=int, default=48, help="requests per 16-client run")
    parser.add_argument("--model", default="", help="a registered model URI (default: a random tiny model)")
    args = parser.parse_args()

    import torch

    from ldmflow.data import cluster

    print(f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, "
          f"GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    work = Path(tempfile.mkdtemp(prefix="ldmflow-bench-serve-"))
    model_uri = args.model or register(tiny_model(work / "model"), "bench-serve")
    cluster.ensure_ray()
    print(f"HTTP on 127.0.0.1, one replica, {args.steps} DDIM steps, guidance 3, 1 image per request ({model_uri}):")
    results = http_benchmark(model_uri, args)
    on, off = results[("on", 16)], results[("off", 16)]
    print(f"  16 clients: batching gives {on['rps'] / off['rps']:.2f}x the throughput, "
          f"p99 {on['p99'] / off['p99']:.2f}x")
    print("Sampler vs diffusers (in process):")
    sampler_vs_diffusers(work, args)


if __name__ == "__main__":
    main()
