"""A class model as its own classifier: the label that best explains what is known of an image.

Inpainting or restoring a digit without its label, an unconditional model may draw any digit
that fits the known pixels a little; told the label, it draws that digit well. The model
can find the label itself (Li et al. 2023, "Your diffusion model is secretly a zero-shot
classifier"): noised to a timestep, the known latents are denoised best under the label
they belong to. :func:`finalists` sums each label's ε error over the known cells at a few
timesteps (the cells to generate zeroed) and keeps the :data:`FINALISTS` best labels.

An edit (everything known) measures the finalists at more timesteps and takes the best of
them (:func:`infer_labels`): ``classes × PROBES + FINALISTS × REFINES`` UNet passes per
image (152 for ten classes), about three 25-step guided samplings. An inpainting knows
too little for that: the probe sees only the cells wholly outside the mask, and reads the
wrong label for about one digit in five with its bottom 40% masked. It is drawn under
every finalist instead, and :func:`best_completions` measures each completion (put under
the input's known pixels and encoded again by the sampler, so that the cells along the
mask's edge count too) under its own label at :data:`REFINES` timesteps: analysis by
synthesis, the finalists' samplings plus ``FINALISTS × REFINES`` passes. Measured with
benchmarks/restore.py (docs/editing.md).

A class model trained with a label reader (:mod:`ldmflow.model.label_reader`, a small
classifier of masked latents) has a second opinion: the finalists are the labels the probe's
errors and the reader's log-probabilities rank best together (:func:`read_finalists`), and
where the reader is sure its log-probabilities weigh in the choice among the completions
(:func:`combined`). It costs one pass of the reader.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldmflow.model import inpainting, schedules
from ldmflow.model.sampling import per_image_noise

PROBES = 8  # timesteps at which every label is measured
REFINES = 24  # more timesteps for the finalists
FINALISTS = 3
# With a label reader (ldmflow.model.label_reader): how much its log-probability counts
# against the probe's standardised error in choosing the finalists, and against a
# completion's in choosing among them, where it is sure (its likeliest label's probability
# above SURE; else the error alone chooses). Chosen on the benchmark's held-out digits
# (benchmarks/restore.py, BENCHMARKS.md): the reader reads the bottom 40% better than the
# UNet (0.92 against 0.89 of the labels) and the centre square far worse (0.68 against
# 0.905). With them, zero-shot: bottom 40% 0.855 → 0.915, centre square 0.895 → 0.880.
FINALIST_READER_WEIGHT = 1.0
READER_WEIGHT = 2.0
SURE = 0.7
SPAN = (0.05, 0.85)  # the share of the training schedule probed: the clean end to well into the noise


@torch.no_grad()
def finalists(denoiser: Callable, schedule: schedules.NoiseSchedule, latents: torch.Tensor, known: torch.Tensor,
              num_classes: int, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """The :data:`FINALISTS` labels (B, k) that denoise each of ``latents`` (B, C, h, w) best
    where ``known`` (B, 1, h, w) is 1, best first, and their errors (B, k); the noise of image
    i is drawn from ``generators[i]``. ``denoiser`` is called as a UNet is, with ``class_labels``."""
    best = lowest(probe(denoiser, schedule, latents, known, num_classes, generators))
    return best.indices, best.values


def lowest(scores: torch.Tensor):
    """The :data:`FINALISTS` lowest of each row of ``scores`` (B, classes): ``.indices``, ``.values``."""
    return scores.topk(min(FINALISTS, scores.shape[1]), dim=1, largest=False)


@torch.no_grad()
def probe(denoiser: Callable, schedule: schedules.NoiseSchedule, latents: torch.Tensor, known: torch.Tensor,
          num_classes: int, generators: list[torch.Generator]) -> torch.Tensor:
    """(B, classes) every label's error on the ``known`` cells of ``latents``, at :data:`PROBES` timesteps."""
    every = torch.arange(num_classes, device=latents.device).expand(len(latents), -1)
    return measure(denoiser, schedule, latents * known, known, every, generators, PROBES)


