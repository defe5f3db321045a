"""Start-up: the seconds from a command to its first step, and where they go.

For `train`, `train-autoencoder`, `precompute`, `sample` and `serve`, on tiny prepared data
(400 16-px digits, a tiny autoencoder and UNet registered in MLflow, Prefect's local API
already running, as for a user's second command):

1. The command as a user runs it: a new `ldmflow` process with `--no-progress`, timed to
   its first step (training: the first `loss` point in MLflow, logged every step here;
   precompute: the first latent shard's part record; sample: the images written, the
   command's end; serve: the first answered request) and to its end.
2. Where that time goes, each phase timed in a fresh probe process that does what the
   command does: the interpreter's start; imports; attaching to Prefect's local API; Ray's
   start; then the stage's own phases. For training, the driver's work before the loop
   (manifest, autoencoder from MLflow, the run created), then from the run's creation to
   the first step with 0 Ray Train workers (Ray Train's local mode: the loop in the
   process), 1 and 2 workers (the difference: the worker actors and their process group)
   and 0 or 1 loader processes, and what follows the last step (EMA weights, model folder,
   grid, registration).

The baseline of each row is the step itself: training's rows end with one optimizer step,
which takes a few milliseconds at these sizes, so everything shown is fixed cost.
Usage: python benchmarks/startup.py [--only train sample ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import training_config  # noqa: E402 - after the checkout is on the path
os.environ.setdefault("LDMFLOW_HOME", tempfile.mkdtemp(prefix="ldmflow-bench-startup-"))

CLI = [sys.executable, "-m", "ldmflow.flows.cli"]
COMMANDS = ("train", "train-autoencoder", "precompute", "sample", "serve")
CONFIG = """\
autoencoder: {steps: 2, batch_size: 16, ray_train: {log_every: 1, checkpoint_every: 2}, scale_samples: 32,
              experiment: startup, model_name: startup-cli-autoencoder}
precompute: {actors: 1}
train: {steps: 2, batch_size: 16, ray_train: {log_every: 1, checkpoint_every: 2}, sample_steps: 2, experiment: startup,
        model_name: startup-cli}
"""


class Clock:
    """Phase marks in a probe process: seconds since the previous mark."""

    def __init__(self, started: float) -> None:
        self.last, self.phases = started, {}

    def mark(self, phase: str, at: float | None = None) -> None:
        now = time.time() if at is None else at
        self.phases[phase] = now - self.last
        self.last = now


# ---------------------------------------------------------------------------------------
# Probes: each runs in a fresh process, started at `started` (the parent's time.time())


def probe(name: str, started: float, data: dict) -> dict[str, float]:
    clock = Clock(started)
    clock.mark("interpreter start")
    from ldmflow.flows import runtime

    runtime.configure()
    runtime.prefect_api()
    clock.mark("Prefect's local API attached")
    return PROBES[name](clock, data)


def probe_train(clock: Clock, data: dict) -> dict[str, float]:
    import ray.train.torch  # noqa: F401 - what the command imports
    from diffusers import AutoencoderKL, UNet2DModel  # noqa: F401 - diffusers imports these lazily

    from ldmflow.data import cluster
    from ldmflow.training.stage_configs import DiffusionConfig
    from ldmflow.training.train import train

    clock.mark("imports (torch, diffusers, Ray Train, MLflow)")
    cluster.ensure_ray()
    clock.mark("Ray started")
    for workers, loaders in ((0, 0), (0, 1), (1, 1), (2, 1)):
        config = training_config(DiffusionConfig, steps=2, batch_size=16, workers=workers, loader_workers=loaders, log_every=1,
                                 checkpoint_every=2, sample_steps=2, experiment="startup",
                                 model_name=f"startup-{workers}-{loaders}")
        time_fit(clock, f"{workers} Ray Train worker(s), {loaders} loader process(es)",
                 functools.partial(train, data["latents"], config, progress=False))
    return clock.phases


def probe_autoencoder(clock: Clock, data: dict) -> dict[str, float]:
    import ray.train.torch  # noqa: F401
    from diffusers import AutoencoderKL  # noqa: F401

    from ldmflow.data import cluster
    from ldmflow.training import autoencoder, stage_configs

    clock.mark("imports (torch, diffusers, Ray Train, MLflow)")
    cluster.ensure_ray()
    clock.mark("Ray started")
    for workers in (0, 1, 2):
        config = training_config(stage_configs.AutoencoderConfig, steps=2, batch_size=16, workers=workers, log_every=1,
                                               checkpoint_every=2, scale_samples=32, experiment="startup",
                                               model_name=f"startup-autoencoder-{workers}")
        time_fit(clock, f"{workers} Ray Train worker(s)",
                 functools.partial(autoencoder.train, data["images"], config, progress=False))
    return clock.phases


def time_fit(clock: Clock, where: str, fit) -> None:
    """Phases of one training stage's call ``fit()`` (its result names the MLflow run): the driver's
    work up to the run's creation, from there to the first logged loss, and from the last
    loss to the call's return."""
    from ldmflow.registry import tracking

    called = time.time()
    run_id = fit().run_id
    returned = time.time()
    client = tracking.client()
    created = client.get_run(run_id).info.start_time / 1000
    losses = sorted(m.timestamp / 1000 for m in client.get_metric_history(run_id, "loss"))
    clock.phases[f"{where}: driver before the loop"] = created - called
    clock.phases[f"{where}: run created -> first step"] = losses[0] - created
    clock.phases[f"{where}: last step -> registered"] = returned - losses[-1]


