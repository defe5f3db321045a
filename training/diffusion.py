"""Diffusion training as plain functions: targets, loss weights, noise tricks, EMA, LR.

The network knows nothing of the schedule: it maps ``(x_t, t, cond)`` to a prediction.
The schedule and its diffusers schedulers are the model layer's
(:mod:`ldmflow.model.schedules`); what is here is what diffusers leaves to the training
script. The reverse process lives with the sampler (:mod:`ldmflow.model.sampler`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) at ``timesteps``."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar).clamp_min(1e-20)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy", eq. 9 and its v-prediction form).

    For an ε target the weight is min(SNR, γ) / SNR; for a v target it is
    min(SNR, γ) / (SNR + 1). At zero terminal SNR the v weight is 0/1 = 0, not NaN.
    """
    clipped = torch.minimum(snr_t, torch.full_like(snr_t, gamma))
    if prediction_type == "epsilon":
        return clipped / snr_t.clamp_min(1e-20)
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1.0)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the network learns to predict: ε, or v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise plus a per-channel constant (Guttenberg 2023, "Diffusion with Offset Noise")."""
    if strength == 0:
        return noise
    shift = torch.randn(noise.shape[0], noise.shape[1], 1, 1, generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + strength * shift


def drop_labels(labels: torch.Tensor, rate: float, null_label: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Classifier-free guidance dropout (Ho & Salimans 2022): each label becomes the null
    label with probability ``rate``."""
    if rate <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < rate
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def drop_embeddings(embeddings: torch.Tensor, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Classifier-free guidance dropout for text: an embedding becomes zeros with probability ``rate``."""
    if rate <= 0:
        return embeddings
    keep = (torch.rand(embeddings.shape[0], generator=generator, device=embeddings.device) >= rate).to(embeddings.dtype)
    return embeddings * keep.view(-1, *([1] * (embeddings.dim() - 1)))


def diffusion_loss(
    prediction: torch.Tensor,
    target_: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    weighting: Literal["uniform", "min_snr"],
    gamma: float,
    prediction_type: str,
) -> torch.Tensor:
    """Mean over the batch of the per-sample MSE, weighted uniformly or by min-SNR-γ."""
    per_sample = F.mse_loss(prediction.float(), target_.float(), reduction="none").mean(dim=(1, 2, 3))
    if weighting == "min_snr":
        per_sample = per_sample * min_snr_weights(snr(alphas_cumprod, timesteps), gamma, prediction_type)
    return per_sample.mean()


def ema_decay(step: int, max_decay: float, warmup: int) -> float:
    """EMA decay with warm-up: min(max_decay, (1 + n) / (warmup + n)), n the EMA update count
    (the schedule of diffusers' ``EMAModel`` without its power form); warmup 10 gives 0.1 at n=0."""
    return min(max_decay, (1 + step) / (warmup + step))


def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], step: int, max_decay: float, warmup: int) -> None:
    """θ_ema ← d · θ_ema + (1 − d) · θ in place, d = :func:`ema_decay` of ``step``: torch's EMA
    (``swa_utils.get_ema_multi_avg_fn``, one fused lerp over all the tensors)."""
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    get_ema_multi_avg_fn(ema_decay(step, max_decay, warmup))(ema, params, step)


def lr_factor(step: int, warmup: int, total: int, min_factor: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_factor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_factor + (1 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
