"""What the sampler promises, on tiny random-weight models (no training needed): the same
seed gives the same image alone or batched, per-request scheduler state, SDEdit at strength
0 is the autoencoder's reconstruction, inpainting keeps the unmasked pixels, interpolation
ends at each seed's (and label's, prompt's) own image, and the saved
folder and the MLflow pyfunc sample exactly like the in-memory model."""

import base64
import io
import json
import re
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ldmflow.model import autoencoders, inpainting, model_format, self_classifier, unets
from ldmflow.model.grids import to_pil
from ldmflow.model.sampler import Sampler
from ldmflow.model.sampling import resampling_plan
from ldmflow.registry import models
from tests.helpers import tiny_diffusion_parts


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return tiny_diffusion_parts(tmp_path_factory.mktemp("sampler"))


@pytest.fixture(scope="module")
def sampler(parts):
    unet, vae, _, info = parts
    return Sampler(unet, vae, info)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++"])
def test_same_seed_same_image_alone_or_batched(sampler, name):
    alone = sampler.generate(label=3, n=3, seed=5, sampler=name)
    batch = sampler.run([sampler.job(label=1, n=2, seed=9, sampler=name, guidance=4.0),
                         sampler.job(label=3, n=1, seed=6, sampler=name),
                         sampler.job(label=3, n=2, seed=5, sampler=name)])
    torch.testing.assert_close(batch[1][0], alone[1], atol=1e-5, rtol=0)  # seed 6 == seed 5's second image
    torch.testing.assert_close(batch[2], alone[:2], atol=1e-5, rtol=0)
    assert not torch.allclose(batch[0][0], alone[0])  # another label, guidance and seed: another image
    assert alone.shape == (3, 3, 16, 16) and alone.abs().max() <= 1


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++"])
def test_interpolation_ends_at_each_seeds_own_image(sampler, name):
    path = sampler.generate(label=3, n=5, seed=5, to_seed=40, sampler=name)
    torch.testing.assert_close(path[0], sampler.generate(label=3, n=1, seed=5, sampler=name)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(path[-1], sampler.generate(label=3, n=1, seed=40, sampler=name)[0], atol=1e-5, rtol=0)
    # Batched with other requests, and one image at a time at its point of the path, it is the same.
    batch = sampler.run([sampler.job(label=1, n=2, seed=9, sampler=name),
                         sampler.job(label=3, n=5, seed=5, to_seed=40, sampler=name)])
    torch.testing.assert_close(batch[1], path, atol=1e-5, rtol=0)
    middle = sampler.generate(label=3, n=1, seed=5, to_seed=40, at=0.5, sampler=name)
    torch.testing.assert_close(middle[0], path[2], atol=1e-5, rtol=0)
    if name != "ddpm":  # deterministic samplers: each step along the path changes the image a little
        steps = (path[1:] - path[:-1]).abs().mean(dim=(1, 2, 3))
        assert steps.max() < (path[-1] - path[0]).abs().mean()


def test_slerp_keeps_the_noise_norm_and_its_ends():
    from ldmflow.model.sampling import slerp

    a, b = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(4, 8, 8)
    path = slerp(a, b, torch.linspace(0, 1, 9))
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    norms = path.flatten(1).norm(dim=1)
    # Near the norm of both ends all along (a straight line would dip to about 1/sqrt(2) of it).
    assert (norms / a.norm()).min() > 0.9 and (norms / a.norm()).max() < 1.1
    assert ((a + b) / 2).norm() / a.norm() < 0.8


def test_interpolating_labels_mixes_their_embeddings(sampler):
    path = sampler.generate(label=3, to_label=8, n=3, seed=2, sampler="ddim")
    torch.testing.assert_close(path[0], sampler.generate(label=3, n=1, seed=2, sampler="ddim")[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(path[-1], sampler.generate(label=8, n=1, seed=2, sampler="ddim")[0], atol=1e-5, rtol=0)
    assert not torch.allclose(path[1], path[0], atol=1e-3) and not torch.allclose(path[1], path[2], atol=1e-3)
    # Batched with a plain request, neither changes.
    batch = sampler.run([sampler.job(label=1, n=2, seed=9, sampler="ddim"),
                         sampler.job(label=3, to_label=8, n=3, seed=2, sampler="ddim")])
    torch.testing.assert_close(batch[0], sampler.generate(label=1, n=2, seed=9, sampler="ddim"), atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1], path, atol=1e-5, rtol=0)


def test_concurrent_runs_do_not_share_scheduler_state(sampler):
    """Two threads sampling with different step counts through the same Sampler get what
    each would alone (diffusers schedulers carry a step index: one per run)."""
    expected = {steps: sampler.generate(label=2, n=2, seed=1, sampler="dpm++", steps=steps) for steps in (3, 7)}
    got, errors = {}, []

    def worker(steps):
        try:
            for _ in range(3):
                got.setdefault(steps, []).append(sampler.generate(label=2, n=2, seed=1, sampler="dpm++", steps=steps))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(steps,)) for steps in (3, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for steps, results in got.items():
        for result in results:
            torch.testing.assert_close(result, expected[steps], atol=1e-5, rtol=0)


def test_edit_at_strength_zero_is_the_reconstruction_and_strength_changes_it(sampler):
    image = sampler.generate(label=4, seed=0)[0]
    reconstruction = sampler.decode(sampler.encode(image[None]))[0]
    unchanged = sampler.run([sampler.job(image=image, strength=0.0, label=7)])[0][0]
    torch.testing.assert_close(unchanged, reconstruction, atol=1e-6, rtol=0)
    half = sampler.run([sampler.job(image=image, strength=0.5, label=7, sampler="dpm++", seed=3)])[0][0]
    full = sampler.run([sampler.job(image=image, strength=1.0, label=7, seed=3)])[0][0]
    distance = lambda a: (a - reconstruction).abs().mean().item()  # noqa: E731
    assert 0 < distance(half) and 0 < distance(full)
    # Same seed and strength: the same edit, batched with another or not.
    again = sampler.run([sampler.job(image=image, strength=0.5, label=1, sampler="dpm++", seed=8),
                         sampler.job(image=image, strength=0.5, label=7, sampler="dpm++", seed=3)])[1][0]
    torch.testing.assert_close(again, half, atol=1e-5, rtol=0)


def test_inpainting_keeps_the_unmasked_region(sampler):
    image = sampler.generate(label=5, seed=2)[0]
    mask = torch.zeros(1, 16, 16)
    mask[:, :, 8:] = 1  # regenerate the right half
    band = sampler.feather_pixels
    for name in ("ddpm", "ddim", "dpm++"):
        job = sampler.job(image=image, mask=mask, label=1, n=2, seed=4, sampler=name)
        assert job.jump_count == (inpainting.JUMP_COUNT if name != "dpm++" else 1)  # dpm++ cannot step back
        assert sampler.job(image=image, mask=mask, sampler=name, jump_count=2).jump_count == (2 if name != "dpm++" else 2)
        result = sampler.run([job])[0]
        # Beyond the feathered band the known pixels are the input's, exactly; within it they fade.
        torch.testing.assert_close(result[:, :, :, : 8 - band], image[:, :, : 8 - band].expand(2, -1, -1, -1),
                                   atol=0, rtol=0)
        assert (result[:, :, :, 8:] - image[:, :, 8:]).abs().mean() > 0.01
    weight = sampler.feathered(mask[None])[0, 0, 0]
    assert weight[: 8 - band].eq(0).all() and weight[8:].eq(1).all() and (0 < weight[8 - band : 8]).all()
    assert weight[8 - band : 8].lt(1).all() and weight[8 - band : 8].diff().gt(0).all()
    # 4×4 latents: the right two columns are generated, and the column beside them by dilation.
    assert sampler.latent_mask(mask[None]).sum() == 4 * (2 + sampler.mask_dilation)


def test_inpainting_without_a_label_completes_under_each_finalist_and_keeps_the_best(sampler, monkeypatch):
    image = sampler.generate(label=5, seed=2)[0]
    mask = torch.zeros(1, 16, 16)
    mask[:, 10:] = 1
    job = sampler.job(image=image, mask=mask, seed=4, n=2)
    assert job.infer_label and not sampler.job(image=image, mask=mask, seed=4, label=2).infer_label
    assert not sampler.job(image=image, mask=mask, seed=4, infer_label=False).infer_label
    assert job.batch_key() != replace(job, infer_label=False).batch_key()  # its batch is its finalists' completions
    seen, judged, decoded = [], [], []
    real = self_classifier.best_completions

    def best_completions(*args):
        judged.append((args[2].clone(), args[3].clone(), real(*args)))
        return judged[-1][-1]

    def decode(latents):
        decoded.append(latents.clone())
        return Sampler.decode(sampler, latents)

    monkeypatch.setattr(self_classifier, "best_completions", best_completions)
    monkeypatch.setattr(sampler, "decode", decode)
    hook = sampler.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["class_labels"]),
                                                  with_kwargs=True)
    try:
        result = sampler.run([job])[0]
    finally:
        hook.remove()
    null, k = sampler.info.null_label, self_classifier.FINALISTS
    assert len(seen) == self_classifier.PROBES + job.denoising_steps + self_classifier.REFINES
    assert all(len(set(labels.tolist())) == null for labels in seen[: self_classifier.PROBES])  # every label
    sampling = seen[self_classifier.PROBES : -self_classifier.REFINES]
    finalists = sampling[0][2 * k :].view(k, 2)  # null passes, then label j of both images, label-major
    assert sampling[0][: 2 * k].eq(null).all() and all(labels.equal(sampling[0]) for labels in sampling)
    assert all(len(set(column.tolist())) == k for column in finalists.T) and finalists.lt(null).all()
    assert all(labels.equal(finalists.reshape(-1)) for labels in seen[-self_classifier.REFINES :])
    # Each completion is judged put under the input's known pixels and encoded again, and the
    # image returned is the best one's, composited over the input.
    (composites, cells, best), = judged
    completions = decoded[0]
    # Measured on the cells mostly known: latent row 2 (pixel rows 8-11, half known) too,
    # which the sampling generated.
    assert cells[0, 0, :, 0].tolist() == [1, 1, 1, 0]
    assert sampler.latent_mask(mask[None])[0, 0, :, 0].tolist() == [0, 0, 1, 1]
    assert len(completions) == 2 * k and best.shape == (2,)
    drawn = Sampler.decode(sampler, completions)
    hole = mask.expand(2 * k, -1, -1, -1)
    torch.testing.assert_close(composites, sampler.encode(hole * drawn + (1 - hole) * image), atol=1e-5, rtol=0)
    weight = sampler.feathered(mask[None])
    expected = weight * drawn[best * 2 + torch.arange(2)] + (1 - weight) * image
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)


