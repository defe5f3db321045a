"""The training stages' configs, each one frozen dataclass (:func:`ldmflow.configs.stage_config`):
the autoencoder's (section ``autoencoder:``) and the diffusion model's (section ``train:``),
and the Ray Train section both hold (``ray_train:``).

Read by the drivers (:mod:`ldmflow.training.autoencoder`, :mod:`ldmflow.training.train`), by
their Ray Train worker loops, which rebuild them from JSON, and by the command line; this
module imports none of them.
"""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field

from ldmflow import configs
from ldmflow.model import autoencoders, model_format, precision, schedules


@configs.stage_config
class RayTrainConfig:
    """How Ray Train runs a training stage's loop (section ``ray_train:`` of ``autoencoder:`` and
    ``train:``, the same fields for both): its workers and devices, its checkpoints and
    recovery, its metric cadence, and how each rank reads its shards."""

    workers: Annotated[int, Field(ge=0, description=(
        "Ray Train workers (data-parallel ranks; the global batch is `workers × batch_size`); 0: Ray Train's local "
        "mode, the loop in this process (no worker actors to start, no recovery). A run resumes on another number, "
        "at its step, with the interrupted epoch's unread samples dealt anew"))] = configs.execution(2)
    use_gpu: Annotated[Literal["auto", "true", "false"], Field(
        description="a GPU per worker: `auto` (where the cluster has them), `true` or `false`")] = "auto"
    mixed_precision: Annotated[precision.MixedPrecision, Field(
        description="`auto` (bf16 autocast on GPU, fp32 on CPU), `bf16` or `no`")] = "auto"
    checkpoint_every: Annotated[int, Field(ge=1, description="steps between checkpoints")] = configs.execution(100)
    checkpoint_storage: Annotated[str, Field(
        description="folder or s3:// prefix for Ray Train checkpoints (on a multi-node cluster, one every node "
                    "reaches); empty: the state folder")] = configs.execution("")
    max_failures: Annotated[int, Field(
        ge=0, description="worker failures Ray Train recovers from")] = configs.execution(3)
    log_every: Annotated[int, Field(ge=1, description="steps between MLflow metric points")] = configs.execution(10)
    shuffle_buffer: Annotated[int, Field(ge=0, description="samples in each reader's shuffle buffer")] = 1000
    loader_workers: Annotated[int, Field(
        ge=0, description="DataLoader worker processes per rank, each reading its share of the rank's shards "
                          "ahead of the step; 0: read between steps in the training process")] = configs.execution(1)
    prefetch_batches: Annotated[int, Field(
        ge=1, description="batches each loader worker keeps ready")] = configs.execution(4)


@configs.stage_config
class AutoencoderConfig:
    """The autoencoder stage: train ``AutoencoderKL`` under Ray Train, measure its latent scale
    factor, register it."""

    preset: Annotated[Literal["tiny", "base"], Field(description="`tiny` or `base`")] = "tiny"
    steps: Annotated[int, Field(ge=1, description="optimizer steps")] = 400
    batch_size: Annotated[int, Field(ge=1, description="images per worker per step")] = 32
    lr: Annotated[float, Field(gt=0, description="AdamW learning rate (β = 0.5, 0.9) after warm-up")] = 1e-3
    warmup_steps: Annotated[int, Field(ge=0, description="linear learning-rate warm-up")] = 20
    recon_loss: Annotated[Literal["l1", "l2"], Field(description="`l1` or `l2`")] = "l1"
    kl_weight: Annotated[float, Field(ge=0, description="weight of the KL term")] = 1e-6
    disc_weight: Annotated[float, Field(
        ge=0, description="weight of the adversarial term; 0 disables the discriminator")] = 0.0
    disc_start: Annotated[int, Field(ge=0, description="step at which the discriminator starts")] = 200
    ray_train: Annotated[RayTrainConfig, Field(
        description="how Ray Train runs the loop: workers, checkpoints, data loading (table below)")] = field(
        default_factory=RayTrainConfig)
    seed: Annotated[int, Field(description="initialisation, shuffling and the held-out split")] = 0
    held_out: Annotated[float, Field(
        ge=0, lt=1, description="fraction of samples kept out of training for evaluation")] = 0.05
    scale_samples: Annotated[int, Field(ge=1, description="training images used to measure the scale factor")] = 512
    experiment: Annotated[str, Field(description="MLflow experiment")] = configs.execution("ldmflow-autoencoder")
    model_name: Annotated[str, Field(description="registered model name")] = "ldmflow-autoencoder"


