"""The training stages on Ray Train (autoencoder and diffusion: drivers and worker loops),
diffusion training tricks as plain functions, checkpoints, evaluation, and the promotion
gate. Never imports serving.
"""