def test_resampling_reruns_each_stretch_and_steps_back(sampler):
    assert resampling_plan(10, 3, 2) == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 6, 7, 8, 9]
    assert resampling_plan(10) == resampling_plan(10, 4, 1) == list(range(10))
    image = sampler.generate(label=5, seed=2, steps=8)[0]
    mask = torch.zeros(1, 16, 16)
    mask[:, 10:] = 1
    plain = sampler.job(image=image, mask=mask, label=1, seed=4, steps=8, jump_count=1)
    jumping = replace(plain, jump_length=2, jump_count=3)
    assert plain.denoising_steps == 8 and jumping.denoising_steps == len(resampling_plan(8, 2, 3)) == 20
    assert plain.batch_key() != jumping.batch_key()
    steps = []
    out = sampler.run([jumping], on_step=lambda: steps.append(1))[0]
    assert len(steps) == 20 and not torch.allclose(out, sampler.run([plain])[0])
    torch.testing.assert_close(out, sampler.run([jumping])[0], atol=1e-5, rtol=0)  # seeded: the same again


def test_an_inpainting_model_is_fed_the_known_latents_and_the_mask(parts, tmp_path):
    plain_unet, vae, vae_folder, _ = parts
    unet, _, _, info = tiny_diffusion_parts(tmp_path, inpainting=True)
    assert info.inpainting and unet.config.in_channels == 2 * info.latent_shape[0] + 1
    # Started from a plain model: the new input channels' weights are zero, the rest its own.
    widened = unets.build("tiny", "class", tuple(info.latent_shape), 10, inpainting=True,
                          weights=plain_unet.state_dict())
    conv = widened.conv_in.weight
    torch.testing.assert_close(conv[:, : info.latent_shape[0]], plain_unet.conv_in.weight)
    assert conv[:, info.latent_shape[0] :].eq(0).all()

    model = Sampler(unet, vae, info)
    seen = []
    unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    image = model.generate(label=5, seed=2)[0]
    assert all(x.shape[1] == 9 for x in seen) and seen[0][:, 4:8].eq(0).all() and seen[0][:, 8].eq(1).all()
    seen.clear()
    mask = torch.zeros(1, 16, 16)
    mask[:, 8:] = 1  # the bottom half: latent rows 2 and 3
    job = model.job(image=image, mask=mask, label=1, seed=4)
    assert job.jump_count == 1 and job.denoising_steps == job.steps  # no resampling: it was trained for this
    result = model.run([job])[0]
    cells = model.latent_mask(mask[None])
    expected = inpainting.conditioning_channels(model.encode(image[None]), cells)
    assert len(seen) == job.steps and cells[0, 0, :, 0].tolist() == [0, 0, 1, 1]
    for x in seen:  # both guidance passes see the same known latents and mask
        torch.testing.assert_close(x[:, 4:], expected.repeat(x.shape[0], 1, 1, 1))
    band = model.feather_pixels
    torch.testing.assert_close(result[:, :, : 8 - band], image[:, : 8 - band][None], atol=0, rtol=0)
    with pytest.raises(ValueError, match="^jump_count: this model is trained for inpainting"):
        model.check(replace(job, jump_count=2, jump_length=1))
    seen.clear()
    model.run([replace(job, label=None, infer_label=True)])
    probes, scores = self_classifier.PROBES, self_classifier.REFINES  # the finalists' probes, sampling, their scores
    assert len(seen) == probes + job.steps + scores
    for x in seen[:probes] + seen[-scores:]:  # the probe sees nothing known: the known latents would answer it
        assert x[:, 4:8].eq(0).all() and x[:, 8].eq(1).all()
    for x in seen[probes:-scores]:
        torch.testing.assert_close(x[:, 4:], expected.repeat(x.shape[0], 1, 1, 1))

    model_format.save(tmp_path / "model", unet, vae_folder, info)
    assert model_format.read_info(tmp_path / "model").inpainting
    torch.testing.assert_close(Sampler.from_folder(tmp_path / "model").run([job])[0], result)


