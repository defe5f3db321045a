"""Serving speed, as ratios measured in one run on the same model.

1. HTTP: throughput and p50/p99 latency of ``POST /v1/generate`` on a local Ray Serve
   (127.0.0.1, one replica) at 1 and 16 concurrent clients, with dynamic batching on
   (``max_batch_size`` 16; a 10-ms and a 100-ms wait for a batch to fill) and off (1), and
   the mean size of the batches the requests were sampled in. Every request is one
   class-conditional image, classifier-free guidance, DDIM; the number of requests is
   fixed (bounded).
2. The ceiling of batching: the sampler alone, in process, on the replica's thread count,
   one image per call against 16 per call.
3. Sampler vs diffusers: ldmflow's sampler against diffusers' own ``LDMPipeline`` on the
   same unconditional UNet, autoencoder, DDIM scheduler and step count (images/s, batch of
   16), and against the exported diffusers pipeline (``ldmflow export``) on the
   class-conditional model with guidance.

The model is the ``tiny`` preset at 32 px with random weights (speed does not depend on
training), or ``--model URI`` for a registered one. Usage:
python benchmarks/serve.py [--steps 25] [--requests 96] [--batch-wait 0.01 0.1] [--replica-cpus 1]
    [--replica-gpus 0] [--http-only] [--model models:/ldmflow-digits@production]
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
runtime.prefect_api()  # the local API the CLI starts and keeps, not an ephemeral server per run


def tiny_model(folder: Path, conditioning: str = "class", resolution: int = 32) -> Path:
    """A model folder with random weights: the tiny autoencoder and UNet of configs/tiny.yaml."""
    import torch

    from ldmflow.model import autoencoders, model_format, unets
    from ldmflow.training.stage_configs import DiffusionConfig, model_info

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


def post(url: str, body: dict) -> tuple[float, int]:
    """(seconds, the size of the batch the request was sampled in)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
    return time.perf_counter() - start, answer["batch"]


def load_test(url: str, clients: int, requests: int, steps: int) -> dict:
    bodies = [{"label": i % 10, "seed": i, "steps": steps, "sampler": "ddim"} for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        answers = list(pool.map(lambda body: post(url + "/v1/generate", body), bodies))
    wall = time.perf_counter() - start
    latencies = sorted(seconds for seconds, _ in answers)
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {"rps": requests / wall, "p50": pick(0.50), "p99": pick(0.99),
            "batch": sum(batch for _, batch in answers) / len(answers)}


def http_benchmark(model_uri: str, args) -> dict:
    from ldmflow.serving import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = {}
    runs = [(f"on, wait {int(wait * 1000)} ms", 16, wait) for wait in args.batch_wait] + [("off", 1, 0.0)]
    for batching, size, wait in runs:
        config = app.ServeConfig(port=port, max_batch_size=size, max_ongoing_requests=32, batch_wait_timeout_s=wait,
                                 follow_seconds=0, num_cpus=args.replica_cpus, num_gpus=args.replica_gpus)
        url = app.run(model_uri, config)
        for _ in range(3):  # warm up
            post(url + "/v1/generate", {"label": 0, "steps": args.steps, "sampler": "ddim"})
        for clients in (1, 16):
            count = args.requests if clients > 1 else max(8, args.requests // 4)
            results[(batching, clients)] = load_test(url, clients, count, args.steps)
            r = results[(batching, clients)]
            print(f"  batching {batching:15s} {clients:2d} clients: {r['rps']:6.2f} req/s  "
                  f"p50 {r['p50'] * 1000:7.1f} ms  p99 {r['p99'] * 1000:7.1f} ms  "
                  f"mean batch {r['batch']:5.1f}  ({count} requests)")
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


def batching_ceiling(work: Path, args) -> None:
    """What batching can give at most: the sampler's images/s at 16 images per call over 1."""
    import torch

    from ldmflow.model.sampler import Sampler

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(args.replica_cpus)))
    sampler = Sampler.from_folder(tiny_model(work / "ceiling"))
    rates = {}
    for batch in (1, 16):
        jobs = [sampler.job(label=i % 10, seed=i, steps=args.steps, sampler="ddim", guidance=3.0) for i in range(batch)]
        rates[batch] = batch / timed(lambda: sampler.run(jobs))
    torch.set_num_threads(threads)
    print(f"  {max(1, int(args.replica_cpus))} thread(s): 1 image per call {rates[1]:.2f} img/s, 16 per call "
          f"{rates[16]:.2f} img/s -> at most {rates[16] / rates[1]:.2f}x from batching")


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
    parser.add_argument("--requests", type=int, default=96, help="requests per 16-client run")
    parser.add_argument("--model", default="", help="a registered model URI (default: a random tiny model)")
    parser.add_argument("--replica-cpus", type=float, default=1, help="the replica's CPUs (and so torch's threads)")
    parser.add_argument("--replica-gpus", type=float, default=0, help="the replica's GPUs (1: sample on a GPU)")
    parser.add_argument("--batch-wait", type=float, nargs="+", default=[0.01, 0.1],
                        help="batch_wait_timeout_s of the batched runs (seconds)")
    parser.add_argument("--http-only", action="store_true", help="skip the in-process comparison with diffusers")
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
    off = results[("off", 16)]
    for (batching, clients), on in results.items():
        if clients == 16 and batching != "off":
            print(f"  16 clients, batching {batching}: {on['rps'] / off['rps']:.2f}x the throughput of unbatched, "
                  f"p99 {on['p99'] / off['p99']:.2f}x")
    print("Batching's ceiling (the sampler alone, in process):")
    batching_ceiling(work, args)
    if not args.http_only:
        print("Sampler vs diffusers (in process):")
        sampler_vs_diffusers(work, args)


if __name__ == "__main__":
    main()
