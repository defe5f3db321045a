"""The GPU figures: precompute and UNet training at 256 px with the `base` presets, FSDP vs DDP.

Ratios against baselines measured in the same run, on whatever device is present (a CUDA
GPU for the real figures; ``--smoke`` shrinks everything to check the script on a CPU):

1. Precompute: the `base` autoencoder (f=8) encoding 256-px images through ldmflow's
   encoder actor class (:class:`ldmflow.data.encode_stages.LatentEncoder`), in bf16 autocast
   vs fp32: images/s.
2. Training: the `base` class-conditional UNet on 32×32×4 latents, ldmflow's loss and
   optimizer step in bf16 autocast vs fp32: latents/s, achieved TFLOP/s (FLOPs counted by
   ``torch.utils.flop_counter`` for one step) and model FLOP utilisation against the card's
   dense bf16 peak (``--peak-tflops``, or looked up from the card's name), peak memory.
3. FSDP vs DDP: the training state each rank holds (weights, gradients, AdamW moments) and
   its peak memory, with 2 ranks (NCCL over 2 GPUs when there are 2, else gloo on the CPU:
   the state's size does not depend on the device).

Serving throughput on the GPU: ``benchmarks/serve.py`` (``benchmarks/gpu.sh`` runs both).
Usage: python benchmarks/gpu.py [--batch-size 32] [--steps 20] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched on the name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def images(count: int, resolution: int):
    """Real digits (scikit-learn's), upscaled to ``resolution``, as (N, 3, R, R) in [-1, 1]."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    digits = torch.from_numpy(load_digits().images[:count].astype(np.float32) / 8.0 - 1.0)[:, None]
    return torch.nn.functional.interpolate(digits, size=resolution, mode="bilinear").repeat(1, 3, 1, 1).numpy()


def timed(run, repeats: int, sync) -> float:
    """Seconds per call of ``run`` after two warm-up calls."""
    for _ in range(2):
        run()
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    sync()
    return (time.perf_counter() - started) / repeats


def precompute_rows(args, device, sync) -> dict[str, float]:
    import torch

    from ldmflow.data.encode_stages import LatentEncoder
    from ldmflow.model import autoencoders

    torch.manual_seed(0)
    vae = autoencoders.build(args.autoencoder, args.resolution)
    folder = Path(args.work) / "autoencoder"
    autoencoders.save(vae, folder, scale_factor=1.0, resolution=args.resolution, config={}, lineage={})
    files = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    batch = images(args.batch_size, args.resolution)
    rows = {}
    for precision in ("no", "bf16"):
        encoder = LatentEncoder(files, args.batch_size, "mean_logvar", use_gpu=device.type == "cuda",
                                threads=os.cpu_count() or 1, mixed_precision=precision)
        seconds = timed(lambda: encoder.encode(batch), args.repeats, sync)
        rows[f"precompute encode, {args.autoencoder} autoencoder, {'bf16' if precision == 'bf16' else 'fp32'}"] = (
            args.batch_size / seconds)
    return rows


def training_rows(args, device, sync, peak_tflops: float | None) -> tuple[dict[str, float], dict[str, str]]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ldmflow.model import schedules, unets
    from ldmflow.training.diffusion_loop import denoising_loss
    from ldmflow.training.stage_configs import DiffusionConfig

    config = DiffusionConfig(preset=args.unet)
    side = args.resolution // 8
    scheduler = schedules.training_scheduler(config.noise)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch_size, 4, side, side, generator=generator).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    timesteps = torch.randint(0, 1000, (args.batch_size,), generator=generator).to(device)
    labels = torch.randint(0, 11, (args.batch_size,), generator=generator).to(device)
    rows, notes = {}, {}
    for autocast in (False, True):
        torch.manual_seed(0)
        model = unets.build(args.unet, "class", (4, side, side), 10).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = denoising_loss(model, scheduler, x0, noise, timesteps, {"class_labels": labels}, config, autocast)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(step, args.steps, sync)
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        name = f"train step, {args.unet} UNet, {'bf16 autocast' if autocast else 'fp32'}"
        rows[name] = args.batch_size / seconds
        tflops = counter.get_total_flops() / seconds / 1e12
        mfu = f", MFU {tflops / peak_tflops:.1%} of {peak_tflops:.0f}" if peak_tflops and autocast else ""
        memory = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
        notes[name] = f"{tflops:.2f} TFLOP/s{mfu}{memory}"
    return rows, notes


