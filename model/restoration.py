"""Restoration of a noisy image: SDEdit at a strength chosen for the noise it carries.

SDEdit (Meng et al. 2022) removes noise by noising the image's latent further, to a level
that drowns the noise it has, and denoising from there: too little strength leaves the noise,
too much redraws the image. :func:`strength` estimates the input's noise (:func:`noise_sigma`,
Immerkær's fast estimator), measures how much of it reaches the latent (the latent's change
when that much noise again is added, through the model's own encoder), and picks the first
step of the sampling schedule whose noise level is ``MARGIN`` times it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MARGIN = 2.0  # the start's noise over the latent noise estimated: chosen with benchmarks/restore.py
MIN_STRENGTH = 0.1  # a clean input is still passed through the model's last steps
# Immerkær (1996): the difference of two Laplacians cancels the image's smooth structure and keeps the noise.
_KERNEL = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]]).view(1, 1, 3, 3)


def noise_sigma(image: torch.Tensor) -> float:
    """The standard deviation of additive Gaussian noise in ``image`` (3, H, W) in [−1, 1],
    on a [0, 1] scale: Immerkær's estimate (1996) of each channel, averaged."""
    channels = ((image.float().cpu() + 1) / 2).unsqueeze(1)  # (3, 1, H, W)
    response = F.conv2d(channels, _KERNEL)
    h, w = response.shape[-2:]
    return float(math.sqrt(math.pi / 2) * response.abs().sum() / (6 * h * w * len(channels)))


@torch.no_grad()
def strength(sampler, image: torch.Tensor, steps: int, sampler_name: str = "ddim", seed: int = 0,
             margin: float = MARGIN) -> float:
    """The SDEdit strength, a share of ``steps`` in [MIN_STRENGTH, 1], that restores ``image``
    (3, H, W) in [−1, 1] with ``sampler`` (:class:`~ldmflow.model.sampler.Sampler`) running
    ``sampler_name``'s schedule."""
    sigma = noise_sigma(image)
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed)) * 2 * sigma  # [−1, 1] scale
    pair = torch.stack([image, (image + noise).clamp(-1, 1)])
    latents = sampler.encode(pair)
    latent_sigma = float((latents[1] - latents[0]).pow(2).mean().sqrt())
    schedule = _noise_levels(sampler, steps, sampler_name)  # per start index: the noise level in units of the clean latent
    target = margin * latent_sigma
    start = max((i for i, level in enumerate(schedule) if level >= target), default=0)
    return min(1.0, max(MIN_STRENGTH, (steps - start) / steps))


def _noise_levels(sampler, steps: int, sampler_name: str) -> list[float]:
    """√((1 − ᾱ_t)/ᾱ_t) at each timestep of a ``steps``-step schedule, first (noisiest) to last."""
    from ldmflow.model import schedules

    scheduler = schedules.sampling_scheduler(sampler.schedule, sampler_name)
    scheduler.set_timesteps(steps)
    alphas = scheduler.alphas_cumprod[scheduler.timesteps.long()]
    return ((1 - alphas) / alphas).sqrt().tolist()
