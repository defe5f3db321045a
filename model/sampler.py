"""Sampling: condition → latents → image, plus img2img editing and inpainting.

:class:`Sampler` holds a model's UNet, autoencoder and :class:`~ldmflow.model.model_format.ModelInfo`
and nothing that changes per request: every :meth:`Sampler.run` builds a fresh diffusers
scheduler (schedulers carry a step index; sharing one between concurrent requests corrupts
them) and per-image random generators. Image ``i`` of a job with seed ``s`` draws all its
noise from ``torch.Generator().manual_seed(s + i)``, so the same seed gives the same image
whether it is sampled alone or batched with other requests.

An interpolation (``to_seed``, ``to_label``, ``to_prompt``) draws ``n`` images along a path:
image ``i`` starts from the noise at ``t = i / (n − 1)`` of the great circle between seed
``seed``'s noise and seed ``to_seed``'s (slerp keeps the noise's norm, which a straight line
would shrink), under the condition at ``t`` of the line between the two labels' embeddings
or the great circle between the two prompts'. Its first image is ``seed``'s, its last
``to_seed``'s, each equal to that seed sampled alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ldmflow.model import inpainting, model_format, schedules, self_classifier, unets
from ldmflow.model.reverse_process import reverse_process
from ldmflow.model.sampling import SAMPLERS, Job, copies, generators, per_image_noise, resampling_plan, slerp
from ldmflow.model.text_encoder import SentenceEncoder


class Sampler:
    """A diffusion model ready to sample: UNet, autoencoder and the facts of ``ldmflow.json``."""

    def __init__(self, unet, vae, info: model_format.ModelInfo, *, device: str = "cpu", text_encoder=None,
                 label_reader=None) -> None:
        self.unet = unet.to(device).eval()
        self.label_reader = None if label_reader is None else label_reader.to(device).eval()
        self.vae = vae.to(device).eval()
        self.info = info
        self.device = device
        self.schedule = schedules.NoiseSchedule(**info.noise)
        self._text_encoder = text_encoder
        self.mask_dilation = inpainting.MASK_DILATION
        self.feather_pixels = inpainting.FEATHER_PIXELS

    @classmethod
    def from_folder(cls, folder, device: str = "cpu") -> "Sampler":
        """From a model folder or an MLflow model folder wrapping one."""
        unet, vae, info = model_format.load_parts(folder, device)
        return cls(unet, vae, info, device=device, label_reader=model_format.load_reader(folder, info, device))

    # -- what a request may ask for ---------------------------------------------------

    def job(self, **fields) -> Job:
        """A :class:`Job` with this model's defaults for the fields left out (or None)."""
        defaults = self.info.defaults
        given = {k: v for k, v in fields.items() if v is not None}
        # Inversion is DDIM's: it is the sampler an inverting job runs unless told otherwise.
        job = Job(sampler="ddim" if given.get("invert") else defaults.sampler, steps=defaults.steps,
                  guidance=defaults.guidance)
        job = replace(job, **given)
        if job.mode == "inpaint" and "jump_length" not in given and not self.info.inpainting:
            job = replace(job, **inpainting.default_jumps(job.steps, job.sampler, given))
        if job.mode == "inpaint" and "infer_label" not in given and job.label is None and self.info.conditioning == "class":
            job = replace(job, infer_label=True)  # continue the digit that is there
        return job

    def check(self, job: Job) -> None:
        """Raise ValueError naming the field of a job this model cannot run."""
        if job.n < 1:
            raise ValueError("n: must be at least 1")
        if job.steps < 1:
            raise ValueError("steps: must be at least 1")
        if job.sampler not in SAMPLERS:
            raise ValueError(f"sampler: must be one of {', '.join(SAMPLERS)}")
        if job.label is not None:
            if self.info.conditioning != "class":
                raise ValueError(f"label: this model is conditioned on {self.info.conditioning}, not class labels")
            if not 0 <= job.label < len(self.info.class_names or ()):
                raise ValueError(f"label: {job.label} is not a class of this model (0…{self.info.null_label - 1})")
        if job.prompt and self.info.conditioning != "text":
            raise ValueError(f"prompt: this model is conditioned on {self.info.conditioning}, not text")
        if job.interpolates:
            self._check_interpolation(job)
        if job.invert:
            self._check_inversion(job)
        if job.at is not None and not job.interpolates:
            raise ValueError("at: a point of an interpolation: give to_seed, to_label or to_prompt")
        if not 0 <= job.strength <= 1:
            raise ValueError("strength: must be in [0, 1]")
        side = self.info.resolution
        if job.image is not None and tuple(job.image.shape) != (3, side, side):
            raise ValueError(f"image: must be (3, {side}, {side}), got {tuple(job.image.shape)}")
        if job.mask is not None:
            if job.image is None:
                raise ValueError("mask: inpainting needs an image")
            if tuple(job.mask.shape) != (1, side, side):
                raise ValueError(f"mask: must be (1, {side}, {side}), got {tuple(job.mask.shape)}")
        inpainting.check_resampling(job, self.info.inpainting)
        if job.infer_label:
            if self.info.conditioning != "class":
                raise ValueError(f"infer_label: this model is conditioned on {self.info.conditioning}, not class labels")
            if job.mode not in ("edit", "inpaint"):
                raise ValueError("infer_label: infers the label of an image to edit or inpaint: give one")
            if job.label is not None:
                raise ValueError("infer_label: give a label or have it inferred, not both")

    def _check_interpolation(self, job: Job) -> None:
        if job.image is not None:
            raise ValueError("to_seed: interpolation draws from noise; it takes no image")
        if job.at is not None and (job.n != 1 or not 0 <= job.at <= 1):
            raise ValueError("at: one image (n = 1) at a point in [0, 1] of the path")
        if job.to_seed is not None and not 0 <= job.to_seed <= 2**63 - 1:
            raise ValueError("to_seed: must be a non-negative integer")
        if job.to_label is not None:
            if job.label is None:
                raise ValueError("to_label: interpolating labels needs the first one (label)")
            try:
                self.check(replace(job, label=job.to_label, to_label=None, to_seed=None, to_prompt=None, at=None))
            except ValueError as exc:
                raise ValueError(f"to_{exc}") from None
        if job.to_prompt is not None:
            if self.info.conditioning != "text":
                raise ValueError(f"to_prompt: this model is conditioned on {self.info.conditioning}, not text")
            if job.prompt is None:
                raise ValueError("to_prompt: interpolating prompts needs the first one (prompt)")

    def _check_inversion(self, job: Job) -> None:
        if job.image is None or job.mask is not None:
            raise ValueError("invert: inverts an image (no mask)")
        if job.sampler != "ddim":
            raise ValueError("sampler: inversion runs DDIM there and back; sampler must be ddim")
        if job.source_label is not None:
            try:
                self.check(replace(job, label=job.source_label, source_label=None, invert=False, image=None))
            except ValueError as exc:
                raise ValueError(f"source_{exc}") from None
        if job.source_prompt and self.info.conditioning != "text":
            raise ValueError(f"source_prompt: this model is conditioned on {self.info.conditioning}, not text")

    # -- sampling -----------------------------------------------------------------------

    @torch.no_grad()
    def run(self, jobs: list[Job], on_step: Callable[[], None] = lambda: None) -> list[torch.Tensor]:
        """Sample every job in one batch; returns, per job, images (n, 3, H, W) in [−1, 1].

        All jobs must share :meth:`Job.batch_key` (sampler, steps, mode, edit strength,
        resampling, whether an inpainting infers its label).
        ``on_step`` is called after each denoising step (:attr:`Job.denoising_steps` of them).
        """
        if not jobs:
            return []
        keys = {job.batch_key() for job in jobs}
        if len(keys) > 1:
            raise ValueError(f"jobs of one batch must share Job.batch_key, got {sorted(keys)}")
        for job in jobs:
            self.check(job)
        first = jobs[0]
        gens = generators(jobs)
        latent_shape = tuple(self.info.latent_shape)
        scheduler = schedules.sampling_scheduler(self.schedule, first.sampler)
        scheduler.set_timesteps(first.steps)
        guidance = torch.tensor([job.guidance for job in jobs for _ in range(job.n)]).view(-1, 1, 1, 1).to(self.device)
        noise = self._interpolated(jobs, per_image_noise(gens, latent_shape)).to(self.device)

        start_step, init = 0, None
        if first.mode != "generate":
            init = self._repeat([job.image for job in jobs], jobs)  # (B, 3, H, W)
            init_latent = self.encode(init)
        pixel_mask, known, plan, extra = self._inpainting(jobs, init_latent if init is not None else noise)
        cond, null = self._conditioning(jobs)
        labels, prior, sampling_gens = None, None, gens
        if first.mode == "inpaint" and first.infer_label:  # a completion under each finalist label, the best kept
            labels, prior = self._finalists(init_latent, 1 - self.latent_mask(pixel_mask), gens)
            count = labels.shape[1]
            cond, null = {"class_labels": labels.T.reshape(-1)}, {"class_labels": null["class_labels"].repeat(count)}
            noise, guidance = noise.repeat(count, 1, 1, 1), guidance.repeat(count, 1, 1, 1)
            known = None if known is None else (known[0].repeat(count, 1, 1, 1), known[1].repeat(count, 1, 1, 1))
            sampling_gens = copies(gens, count)
        elif any(job.infer_label for job in jobs):
            cond["class_labels"] = self._inferred(jobs, cond["class_labels"], init_latent, gens)
        elif not any(job.label is not None or job.prompt or job.to_label is not None or job.to_prompt for job in jobs):
            null = None  # every image is unconditional: guidance would add nothing to the null pass
        denoiser = self._with_channels(self._denoiser(jobs), extra)
        if first.mode == "invert":
            latents = self.invert(init_latent, jobs, on_step, denoiser)
        elif first.mode == "edit":
            start_step = first.steps - first.denoising_steps
            if first.denoising_steps == 0:
                return self._split(self.decode(init_latent), jobs)
            t_start = scheduler.timesteps[start_step : start_step + 1]
            latents = scheduler.add_noise(init_latent, noise, t_start.repeat(noise.shape[0]))
        else:
            latents = noise

        def known_noise(shape):
            return per_image_noise(sampling_gens, shape)

        latents = reverse_process(
            denoiser, scheduler, latents, steps=first.steps, conditioning=cond, null_conditioning=null,
            guidance=guidance, generator=sampling_gens, start_step=start_step, known=known, known_noise=known_noise,
            plan=plan, on_step=on_step)
        if labels is not None:
            images = self._best_completions(latents, labels, init, pixel_mask, gens, prior)
        else:
            images = self.decode(latents)
        if pixel_mask is not None:  # the known pixels are the input's own, fading in over a thin band
            weight = self.feathered(pixel_mask)
            images = weight * images + (1 - weight) * init.to(self.device)
        return self._split(images, jobs)

    def _inferred(self, jobs: list[Job], labels: torch.Tensor, latents: torch.Tensor, gens) -> torch.Tensor:
        """``labels`` with each image of an edit that asks (``infer_label``) given the label
        its latents fit best (:func:`~ldmflow.model.self_classifier.infer_labels`)."""
        index = torch.tensor([job.infer_label for job in jobs for _ in range(job.n)]).nonzero().squeeze(1)
        probed = latents[index.to(latents.device)]
        found = self_classifier.infer_labels(self.label_probe(probed), self.schedule, probed,
                                             torch.ones_like(probed[:, :1]), len(self.info.class_names or ()),
                                             [gens[i] for i in index.tolist()])
        labels = labels.clone()
        labels[index.to(labels.device)] = found.to(labels.device)
        return labels

    def _finalists(self, latents: torch.Tensor, kept: torch.Tensor, gens) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, k) the labels an inpainting's latents fit best on its ``kept`` cells, each to
        inpaint under, found by the UNet's probe, with the label reader where the model has one,
        and the weight the reader has in choosing among them (B, k; None without a reader):
        :mod:`~ldmflow.model.self_classifier`."""
        errors = self_classifier.probe(self.label_probe(latents), self.schedule, latents, kept,
                                       len(self.info.class_names or ()), gens)
        if self.label_reader is not None:
            return self_classifier.read_finalists(self.label_reader, errors, latents, kept)
        return self_classifier.lowest(errors).indices, None

    def _best_completions(self, completions: torch.Tensor, labels: torch.Tensor, init: torch.Tensor,
                          pixel_mask: torch.Tensor, gens, prior: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) decoded, of the k·B ``completions`` (label-major: image i's under
        ``labels[i, j]`` at row j·B + i), the one per image its label explains best. Each is
        decoded, put under the input's known pixels and encoded again, and measured on the
        cells mostly known (:func:`~ldmflow.model.inpainting.mostly_known`): the cells along
        the mask's edge, part known, part the completion's, are where a continuation fits its
        label or does not, and the sampling counted them as unknown. ``prior``: the reader's
        log-probabilities of the labels, weighed in (:func:`~ldmflow.model.self_classifier.combined`)."""
        batch = len(labels)
        count = len(completions) // batch
        decoded = self.decode(completions)
        hole = pixel_mask.repeat(count, 1, 1, 1)
        composites = self.encode(hole * decoded + (1 - hole) * init.to(decoded.device).repeat(count, 1, 1, 1))
        cells = inpainting.mostly_known(pixel_mask, self.info.latent_shape[1:])
        best = self_classifier.best_completions(self.label_probe(composites[:batch]), self.schedule, composites,
                                                cells, labels, gens, prior)
        return decoded[best.to(decoded.device) * batch + torch.arange(batch, device=decoded.device)]

    def label_probe(self, latents: torch.Tensor):
        """The UNet as a label's probe calls it. An inpainting model's probe sees nothing
        known, or the known latents would answer it under any label."""
        return self._with_channels(self.unet, inpainting.nothing_known(latents) if self.info.inpainting else None)

    def _inpainting(self, jobs: list[Job], latents: torch.Tensor):
        """(pixel mask, known latents and their mask, resampling plan, the UNet's extra input
        channels) of a batch whose input latents are ``latents``: a zero-shot inpainting blends
        and resamples, an inpainting model sees the known latents and the mask, and sees
        nothing known when it generates, edits or inverts."""
        first = jobs[0]
        if first.mode != "inpaint":
            return None, None, None, inpainting.nothing_known(latents) if self.info.inpainting else None
        pixel_mask = self._repeat([job.mask for job in jobs], jobs).to(self.device)  # 1 = generate
        cells = self.latent_mask(pixel_mask)
        if self.info.inpainting:
            return pixel_mask, None, None, inpainting.conditioning_channels(latents, cells)
        plan = resampling_plan(first.steps, first.jump_length, first.jump_count)
        return pixel_mask, (latents, 1 - cells), plan, None

    @torch.no_grad()
    def invert(self, latents: torch.Tensor, jobs: list[Job], on_step: Callable[[], None] = lambda: None,
               denoiser=None) -> torch.Tensor:
        """Deterministic DDIM inversion (Song et al. 2021; as in Mokady et al. 2023): the
        sampler's ODE run from the scaled latents towards the noise that DDIM at the jobs'
        step count would draw them from, under each image's own condition (``source_label``
        or ``source_prompt``, unconditional where unknown), without guidance. ``denoiser``:
        the UNet (as :meth:`run` calls it) by default."""
        denoiser = denoiser or self._with_channels(self.unet, None if not self.info.inpainting
                                                   else inpainting.nothing_known(latents))
        sources = [replace(job, label=job.source_label, prompt=job.source_prompt, to_label=None, to_prompt=None,
                           to_seed=None) for job in jobs]
        conditioning, _ = self._conditioning(sources)
        scheduler = schedules.inversion_scheduler(self.schedule)
        scheduler.set_timesteps(jobs[0].steps, device=latents.device)
        for t in scheduler.timesteps:
            prediction = denoiser(scheduler.scale_model_input(latents, t), t, **conditioning, return_dict=False)[0]
            latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
            on_step()
        return latents

    def generate(self, **fields) -> torch.Tensor:
        """Images (n, 3, H, W) in [−1, 1] for one job; fields as in :class:`Job`."""
        return self.run([self.job(**fields)])[0]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents of images in [−1, 1] (the posterior mean: deterministic)."""
        moments = self.vae.encode(images.to(self.device)).latent_dist
        return moments.mean * self.info.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.info.scale_factor).sample.clamp(-1, 1)

    def latent_mask(self, pixel_mask: torch.Tensor) -> torch.Tensor:
        return inpainting.latent_mask(pixel_mask, self.info.latent_shape[1:], self.mask_dilation)

    def feathered(self, pixel_mask: torch.Tensor) -> torch.Tensor:
        return inpainting.feathered(pixel_mask, self.feather_pixels)

    def _interpolated(self, jobs: list[Job], noise: torch.Tensor) -> torch.Tensor:
        """``noise`` (one row per image, drawn from its generator) with each interpolating
        job's rows replaced by the slerp from ``seed``'s noise to ``to_seed``'s."""
        start = 0
        for job in jobs:
            if job.to_seed is not None:
                ends = [torch.Generator().manual_seed(job.seed), torch.Generator().manual_seed(job.to_seed)]
                first, last = per_image_noise(ends, tuple(noise.shape[1:]))
                noise[start : start + job.n] = slerp(first, last, job.path())
            start += job.n
        return noise

    def _denoiser(self, jobs: list[Job]):
        """The UNet, or, where a job interpolates labels, the UNet called with a class
        embedding table of one row per image (its label's embedding, or the mix of two at
        its point of the path) and the null label's last."""
        if not any(job.to_label is not None for job in jobs):
            return self.unet
        weight = self.unet.class_embedding.weight
        rows = []
        for job in jobs:
            first = weight[job.label if job.label is not None else self.info.null_label]
            last = weight[job.to_label] if job.to_label is not None else first
            t = job.path().to(weight.device, weight.dtype).unsqueeze(1)
            rows.append((1 - t) * first + t * last)
        table = torch.cat([*rows, weight[self.info.null_label : self.info.null_label + 1]])
        overrides = {"class_embedding.weight": table}

        def denoiser(sample, timestep, class_labels, **kwargs):
            # class_labels index the table: image i is row i, the null label the last row.
            index = torch.arange(len(table) - 1, device=class_labels.device)
            index = torch.where(class_labels == self.info.null_label, len(table) - 1, index.repeat(len(class_labels) // len(index)))
            return torch.func.functional_call(self.unet, overrides, (sample, timestep), {"class_labels": index, **kwargs})
        return denoiser

    @staticmethod
    def _with_channels(denoiser, extra: torch.Tensor | None):
        """``denoiser`` given an inpainting model's ``extra`` input channels (B, C + 1, h, w)
        after the latent's, as many times as the batch holds the B images (both guidance passes)."""
        if extra is None:
            return denoiser

        def call(sample, timestep, **kwargs):
            repeated = extra.to(sample.dtype).repeat(sample.shape[0] // extra.shape[0], 1, 1, 1)
            return denoiser(torch.cat([sample, repeated], dim=1), timestep, **kwargs)
        return call

    def _conditioning(self, jobs: list[Job]) -> tuple[dict, dict | None]:
        """The UNet's conditioning for every image of ``jobs``, and the null conditioning of
        guidance (None for an unconditional model). A job with no label or prompt gets the
        null one (which a model trained with condition dropout treats as unconditional)."""
        kind = self.info.conditioning
        if kind == "class":
            null_label = self.info.null_label
            labels = torch.tensor([null_label if job.label is None else job.label for job in jobs for _ in range(job.n)])
            labels = labels.to(self.device)
            return {"class_labels": labels}, {"class_labels": torch.full_like(labels, null_label)}
        if kind == "text":
            text = torch.cat([self._prompt_embeddings(job) for job in jobs]).to(self.device)
            null = self.text_encoder([""] * len(text)).to(self.device)
            return unets.conditioning_kwargs("text", None, text), unets.conditioning_kwargs("text", None, null)
        return {}, None

    def _prompt_embeddings(self, job: Job) -> torch.Tensor:
        """(n, 1, TEXT_DIM): the prompt's embedding per image, or along the great circle to
        ``to_prompt``'s (the embeddings are unit vectors)."""
        first = self.text_encoder([job.prompt or ""])
        if job.to_prompt is None:
            return first.expand(job.n, -1, -1)
        return slerp(first[0], self.text_encoder([job.to_prompt])[0], job.path())

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            self._text_encoder = SentenceEncoder()
        return self._text_encoder

    @staticmethod
    def _repeat(tensors: list[torch.Tensor], jobs: list[Job]) -> torch.Tensor:
        return torch.cat([t.unsqueeze(0).expand(job.n, *t.shape) for t, job in zip(tensors, jobs)])

    @staticmethod
    def _split(images: torch.Tensor, jobs: list[Job]) -> list[torch.Tensor]:
        return list(images.cpu().split([job.n for job in jobs]))