def probe_precompute(clock: Clock, data: dict) -> dict[str, float]:
    import ray.data  # noqa: F401
    from diffusers import AutoencoderKL  # noqa: F401

    from ldmflow.data import cluster
    from ldmflow.data.precompute import PrecomputeConfig
    from ldmflow.flows.precompute import precompute_flow, resolve_task

    clock.mark("imports (torch, diffusers, Ray Data, MLflow)")
    cluster.ensure_ray()
    clock.mark("Ray started")
    resolve_task(data["autoencoder"])
    clock.mark("autoencoder from MLflow")
    dest = Path(tempfile.mkdtemp(prefix="startup-latents-")) / "latents"
    first = watch_first(dest / "_parts", "*.json")
    precompute_flow(data["images"], str(dest), data["autoencoder"], PrecomputeConfig(actors=1), progress=False)
    clock.mark("Ray Data and an encoder actor -> first shard written", first())
    clock.mark("the other shards and the manifest")
    return clock.phases


def probe_sample(clock: Clock, data: dict) -> dict[str, float]:
    import mlflow  # noqa: F401 - what loading a model imports
    from diffusers import AutoencoderKL, UNet2DModel  # noqa: F401 - diffusers imports these lazily

    from ldmflow.model import sampler  # noqa: F401
    from ldmflow.registry.models import load_sampler

    clock.mark("imports (torch, diffusers, MLflow)")
    model, _ = load_sampler(data["model"])
    clock.mark("model from MLflow")
    job = model.job(n=1, label=3, steps=2)
    stepped: list[float] = []
    model.run([job], on_step=lambda: stepped.append(time.time()))
    clock.mark("first denoising step", stepped[0])
    clock.mark("the other step and decoding")
    return clock.phases


def probe_serve(clock: Clock, data: dict) -> dict[str, float]:
    from ray import serve

    from ldmflow.data import cluster
    from ldmflow.serving import app

    clock.mark("imports (Ray Serve)")
    cluster.ensure_ray()
    clock.mark("Ray started")
    url = app.run(data["model"], app.ServeConfig(port=free_port()))
    clock.mark("Serve application deployed (proxy, replica, model loaded)")
    generate(url)
    clock.mark("first request answered")
    serve.shutdown()
    return clock.phases


PROBES = {"train": probe_train, "train-autoencoder": probe_autoencoder, "precompute": probe_precompute,
          "sample": probe_sample, "serve": probe_serve}


