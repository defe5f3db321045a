"""What a latent diffusion model *is*: the autoencoder and UNet presets, the noise schedule,
the sampler (generate, edit, inpaint, grids) and the folder formats of both models.

Imports torch, diffusers and safetensors; never Ray, MLflow or Prefect. Training and
serving both stand on it.
"""
