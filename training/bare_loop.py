"""The bare PyTorch training loop that ldmflow's speed is measured against, and the machine's
speed by it.

``benchmarks/train.py`` compares ldmflow's training step with :func:`latents_per_second` on
the same UNet and data; :func:`machine_speed` runs the same loop for a few seconds on random
latents so that any timing (the test suite's, a benchmark's) can be read against the machine
it ran on: "64 latents/s" is a slow 2-core VM, "220" a fast one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from ldmflow.model import schedules, unets
from ldmflow.training import diffusion


def latents_per_second(model, scheduler, config, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], steps: int,
                       encode: Callable[[torch.Tensor], torch.Tensor] | None = None, seconds: float = 0.0) -> float:
    """Latents (or images) per second of a plain loop: noise, predict, weighted MSE, AdamW,
    over ``batches`` of (latents or images, labels) in memory, after 5 warm-up steps; for
    ``steps`` steps, or as many as fit in ``seconds`` when that is given."""
    from ldmflow.training.diffusion_loop import denoising_loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(0)
    count, started, step = 0, 0.0, 0
    while True:
        if step == 5:
            started, count = time.perf_counter(), 0
        if step >= 5 and (time.perf_counter() - started >= seconds if seconds else step >= steps + 5):
            break
        x, labels = batches[step % len(batches)]
        if encode is not None:
            with torch.no_grad():
                x = encode(x)
        noise = torch.randn(x.shape, generator=generator)
        timesteps = torch.randint(0, config.noise.num_train_timesteps, (x.shape[0],), generator=generator)
        labels = diffusion.drop_labels(labels, config.cond_dropout, 10, generator)
        loss = denoising_loss(model, scheduler, x, noise, timesteps, {"class_labels": labels}, config, False)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        count += x.shape[0]
        step += 1
    return count / (time.perf_counter() - started)


def machine_speed(seconds: float = 3.0, batch_size: int = 64) -> float:
    """This machine's latents/s on one thread: the ``tiny`` class UNet on 8×8×4 latents in
    batches of 64, as ``benchmarks/train.py``'s "bare loop, 1 thread" row."""
    from ldmflow.training.stage_configs import DiffusionConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        batches = [(torch.randn(batch_size, 4, 8, 8, generator=generator),
                    torch.randint(0, 10, (batch_size,), generator=generator)) for _ in range(4)]
        torch.manual_seed(0)
        config = DiffusionConfig()
        model = unets.build("tiny", "class", (4, 8, 8), 10)
        return latents_per_second(model, schedules.training_scheduler(config.noise), config, batches, 0, seconds=seconds)
    finally:
        torch.set_num_threads(threads)
