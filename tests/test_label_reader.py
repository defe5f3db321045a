"""A class model's label reader: trained with the model, saved in its folder, loaded with it,
and, for an inpainting without a label, the finalists' source and a weight in the choice."""

import pytest
import torch

from ldmflow.model import label_reader, model_format, self_classifier
from ldmflow.model.label_reader import LabelReader
from ldmflow.model.sampler import Sampler
from tests.helpers import tiny_diffusion_parts


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return tiny_diffusion_parts(tmp_path_factory.mktemp("reader"))


def sure_of(labels: list[int], channels: int, num_classes: int = 10) -> LabelReader:
    """A reader that reads ``labels`` whatever it is shown: the first most likely, by 10 nats each."""
    reader = LabelReader(channels, num_classes)
    last = reader.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-100.0)
        for rank, label in enumerate(labels):
            last.bias[label] = -10.0 * rank
    return reader.eval()


def test_a_sure_readers_finalists_are_drawn_and_its_likeliest_kept(parts, monkeypatch):
    unet, vae, _, info = parts
    reader = sure_of([7, 3, 1], info.latent_shape[0])
    sampler = Sampler(unet, vae, info, label_reader=reader)
    image = sampler.generate(label=5, seed=2)[0]
    mask = torch.zeros(1, 16, 16)
    mask[:, 10:] = 1
    seen, decoded = [], []

    def decode(latents):
        decoded.append(latents.clone())
        return Sampler.decode(sampler, latents)

    monkeypatch.setattr(sampler, "decode", decode)
    hook = sampler.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["class_labels"]),
                                                  with_kwargs=True)
    try:
        job = sampler.job(image=image, mask=mask, seed=4)
        result = sampler.run([job])[0]
    finally:
        hook.remove()
    # The probe of every label, the sampling passes (null then the finalists), the refines.
    assert len(seen) == self_classifier.PROBES + job.denoising_steps + self_classifier.REFINES
    null = info.null_label
    assert seen[self_classifier.PROBES].tolist() == [null] * 3 + [7, 3, 1]
    assert all(labels.tolist() == [7, 3, 1] for labels in seen[-self_classifier.REFINES :])
    # Sure (its likeliest label's probability above SURE), its likeliest outweighs any spread
    # of the UNet's errors: the image is the completion drawn under label 7.
    drawn = Sampler.decode(sampler, decoded[0])
    weight = sampler.feathered(mask[None])
    torch.testing.assert_close(result, weight * drawn[:1] + (1 - weight) * image, atol=1e-5, rtol=0)


def test_the_error_and_the_readers_belief_are_weighed_together():
    errors = torch.tensor([[10.0, 11.0, 30.0], [10.0, 20.0, 30.0]])
    assert self_classifier.combined(errors, None).equal(errors)
    # Row 0: a reader sure of label 1, whose error is a little above the best: the reader wins.
    # Row 1: a reader that can hardly tell the labels apart, errors a spread apart: the error wins.
    prior = torch.tensor([[-3.0, -0.05, -4.0], [-1.1, -1.0, -1.2]])
    assert self_classifier.combined(errors, prior).argmin(dim=1).tolist() == [1, 0]
    same = torch.full((1, 3), 5.0)  # no spread at all: the reader decides
    assert self_classifier.combined(errors, prior, weight=0.0).argmin(dim=1).tolist() == [0, 0]
    assert self_classifier.combined(same, torch.tensor([[-2.0, -3.0, -0.5]])).argmin(dim=1).tolist() == [2]
    assert self_classifier.combined(errors[:, :1], prior[:, :1]).isfinite().all()  # one finalist: no spread


def test_the_reader_is_saved_in_the_model_folder_and_loaded_with_it(parts, tmp_path):
    from dataclasses import replace

    unet, _, vae_folder, info = parts
    reader = LabelReader(info.latent_shape[0], 10)
    with pytest.raises(ValueError, match="label_reader"):
        model_format.save(tmp_path / "refused", unet, vae_folder, info, reader)  # info says none
    with_reader = replace(info, label_reader=True)
    model_format.save(tmp_path / "model", unet, vae_folder, with_reader, reader.eval())
    assert model_format.read_info(tmp_path / "model").label_reader
    assert sorted(p.name for p in (tmp_path / "model" / label_reader.FOLDER).iterdir()) == ["config.json",
                                                                                          "model.safetensors"]
    loaded = Sampler.from_folder(tmp_path / "model").label_reader
    channels = torch.randn(4, info.latent_shape[0] + 1, *info.latent_shape[1:])
    torch.testing.assert_close(loaded(channels), reader(channels), atol=0, rtol=0)
    model_format.save(tmp_path / "plain", unet, vae_folder, info)
    assert Sampler.from_folder(tmp_path / "plain").label_reader is None


def test_the_trained_models_reader_reads_its_digits_half_masked(digits_model):
    """Trained after the UNet on the same latents: with their bottom half masked, it reads the
    labels of the training digits far better than chance (one in ten)."""
    from ldmflow.data import image_shards, latent_shards, shard_stream
    from ldmflow.model import inpainting

    info = model_format.read_info(digits_model.folder)
    assert info.label_reader and info.config["label_reader_steps"] == 300
    sampler = Sampler.from_folder(digits_model.folder)
    url = info.lineage["latents"]
    _, text = image_shards.read_manifest_text(url, "precompute")
    manifest = latent_shards.LatentManifest.from_json(text, where=url)
    stream = shard_stream.ShardStream(latent_shards.shard_urls(url, manifest), shuffle_buffer=0,
                                      decode=latent_shards.decode_latent)
    samples = [sample for _, sample in zip(range(256), stream)]
    latents = torch.stack([torch.from_numpy(s.mean) for s in samples]) * info.scale_factor
    labels = torch.tensor([s.label for s in samples])
    cells = torch.zeros(len(latents), 1, *latents.shape[2:])
    cells[:, :, latents.shape[2] // 2 :] = 1
    with torch.no_grad():
        read = sampler.label_reader(inpainting.conditioning_channels(latents, cells)).argmax(dim=1)
    assert float((read == labels).float().mean()) > 0.4


def test_an_unsure_reader_leaves_the_choice_to_the_error(parts):
    """A reader that is not sure of any label (none above SURE) still ranks the finalists
    with the probe, but has no weight in choosing among their completions."""
    unet, vae, _, info = parts
    reader = sure_of([7, 3, 1], info.latent_shape[0])
    with torch.no_grad():
        reader.net[-1].bias.copy_(torch.tensor([0.0] * 10))
        reader.net[-1].bias[[7, 3, 1]] = torch.tensor([0.5, 0.4, 0.3])
    latents = torch.randn(2, *info.latent_shape)
    known = torch.ones(2, 1, *info.latent_shape[1:])
    errors = torch.arange(20.0).view(2, 10)
    ranked, weight = self_classifier.read_finalists(reader, errors, latents, known)
    assert ranked.shape == (2, self_classifier.FINALISTS) and weight.eq(0).all()
    sure = sure_of([7, 3, 1], info.latent_shape[0])
    ranked, weight = self_classifier.read_finalists(sure, errors, latents, known)
    assert ranked.tolist() == [[7, 3, 1]] * 2 and weight[:, 0].gt(-1e-3).all() and weight[:, 1].lt(-5).all()
