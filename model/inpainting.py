"""Inpainting, defined once: how a pixel mask becomes the latent grid's, RePaint's resampling
settings, how the known pixels are composited back, and the extra input channels of a UNet
trained for inpainting.

Zero-shot, any model inpaints by latent blending (:func:`ldmflow.model.reverse_process.reverse_process`):
after each step the known region's latents, noised to the next step's level, replace the
latent's outside :func:`latent_mask`; RePaint's resampling (:func:`~ldmflow.model.sampling.resampling_plan`)
runs each stretch of steps again so the new region agrees with the known one. A model trained
for inpainting (``train: inpainting: true``) instead sees, beside the noisy latent, the known
latents with the masked cells zeroed and the latent mask (:func:`conditioning_channels`), as
Stable Diffusion's inpainting models see the masked image's latents and the mask. Either way
the decoded image is put back over the input through :func:`feathered`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Zero-shot settings, chosen with benchmarks/restore.py (BENCHMARKS.md): RePaint's resampling for
# a request that names none (off: at 25 steps it gained nothing measurable, at 2.4× the cost; a
# request asking for jump_count alone gets JUMP_LENGTH), the latent cells the mask grows by
# (none: growing it lost accuracy on every mask measured), and the band of known pixels
# (outside the mask) over which the output fades into the input.
JUMP_LENGTH = 5
JUMP_COUNT = 1
MASK_DILATION = 0
FEATHER_PIXELS = 2
STATELESS_SAMPLERS = ("ddpm", "ddim")  # resampling steps back: only schedulers without step history
MAX_JUMP_COUNT = 10


def latent_mask(pixel_mask: torch.Tensor, latent_hw: tuple[int, int], dilation: int = MASK_DILATION) -> torch.Tensor:
    """(B, 1, h, w) of a (B, 1, H, W) pixel mask (1 = generate): a latent cell is generated if
    any pixel it covers is, or any cell within ``dilation`` of one is."""
    cells = (F.adaptive_max_pool2d(pixel_mask.float(), tuple(latent_hw)) > 0.5).float()
    return F.max_pool2d(cells, 2 * dilation + 1, stride=1, padding=dilation) if dilation else cells


def mostly_known(pixel_mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) of a (B, 1, H, W) pixel mask (1 = generate): 1 where at least half of
    a latent cell's pixels are known. Judging a completion (not generating one), a cell
    beside the mask's edge is mostly the input's."""
    return (F.adaptive_avg_pool2d(1 - pixel_mask.float(), tuple(latent_hw)) >= 0.5).float()


def feathered(pixel_mask: torch.Tensor, band: int = FEATHER_PIXELS) -> torch.Tensor:
    """The weight of the generated image per pixel: 1 under the mask, fading to 0 across
    ``band`` known pixels around it, and 0 beyond them, where the output is the input exactly."""
    if not band:
        return pixel_mask
    spread = F.avg_pool2d(pixel_mask, 2 * band + 1, stride=1, padding=band, count_include_pad=False)
    return torch.maximum(pixel_mask, spread)


def default_jumps(steps: int, sampler: str, given: dict) -> dict[str, int]:
    """The resampling of a zero-shot inpainting request that names ``given`` of it: the
    default count, and a jump length that fits ``steps``."""
    count = given.get("jump_count", JUMP_COUNT)
    if count == 1 or sampler not in STATELESS_SAMPLERS or steps < 2:
        return {}
    return {"jump_length": given.get("jump_length", min(JUMP_LENGTH, steps - 1)), "jump_count": count}


