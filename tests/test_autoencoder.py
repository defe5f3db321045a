"""The autoencoder stage on real digits: Ray Train with 2 workers, MLflow on SQLite."""

import json

import pytest
import torch

from ldmflow.data import image_shards, shard_stream
from ldmflow.model import autoencoders
from ldmflow.registry import models, tracking
from ldmflow.training import autoencoder, autoencoder_loop, stage_configs
from tests.helpers import training_config


def held_out_l1(vae, urls, config) -> float:
    return autoencoder.evaluate(vae, urls, config, autoencoders.downsample_factor(vae))["rec_l1_held_out"]


def test_train_two_workers_register_and_reload(ray_local, digits16):
    config = training_config(stage_configs.AutoencoderConfig, steps=40, batch_size=16, workers=2, lr=2e-3, warmup_steps=5,
                                           checkpoint_every=20, log_every=10, held_out=0.1, scale_samples=128,
                                           disc_weight=0.05, disc_start=30,  # the PatchGAN joins for the last steps
                                           model_name="test-autoencoder", experiment="test-autoencoder")
    urls = image_shards.shard_urls(digits16)
    torch.manual_seed(config.seed)
    untrained = autoencoders.build(config.preset, 16).eval()

    trained = autoencoder.train(digits16, config, progress=False)

    assert trained.metrics["rec_l1_held_out"] < 0.7 * held_out_l1(untrained, urls, config)
    # The scale factor is measured, stored in both configs, and read back.
    scale = trained.metrics["scale_factor"]
    assert scale > 0 and trained.info.scale_factor == pytest.approx(scale)
    assert json.loads((trained.folder / "config.json").read_text())["scaling_factor"] == pytest.approx(scale)

    # Save → register → load gives identical outputs.
    assert trained.model_uri == "models:/test-autoencoder/1"
    folder, registered = models.resolve(trained.model_uri)
    assert registered.version == "1" and registered.run_id == trained.run_id
    loaded, info = autoencoders.load(folder)
    assert info == trained.info
    in_memory, _ = autoencoders.load(trained.folder)
    x = torch.from_numpy(next(iter(shard_stream.ShardStream(urls, shuffle_buffer=0))).image)[None]
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).latent_dist.mean, in_memory.encode(x).latent_dist.mean)
        assert torch.equal(loaded.decode(torch.ones(1, 4, 4, 4)).sample, in_memory.decode(torch.ones(1, 4, 4, 4)).sample)

    run = tracking.client().get_run(trained.run_id)
    assert run.data.params["steps"] == "40" and "psnr" in run.data.metrics and "rec_loss" in run.data.metrics
    assert "d_loss" in run.data.metrics  # the discriminator trained after disc_start
    tracking.client().set_registered_model_alias("test-autoencoder", "candidate", "1")
    by_alias, registered = models.resolve("models:/test-autoencoder@candidate")
    assert registered.version == "1" and autoencoders.read_info(by_alias) == trained.info
    assert "reconstructions.png" in {a.path for a in tracking.client().list_artifacts(trained.run_id)}
    # The version is an MLflow logged model of the run, and its scores are the model's own metrics.
    logged = tracking.client().get_logged_model(registered.model_id)
    assert logged.source_run_id == trained.run_id and logged.model_type == autoencoders.KIND
    assert {m.key for m in logged.metrics} >= {"psnr", "scale_factor"}

    # The same job again resumes from its last checkpoint: no step is redone.
    again = autoencoder.train(digits16, config, progress=False)
    assert again.info.weights_sha256 == trained.info.weights_sha256
    assert again.model_uri == "models:/test-autoencoder/2"


def test_unknown_model_uris_are_clear_errors(tmp_path):
    with pytest.raises(models.ModelNotFound, match="not in the model registry"):
        models.resolve("models:/no-such-model/3")
    with pytest.raises(models.ModelNotFound, match="no such model folder"):
        models.resolve(str(tmp_path / "missing"))
    with pytest.raises(autoencoders.AutoencoderError, match="not an ldmflow autoencoder folder"):
        autoencoders.load(tmp_path)


def test_loss_functions_match_their_formulas():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 3.0])
    # hinge: ½(mean(relu(1 − real)) + mean(relu(1 + fake)))
    expected = 0.5 * ((0 + 0.5 + 2.0) / 3 + (0 + 1.0 + 4.0) / 3)
    assert autoencoder_loop.hinge_d_loss(real, fake).item() == pytest.approx(expected)
    x = torch.zeros(1, 3, 4, 4)
    assert autoencoder.psnr(x, x + 0.2) == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.04)).item())
    smooth = torch.ones(1, 3, 8, 8) * 0.3
    assert torch.allclose(autoencoder.bilinear_baseline(smooth, 4), smooth)
    assert autoencoder_loop.PatchDiscriminator()(torch.zeros(2, 3, 32, 32)).shape[0] == 2


@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_the_learning_rate_warms_up_then_holds_and_resumes_where_it_was(warmup):
    def schedule():
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
        return optimizer, autoencoder_loop.lr_schedule(optimizer, warmup)

    optimizer, lr = schedule()
    seen = []
    for _ in range(7):
        seen.append(lr.get_last_lr()[0])
        optimizer.step()
        lr.step()
    assert seen == pytest.approx([2e-3 * min(1.0, (n + 1) / max(warmup, 1)) for n in range(7)])
    again, resumed = schedule()
    again.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(lr.state_dict())
    assert resumed.get_last_lr() == lr.get_last_lr()


def test_bf16_autocast_runs_the_networks_in_bf16_and_keeps_weights_and_losses_fp32():
    from ldmflow.model import precision
    from ldmflow.training.autoencoder_loop import PatchDiscriminator, _EncodeDecode, reconstruction_loss

    torch.manual_seed(0)
    model, disc = _EncodeDecode(autoencoders.build("tiny", 16)), PatchDiscriminator()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with precision.autocast("bf16", "cpu"):  # as the loop does with mixed_precision: bf16
        x_hat, kl = model(x)
        logits = disc(x_hat)
    assert x_hat.dtype == logits.dtype == torch.bfloat16
    loss = reconstruction_loss(x, x_hat.float(), "l1") + 1e-6 * kl.float().mean() - 0.1 * logits.float().mean()
    loss.backward()
    grads = [p.grad for p in [*model.parameters(), *disc.parameters()] if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
