"""The reverse process: a latent denoised step by step with classifier-free guidance, from
noise or from an SDEdit start, with an inpainting's known region blended in after every step
and RePaint's jumps back (:func:`~ldmflow.model.sampling.resampling_plan`).
:class:`~ldmflow.model.sampler.Sampler` prepares what it is given."""

from __future__ import annotations

from collections.abc import Callable

import torch


@torch.no_grad()
def reverse_process(
    unet,
    scheduler,
    latents: torch.Tensor,
    *,
    steps: int,
    conditioning: dict,
    null_conditioning: dict | None,
    guidance: torch.Tensor | float,
    generator: list[torch.Generator] | torch.Generator | None,
    start_step: int = 0,
    known: tuple[torch.Tensor, torch.Tensor] | None = None,
    known_noise=None,
    plan: list[int] | None = None,
    on_step: Callable[[], None] = lambda: None,
) -> torch.Tensor:
    """The reverse process with classifier-free guidance (Ho & Salimans 2022).

    ``latents`` is pure noise (``start_step`` 0) or a latent already noised to the level of
    timestep ``start_step`` (SDEdit, Meng et al. 2022). Both guidance passes run as one
    batch of 2B; ``guidance`` is a scalar or a (B, 1, 1, 1) tensor. ``known = (latent, mask)``
    with mask 1 where the latent is kept re-imposes the known region, noised to each step's
    level by ``known_noise(shape)``, after every step (inpainting by latent blending).
    ``plan`` (:func:`~ldmflow.model.sampling.resampling_plan`) orders the steps with RePaint's
    jumps back, each re-noising the latent by ``known_noise``; by default each step runs once.
    ``scheduler`` must be fresh for this call, and stateless between steps (DDPM, DDIM) when
    the plan jumps; ``on_step`` is called after each step.
    """
    scheduler.set_timesteps(steps, device=latents.device)
    timesteps = scheduler.timesteps
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start_step * scheduler.order)
    if start_step == 0:
        latents = latents * scheduler.init_noise_sigma
    guided = null_conditioning is not None and not _all_one(guidance)
    order = plan if plan is not None else range(start_step, len(timesteps))
    last = None
    for i in order:
        if last is not None and i <= last:  # a jump back: noise from after step `last` to before step i
            latents = renoise(scheduler, latents, timesteps[last + 1], timesteps[i], known_noise(latents.shape[1:]))
        last, t = i, timesteps[i]
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        kwargs = {k: torch.cat([null_conditioning[k], v]) for k, v in conditioning.items()} if guided else conditioning
        prediction = unet(model_input, t, **kwargs, return_dict=False)[0]
        if guided:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + guidance * (cond - uncond)
        latents = scheduler.step(prediction, t, latents, generator=generator, return_dict=False)[0]
        if known is not None:
            known_latent, mask = known
            if i + 1 < len(timesteps):
                noise = known_noise(known_latent.shape[1:]).to(latents.device)
                known_latent = scheduler.add_noise(known_latent, noise, timesteps[i + 1 : i + 2])
            latents = mask * known_latent + (1 - mask) * latents
        on_step()
    return latents


def renoise(scheduler, latents: torch.Tensor, t_from, t_to, noise: torch.Tensor) -> torch.Tensor:
    """``latents`` at the noise level of timestep ``t_from`` taken forward to ``t_to`` (a
    higher one): q(x_to | x_from) = N(√(ᾱ_to/ᾱ_from)·x_from, (1 − ᾱ_to/ᾱ_from)·I)."""
    alphas = scheduler.alphas_cumprod.to(latents.device)
    ratio = alphas[int(t_to)] / alphas[int(t_from)]
    return ratio.sqrt() * latents + (1 - ratio).sqrt() * noise.to(latents.device)


def _all_one(guidance) -> bool:
    if isinstance(guidance, torch.Tensor):
        return bool((guidance == 1).all())
    return guidance == 1