@configs.stage_config
class DiffusionConfig:
    """Diffusion training: the denoising UNet on precomputed latents under Ray Train (DDP),
    with EMA and checkpoints."""

    preset: Annotated[Literal["tiny", "base"], Field(description="`tiny` or `base`")] = "tiny"
    init_from: Annotated[str, Field(
        description="fine-tune: start from this model's EMA weights (models:/NAME/VERSION, models:/NAME@ALIAS or a "
                    "model folder), made with the latents' autoencoder and the same conditioning, preset and "
                    "classes; empty: from scratch")] = ""
    lora_rank: Annotated[int, Field(
        ge=0, description="0: train every weight; R: train rank-R LoRA adapters (peft) on the UNet's attention and "
                          "projection layers instead, merged into the registered model")] = 0
    conditioning: Annotated[Literal["class", "text", "none"], Field(description="`class`, `text` or `none`")] = "class"
    inpainting: Annotated[bool, Field(
        description="a model trained for inpainting: the UNet also takes the known latents and the mask as input "
                    "channels, trained on random masks (boxes, bands, strokes, the whole image); with `init_from` a "
                    "plain model it starts from that model's weights")] = False
    label_reader_steps: Annotated[int, Field(
        ge=0, description="class models: steps of the label reader trained after the UNet, on the driver: a small "
                          "classifier of masked latents that picks the labels an inpainting without a label is drawn "
                          "under (docs/editing.md); 0: none, the UNet's own probe picks them")] = 3000
    noise: Annotated[schedules.NoiseSchedule, Field(
        description="the noise schedule (table below)")] = field(default_factory=schedules.NoiseSchedule)
    loss_weighting: Annotated[Literal["uniform", "min_snr"], Field(description="`uniform` or `min_snr`")] = "min_snr"
    snr_gamma: Annotated[float, Field(gt=0, description="γ of min-SNR-γ")] = 5.0
    noise_offset: Annotated[float, Field(ge=0, description="offset-noise strength")] = 0.0
    cond_dropout: Annotated[float, Field(
        ge=0, lt=1, description="share of samples trained without their condition")] = 0.1
    steps: Annotated[int, Field(ge=1, description="optimizer steps")] = 2000
    batch_size: Annotated[int, Field(ge=1, description="latents per worker per micro-batch")] = 64
    grad_accum: Annotated[int, Field(ge=1, description="micro-batches per optimizer step")] = 1
    lr: Annotated[float, Field(gt=0, description="peak AdamW learning rate")] = 2e-4
    min_lr_factor: Annotated[float, Field(
        ge=0, le=1, description="the cosine decay ends at `lr × min_lr_factor`")] = 0.1
    warmup_steps: Annotated[int, Field(ge=0, description="linear warm-up")] = 100
    weight_decay: Annotated[float, Field(ge=0, description="AdamW weight decay")] = 0.01
    grad_clip: Annotated[float, Field(gt=0, description="gradient-norm clipping")] = 1.0
    ema_decay: Annotated[float, Field(ge=0, le=1, description="largest EMA decay")] = 0.999
    ema_warmup: Annotated[int, Field(
        ge=1, description="EMA decay is min(`ema_decay`, (1 + n) / (`ema_warmup` + n))")] = 10
    parallel: Annotated[Literal["ddp", "fsdp"], Field(
        description="`ddp` (every rank holds the whole UNet) or `fsdp` (each holds 1/`ray_train.workers` of its weights, "
                    "gradients and optimizer state); a run resumes from either kind of checkpoint")] = configs.execution("ddp")
    ray_train: Annotated[RayTrainConfig, Field(
        description="how Ray Train runs the loop: workers, checkpoints, data loading (table below)")] = field(
        default_factory=RayTrainConfig)
    seed: Annotated[int, Field(description="weights, data order and noise")] = 0
    sample_every: Annotated[int, Field(
        ge=0, description="steps between sample grids; 0: only at the end")] = configs.execution(0)
    max_bad_steps: Annotated[int, Field(
        ge=1, description="consecutive non-finite losses before restoring the last checkpoint")] = configs.execution(5)
    autoencoder: Annotated[str, Field(
        description="autoencoder URI; empty: the one the latent manifest names")] = configs.execution("")
    sampler: Annotated[Literal["ddpm", "ddim", "dpm++"], Field(
        description="`ddpm`, `ddim` or `dpm++`: for sample grids, and the registered model's default")] = "ddim"
    sample_steps: Annotated[int, Field(ge=1, description="sampling steps: for grids, and the model's default")] = 25
    guidance: Annotated[float, Field(
        ge=0, description="classifier-free guidance scale: for grids, and the model's default")] = 3.0
    experiment: Annotated[str, Field(description="MLflow experiment")] = configs.execution("ldmflow-diffusion")
    model_name: Annotated[str, Field(
        description="registered model; every run adds a version with the alias `candidate`")] = "ldmflow-diffusion"


def model_info(config: DiffusionConfig, latent_shape, class_names, scale_factor: float, vae, *,
               autoencoder: dict, lineage: dict, label_reader: bool = False) -> model_format.ModelInfo:
    """What ``ldmflow.json`` says of a model trained with ``config``."""
    latent_shape = [int(x) for x in latent_shape]
    return model_format.ModelInfo(
        conditioning=config.conditioning,
        noise=configs.to_dict(config.noise),
        latent_shape=latent_shape,
        resolution=latent_shape[1] * autoencoders.downsample_factor(vae),
        scale_factor=float(scale_factor),
        class_names=list(class_names) if class_names else None,
        text_encoder=model_format.TEXT_ENCODER if config.conditioning == "text" else None,
        defaults=model_format.SamplerDefaults(config.sampler, config.sample_steps, config.guidance),
        inpainting=config.inpainting,
        label_reader=label_reader,
        autoencoder=autoencoder,
        lineage=lineage,
        config=configs.to_dict(config),
    )
