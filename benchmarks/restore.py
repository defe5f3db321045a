"""How good restoration and inpainting are: held-out real digits, corrupted, restored without
their label, and judged by the evaluation's domain classifier.

For each dataset (``builtin:digits``, and MNIST at 32 px) the pipeline's stages train, on
the first ``--train`` images only, an autoencoder, a class model and, from that model's
weights, a model trained for inpainting (``inpainting: true``, ``--init-from``), each
with its label reader (``--reader-steps``). The next
``--held-out`` images, never seen in training, are corrupted:

- ``noise 0.2`` and ``noise 0.35``: Gaussian noise of that σ on [0, 1], the same on every
  channel (a grey image's), clipped and quantised as a saved PNG is;
- ``bottom 40%``, ``random box``, ``centre square``, ``scribble``: a mask, its pixels black.

Each is restored without its label: unconditionally (the model's null class), or under the
label the model infers from the image itself (:mod:`ldmflow.model.self_classifier`). Noise
by SDEdit at fixed strengths and at the strength ``mode: restore`` chooses; masks by
zero-shot inpainting as it was first (a hard composite, unconditional), as it is now
(feathered composite, label inferred: a completion under each of the finalist labels the
model's label reader finds, the one the UNet's error and the reader agree on best kept) and
by the inpainting model; the same two with the finalists found and judged by the UNet alone
("without the reader", :mod:`ldmflow.model.label_reader`), and under the label the probe
alone finds (the inference before analysis by synthesis, "label probed"); and for reference, the
restoration and the zero-shot inpainting given the true label. Per corruption and
method it prints the classifier's accuracy on the original label, the mean error against
the original and (masks) the largest error on the known pixels outside the 2-pixel
feathered band, in grey levels; the FD of the restored set against the originals in the
classifier's features; and seconds per image. The corrupted input itself is the baseline.
Per mask, one more reference: what the known region alone tells, the accuracy of the
classifier's recipe trained on the training images under such masks.

``--figure`` writes a picture of the first dataset: per corruption, the original, the
corrupted input and each method's restoration of a few images (the sweep's settings left
out). ``--sweep`` adds the settings the defaults were chosen from (RePaint's resampling
jumps, a grown latent mask, the restore margin).

Usage: python benchmarks/restore.py [--datasets digits mnist] [--train 1500] [--held-out 200]
       [--figure docs/figures/restoration.png] [--sweep]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import training_config  # noqa: E402 - after the checkout is on the path

os.environ.setdefault("LDMFLOW_HOME", tempfile.mkdtemp(prefix="ldmflow-bench-"))

import torch  # noqa: E402

from ldmflow.flows import runtime  # noqa: E402

runtime.configure()
runtime.prefect_api()

RESOLUTION = 32
BAND = 2  # the feathered band: known pixels within it may fade; beyond it they must be exact


@dataclass
class Models:
    plain: object  # Sampler
    inpainting: object  # Sampler
    classifier: torch.nn.Module
    features: torch.nn.Module


def train_models(name: str, args, root: Path) -> Models:
    from ldmflow.data import cluster
    from ldmflow.data.precompute import PrecomputeConfig
    from ldmflow.data.sharding import ShardConfig
    from ldmflow.flows import shard as shard_flow
    from ldmflow.flows.precompute import precompute_flow
    from ldmflow.model.sampler import Sampler
    from ldmflow.training import autoencoder, features, stage_configs
    from ldmflow.training.stage_configs import DiffusionConfig
    from ldmflow.training.train import train

    cluster.ensure_ray()
    shards, latents = str(root / f"{name}-shards"), str(root / f"{name}-latents")
    shard_flow.run(f"builtin:{name}", shards, ShardConfig(resolution=RESOLUTION, shard_size=500, limit=args.train),
                   progress=False)
    ae = autoencoder.train(shards, training_config(
        stage_configs.AutoencoderConfig, steps=args.autoencoder_steps, batch_size=32, lr=1e-3, workers=args.workers,
        checkpoint_every=args.autoencoder_steps, model_name=f"bench-{name}-autoencoder", experiment="bench-restore"),
        progress=False)
    precompute_flow(shards, latents, ae.model_uri, PrecomputeConfig(batch_size=64), progress=False)
    run = dict(batch_size=64, workers=args.workers, log_every=50, sample_steps=25, experiment="bench-restore")
    run = dict(run, label_reader_steps=args.reader_steps)
    plain = train(latents, training_config(
        DiffusionConfig, **run, steps=args.steps, lr=1e-3, warmup_steps=50, checkpoint_every=args.steps,
        model_name=f"bench-{name}"), progress=False)
    inpainting = train(latents, training_config(
        DiffusionConfig, **run, steps=args.inpainting_steps, lr=5e-4, warmup_steps=20,
        checkpoint_every=args.inpainting_steps, inpainting=True, init_from=plain.model_uri,
        model_name=f"bench-{name}-inpainting"), progress=False)
    print(f"{name}: autoencoder PSNR {ae.metrics['psnr']:.1f} dB; class model's grid accuracy "
          f"{plain.metrics['class_accuracy']:.3f}; inpainting model's {inpainting.metrics['class_accuracy']:.3f}",
          flush=True)
    reference = features.Reference.read(shards)
    classifier = features.classifier_for(reference)
    return Models(Sampler.from_folder(plain.folder), Sampler.from_folder(inpainting.folder), classifier,
                  features.DomainFeatures(classifier, reference.key))


def held_out(name: str, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images start … start + count of the built-in dataset, as a request's upload becomes
    a model input, and their labels."""
    from ldmflow.data import builtin, images, jobs

    dataset = builtin.load(f"builtin:{name}")
    pictures = [images.image_to_model(jobs.decode_upload("image", dataset.png(i), RESOLUTION)[0], RESOLUTION)
                for i in range(start, start + count)]
    return torch.stack(pictures), torch.as_tensor(dataset.labels[start : start + count])


