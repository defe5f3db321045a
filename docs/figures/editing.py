"""The pictures and figures of docs/editing.md, from a registered class-conditional model.

    python docs/figures/editing.py models:/ldmflow-digits@production [--out docs/figures]

Reads real digits from the image dataset of the model's lineage (the shards it was
trained on) and writes:

- ``interpolation.png``: rows of 8 images along the path from one seed to another (same
  label), then from one label to another (same seed);
- ``editing.png``: per row a real digit, its autoencoder reconstruction, SDEdit at strength
  0.6, inversion regenerated under another label, and inpainting of the right half under
  that label;

and prints, for docs/editing.md: the PSNR of inversion regenerated under the image's own
label against the autoencoder's reconstruction, per DDIM step count; and, regenerated under
another label, how often the domain classifier sees the new label, and how close the result
stays to the input (pixel correlation) against a fresh sample of that label.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def psnr(a, b) -> float:
    import torch

    return float(10 * torch.log10(4 / ((a - b) ** 2).mean(dim=(1, 2, 3))).mean())


def correlation(a, b) -> float:
    """Mean per-image Pearson correlation of the pixels of two image batches."""
    a, b = a.flatten(1), b.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-8)).mean())


def enlarged(image, factor: int = 4):
    """Small digits, drawn 4 times larger (nearest neighbour: the pixels as they are)."""
    from PIL import Image

    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_uri")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--per-class", type=int, default=5, help="real digits per class for the measurements")
    args = parser.parse_args()

    import torch

    from ldmflow.flows import runtime

    runtime.configure()
    from ldmflow.model.grids import grid
    from ldmflow.registry.models import load_sampler
    from ldmflow.training import features

    sampler, _ = load_sampler(args.model_uri)
    reference = features.Reference.read(sampler.info.lineage["image_dataset"])
    classifier = features.classifier_for(reference)
    by_class: dict[int, list] = {}
    for sample in reference.stream():
        if len(by_class.setdefault(sample.label, [])) < args.per_class:
            by_class[sample.label].append(torch.from_numpy(sample.image))
        if len(by_class) == 10 and all(len(v) == args.per_class for v in by_class.values()):
            break
    out = Path(args.out)

    # Interpolation: seeds, then labels.
    seeds = sampler.generate(label=7, n=8, seed=1, to_seed=2, sampler="ddim", steps=50)
    labels = sampler.generate(label=1, to_label=7, n=8, seed=3, sampler="ddim", steps=50)
    enlarged(grid([seeds, labels])).save(out / "interpolation.png")

    # Editing side by side: input, reconstruction, SDEdit, inversion, inpainting.
    rows = []
    mask = torch.zeros(1, sampler.info.resolution, sampler.info.resolution)
    mask[:, :, sampler.info.resolution // 2 :] = 1
    for source, target in ((3, 8), (4, 9), (1, 7), (6, 5)):
        image = by_class[source][0]
        rows.append(torch.stack([
            image,
            sampler.generate(image=image, strength=0.0, label=source)[0],
            sampler.generate(image=image, strength=0.6, label=target, seed=0, sampler="ddim", steps=50)[0],
            sampler.generate(image=image, invert=True, source_label=source, label=target, steps=50)[0],
            sampler.generate(image=image, mask=mask, label=target, seed=0, sampler="ddim", steps=50)[0],
        ]))
    enlarged(grid(rows)).save(out / "editing.png")

    # Reconstruction by inversion under the image's own label, per step count.
    real = torch.cat([torch.stack(v) for _, v in sorted(by_class.items())])
    own = [label for label, v in sorted(by_class.items()) for _ in v]
    def batch(**fields_per_image) -> torch.Tensor:
        """One sampler run over every real image (all jobs share a batch key)."""
        names = list(fields_per_image)
        jobs = [sampler.job(**dict(zip(names, values))) for values in zip(*fields_per_image.values())]
        return torch.cat(sampler.run(jobs))

    n = len(real)
    reconstruction = batch(image=real, strength=[0.0] * n, label=own)
    print("| DDIM steps | PSNR, guidance 1 | PSNR, guidance 3 |")
    print("| ---: | ---: | ---: |")
    for steps in (10, 25, 50, 100):
        scores = [psnr(batch(image=real, invert=[True] * n, source_label=own, label=own, steps=[steps] * n,
                             guidance=[guidance] * n), reconstruction) for guidance in (1.0, 3.0)]
        print(f"| {steps} | {scores[0]:.1f} dB | {scores[1]:.1f} dB |")

    # Regenerated under another label (k + 5 mod 10): recognised as it? Still the input's layout?
    other = [(k + 5) % 10 for k in own]
    edited = batch(image=real, invert=[True] * n, source_label=own, label=other, steps=[50] * n)
    fresh = batch(label=other, seed=list(range(n)), sampler=["ddim"] * n, steps=[50] * n)
    with torch.no_grad():
        recognised = float((classifier(edited).argmax(1) == torch.tensor(other)).float().mean())
        fresh_recognised = float((classifier(fresh).argmax(1) == torch.tensor(other)).float().mean())
    print(f"\ninverted under its own label, regenerated under label + 5 (50 steps, guidance "
          f"{sampler.info.defaults.guidance}): classifier sees the new label in {recognised:.0%} "
          f"(fresh samples of that label: {fresh_recognised:.0%}); pixel correlation with the input "
          f"{correlation(edited, real):.2f} (fresh samples: {correlation(fresh, real):.2f})")


if __name__ == "__main__":
    main()
