"""The registered model: register → load by alias → the same images; export to diffusers;
evaluation (FD, KID, class accuracy) and the promotion gate with rollback, on MLflow/SQLite."""

import shutil

import numpy as np
import pytest
import torch

from serving import model as model_format
from serving.sampler import Sampler, load
from training import evaluation, registry, tracking
from tests.helpers import tiny_diffusion_parts


def new_run(experiment: str = "test-registry") -> str:
    return tracking.client().create_run(tracking.experiment_id(experiment)).info.run_id


def alias(name: str, alias_name: str) -> str:
    return str(tracking.client().get_model_version_by_alias(name, alias_name).version)


def register_folder_copy(folder, name: str) -> str:
    """Register a model folder as a new version of ``name``; returns the version."""
    return registry.register(folder, name, new_run()).version


def test_register_then_load_by_alias_samples_like_the_in_memory_model(tmp_path):
    import mlflow
    import mlflow.pyfunc
    import pandas as pd

    unet, vae, vae_folder, info = tiny_diffusion_parts(tmp_path)
    in_memory = Sampler(unet, vae, info)
    model_format.save(tmp_path / "model", unet, vae_folder, info)
    version = registry.register(tmp_path / "model", "registry-roundtrip", new_run())
    assert alias("registry-roundtrip", "candidate") == version.version

    for uri in ("models:/registry-roundtrip@candidate", f"models:/registry-roundtrip/{version.version}"):
        loaded, registered = load(uri)
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

    from serving.export import export

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
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 3))
    b = rng.standard_normal((20000, 3)) * 2.0 + np.array([1.0, 0.0, -1.0])
    # N(0, I) vs N(μ, 4I): ‖μ‖² + tr(I) + tr(4I) − 2 tr(2I) = 2 + 3 + 12 − 12 = 5
    assert evaluation.frechet_distance(a, b) == pytest.approx(5.0, rel=0.03)
    assert evaluation.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    few = rng.standard_normal((10, 64))  # fewer samples than dimensions: finite, non-negative
    assert 0 <= evaluation.frechet_distance(few, few + 0.1) < np.inf


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((400, 8)), rng.standard_normal((400, 8))
    same = evaluation.kernel_inception_distance(a, b, subset_size=100, subsets=20)
    shifted = evaluation.kernel_inception_distance(a, b + 1.0, subset_size=100, subsets=20)
    assert abs(same) < 0.02 < shifted


# ---------------------------------------------------------------------------------------
# Evaluation and the promotion gate on a trained model


EVAL = evaluation.EvaluationConfig(num_samples=60, reference_samples=200, steps=10, batch_size=60,
                                   kid_subset_size=50, kid_subsets=10)


def random_unet_copy(folder, dest):
    """The same model with an untrained UNet: a clearly worse candidate."""
    from training import unet

    info = model_format.read_info(folder)
    shutil.copytree(folder, dest)
    torch.manual_seed(123)
    fresh = unet.build_unet("tiny", info.conditioning, tuple(info.latent_shape), len(info.class_names))
    fresh.save_pretrained(dest / model_format.UNET, safe_serialization=True)
    return dest


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


def test_evaluate_with_local_inception_weights(digits_model, tmp_path):
    """A TorchScript feature extractor at the configured path replaces the domain classifier."""

    class Features(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert x.shape[-1] == 299
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    path = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(Features()), str(path))
    config = evaluation.EvaluationConfig(**{**vars(EVAL), "inception_path": str(path)})
    result = evaluation.evaluate(digits_model.model_uri, config)
    assert result.features == "inception" and result.metrics["fd"] > 0
    missing = evaluation.EvaluationConfig(**{**vars(EVAL), "features": "inception"})
    with pytest.raises(ValueError, match="inception_path"):
        evaluation.evaluate(digits_model.model_uri, missing)


def test_promotion_refuses_a_worse_candidate_accepts_a_better_one_and_rolls_back(digits_model, tmp_path):
    name = "gate-test"
    good = digits_model.folder
    bad = random_unet_copy(good, tmp_path / "bad")
    config = registry.PromotionConfig(metric="fd")

    register_folder_copy(bad, name)  # v1: the first version goes to production whatever its score
    first = registry.promote(name, config, EVAL)
    assert first.promoted and first.candidate == "1" and first.production is None

    register_folder_copy(good, name)  # v2: better
    better = registry.promote(name, config, EVAL)
    assert better.promoted and better.candidate == "2" and better.production == "1"
    assert better.candidate_score < better.production_score
    client = tracking.client()
    assert alias(name, "production") == "2"
    assert alias(name, "previous") == "1"
    tags = client.get_model_version(name, "2").tags
    assert tags["ldmflow.promotion.decision"] == "promoted"
    assert float(tags["ldmflow.promotion.production_score"]) == pytest.approx(better.production_score)

    register_folder_copy(bad, name)  # v3: worse
    worse = registry.promote(name, config, EVAL)
    assert not worse.promoted and worse.candidate_score > worse.production_score
    assert alias(name, "production") == "2"
    assert alias(name, "candidate") == "3"
    assert client.get_model_version(name, "3").tags["ldmflow.promotion.decision"] == "refused"

    forced = registry.promote(name, config, EVAL, force=True)  # scores come from the version tags
    assert forced.promoted and "forced" in forced.reason
    assert registry.history(name) == ["1", "2", "3"]

    back = registry.rollback(name)
    assert (back.restored, back.replaced) == ("2", "3")
    assert alias(name, "production") == "2"
    assert registry.rollback(name).restored == "1"
    with pytest.raises(registry.RegistryError, match="nothing to roll back to"):
        registry.rollback(name)