def check_resampling(job, trained_for_it: bool = False) -> None:
    """Raise ValueError naming the resampling field a job cannot have (``trained_for_it``: the
    model is an inpainting model, which needs none)."""
    if not 1 <= job.jump_count <= MAX_JUMP_COUNT:
        raise ValueError(f"jump_count: must be in [1, {MAX_JUMP_COUNT}]")
    if job.jump_count == 1:
        return
    if job.mode != "inpaint":
        raise ValueError("jump_count: resampling is for inpainting (give an image and a mask)")
    if trained_for_it:
        raise ValueError("jump_count: this model is trained for inpainting; resampling is for zero-shot inpainting")
    if job.sampler not in STATELESS_SAMPLERS:
        raise ValueError(f"sampler: resampling steps back, which {job.sampler} cannot: use ddpm or ddim")
    if not 1 <= job.jump_length < job.steps:
        raise ValueError(f"jump_length: must be in [1, steps − 1] ({job.steps - 1})")


# -- a UNet trained for inpainting -----------------------------------------------------------

def extra_channels(latent_channels: int) -> int:
    """Input channels an inpainting UNet takes beyond the noisy latent's: the known latents
    and the mask."""
    return latent_channels + 1


def conditioning_channels(known_latents: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """(B, C + 1, h, w): the known latents with the cells to generate zeroed, and the latent
    mask (1 = generate), in that order after the noisy latent's C channels. Training makes
    them from the clean latents it reads, sampling from the input image's latents: the
    same thing, so training needs no pixels."""
    return torch.cat([known_latents * (1 - cells), cells], dim=1)


def nothing_known(latents: torch.Tensor) -> torch.Tensor:
    """The conditioning channels of a request with no known region (generate, edit, invert):
    everything is generated, as the whole-image masks of training teach."""
    shape = (latents.shape[0], 1, *latents.shape[2:])
    return conditioning_channels(torch.zeros_like(latents), torch.ones(shape, dtype=latents.dtype, device=latents.device))


def widen_input(weights: dict[str, torch.Tensor], latent_channels: int) -> dict[str, torch.Tensor]:
    """A plain UNet's weights for its inpainting version: the first convolution gains zero
    weights for the extra channels, so the model starts as the one it comes from."""
    conv = weights["conv_in.weight"]
    if conv.shape[1] != latent_channels:
        return weights
    extra = torch.zeros(conv.shape[0], extra_channels(latent_channels), *conv.shape[2:], dtype=conv.dtype)
    return {**weights, "conv_in.weight": torch.cat([conv, extra], dim=1)}


# The training masks' kinds and their shares: boxes, bands from an edge, strokes, and the
# whole image (which keeps the model a generator when nothing is known).
MASK_KINDS = {"box": 0.3, "band": 0.25, "stroke": 0.25, "whole": 0.2}


def training_masks(batch: int, side: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(B, 1, h, w) random latent masks (1 = generate) of :data:`MASK_KINDS`, from ``generator``."""
    h, w = side
    kinds = list(MASK_KINDS)
    chosen = torch.multinomial(torch.tensor(list(MASK_KINDS.values())), batch, replacement=True, generator=generator)
    masks = torch.zeros(batch, 1, h, w)

    def rand(low: int, high: int) -> int:  # inclusive
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    for i, kind in enumerate(kinds[int(k)] for k in chosen):
        if kind == "whole":
            masks[i] = 1
        elif kind == "box":
            bh, bw = rand(max(1, h // 4), max(1, 3 * h // 4)), rand(max(1, w // 4), max(1, 3 * w // 4))
            top, left = rand(0, h - bh), rand(0, w - bw)
            masks[i, 0, top : top + bh, left : left + bw] = 1
        elif kind == "band":
            depth = rand(max(1, h // 4), max(1, 3 * h // 4))
            edge = rand(0, 3)
            region = [(slice(0, depth), slice(None)), (slice(h - depth, h), slice(None)),
                      (slice(None), slice(0, depth)), (slice(None), slice(w - depth, w))][edge]
            masks[i, 0][region] = 1
        else:  # a stroke: a random walk of cells, one or two wide
            y, x, width = rand(0, h - 1), rand(0, w - 1), rand(1, 2)
            for _ in range(rand(h // 2, 2 * h)):
                masks[i, 0, y : y + width, x : x + width] = 1
                y = min(max(y + rand(-1, 1), 0), h - 1)
                x = min(max(x + rand(-1, 1), 0), w - 1)
    return masks