def quantised(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def scribble(generator: torch.Generator) -> torch.Tensor:
    """A stroke: a polyline of 3 to 5 random points, 3 to 5 pixels wide."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (RESOLUTION, RESOLUTION))
    points = [tuple(int(v) for v in torch.randint(4, RESOLUTION - 4, (2,), generator=generator))
              for _ in range(int(torch.randint(3, 6, (1,), generator=generator)))]
    ImageDraw.Draw(canvas).line(points, fill=255, width=int(torch.randint(3, 6, (1,), generator=generator)))
    return torch.from_numpy((__import__("numpy").asarray(canvas) >= 128).astype("float32"))[None]


def corruptions(clean: torch.Tensor, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """name → (corrupted images, masks (1 = generate) or None)."""
    generator = torch.Generator().manual_seed(seed)
    n, side = clean.shape[0], RESOLUTION
    out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for sigma in (0.2, 0.35):
        noise = torch.randn(n, 1, side, side, generator=generator).expand(-1, 3, -1, -1) * 2 * sigma
        out[f"noise {sigma}"] = (quantised(clean + noise), None)
    masks = {"bottom 40%": torch.zeros(n, 1, side, side), "random box": torch.zeros(n, 1, side, side),
             "centre square": torch.zeros(n, 1, side, side)}
    masks["bottom 40%"][:, :, round(side * 0.6) :] = 1
    square = round(side * 0.4)
    low = (side - square) // 2
    masks["centre square"][:, :, low : low + square, low : low + square] = 1
    for i in range(n):
        h, w = (int(v) for v in torch.randint(side // 4, side // 2 + 1, (2,), generator=generator))
        top, left = int(torch.randint(0, side - h + 1, (1,), generator=generator)), int(
            torch.randint(0, side - w + 1, (1,), generator=generator))
        masks["random box"][i, :, top : top + h, left : left + w] = 1
    masks["scribble"] = torch.stack([scribble(generator) for _ in range(n)])
    for name, mask in masks.items():
        out[name] = (torch.where(mask.bool().expand(-1, 3, -1, -1), -1.0, clean), mask)
    return out


def restore(sampler, corrupted: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor, batch: int = 100,
            **fields) -> torch.Tensor:
    """Each image restored alone, seed = its index, in batches of ``batch``; without its label
    unless the fields say ``true_label=True`` (the reference: what a perfect inference gives)."""
    from ldmflow.model import restoration
    from ldmflow.model.sampling import batch_groups

    out = []
    for start in range(0, len(corrupted), batch):
        jobs = []
        stop = min(start + batch, len(corrupted))
        probed = probed_labels(sampler, corrupted, mask, start, stop) if fields.get("probed_label") else None
        for i in range(start, stop):
            given = dict(fields)
            margin = given.pop("margin", None)
            if given.pop("true_label", False):
                given["label"] = int(labels[i])
            if given.pop("probed_label", False):
                given["label"] = probed[i - start]
            job = sampler.job(image=corrupted[i], mask=None if mask is None else mask[i], seed=i, **given)
            if margin is not None:
                job = replace(job, strength=restoration.strength(sampler, corrupted[i], job.steps, job.sampler, i,
                                                                 margin=margin))
            jobs.append(job)
        drawn: list[torch.Tensor | None] = [None] * len(jobs)
        for indices in batch_groups(jobs):
            for i, image in zip(indices, sampler.run([jobs[i] for i in indices])):
                drawn[i] = image[0]
        out.extend(drawn)
    return torch.stack(out)


def probed_labels(sampler, corrupted: torch.Tensor, mask: torch.Tensor, start: int, stop: int) -> list[int]:
    """Images start … stop − 1's labels as inpainting inferred them before it inpainted under
    its finalists: the label whose probe of the known latents is best (the finalists
    measured again, as an edit's label is; :func:`ldmflow.model.self_classifier.infer_labels`)."""
    from ldmflow.model import self_classifier

    with torch.no_grad():
        latents = sampler.encode(corrupted[start:stop])
        kept = 1 - sampler.latent_mask(mask[start:stop].to(latents.device))
        generators = [torch.Generator().manual_seed(i) for i in range(start, stop)]
        found = self_classifier.infer_labels(sampler.label_probe(latents), sampler.schedule, latents, kept,
                                             len(sampler.info.class_names), generators)
    return found.tolist()


def read_from_known(masked: torch.Tensor, classes: torch.Tensor, corrupted: torch.Tensor, labels: torch.Tensor,
                    seeds: int = 3) -> float:
    """What the known region alone tells: the evaluation classifier's recipe trained on the
    training images ``masked`` as ``corrupted`` is (a mask of the same kind), its accuracy on
    ``corrupted``, the mean of ``seeds`` trainings. A restoration read by the evaluation's
    classifier is itself a classifier of the known region: it can beat this only as far as
    this recipe falls short of the best one."""
    from ldmflow.training import features

    accuracies = []
    for seed in range(seeds):
        model = features.fit_classifier(masked, classes, int(classes.max()) + 1, seed=seed)
        with torch.no_grad():
            accuracies.append(float((model(corrupted).argmax(1) == labels).float().mean()))
    return sum(accuracies) / seeds


def band_free(mask: torch.Tensor) -> torch.Tensor:
    """Known pixels farther than the feathered band from the mask."""
    grown = torch.nn.functional.max_pool2d(mask, 2 * BAND + 1, stride=1, padding=BAND)
    return (grown == 0).expand(-1, 3, -1, -1)


def scores(models: Models, restored, clean, labels, mask, real_features, seconds) -> dict[str, float]:
    from ldmflow.training import evaluation, features

    restored = quantised(restored)
    with torch.no_grad():
        accuracy = float((models.classifier(restored).argmax(1) == labels).float().mean())
    grey = (restored - clean).abs() * 127.5
    known = float(grey[band_free(mask)].max()) if mask is not None else float("nan")
    fd = evaluation.distances(models.features(features.to_uint8(restored)), real_features, kid_subsets=10)["fd"]
    return {"accuracy": accuracy, "mae": float(grey.mean()), "known": known, "fd": fd,
            "s": seconds / len(restored)}


NOT_IN_FIGURE = ("margin", "jumps", "grown", "true", "probed", "without")  # words of the sweep's and the references' rows


def methods(args, models: Models, noisy: bool) -> dict[str, tuple[object, dict, dict]]:
    """label → (sampler, job fields, sampler attributes)."""
    from ldmflow.model import restoration

    unconditional = {"infer_label": False}
    if noisy:
        chosen = {f"sdedit {s}": (models.plain, {"strength": s, **unconditional}, {}) for s in (0.3, 0.5, 0.7)}
        chosen["restore, unconditional"] = (models.plain, {"margin": restoration.MARGIN, **unconditional}, {})
        chosen["restore, label inferred"] = (models.plain, {"margin": restoration.MARGIN, "infer_label": True}, {})
        chosen["restore, true label given"] = (models.plain, {"margin": restoration.MARGIN, "true_label": True}, {})
        if args.sweep:
            chosen |= {f"restore, label inferred, margin {m}": (models.plain, {"margin": m, "infer_label": True}, {})
                       for m in (1.0, 3.0)}
        return chosen
    before = {"mask_dilation": 0, "feather_pixels": 0}
    now = {"mask_dilation": 0, "feather_pixels": 2}
    chosen = {
        "zero-shot, before": (models.plain, {"jump_count": 1, **unconditional}, before),
        "zero-shot, unconditional": (models.plain, {"jump_count": 1, **unconditional}, now),
        "zero-shot, label probed": (models.plain, {"jump_count": 1, "probed_label": True}, now),
        "zero-shot, label inferred": (models.plain, {"jump_count": 1}, now),
        "zero-shot, label inferred without the reader": (models.plain, {"jump_count": 1},
                                                         {**now, "label_reader": None}),
        "inpainting model, unconditional": (models.inpainting, unconditional, now),
        "inpainting model, label probed": (models.inpainting, {"probed_label": True}, now),
        "inpainting model, label inferred": (models.inpainting, {}, now),
        "inpainting model, label inferred without the reader": (models.inpainting, {}, {**now, "label_reader": None}),
        "zero-shot, true label given": (models.plain, {"jump_count": 1, "true_label": True}, now),
    }
    if args.sweep:
        for length, count in ((2, 3), (5, 3), (10, 3)):
            chosen[f"zero-shot, label inferred, jumps {length}×{count}"] = (
                models.plain, {"jump_length": length, "jump_count": count}, now)
        chosen["zero-shot, label inferred, mask grown 1 cell"] = (models.plain, {"jump_count": 1},
                                                                   {**now, "mask_dilation": 1})
    return chosen


def bench_dataset(name: str, args, root: Path, figure: dict) -> None:
    from ldmflow.training import features

    models = train_models(name, args, root)
    clean, labels = held_out(name, args.train, args.held_out)
    training, classes = held_out(name, 0, args.train)
    masked_training = corruptions(training)
    real_features = models.features(features.to_uint8(clean))
    print(f"\n{name}: {len(clean)} held-out images, restored without their label\n")
    print("| corruption | method | accuracy | MAE (grey levels) | known Δmax outside band | FD | s/image |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        ceiling = float((models.classifier(quantised(clean)).argmax(1) == labels).float().mean())
    print(f"| none | the originals | {ceiling:.3f} | 0.0 | | 0.00 | |")
    for corruption, (corrupted, mask) in corruptions(clean).items():
        if mask is not None:
            print(f"| {corruption} | known region, read by a classifier trained on it | "
                  f"{read_from_known(masked_training[corruption][0], classes, corrupted, labels):.3f} | | | | |",
                  flush=True)
        rows = [("as given", corrupted, 0.0)]
        for label, (sampler, fields, attributes) in methods(args, models, mask is None).items():
            saved = {key: getattr(sampler, key) for key in attributes}
            for key, value in attributes.items():
                setattr(sampler, key, value)
            started = time.perf_counter()
            try:
                restored = restore(sampler, corrupted, mask, labels, **fields)
            finally:
                for key, value in saved.items():
                    setattr(sampler, key, value)
            rows.append((label, restored, time.perf_counter() - started))
        for label, restored, seconds in rows:
            s = scores(models, restored, clean, labels, mask, real_features, seconds)
            known = "" if mask is None else f"{s['known']:.1f}"
            print(f"| {corruption} | {label} | {s['accuracy']:.3f} | {s['mae']:.1f} | {known} | {s['fd']:.2f} | "
                  f"{s['s']:.3f} |", flush=True)
        if name == args.datasets[0]:
            shown = slice(0, args.figure_images)
            figure[corruption] = [("original", clean[shown])] + [
                (label, restored[shown]) for label, restored, _ in rows
                if not any(word in label for word in NOT_IN_FIGURE)]


def save_figure(figure: dict[str, list[tuple[str, torch.Tensor]]], path: str, scale: int = 2) -> None:
    """A panel per corruption (its name above it): a row per method, the original and the
    corrupted input first, each row the same images; the noises in one line of panels, the
    masks in the next, each line's row names at its left."""
    from PIL import Image, ImageDraw

    from ldmflow.model.grids import grid

    gap, label_width, title = 4, 230, 16
    noises = [name for name in figure if name.startswith("noise")]
    lines = [line for line in (noises, [name for name in figure if name not in noises]) if line]
    panels = {name: grid([images for _, images in rows]) for name, rows in figure.items()}
    panels = {name: im.resize((im.width * scale, im.height * scale), Image.NEAREST) for name, im in panels.items()}
    row_height = next(iter(figure.values()))[0][1].shape[-2] * scale
    heights = [title + max(panels[name].height for name in line) for line in lines]
    width = label_width + max(sum(panels[name].width + gap * 4 for name in line) for line in lines)
    canvas = Image.new("RGB", (width, sum(heights) + gap * 4 * len(heights)), "white")
    draw, top = ImageDraw.Draw(canvas), 0
    for line, height in zip(lines, heights):
        for r, (label, _) in enumerate(figure[line[0]]):
            draw.text((4, top + title + r * row_height + row_height // 2 - 6), label, fill="black")
        left = label_width
        for name in line:
            draw.text((left, top + 2), name, fill="black")
            canvas.paste(panels[name], (left, top + title))
            left += panels[name].width + gap * 4
        top += height + gap * 4
    canvas.save(path)
    print(f"figure: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist"], choices=["digits", "mnist"])
    parser.add_argument("--train", type=int, default=1500, help="images trained on (the first of each dataset)")
    parser.add_argument("--held-out", type=int, default=200, help="the images after them, restored")
    parser.add_argument("--autoencoder-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=1000, help="the class model's")
    parser.add_argument("--inpainting-steps", type=int, default=1000,
                        help="the inpainting model's, from the class model")
    parser.add_argument("--reader-steps", type=int, default=3000, help="each model's label reader's")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--figure", default="", help="write the restorations of the first dataset here (PNG)")
    parser.add_argument("--figure-images", type=int, default=6)
    parser.add_argument("--sweep", action="store_true", help="also the settings the defaults were chosen from")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    root = Path(tempfile.mkdtemp(prefix="ldmflow-bench-restore-"))
    figure: dict = {}
    for name in args.datasets:
        bench_dataset(name, args, root, figure)
        if args.figure and name == args.datasets[0]:  # written as soon as its dataset is done
            save_figure(figure, args.figure)


if __name__ == "__main__":
    main()
