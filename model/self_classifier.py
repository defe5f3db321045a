"""A class model as its own classifier: the label that best explains what is known of an image.

Inpainting or restoring a digit without its label, an unconditional model may draw any digit
that fits the known pixels a little; told the label, it draws that digit well. The model
can find the label itself (Li et al. 2023, "Your diffusion model is secretly a zero-shot
classifier"): noised to a timestep, the known latents are denoised best under the label
they belong to. :func:`infer_labels` sums each label's ε error over the known cells at a few
timesteps (the cells to generate zeroed), keeps the :data:`FINALISTS` best labels, measures
them at more timesteps, and returns the best of those. It costs ``classes × PROBES +
FINALISTS × REFINES`` UNet passes per image (152 for ten classes): about three 25-step
guided samplings. Measured with benchmarks/restore.py (docs/editing.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldmflow.model import schedules
from ldmflow.model.sampling import per_image_noise

PROBES = 8  # timesteps at which every label is measured
REFINES = 24  # more timesteps for the finalists
FINALISTS = 3
SPAN = (0.05, 0.85)  # the share of the training schedule probed: the clean end to well into the noise


@torch.no_grad()
def infer_labels(denoiser: Callable, schedule: schedules.NoiseSchedule, latents: torch.Tensor, known: torch.Tensor,
                 num_classes: int, generators: list[torch.Generator]) -> torch.Tensor:
    """(B,) the label that denoises each of ``latents`` (B, C, h, w) best where ``known``
    (B, 1, h, w) is 1; the noise of image i is drawn from ``generators[i]``. ``denoiser`` is
    called as a UNet is, with ``class_labels``."""
    scheduler = schedules.training_scheduler(schedule)
    total = scheduler.config.num_train_timesteps
    x0 = latents * known
    batch = len(latents)
    errors = torch.zeros(batch, num_classes, device=latents.device)
    rows = torch.arange(batch, device=latents.device)

    def measure(timesteps: torch.Tensor, candidates: torch.Tensor) -> None:  # candidates (B, k)
        k = candidates.shape[1]
        labels = candidates.T.reshape(-1)  # candidate-major: label j of every image, then j + 1
        for t in timesteps.tolist():
            noise = per_image_noise(generators, tuple(latents.shape[1:])).to(latents.device, latents.dtype)
            steps = torch.full((batch,), int(t), device=latents.device, dtype=torch.long)
            noisy = scheduler.add_noise(x0, noise, steps)
            target = noise if schedule.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, steps)
            prediction = denoiser(noisy.repeat(k, 1, 1, 1), steps.repeat(k), class_labels=labels, return_dict=False)[0]
            error = ((prediction - target.repeat(k, 1, 1, 1)) ** 2 * known.repeat(k, 1, 1, 1)).sum(dim=(1, 2, 3))
            errors[rows.repeat(k), labels] += error.float()

    low, high = (int(total * share) for share in SPAN)
    measure(torch.linspace(low, high, PROBES).round().long(), torch.arange(num_classes).expand(batch, -1).to(rows))
    finalists = errors.topk(min(FINALISTS, num_classes), dim=1, largest=False).indices
    offset = (high - low) / (2 * REFINES)
    measure(torch.linspace(low + offset, high - offset, REFINES).round().long(), finalists)
    return finalists.gather(1, errors.gather(1, finalists).argmin(dim=1, keepdim=True)).squeeze(1)
