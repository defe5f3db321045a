"""The registered model: register → load by alias → the same images; export to diffusers;
evaluation (FD, KID, class accuracy) and the promotion gate with rollback, on MLflow/SQLite."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from ldmflow.model import model_format
from ldmflow.model.sampler import Sampler
from ldmflow.registry import aliases, gate, models, tracking
from ldmflow.training import evaluation, features, promotion
from tests import helpers
from tests.helpers import tiny_diffusion_parts


def new_run(experiment: str = "test-registry") -> str:
    return tracking.client().create_run(tracking.experiment_id(experiment)).info.run_id


def alias(name: str, alias_name: str) -> str:
    return str(tracking.client().get_model_version_by_alias(name, alias_name).version)


def register_folder_copy(folder, name: str) -> str:
    """Register a model folder as a new version of ``name``; returns the version."""
    return models.register(folder, name, new_run()).version


def test_register_then_load_by_alias_samples_like_the_in_memory_model(tmp_path):
    import mlflow
    import mlflow.pyfunc
    import pandas as pd

    unet, vae, vae_folder, info = tiny_diffusion_parts(tmp_path)
    in_memory = Sampler(unet, vae, info)
    model_format.save(tmp_path / "model", unet, vae_folder, info)
    version = models.register(tmp_path / "model", "registry-roundtrip", new_run())
    assert alias("registry-roundtrip", "candidate") == version.version

    for uri in ("models:/registry-roundtrip@candidate", f"models:/registry-roundtrip/{version.version}"):
        loaded, registered = models.load_sampler(uri)
        assert registered.version == version.version
        torch.testing.assert_close(loaded.generate(label=2, n=3, seed=7), in_memory.generate(label=2, n=3, seed=7))
    mlflow.set_tracking_uri(tracking.tracking_uri())
    mlflow.set_registry_uri(tracking.tracking_uri())
    try:
        pyfunc = mlflow.pyfunc.load_model("models:/registry-roundtrip@candidate")
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert len(pyfunc.predict(pd.DataFrame({"label": [1, 2, 3]}))) == 3


def test_export_is_a_diffusers_pipeline_that_samples_the_same_images(tmp_path):
    from diffusers import DiffusionPipeline

    from ldmflow.serving.export import export

    unet, vae, vae_folder, info = tiny_diffusion_parts(tmp_path)
    model_format.save(tmp_path / "model", unet, vae_folder, info)
    dest = export(str(tmp_path / "model"), tmp_path / "exported")
    assert {"model_index.json", "pipeline.py", "unet", "vae", "scheduler"} <= {p.name for p in dest.iterdir()}

    pipeline = DiffusionPipeline.from_pretrained(dest, trust_remote_code=True)
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    images = pipeline(class_labels=[4, 4], num_inference_steps=4, guidance_scale=2.0, generator=generators,
                      output_type="np").images
    ours = ((Sampler(unet, vae, info).generate(label=4, n=2, seed=5) + 1) / 2).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, ours, atol=1e-5)


# ---------------------------------------------------------------------------------------
# The distances, against their formulas


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=generator, dtype=torch.float64)
    b = torch.randn(20000, 3, generator=generator, dtype=torch.float64) * 2.0 + torch.tensor([1.0, 0.0, -1.0])
    # N(0, I) vs N(μ, 4I): ‖μ‖² + tr(I) + tr(4I) − 2 tr(2I) = 2 + 3 + 12 − 12 = 5
    assert evaluation.distances(a, b)["fd"] == pytest.approx(5.0, rel=0.03)
    assert evaluation.distances(a, a)["fd"] == pytest.approx(0.0, abs=1e-6)
    few = torch.randn(10, 64, generator=generator)  # fewer samples than dimensions: finite, non-negative
    assert 0 <= evaluation.distances(few, few + 0.1, kid_subset_size=10)["fd"] < float("inf")


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(400, 8, generator=generator), torch.randn(400, 8, generator=generator)
    same = evaluation.distances(a, b, kid_subset_size=100, kid_subsets=20)["kid"]
    shifted = evaluation.distances(a, b + 1.0, kid_subset_size=100, kid_subsets=20)["kid"]
    assert abs(same) < 0.02 < shifted
    assert evaluation.distances(a, b + 1.0, kid_subset_size=100, kid_subsets=20, seed=3)["kid"] == pytest.approx(
        evaluation.distances(a, b + 1.0, kid_subset_size=100, kid_subsets=20, seed=3)["kid"])  # seeded subsets


def test_images_reach_the_feature_extractor_as_uint8_at_their_own_size(tmp_path):
    """As the reference FID implementations feed Inception: saved-PNG values, not resized."""

    class Probe(torch.nn.Module):  # reports what it was given, as its "features"
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            facts = [float(x.dtype == torch.uint8), float(x.shape[2]), float(x.shape[3]),
                     float(x.min()), float(x.max()), float(return_features)]
            return torch.tensor(facts).repeat(x.shape[0], 1)

    path = tmp_path / "probe.pt"
    torch.jit.save(torch.jit.script(Probe()), str(path))
    images = torch.linspace(-1, 1, 2 * 3 * 16 * 16).view(2, 3, 16, 16)
    seen = features.InceptionFeatures(str(path))(features.to_uint8(images))
    assert seen[0].tolist() == [1.0, 16.0, 16.0, 0.0, 255.0, 1.0]


# ---------------------------------------------------------------------------------------
# Evaluation and the promotion gate on a trained model


EVAL = evaluation.EvaluationConfig(num_samples=60, reference_samples=200, steps=10, batch_size=60,
                                   kid_subset_size=50, kid_subsets=10)


def test_reference_features_are_computed_once_per_dataset_and_extractor(digits16, tmp_path):
    """A second evaluation against the same dataset reads the cached features, not the images:
    with the shards gone it still gets them; another extractor or limit computes anew."""
    copy = shutil.copytree(digits16, tmp_path / "images")
    reference = features.Reference.read(str(copy))
    torch.manual_seed(0)
    extract = features.DomainFeatures(features.DomainClassifier(10).eval(), reference.key)
    first = features.reference_features(extract, reference, 40, batch_size=16)
    assert first.shape == (40, 1024)
    for shard in copy.glob("shard-*.tar"):
        shard.unlink()
    again = features.reference_features(extract, features.Reference.read(str(copy)), 40, batch_size=16)
    assert torch.equal(again, first)
    with pytest.raises(ValueError, match="no readable images"):
        features.reference_features(extract, reference, 30, batch_size=16)  # another limit: not cached


def test_the_reference_set_is_drawn_at_random_from_every_shard(digits16):
    """Not the first N in shard order (for class folders sorted by name, the first classes):
    a seeded draw over the whole dataset, read from only the shards it picked."""
    from ldmflow.data import image_shards, shard_stream

    reference = features.Reference.read(digits16)
    picks = reference.picks(40, seed=0)
    assert sum(len(p) for p in picks.values()) == 40 and len(picks) >= 6  # 8 shards of 50
    assert reference.picks(40, seed=0) == picks and reference.picks(40, seed=1) != picks
    assert sum(len(p) for p in reference.picks(10_000, seed=0).values()) == 400  # a smaller dataset: all of it
    everything = list(shard_stream.ShardStream(image_shards.shard_urls(digits16), shuffle_buffer=0))
    by_position = {(i // 50, i % 50): sample for i, sample in enumerate(everything)}
    expected = [by_position[shard, position] for shard in sorted(picks) for position in sorted(picks[shard])]
    images = reference.images(40, seed=0)
    assert torch.equal(images, torch.stack([torch.from_numpy(sample.image) for sample in expected]))
    assert [sample.key for sample in expected] != [sample.key for sample in everything[:40]]
    captions = reference.captioned(40, seed=0)
    assert captions == [(sample.caption, sample.label) for sample in expected]


def test_evaluate_records_scores_on_the_model_version(digits_model, tmp_path):
    result = evaluation.evaluate(digits_model.model_uri, EVAL)
    assert result.features == "domain-classifier"
    assert result.num_samples == 60 and result.num_reference == 200
    assert set(result.metrics) == {"fd", "kid", "class_accuracy"}
    assert result.metrics["class_accuracy"] > 0.5
    name, version = digits_model.model_uri[len("models:/"):].split("/")
    assert evaluation.recorded(name, version, EVAL) == result
    again = evaluation.evaluate(digits_model.model_uri, EVAL)  # fixed seeds: the same scores
    assert again.metrics == pytest.approx(result.metrics)
    registered = models.resolve_version(digits_model.model_uri)  # the scores attach to the logged model too
    logged = tracking.client().get_logged_model(registered.model_id)
    assert {"eval_fd", "eval_kid", "eval_class_accuracy"} <= {m.key for m in logged.metrics}


def test_evaluation_draws_the_same_images_on_ray_workers(digits_model, ray_local):
    """``workers: 3``: three Ray tasks, each loading the registered version itself, draw the
    seeds' images that this process draws, in the same order, and the scores follow."""
    sampler, _ = models.load_sampler(digits_model.model_uri)
    config = dataclasses.replace(EVAL, num_samples=12, batch_size=4)
    here, labels = evaluation.draw(sampler, config, [])
    there, same_labels = evaluation.draw(sampler, dataclasses.replace(config, workers=3), [], model_uri=digits_model.model_uri)
    assert same_labels == labels and there.shape == here.shape
    assert torch.allclose(there, here, atol=1e-4), (there - here).abs().max()
    spread = evaluation.evaluate(digits_model.model_uri, dataclasses.replace(EVAL, workers=2))
    assert spread.metrics == pytest.approx(evaluation.evaluate(digits_model.model_uri, EVAL).metrics, rel=1e-3)


