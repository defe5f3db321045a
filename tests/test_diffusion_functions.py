"""The diffusion tricks as plain functions, each against its paper's formula."""

import copy
import math

import pytest
import torch

from ldmflow.model import schedules, unets
from ldmflow.training import diffusion


@pytest.fixture()
def scheduler():
    return schedules.training_scheduler(schedules.NoiseSchedule())


def test_min_snr_weights_match_the_paper():
    snr_t = torch.tensor([0.25, 1.0, 5.0, 20.0, 400.0])
    gamma = 5.0
    eps = diffusion.min_snr_weights(snr_t, gamma, "epsilon")
    v = diffusion.min_snr_weights(snr_t, gamma, "v_prediction")
    for s, we, wv in zip(snr_t.tolist(), eps.tolist(), v.tolist()):
        assert we == pytest.approx(min(s, gamma) / s)
        assert wv == pytest.approx(min(s, gamma) / (s + 1))
    assert diffusion.min_snr_weights(torch.tensor([0.0]), gamma, "v_prediction").item() == 0.0


def test_snr_and_targets_by_hand(scheduler):
    t = torch.tensor([0, 499, 999])
    alpha_bar = scheduler.alphas_cumprod[t]
    assert torch.allclose(diffusion.snr(scheduler.alphas_cumprod, t), alpha_bar / (1 - alpha_bar))
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    a, s = alpha_bar.sqrt().view(-1, 1, 1, 1), (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(diffusion.target(scheduler, x0, noise, t, "v_prediction"), a * noise - s * x0, atol=1e-6)
    assert torch.equal(diffusion.target(scheduler, x0, noise, t, "epsilon"), noise)
    assert torch.allclose(scheduler.add_noise(x0, noise, t), a * x0 + s * noise, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_weighted_loss_by_hand(scheduler, prediction_type):
    prediction, target = torch.zeros(2, 1, 1, 2), torch.tensor([[[[1.0, 3.0]]], [[[2.0, 2.0]]]])
    t = torch.tensor([10, 900])
    per_sample = torch.tensor([(1 + 9) / 2, (4 + 4) / 2])
    uniform = diffusion.diffusion_loss(prediction, target, t, scheduler.alphas_cumprod, weighting="uniform",
                                       gamma=5.0, prediction_type=prediction_type)
    assert uniform.item() == pytest.approx(per_sample.mean().item())
    weighted = diffusion.diffusion_loss(prediction, target, t, scheduler.alphas_cumprod, weighting="min_snr",
                                        gamma=5.0, prediction_type=prediction_type)
    snr_t = diffusion.snr(scheduler.alphas_cumprod, t)
    weights = torch.minimum(snr_t, torch.tensor(5.0)) / (snr_t if prediction_type == "epsilon" else snr_t + 1)
    assert weighted.item() == pytest.approx((per_sample * weights).mean().item(), rel=1e-6)


def test_ema_weights_equal_the_formulas():
    """Over real optimizer steps of a small UNet, torch's EMA update with ldmflow's decay
    schedule gives e_{n+1} = d_n·e_n + (1 − d_n)·θ_{n+1}, d_n = min(0.99, (1 + n)/(4 + n))."""
    torch.manual_seed(0)
    model = unets.build("tiny", "class", (4, 8, 8), 10)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    expected = {name: p.detach().clone().double() for name, p in model.named_parameters()}
    for n in range(6):
        x = torch.randn(2, 4, 8, 8)
        model(x, torch.tensor([10, 500]), class_labels=torch.tensor([1, 10]), return_dict=False)[0].pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        diffusion.ema_update(list(ema.parameters()), list(model.parameters()), n, 0.99, 4)
        d = min(0.99, (1 + n) / (4 + n))
        for name, p in model.named_parameters():
            expected[name] = d * expected[name] + (1 - d) * p.detach().double()
    assert diffusion.ema_decay(0, 0.999, 10) == pytest.approx(1 / 10)
    assert diffusion.ema_decay(10_000, 0.999, 10) == 0.999
    moved = 0
    for name, e in ema.named_parameters():
        torch.testing.assert_close(e.double(), expected[name], atol=1e-6, rtol=1e-5)
        moved += not torch.equal(e, dict(model.named_parameters())[name])
    assert moved > 0  # the average lags the weights


def test_classifier_free_dropout_rate():
    generator = torch.Generator().manual_seed(0)
    labels = torch.zeros(100_000, dtype=torch.long)
    dropped = diffusion.drop_labels(labels, 0.1, null_label=10, generator=generator)
    assert set(dropped.unique().tolist()) == {0, 10}
    assert (dropped == 10).float().mean().item() == pytest.approx(0.1, abs=0.005)
    assert torch.equal(diffusion.drop_labels(labels, 0.0, 10), labels)
    text = diffusion.drop_embeddings(torch.ones(50_000, 1, 4), 0.25, generator)
    assert (text.sum(dim=(1, 2)) == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)


def test_offset_noise_and_lr_schedule():
    noise = torch.zeros(2, 4, 3, 3)
    shifted = diffusion.offset_noise(noise, 0.1, torch.Generator().manual_seed(0))
    assert torch.allclose(shifted, shifted[:, :, :1, :1].expand_as(shifted))  # constant per channel
    assert diffusion.lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert diffusion.lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert diffusion.lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert diffusion.lr_factor(100, 10, 100, min_factor=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr(schedule):
    plain = schedules.training_scheduler(schedules.NoiseSchedule(schedule=schedule))
    rescaled = schedules.training_scheduler(schedules.NoiseSchedule(schedule=schedule, zero_terminal_snr=True))
    assert plain.alphas_cumprod[-1] > 0
    assert rescaled.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert not math.isnan(diffusion.min_snr_weights(diffusion.snr(rescaled.alphas_cumprod, torch.tensor([999])), 5.0, "v_prediction").item())


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_samplers_are_fresh_and_unclipped(sampler):
    first = schedules.sampling_scheduler(schedules.NoiseSchedule(), sampler)
    second = schedules.sampling_scheduler(schedules.NoiseSchedule(), sampler)
    assert first is not second and not first.config.get("clip_sample", False)


def test_training_masks_are_boxes_bands_strokes_and_whole_images():
    from ldmflow.model import inpainting

    masks = inpainting.training_masks(400, (8, 8), torch.Generator().manual_seed(0))
    again = inpainting.training_masks(400, (8, 8), torch.Generator().manual_seed(0))
    assert masks.shape == (400, 1, 8, 8) and torch.equal(masks, again)
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    covered = masks.mean(dim=(1, 2, 3))
    whole = covered == 1
    assert 0.12 < whole.float().mean() < 0.3  # a fifth are the whole image
    assert (covered > 0).all() and (covered[~whole] < 1).float().mean() > 0.9  # the rest keep a known region
    # Bands reach an edge across the whole side; a box or a stroke need not.
    rows_full = masks[~whole, 0].amin(dim=2).amax(dim=1) == 1
    cols_full = masks[~whole, 0].amin(dim=1).amax(dim=1) == 1
    assert 0.15 < (rows_full | cols_full).float().mean() < 0.6
    channels = inpainting.conditioning_channels(torch.ones(2, 4, 8, 8), masks[:2])
    assert channels.shape == (2, 5, 8, 8) and torch.equal(channels[:, 4:], masks[:2])
    assert torch.equal(channels[:, :4], (1 - masks[:2]).expand(-1, 4, -1, -1))


def test_the_model_as_its_own_classifier_picks_the_label_that_denoises_the_known_cells_best():
    from ldmflow.model import self_classifier
    from ldmflow.model.schedules import NoiseSchedule

    schedule = NoiseSchedule()
    scheduler = schedules.training_scheduler(schedule)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    known = torch.ones(4, 1, 8, 8)
    known[:, :, 5:] = 0  # the bottom rows are to be generated: what they hold must not count
    truth = torch.tensor([3, 0, 7, 7])

    def denoiser(noisy, timesteps, class_labels, return_dict=False):
        """An image's own label: exact ε on the known rows, off by 0.2 on the rows to generate.
        Label 9: exact on the rows to generate, off by 0.1 on the known ones (less error in
        all, more where it counts). Any other label: off by 0.3 everywhere."""
        k = len(noisy) // len(x0)
        alphas = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        exact = (noisy - alphas.sqrt() * (x0 * known).repeat(k, 1, 1, 1)) / (1 - alphas).sqrt()
        where_known = known.repeat(k, 1, 1, 1)
        own = (class_labels == truth.repeat(k)).view(-1, 1, 1, 1)
        nine = (class_labels == 9).view(-1, 1, 1, 1)
        return (torch.where(own, exact + 0.2 * (1 - where_known),
                            torch.where(nine, exact + 0.1 * where_known, exact + 0.3)),)

    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    assert self_classifier.infer_labels(denoiser, schedule, x0, known, 10, generators).tolist() == truth.tolist()

    # Analysis by synthesis: each image's completion under each finalist, label-major; the
    # one under its own label (at a different place for each image) is explained best.
    candidates = torch.stack([truth, (truth + 1) % 10, (truth + 2) % 10], dim=1)
    candidates[1] = candidates[1].roll(1)
    candidates[2] = candidates[2].roll(2)
    completions = torch.randn(3 * 4, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def judge(noisy, timesteps, class_labels, return_dict=False):
        """Exact ε for the row's own completion under the image's own label, off by 0.3 on
        the known rows under any other (and by 1 on the rows to generate, which do not count)."""
        alphas = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        exact = (noisy - alphas.sqrt() * completions) / (1 - alphas).sqrt()
        own = (class_labels == truth.repeat(3)).view(-1, 1, 1, 1)
        return (torch.where(own, exact, exact + 0.3) + (1 - known.repeat(3, 1, 1, 1)),)

    best = self_classifier.best_completions(judge, schedule, completions, known, candidates, generators)
    assert best.tolist() == [0, 1, 2, 0]
    assert candidates.gather(1, best[:, None]).squeeze(1).tolist() == truth.tolist()