def test_inversion_is_deterministic_ddim_and_follows_the_new_condition(sampler):
    """What inversion promises on random weights; how closely a trained model reconstructs is
    measured over HTTP (tests/test_serving.py) and in docs/editing.md."""
    source = sampler.generate(label=3, n=1, seed=7, sampler="ddim", steps=10)[0]
    # Deterministic, seed-free; under another class it is another image.
    job = sampler.job(image=source, invert=True, source_label=3, label=3, guidance=1.0, steps=10)
    assert job.sampler == "ddim" and job.mode == "invert" and job.denoising_steps == 20
    torch.testing.assert_close(sampler.run([job])[0], sampler.run([replace(job, seed=99)])[0])
    other = sampler.generate(image=source, invert=True, source_label=3, label=8, guidance=1.0, steps=10)[0]
    assert not torch.allclose(other, sampler.run([job])[0][0], atol=1e-3)


def test_requests_the_model_cannot_run_name_their_field(sampler):
    cases = [
        (dict(label=10), "label"),
        (dict(prompt="a seven"), "prompt"),
        (dict(sampler="euler"), "sampler"),
        (dict(steps=0), "steps"),
        (dict(image=torch.zeros(3, 8, 8)), "image"),
        (dict(image=torch.zeros(3, 16, 16), mask=torch.zeros(1, 8, 8)), "mask"),
        (dict(mask=torch.zeros(1, 16, 16)), "mask"),
        (dict(image=torch.zeros(3, 16, 16), strength=1.5), "strength"),
        (dict(to_seed=3, image=torch.zeros(3, 16, 16)), "to_seed"),
        (dict(to_label=2), "to_label"),
        (dict(label=1, to_label=10), "to_label"),
        (dict(prompt="a seven", to_prompt="a two"), "prompt"),
        (dict(to_seed=3, n=2, at=0.5), "at"),
        (dict(at=0.5), "at"),
        (dict(invert=True), "invert"),
        (dict(invert=True, image=torch.zeros(3, 16, 16), sampler="dpm++"), "sampler"),
        (dict(invert=True, image=torch.zeros(3, 16, 16), source_label=11), "source_label"),
        (dict(invert=True, image=torch.zeros(3, 16, 16), source_prompt="a seven"), "source_prompt"),
        (dict(jump_count=2), "jump_count"),
        (dict(infer_label=True), "infer_label"),
        (dict(image=torch.zeros(3, 16, 16), mask=torch.zeros(1, 16, 16), infer_label=True, label=3), "infer_label"),
        (dict(image=torch.zeros(3, 16, 16), mask=torch.zeros(1, 16, 16), jump_count=11), "jump_count"),
        (dict(image=torch.zeros(3, 16, 16), mask=torch.zeros(1, 16, 16), jump_count=2, sampler="dpm++"), "sampler"),
        (dict(image=torch.zeros(3, 16, 16), mask=torch.zeros(1, 16, 16), jump_length=25, jump_count=2, steps=25), "jump_length"),
    ]
    for fields, name in cases:
        with pytest.raises(ValueError, match=f"^{name}:"):
            sampler.check(sampler.job(**fields))