def watch_first(folder: Path, pattern: str):
    """A function giving the time the first file matching ``pattern`` appeared in ``folder``
    (polled every 10 ms from now on, in a thread)."""
    seen: list[float] = []

    def poll() -> None:
        while not seen:
            if folder.exists() and any(folder.glob(pattern)):
                seen.append(time.time())
            time.sleep(0.01)

    threading.Thread(target=poll, daemon=True).start()
    return lambda: seen[0] if seen else time.time()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate(url: str, timeout: float = 120) -> None:
    body = json.dumps({"label": 3, "n": 1, "steps": 2}).encode()
    request = urllib.request.Request(f"{url}/v1/generate", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()


# ---------------------------------------------------------------------------------------
# The commands as a user runs them


def command(name: str, data: dict, work: Path, env: dict) -> dict[str, float]:
    """Seconds from starting ``ldmflow NAME`` to its first step and to its end."""
    from ldmflow.registry import tracking

    config = work / "startup.yaml"
    config.write_text(CONFIG)
    args = {
        "train": ["train", data["latents"], "--workers", "2", "--config", str(config)],
        "train-autoencoder": ["train-autoencoder", data["images"], "--workers", "2", "--config", str(config)],
        "precompute": ["precompute", data["images"], str(work / f"latents-{time.time_ns()}"), "--autoencoder",
                       data["autoencoder"], "--config", str(config)],
        "sample": ["sample", data["model"], "--label", "3", "--n", "1", "--steps", "2", "--out", str(work / "drawn")],
    }
    if name == "serve":
        return serve_command(data, work, env)
    started = time.time()
    if name == "precompute":
        first = watch_first(Path(args[name][2]) / "_parts", "*.json")
    result = subprocess.run([*CLI, *args[name], "--no-progress"], env=env, cwd=work, capture_output=True, text=True)
    ended = time.time()
    if result.returncode:
        raise SystemExit(f"{name} failed: {result.stderr[-2000:]}")
    if name in ("train", "train-autoencoder"):
        client = tracking.client()
        experiment = tracking.experiment_id("startup")
        run = client.search_runs([experiment], order_by=["attributes.start_time DESC"], max_results=1)[0]
        first_step = min(m.timestamp for m in client.get_metric_history(run.info.run_id, "loss")) / 1000
    elif name == "precompute":
        first_step = first()
    else:
        first_step = ended
    return {"to first step": first_step - started, "to the end": ended - started}


def serve_command(data: dict, work: Path, env: dict) -> dict[str, float]:
    port = free_port()
    started = time.time()
    server = subprocess.Popen([*CLI, "serve", data["model"], "--port", str(port)], env=env, cwd=work,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                generate(f"http://127.0.0.1:{port}", timeout=30)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("serve: no answer")
                time.sleep(0.1)
        answered = time.time()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
    return {"to first step": answered - started, "to the end": answered - started}


def prepare(work: Path) -> dict:
    """400 digits at 16 px, a tiny autoencoder and UNet registered (Ray Train's local mode)."""
    from ldmflow.data import cluster
    from ldmflow.data.precompute import PrecomputeConfig
    from ldmflow.data.sharding import ShardConfig
    from ldmflow.flows import shard as shard_flow
    from ldmflow.flows.precompute import precompute_flow
    from ldmflow.training import autoencoder, stage_configs
    from ldmflow.training.stage_configs import DiffusionConfig
    from ldmflow.training.train import train

    images = str(work / "images")
    shard_flow.run("builtin:digits", images, ShardConfig(resolution=16, shard_size=100, limit=400), progress=False)
    cluster.ensure_ray()
    vae = autoencoder.train(images, training_config(stage_configs.AutoencoderConfig, 
        steps=20, batch_size=32, workers=0, checkpoint_every=20, scale_samples=64, experiment="startup-data",
        model_name="startup-data-autoencoder"), progress=False)
    latents = str(work / "latents")
    precompute_flow(images, latents, vae.model_uri, PrecomputeConfig(actors=1), progress=False)
    model = train(latents, training_config(DiffusionConfig, steps=20, batch_size=32, workers=0, checkpoint_every=20, sample_steps=2,
                                           experiment="startup-data", model_name="startup-data"), progress=False)
    return {"images": images, "latents": latents, "autoencoder": vae.model_uri, "model": model.model_uri}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=COMMANDS, default=list(COMMANDS))
    parser.add_argument("--probe", choices=COMMANDS, help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print("PHASES=" + json.dumps(probe(args.probe, args.started, json.loads(args.data))))
        return

    from ldmflow.flows import runtime

    runtime.configure()
    started = time.time()
    runtime.prefect_api()
    api_start = time.time() - started
    from ldmflow.training import bare_loop

    speed = bare_loop.machine_speed()
    work = Path(tempfile.mkdtemp(prefix="ldmflow-bench-startup-"))
    data = prepare(work)
    env = dict(os.environ)
    print(f"\nmachine: {os.cpu_count()} cores, 1-thread bare training loop {speed:.0f} latents/s; "
          f"Prefect's local API started in {api_start:.1f} s (a user's first command pays it)")
    for name in args.only:
        timed = command(name, data, work, env)
        probe_started = time.time()
        result = subprocess.run([sys.executable, __file__, "--probe", name, "--started", str(probe_started),
                                 "--data", json.dumps(data)], env=env, capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("PHASES=")]
        if result.returncode or not lines:
            raise SystemExit(f"probe {name} failed: {result.stderr[-3000:]}")
        phases = json.loads(lines[-1][len("PHASES="):])
        print(f"\nldmflow {name}: {timed['to first step']:.1f} s to the first step, {timed['to the end']:.1f} s in all")
        for phase, seconds in phases.items():
            print(f"  {phase:72s} {seconds:6.1f} s")


if __name__ == "__main__":
    main()