@torch.no_grad()
def read_finalists(reader: torch.nn.Module, errors: torch.Tensor, latents: torch.Tensor,
                   known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The :data:`FINALISTS` labels (B, k) of ``latents`` (B, C, h, w), known where ``known``
    (B, 1, h, w) is 1, that the probe's ``errors`` (B, classes; :func:`probe`) and a label
    reader's log-probabilities (:mod:`ldmflow.model.label_reader`) rank best together
    (:func:`combined`, the reader weighed :data:`FINALIST_READER_WEIGHT`), and the reader's
    log-probabilities of them (B, k) where it is sure (its likeliest label above
    :data:`SURE`), else zeros: the weight it has in choosing among their completions."""
    log_probs = reader(inpainting.conditioning_channels(latents, 1 - known)).log_softmax(dim=1).to(errors.device)
    ranked = lowest(combined(errors, log_probs, FINALIST_READER_WEIGHT)).indices
    sure = log_probs.max(dim=1, keepdim=True).values.exp() > SURE
    return ranked, log_probs.gather(1, ranked) * sure


@torch.no_grad()
def infer_labels(denoiser: Callable, schedule: schedules.NoiseSchedule, latents: torch.Tensor, known: torch.Tensor,
                 num_classes: int, generators: list[torch.Generator]) -> torch.Tensor:
    """(B,) the label that denoises each of ``latents`` best where ``known`` is 1: the
    :func:`finalists` measured again at :data:`REFINES` more timesteps, their errors summed."""
    labels, errors = finalists(denoiser, schedule, latents, known, num_classes, generators)
    errors = errors + measure(denoiser, schedule, latents * known, known, labels, generators, REFINES, refine=True)
    return labels.gather(1, errors.argmin(dim=1, keepdim=True)).squeeze(1)


@torch.no_grad()
def best_completions(denoiser: Callable, schedule: schedules.NoiseSchedule, completions: torch.Tensor,
                     known: torch.Tensor, labels: torch.Tensor, generators: list[torch.Generator],
                     prior: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) which of the k completions of each image fits its label best: ``completions``
    (k·B, C, h, w) holds image i's under ``labels[i, j]`` at row j·B + i, each measured on
    the cells ``known`` (B, 1, h, w) at :data:`REFINES` timesteps, every completion of an
    image with the same noise; with a label reader's log-probabilities of the labels
    (``prior``, B × k), by :func:`combined`."""
    errors = measure(denoiser, schedule, completions, known, labels, generators, REFINES, refine=True)
    return combined(errors, prior).argmin(dim=1)


def combined(errors: torch.Tensor, prior: torch.Tensor | None, weight: float | None = None) -> torch.Tensor:
    """(B, k) the score of each of k labels or completions, lowest best: its error
    standardised among the image's k, less ``weight`` (:data:`READER_WEIGHT`) times the
    reader's log-probability of its label; the error alone without a reader."""
    if prior is None:
        return errors
    weight = READER_WEIGHT if weight is None else weight
    spread = errors.std(dim=1, keepdim=True, correction=1 if errors.shape[1] > 1 else 0).clamp_min(1e-12)
    return (errors - errors.mean(dim=1, keepdim=True)) / spread - weight * prior.to(errors.device)


def measure(denoiser: Callable, schedule: schedules.NoiseSchedule, x0: torch.Tensor, known: torch.Tensor,
            labels: torch.Tensor, generators: list[torch.Generator], count: int, refine: bool = False) -> torch.Tensor:
    """(B, k) the ε (or v) error summed over the ``known`` cells and ``count`` timesteps of
    :data:`SPAN` of ``x0`` noised under each of ``labels`` (B, k); ``x0`` is (B, …), the
    same for every label, or (k·B, …), one per label, label-major. ``refine``: the timesteps
    halfway between the probes', which are all new."""
    scheduler = schedules.training_scheduler(schedule)
    total = scheduler.config.num_train_timesteps
    low, high = (int(total * share) for share in SPAN)
    if refine:
        offset = (high - low) / (2 * count)
        low, high = low + offset, high - offset
    batch, k = labels.shape
    flat = labels.T.reshape(-1)  # label-major: label j of every image, then j + 1
    x0 = x0 if len(x0) == k * batch else x0.repeat(k, 1, 1, 1)
    where = known.repeat(k, 1, 1, 1)
    errors = torch.zeros(k, batch, device=x0.device)
    for t in torch.linspace(low, high, count).round().long().tolist():
        noise = per_image_noise(generators, tuple(x0.shape[1:])).to(x0.device, x0.dtype).repeat(k, 1, 1, 1)
        steps = torch.full((k * batch,), int(t), device=x0.device, dtype=torch.long)
        noisy = scheduler.add_noise(x0, noise, steps)
        target = noise if schedule.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, steps)
        prediction = denoiser(noisy, steps, class_labels=flat, return_dict=False)[0]
        errors += ((prediction - target) ** 2 * where).sum(dim=(1, 2, 3)).float().view(k, batch)
    return errors.T