def test_saved_folder_and_pyfunc_sample_like_the_in_memory_model(parts, sampler, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    unet, _, vae_folder, info = parts
    model_format.save(tmp_path / "model", unet, vae_folder, info)
    assert model_format.read_info(tmp_path / "model") == info
    loaded = Sampler.from_folder(tmp_path / "model")
    torch.testing.assert_close(loaded.generate(label=6, n=2, seed=11), sampler.generate(label=6, n=2, seed=11))

    packaged = models.package(tmp_path / "model", tmp_path / "mlflow")
    assert model_format.model_folder(packaged) == packaged / "data" / model_format.MLFLOW_DATA
    pyfunc = mlflow.pyfunc.load_model(str(packaged))
    assert [c.name for c in pyfunc.metadata.get_input_schema().inputs][:2] == ["label", "prompt"]
    out = pyfunc.predict(pd.DataFrame({"label": [6, 6], "seed": [11, 12]}))
    assert list(out["seed"]) == [11, 12]
    expected = [np.asarray(image) for image in to_pil(sampler.generate(label=6, n=2, seed=11))]
    for encoded, want in zip(out["image"], expected):
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    # Interpolation: one row per image, each at its point of the path.
    path = sampler.generate(label=6, n=3, seed=11, to_seed=30)
    rows = pd.DataFrame({"label": [6] * 3, "seed": [11] * 3, "to_seed": [30] * 3, "at": [0.0, 0.5, 1.0]})
    out = pyfunc.predict(rows)
    assert list(out["seed"]) == [11, 11, 30]
    for encoded, want in zip(out["image"], to_pil(path)):
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))
        assert np.abs(got.astype(int) - np.asarray(want).astype(int)).max() <= 1



