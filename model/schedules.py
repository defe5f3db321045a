"""The noise schedule: what defines the forward process, and the diffusers schedulers built
from it (DDPM for training's ``add_noise``/``get_velocity``; DDPM, DDIM and DPM-Solver++
for sampling). Saved with every checkpoint and model folder; the network never sees it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ldmflow import configs

Schedule = Literal["linear", "scaled_linear", "cosine"]
Prediction = Literal["epsilon", "v_prediction"]
_DIFFUSERS_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@configs.stage_config
class NoiseSchedule:
    """What defines the forward process; saved with every checkpoint and model."""

    schedule: Annotated[Schedule, Field(description="`linear`, `scaled_linear` or `cosine`")] = "linear"
    num_train_timesteps: Annotated[int, Field(ge=1, description="diffusion steps")] = 1000
    beta_start: Annotated[float, Field(gt=0, description="first beta")] = 0.0001
    beta_end: Annotated[float, Field(gt=0, description="last beta")] = 0.02
    prediction_type: Annotated[Prediction, Field(description="`epsilon` or `v_prediction`")] = "epsilon"
    zero_terminal_snr: Annotated[bool, Field(description="rescale betas to zero terminal SNR (use with v)")] = False

    def __post_init__(self) -> None:
        if self.beta_end <= self.beta_start:
            raise ValueError("beta_end must be larger than beta_start")

    def scheduler_config(self) -> dict:
        """Keyword arguments shared by every diffusers scheduler built for this schedule.

        ``clip_sample`` is off: predicted x0 is a latent, not an image in [-1, 1].
        """
        return dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            beta_schedule=_DIFFUSERS_SCHEDULE[self.schedule],
            prediction_type=self.prediction_type,
            rescale_betas_zero_snr=self.zero_terminal_snr,
        )


def training_scheduler(schedule: NoiseSchedule):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**schedule.scheduler_config(), clip_sample=False)


def sampling_scheduler(schedule: NoiseSchedule, sampler: Literal["ddpm", "ddim", "dpm++"] = "ddim"):
    """A fresh scheduler for one sampling run (schedulers carry per-run step state)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    config = schedule.scheduler_config()
    if sampler == "ddpm":
        return DDPMScheduler(**config, clip_sample=False)
    if sampler == "ddim":
        spacing = "trailing" if schedule.zero_terminal_snr else "leading"
        return DDIMScheduler(**config, clip_sample=False, set_alpha_to_one=False, timestep_spacing=spacing)
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown sampler {sampler!r}: choose ddpm, ddim or dpm++")


def inversion_scheduler(schedule: NoiseSchedule):
    """A fresh DDIM inversion scheduler (diffusers' ``DDIMInverseScheduler``): the DDIM
    sampler's steps run from the data towards the noise, on the same timesteps."""
    from diffusers import DDIMInverseScheduler

    spacing = "trailing" if schedule.zero_terminal_snr else "leading"
    return DDIMInverseScheduler(**schedule.scheduler_config(), clip_sample=False, set_alpha_to_one=False,
                                timestep_spacing=spacing)