def test_evaluate_with_local_inception_weights(digits_model, tmp_path):
    """A TorchScript feature extractor at the configured path replaces the domain classifier."""

    class Features(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert x.dtype == torch.uint8  # the reference preparation: uint8, native size
            return torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)

    path = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(Features()), str(path))
    config = dataclasses.replace(EVAL, inception_path=str(path))
    result = evaluation.evaluate(digits_model.model_uri, config)
    assert result.features == "inception" and result.metrics["fd"] > 0
    missing = dataclasses.replace(EVAL, features="inception")
    with pytest.raises(ValueError, match="inception_path"):
        evaluation.evaluate(digits_model.model_uri, missing)


def test_promotion_refuses_a_worse_candidate_accepts_a_better_one_and_rolls_back(digits_model, tmp_path):
    name = "gate-test"
    good = digits_model.folder
    bad = helpers.random_unet_copy(good, tmp_path / "bad")
    config = gate.PromotionConfig(metric="fd")

    register_folder_copy(bad, name)  # v1: the first version goes to production whatever its score
    first = promotion.promote(name, config, EVAL)
    assert first.promoted and first.candidate == "1" and first.production is None

    register_folder_copy(good, name)  # v2: better
    better = promotion.promote(name, config, EVAL)
    assert better.promoted and better.candidate == "2" and better.production == "1"
    assert better.candidate_score < better.production_score
    client = tracking.client()
    assert alias(name, "production") == "2"
    assert alias(name, "previous") == "1"
    tags = client.get_model_version(name, "2").tags
    assert tags["ldmflow.promotion.decision"] == "promoted"
    assert float(tags["ldmflow.promotion.production_score"]) == pytest.approx(better.production_score)

    register_folder_copy(bad, name)  # v3: worse
    worse = promotion.promote(name, config, EVAL)
    assert not worse.promoted and worse.candidate_score > worse.production_score
    assert alias(name, "production") == "2"
    assert alias(name, "candidate") == "3"
    assert client.get_model_version(name, "3").tags["ldmflow.promotion.decision"] == "refused"

    forced = promotion.promote(name, config, EVAL, force=True, who="ci", why="a drill")  # scores from the tags
    assert forced.promoted and "forced" in forced.reason
    tags = client.get_model_version(name, "3").tags
    assert (tags["ldmflow.promotion.by"], tags["ldmflow.promotion.why"], tags["ldmflow.promotion.forced"]) == (
        "ci", "a drill", "true")
    assert aliases.history(name) == ["1", "2", "3"]

    back = aliases.rollback(name)
    assert (back.restored, back.replaced) == ("2", "3")
    assert alias(name, "production") == "2"
    assert aliases.rollback(name).restored == "1"
    with pytest.raises(aliases.RegistryError, match="nothing to roll back to"):
        aliases.rollback(name)

    # The gate on recorded evaluations (the sampler's POST /v1/promote): the same decision,
    # the same record, with who and why; a version never evaluated is refused, not evaluated.
    again = gate.promote_recorded(name, "2", config, who="ana", why="sharper sevens")
    assert again.promoted and again.production == "1" and alias(name, "production") == "2"
    tags = client.get_model_version(name, "2").tags
    assert (tags["ldmflow.promotion.decision"], tags["ldmflow.promotion.by"], tags["ldmflow.promotion.why"]) == (
        "promoted", "ana", "sharper sevens")
    assert float(tags["ldmflow.promotion.candidate_score"]) == pytest.approx(better.candidate_score)
    candidate_before = alias(name, "candidate")
    refused = gate.reject(name, "3", who="ana", why="blurry")
    assert not refused.promoted and client.get_model_version(name, "3").tags["ldmflow.promotion.decision"] == "rejected"
    assert alias(name, "candidate") == candidate_before  # a rejection moves no alias
    register_folder_copy(good, name)  # v4: never evaluated
    with pytest.raises(gate.GateError, match="version 4 has no recorded fd: evaluate it first"):
        gate.promote_recorded(name, "4", config)
    assert alias(name, "production") == "2"