def test_text_model_follows_its_prompt(tmp_path):
    unet, vae, _, info = tiny_diffusion_parts(tmp_path, conditioning="text")
    sampler = Sampler(unet, vae, info)
    seven = sampler.generate(prompt="a handwritten seven", n=2, seed=0)
    torch.testing.assert_close(sampler.generate(prompt="a handwritten seven", n=2, seed=0), seven)
    two = sampler.generate(prompt="a handwritten two", n=2, seed=0)
    assert not torch.allclose(two, seven)
    # Interpolating prompts (same seed): the ends are each prompt's own image.
    path = sampler.generate(prompt="a handwritten seven", to_prompt="a handwritten two", n=3, seed=0)
    torch.testing.assert_close(path[0], seven[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(path[-1], two[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="^label:"):
        sampler.check(sampler.job(label=1))


def test_a_folder_that_is_not_a_model_is_refused_with_its_reason(tmp_path, parts):
    with pytest.raises(model_format.ModelError, match="no ldmflow.json"):
        model_format.model_folder(tmp_path)
    (tmp_path / "ldmflow.json").write_text('{"kind": "ldmflow.autoencoder"}')
    with pytest.raises(model_format.ModelError, match="kind is 'ldmflow.autoencoder'"):
        model_format.read_info(tmp_path)
    (tmp_path / "ldmflow.json").write_text('{"kind": "ldmflow.diffusion", "version": 1, "conditioning": "class"}')
    with pytest.raises(model_format.ModelError, match="malformed"):
        model_format.read_info(tmp_path)


def test_a_model_of_another_format_version_is_refused_in_one_line(tmp_path, parts):
    unet, _, vae_folder, info = parts
    model_format.save(tmp_path / "model", unet, vae_folder, info)
    meta = tmp_path / "model" / "ldmflow.json"
    assert json.loads(meta.read_text())["version"] == model_format.VERSION
    body = json.loads(meta.read_text())
    for version, says in ((None, "format version 0 is older than this ldmflow's (1) and is not converted: train it"),
                          (2, "format version 2 is newer than this ldmflow's (1): upgrade ldmflow")):
        if version is None:
            body.pop("version")
        else:
            body["version"] = version
        meta.write_text(json.dumps(body))
        with pytest.raises(model_format.ModelError, match=re.escape(says)) as refused:
            Sampler.from_folder(tmp_path / "model")
        assert "\n" not in str(refused.value)
    autoencoder_meta = tmp_path / "model" / "autoencoder" / "ldmflow.json"
    body = json.loads(autoencoder_meta.read_text())
    body.pop("version")
    autoencoder_meta.write_text(json.dumps(body))
    with pytest.raises(autoencoders.AutoencoderError, match="ldmflow.autoencoder format version 0 is older"):
        autoencoders.load(tmp_path / "model" / "autoencoder")
