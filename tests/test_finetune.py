"""Fine-tuning a registered model: `init_from` starts from its EMA weights, LoRA adapters
train instead of every weight, and the new version names its parent. The session's digits
model (16-px `builtin:digits`, 300 steps) is fine-tuned on its own latents: what is tested
here is that a run starts where its parent stands and keeps it, at a fraction of the steps
training from scratch needs. (Transfer to `builtin:mnist` is not shown at this size: see
docs/training.md.)"""

import pytest
import torch

from ldmflow.data import latent_shards
from ldmflow.errors import InputError
from ldmflow.model import model_format
from ldmflow.registry import models, tracking
from ldmflow.training.stage_configs import DiffusionConfig
from ldmflow.training.train import train
from tests.helpers import training_config

# One setting for the fine-tuned and the from-scratch runs; only init_from and steps differ. In Ray
# Train's local mode: what is tested is where a run starts, not how it is distributed.
RUN = dict(batch_size=32, workers=0, lr=5e-4, warmup_steps=5, log_every=5, sample_steps=10, shuffle_buffer=100,
           experiment="test-finetune", model_name="test-finetuned")
N = 20


@pytest.fixture(scope="module")
def digits_latents(digits_model) -> str:
    """The latents the session's digits model was trained on (its lineage names them)."""
    return model_format.read_info(digits_model.folder).lineage["latents"]


def test_fine_tuning_reaches_in_n_steps_what_scratch_does_not_in_3n(digits_model, digits_latents, tmp_path):
    tuned = train(digits_latents, training_config(DiffusionConfig, **RUN, steps=N, checkpoint_every=N, init_from=digits_model.model_uri),
                  storage_path=str(tmp_path / "tuned"), progress=False)
    scratch = train(digits_latents, training_config(DiffusionConfig, **RUN, steps=3 * N, checkpoint_every=3 * N),
                    storage_path=str(tmp_path / "scratch"), progress=False)
    # Class accuracy of each model's grid (8 samples a class) by the digits' domain classifier.
    accuracies = {"parent": digits_model.metrics["class_accuracy"], "tuned": tuned.metrics["class_accuracy"],
                  "scratch": scratch.metrics["class_accuracy"]}
    assert accuracies["tuned"] >= accuracies["parent"] - 0.15, accuracies
    assert accuracies["tuned"] > accuracies["scratch"] + 0.3, accuracies

    version = models.resolve_version(tuned.model_uri)
    tags = tracking.client().get_model_version(version.name, version.version).tags
    assert tags["ldmflow.parent_model"] == digits_model.model_uri  # a concrete version, the lineage's link
    assert tracking.client().get_run(tuned.run_id).data.tags["ldmflow.parent_model"] == digits_model.model_uri
    assert model_format.read_info(tuned.folder).lineage["parent_model"] == digits_model.model_uri
    assert "parent_model" not in model_format.read_info(scratch.folder).lineage


def test_lora_trains_adapters_and_registers_a_merged_plain_unet(digits_model, digits_latents, tmp_path):
    from diffusers import UNet2DModel

    from ldmflow.model.sampler import Sampler

    tuned = train(digits_latents, training_config(DiffusionConfig, **RUN, steps=N, checkpoint_every=N, init_from=digits_model.model_uri,
                                                  lora_rank=4, sample_every=N),
                  storage_path=str(tmp_path / "lora"), progress=False)
    parent, _, _ = model_format.load_parts(digits_model.folder)
    child, _, _ = model_format.load_parts(tuned.folder)
    assert type(child) is UNet2DModel and not any("lora" in key for key in child.state_dict())
    changed = {key for key, value in child.state_dict().items() if not torch.equal(value, parent.state_dict()[key])}
    # Only the weights the adapters were merged into moved: attention and the time projections.
    assert changed and all(key.endswith(".weight") for key in changed)
    assert all(any(t in key for t in ("to_q", "to_k", "to_v", "to_out", "time_emb_proj")) for key in changed)
    assert not any("conv" in key for key in changed)
    assert tuned.metrics["class_accuracy"] >= digits_model.metrics["class_accuracy"] - 0.15
    images = Sampler.from_folder(tuned.folder).run([Sampler.from_folder(tuned.folder).job(n=2, seed=0, label=3)])
    assert images[0].shape[0] == 2 and torch.isfinite(images[0]).all()
    assert model_format.read_info(tuned.folder).config["lora_rank"] == 4


def test_init_from_refuses_another_autoencoder_or_conditioning(digits_model, digits_latents, latent_other_autoencoder):
    with pytest.raises(InputError, match="its conditioning is 'class', this run's 'none'"):
        train(digits_latents, training_config(DiffusionConfig, **RUN, steps=1, conditioning="none", init_from=digits_model.model_uri),
              progress=False)
    with pytest.raises(latent_shards.LineageError, match="another autoencoder"):
        train(latent_other_autoencoder, training_config(DiffusionConfig, **RUN, steps=1, init_from=digits_model.model_uri),
              progress=False)


@pytest.fixture(scope="module")
def latent_other_autoencoder(ray_local, digits16, tmp_path_factory) -> str:
    """The 16-px digits encoded by an untrained autoencoder of the same size."""
    from ldmflow.data.precompute import PrecomputeConfig, precompute
    from ldmflow.model import autoencoders

    root = tmp_path_factory.mktemp("other-autoencoder")
    torch.manual_seed(1)
    info = autoencoders.save(autoencoders.build("tiny", 16), root / "autoencoder", scale_factor=0.8, resolution=16,
                             config={}, lineage={})
    ref = latent_shards.AutoencoderRef(uri=str(root / "autoencoder"), weights_sha256=info.weights_sha256, scale_factor=0.8)
    precompute(digits16, str(root / "latents"), root / "autoencoder", ref, PrecomputeConfig(actors=1), progress=False)
    return str(root / "latents")


def test_an_inpainting_model_trains_from_a_plain_one_and_is_recorded(digits_model, digits_latents, inpainting_model):
    from ldmflow.model.sampler import Sampler

    trained = inpainting_model
    info = model_format.read_info(trained.folder)
    assert info.inpainting and info.config["inpainting"] and info.lineage["parent_model"] == digits_model.model_uri
    version = models.resolve_version(trained.model_uri)
    assert tracking.client().get_model_version(version.name, version.version).tags["ldmflow.inpainting"] == "true"
    parent, _, _ = model_format.load_parts(digits_model.folder)
    child, _, _ = model_format.load_parts(trained.folder)
    channels = info.latent_shape[0]
    assert child.config.in_channels == 2 * channels + 1
    # The new channels started at zero and were fed: training moved their weights.
    assert child.conv_in.weight[:, channels:].abs().sum() > 0
    model = Sampler.from_folder(trained.folder)
    image = model.generate(label=3, seed=1)[0]
    mask = torch.zeros(1, 16, 16)
    mask[:, 10:] = 1
    out = model.run([model.job(image=image, mask=mask, seed=2)])[0]
    assert torch.equal(out[0, :, :8], image[:, :8])  # known rows beyond the feathered band: the input's
    with pytest.raises(InputError, match="it is trained for inpainting"):
        train(digits_latents, training_config(DiffusionConfig, **RUN, steps=1, init_from=trained.model_uri),
              progress=False)
    with pytest.raises(InputError, match="lora_rank would freeze"):
        train(digits_latents, training_config(DiffusionConfig, **RUN, steps=1, inpainting=True, lora_rank=4),
              progress=False)
