"""What the sampler is asked: a :class:`Job` (one request's images, its seeds and where they
lie along an interpolation), jobs grouped into batches that share a timestep schedule, and
the per-image noise every image draws from its own seed (:mod:`ldmflow.model.sampler` runs
them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

SamplerName = Literal["ddpm", "ddim", "dpm++"]
SAMPLERS = ("ddpm", "ddim", "dpm++")


@dataclass(frozen=True)
class Job:
    """One request's images: ``n`` images drawn with seeds ``seed … seed + n − 1``.

    With ``image`` (3, H, W) in [−1, 1] and ``strength`` < 1 it is an edit (SDEdit); with
    ``mask`` (1, H, W), 1 where new content goes and 0 where the image is kept, it is an
    inpainting: zero-shot, with each stretch of ``jump_length`` steps run ``jump_count`` times
    (RePaint's resampling, :func:`resampling_plan`), or by a model trained for it.
    ``label``/``prompt`` None draws unconditionally.
    """

    n: int = 1
    seed: int = 0
    label: int | None = None
    prompt: str | None = None
    sampler: SamplerName = "ddim"
    steps: int = 25
    guidance: float = 3.0
    image: torch.Tensor | None = None
    strength: float = 1.0
    mask: torch.Tensor | None = None
    jump_length: int = 1  # inpainting: steps a resampling jump goes back
    jump_count: int = 1  # inpainting: times each stretch of jump_length steps runs (1: no resampling)
    infer_label: bool = False  # edit, inpainting: condition on the label the known region fits best
    to_seed: int | None = None
    to_label: int | None = None
    to_prompt: str | None = None
    at: float | None = None  # one image (n = 1) at this point of the path, 0 … 1
    invert: bool = False  # with image: DDIM-invert it to its noise, then sample from that
    source_label: int | None = None  # the image's own condition for the inversion, where known
    source_prompt: str | None = None

    @property
    def interpolates(self) -> bool:
        return self.to_seed is not None or self.to_label is not None or self.to_prompt is not None

    def seeds(self) -> list[int]:
        """The seed of each image's generator: ``seed + i``; along an interpolation ``seed``,
        and ``to_seed`` for the last image."""
        if not self.interpolates:
            return [self.seed + i for i in range(self.n)]
        last = self.seed if self.to_seed is None else self.to_seed
        return [last if t == 1 else self.seed for t in self.path().tolist()]

    def path(self) -> torch.Tensor:
        """(n,) the position of each image along an interpolation, 0 … 1: evenly spaced, or
        ``at`` for a single image."""
        if self.at is not None:
            return torch.tensor([float(self.at)])
        return torch.linspace(0, 1, self.n) if self.n > 1 else torch.zeros(1)

    @property
    def mode(self) -> str:
        if self.mask is not None:
            return "inpaint"
        if self.image is not None:
            return "invert" if self.invert else "edit"
        return "generate"

    @property
    def denoising_steps(self) -> int:
        """UNet steps the job runs: ``steps``, its ``strength`` share for an edit, twice
        ``steps`` for an inversion (to the noise, and back), the resampling plan's length for
        an inpainting."""
        if self.mode == "edit":
            return min(int(round(self.steps * self.strength)), self.steps)
        if self.mode == "inpaint":
            return len(resampling_plan(self.steps, self.jump_length, self.jump_count))
        return 2 * self.steps if self.mode == "invert" else self.steps

    def batch_key(self) -> tuple:
        """Jobs with equal keys share a timestep schedule and run as one batch (an inpainting
        that infers its label runs as one batch of its finalists' completions)."""
        strength = self.strength if self.mode == "edit" else 1.0
        jumps = (self.jump_length, self.jump_count) if self.mode == "inpaint" and self.jump_count > 1 else (1, 1)
        return (self.mode, self.sampler, self.steps, strength, *jumps, self.mode == "inpaint" and self.infer_label)


def resampling_plan(steps: int, jump_length: int = 1, jump_count: int = 1) -> list[int]:
    """The denoising steps (indices into the schedule's ``steps`` timesteps) in the order an
    inpainting runs them: RePaint's resampling (Lugmayr et al. 2022). The schedule is cut into
    stretches of ``jump_length`` steps; each stretch that ends before the last step is run
    ``jump_count`` times, the latent re-noised back to the stretch's start between runs, so
    the generated region is denoised again in the light of the known region it was blended
    with. A step index not above the one before it marks such a jump back."""
    if jump_count <= 1 or jump_length < 1:
        return list(range(steps))
    plan: list[int] = []
    start = 0
    while start + jump_length <= steps - 1:
        plan.extend(list(range(start, start + jump_length)) * jump_count)
        start += jump_length
    return plan + list(range(start, steps))


def batch_groups(jobs: list[Job]) -> list[list[int]]:
    """Indices of ``jobs`` grouped by :meth:`Job.batch_key`, in order of first appearance:
    each group can run as one :meth:`~ldmflow.model.sampler.Sampler.run`."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.batch_key(), []).append(i)
    return list(groups.values())


def generators(jobs: list[Job]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for job in jobs for seed in job.seeds()]


def copies(gens: list[torch.Generator], count: int) -> list[torch.Generator]:
    """``count`` copies of ``gens`` one after another, each drawing what its original would
    draw next: the same image sampled ``count`` times over, under ``count`` conditions."""
    out = []
    for _ in range(count):
        for original in gens:
            copy = torch.Generator(device=original.device)
            copy.set_state(original.get_state())
            out.append(copy)
    return out


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of ``a`` and ``b`` (same shape) at each ``t`` of (k,): (k, *shape).

    Along the great circle through both (two Gaussian noises have nearly the same norm, which
    every point keeps); ``t`` 0 and 1 give ``a`` and ``b`` exactly; (anti)parallel inputs
    fall back to the straight line."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cosine = torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp_min(1e-12)
    omega = torch.arccos(cosine.clamp(-1, 1))
    t = t.double().view(-1, *([1] * a.dim()))
    if torch.sin(omega).abs() < 1e-6:
        mixed = (1 - t) * a.double() + t * b.double()
    else:
        mixed = (torch.sin((1 - t) * omega) * a.double() + torch.sin(t * omega) * b.double()) / torch.sin(omega)
    mixed = mixed.to(a.dtype)
    mixed[t.flatten() == 0] = a
    mixed[t.flatten() == 1] = b
    return mixed


def per_image_noise(gens: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """(len(gens), *shape) standard normal noise, row i from generator i."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in gens])
