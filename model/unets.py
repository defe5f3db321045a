"""The denoising networks: diffusers UNets sized by named presets, and their conditioning.

``class`` conditioning uses ``UNet2DModel`` with a class embedding (one extra class, the
last, is the "no label" of classifier-free guidance); ``text`` conditioning uses
``UNet2DConditionModel`` with cross-attention over sentence embeddings (384-d, from the
offline all-MiniLM-L6-v2 encoder of :mod:`ldmflow.model.text_encoder`), pooled into the time embedding too; ``none`` is
unconditional.
"""

from __future__ import annotations

from typing import Any

import torch

from ldmflow.model import inpainting as inpainting_module
from ldmflow.model.text_encoder import TEXT_DIM

PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the demo: 8×8 latents.
    "tiny": dict(block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=32),
    # 32×32 latents of 256-px images on GPUs.
    "base": dict(block_out_channels=(256, 512, 768, 768), layers_per_block=2, norm_num_groups=32),
}


def build(preset: str, conditioning: str, latent_shape: tuple[int, int, int], num_classes: int = 0, *,
          lora_rank: int = 0, weights: dict[str, torch.Tensor] | None = None, inpainting: bool = False):
    """The UNet for latents of ``latent_shape`` (C, h, w): fresh, or with ``weights`` (a state
    dict of the same UNet: fine-tuning's parent, or the plain UNet an inpainting one starts
    from); taking the extra input channels of :mod:`ldmflow.model.inpainting` with
    ``inpainting``; with rank-``lora_rank`` LoRA adapters on top when it is not 0 (:func:`add_lora`)."""
    unet = _unet(preset, conditioning, latent_shape, num_classes, inpainting)
    if weights is not None:
        unet.load_state_dict(inpainting_module.widen_input(weights, latent_shape[0]) if inpainting else weights)
    return add_lora(unet, lora_rank) if lora_rank else unet


def _unet(preset: str, conditioning: str, latent_shape: tuple[int, int, int], num_classes: int, inpainting: bool):
    from diffusers import UNet2DConditionModel, UNet2DModel

    sizes = PRESETS[preset]
    depth = len(sizes["block_out_channels"])
    channels, side = latent_shape[0], latent_shape[1]
    in_channels = channels + (inpainting_module.extra_channels(channels) if inpainting else 0)
    if conditioning == "text":
        return UNet2DConditionModel(
            sample_size=side,
            in_channels=in_channels,
            out_channels=channels,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
            cross_attention_dim=TEXT_DIM,
            attention_head_dim=8,
            # The pooled prompt also joins the time embedding (as in DeepFloyd IF), so every
            # ResNet block sees it, as a class UNet's blocks see the class: cross-attention
            # over a single sentence vector is only an additive shift in the attention layers.
            addition_embed_type="text",
            addition_embed_type_num_heads=8,
            **sizes,
        )
    if conditioning == "class" and num_classes < 1:
        raise ValueError("class conditioning needs class names in the dataset")
    return UNet2DModel(
        sample_size=side,
        in_channels=in_channels,
        out_channels=channels,
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (depth - 1),
        up_block_types=("AttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
        num_class_embeds=num_classes + 1 if conditioning == "class" else None,
        attention_head_dim=32,
        **sizes,
    )


# Where LoRA adapters go (peft module-name suffixes): attention's query, key, value and output
# projections, a transformer block's input and output projections and feed-forward layers
# (text UNets), and each ResNet block's projection of the time embedding. The convolutions
# stay frozen.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "time_emb_proj")


def add_lora(unet: torch.nn.Module, rank: int) -> torch.nn.Module:
    """``unet`` with rank-``rank`` LoRA adapters (peft, alpha = rank) on :data:`LORA_TARGETS`
    and every other weight frozen. The adapters start as a zero update (B = 0): the model
    computes what it did before until it is trained."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [name for name, _ in unet.named_modules()]
    targets = [t for t in LORA_TARGETS if any(n == t or n.endswith("." + t) for n in names)]
    unet = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), unet)
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return unet


def merge_lora(unet: torch.nn.Module) -> torch.nn.Module:
    """``unet`` with each LoRA adapter merged into the weight it adapts and removed: a plain
    diffusers UNet again, which loads and samples without peft."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(unet.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent) if parent else unet, child, module.get_base_layer())
    return unet.requires_grad_(True)


def conditioning_kwargs(conditioning: str, labels: torch.Tensor | None, text: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The keyword arguments that condition the UNet's forward."""
    if conditioning == "class":
        return {"class_labels": labels}
    if conditioning == "text":
        return {"encoder_hidden_states": text}
    return {}
