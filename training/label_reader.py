"""Training a class model's label reader (:mod:`ldmflow.model.label_reader`) on the driver,
after the UNet, from the same latent shards.

The labelled latents' stored moments are read once, in one shuffled pass: all of them, or as
many as :data:`MEMORY` holds (a bounded share of a big dataset, as the evaluation's domain
classifier holds at most ``CLASSIFIER_SAMPLES``; streaming every step's batch from the tars
cost twice the training itself). Each step draws :data:`BATCH` of them at random, each from
its moments as the UNet's are, masked by :func:`ldmflow.model.inpainting.training_masks`,
and the reader learns its label (label smoothing 0.1; unlabelled latents are left out).
AdamW with a one-cycle schedule. A small network on a small grid: 3,000 steps take about
90 s on 2 CPU cores. Seeded: the same latents and config train the same reader.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ldmflow.data import latent_shards, shard_stream
from ldmflow.errors import InputError
from ldmflow.model import inpainting
from ldmflow.model.label_reader import LabelReader
from ldmflow.training.diffusion_loop import LatentBatch, draw_latents

BATCH = 128
LR = 2e-3
WEIGHT_DECAY = 1e-2
SMOOTHING = 0.1
MEMORY = 512 * 2**20  # bytes of latents held: every one of a small set, a shuffled share of a big one


def held(urls: list[str], counts: list[int] | None, seed: int, shuffle_buffer: int, limit: int) -> LatentBatch:
    """Up to ``limit`` labelled latents (their stored moments and labels; no captions) of one
    shuffled pass over the shards: all of them where there are no more."""
    stream = shard_stream.ShardStream(urls, shuffle_buffer=shuffle_buffer, seed=seed,
                                      decode=latent_shards.decode_latent, counts=counts)
    samples = []
    for sample in stream:
        if sample.label >= 0:
            samples.append(sample)
            if len(samples) == limit:
                break
    if not samples:
        raise InputError(f"label reader: the latents at {urls[0]}… hold no labelled sample to learn from")
    logvar = None if samples[0].logvar is None else torch.from_numpy(np.stack([s.logvar for s in samples]))
    return LatentBatch(torch.from_numpy(np.stack([s.mean for s in samples])), logvar,
                       torch.tensor([s.label for s in samples], dtype=torch.long), [], torch.empty(len(samples), 1, 0))


def train_reader(urls: list[str], counts: list[int] | None, latent_shape, num_classes: int, scale_factor: float,
                 steps: int, seed: int = 0, shuffle_buffer: int = 1000) -> LabelReader:
    """A reader of ``num_classes`` labels trained ``steps`` (≥ 1) steps on the latent shards ``urls``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    channels, h, w = (int(x) for x in latent_shape)
    moments = held(urls, counts, seed, shuffle_buffer, max(BATCH, MEMORY // (2 * 4 * channels * h * w)))
    reader = LabelReader(channels, num_classes)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=steps)
    for _ in range(steps):
        pick = torch.randint(0, len(moments.labels), (BATCH,), generator=generator)
        batch = LatentBatch(moments.mean[pick], None if moments.logvar is None else moments.logvar[pick],
                            moments.labels[pick], [], moments.text[pick])
        x0 = draw_latents(batch, scale_factor, generator)
        cells = inpainting.training_masks(BATCH, (h, w), generator)
        loss = F.cross_entropy(reader(inpainting.conditioning_channels(x0, cells)), batch.labels,
                               label_smoothing=SMOOTHING)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return reader.eval()