def _sharding_rank(rank: int, world: int, strategy: str, args, port: int, out) -> None:
    import torch

    from ldmflow.model import unets
    from ldmflow.training import parallel

    cuda = torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    side = args.resolution // 8
    torch.manual_seed(0)
    model = unets.build(args.unet, "class", (4, side, side), 10)
    ema = unets.build(args.unet, "class", (4, side, side), 10).requires_grad_(False)
    if strategy == "ddp":
        model, ema = model.to(device), ema.to(device)
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
    else:
        trained = parallel.prepare(model, ema, "fsdp", device, world)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4)
    x = torch.randn(2, 4, side, side, device=device)
    loss = trained(x, torch.zeros(2, dtype=torch.long, device=device), class_labels=torch.zeros(2, dtype=torch.long,
                                                                                                  device=device)).sample
    loss.float().pow(2).mean().backward()
    optimizer.step()

    def local_bytes(tensors) -> int:
        total = 0
        for t in tensors:
            t = getattr(t, "_local_tensor", t)
            total += t.numel() * t.element_size()
        return total

    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    held = local_bytes(trained.parameters()) + local_bytes(p.grad for p in trained.parameters() if p.grad is not None)
    held += local_bytes(state) + local_bytes(ema.parameters())
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    if rank == 0:
        out.put((strategy, held, peak, "nccl" if cuda else "gloo"))
    torch.distributed.destroy_process_group()


def sharding_rows(args) -> dict[str, str]:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    rows = {}
    for i, strategy in enumerate(("ddp", "fsdp")):
        out = context.Queue()
        ranks = [context.Process(target=_sharding_rank, args=(r, 2, strategy, args, 29620 + i, out)) for r in range(2)]
        for process in ranks:
            process.start()
        strategy, held, peak, backend = out.get(timeout=600)
        for process in ranks:
            process.join()
        memory = f", peak {peak / 2**30:.2f} GiB" if peak else ""
        rows[f"{strategy.upper()}, 2 ranks ({backend}), {args.unet} UNet"] = (
            f"{held / 2**20:.0f} MiB of training state per rank{memory}")
    return rows


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps (after 2 warm-up steps)")
    parser.add_argument("--repeats", type=int, default=10, help="timed encoder batches")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (default: by name)")
    parser.add_argument("--smoke", action="store_true", help="tiny presets, 32 px, 2 steps: checks the script on a CPU")
    args = parser.parse_args()
    args.autoencoder = args.unet = "base"
    if args.smoke:
        args.resolution, args.batch_size, args.steps, args.repeats = 64, 4, 2, 2
        args.autoencoder = args.unet = "tiny"
    args.work = tempfile.mkdtemp(prefix="ldmflow-bench-gpu-")

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in card), None)

    rows = precompute_rows(args, device, sync)
    trained, notes = training_rows(args, device, sync, peak if device.type == "cuda" else None)
    rows |= trained
    sharding = sharding_rows(args)

    print(f"\ndevice: {card}; {args.resolution} px, batch {args.batch_size}")
    print(f"{'':60s} {'per s':>10s} {'vs fp32':>8s}")
    baselines = {}
    for name, rate in rows.items():
        kind = name.rsplit(", ", 1)[0]
        baselines.setdefault(kind, rate)
        print(f"{name:60s} {rate:10.1f} {rate / baselines[kind]:7.2f}x {notes.get(name, '')}")
    for name, text in sharding.items():
        print(f"{name:60s} {text}")


if __name__ == "__main__":
    main()
