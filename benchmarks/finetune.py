"""Fine-tuning's payoff: a digits model fine-tuned on MNIST vs MNIST trained from scratch.

One autoencoder is trained on the built-in digits and MNIST together (both exported as class
folders and sharded as one source), so both datasets share a latent space. A parent class
model is trained on the digits' latents; then, on the MNIST latents, fine-tuned runs of N
steps (``--init-from`` the parent) are set against runs from scratch of 3N steps. Each
model's score is its class accuracy by the MNIST domain classifier, on its sample grid (8 a
digit, as training logs it) and on 400 samples drawn by the evaluation stage (40 a digit,
less noisy); the parent's own score on MNIST is measured too (one step at a vanishing
learning rate). The goal (issue 16): the fine-tuned model at N reaches what scratch needs
at least 3N for, a ratio ≥ 1.

A fine-tuned run warms its learning rate up over ``--tune-warmup`` of its N steps (a half by
default), then decays it; scratch warms up over 5. Of the warm-ups measured, half the run
kept the most of the parent's head start (docs/training.md has the sweep).

Usage: python benchmarks/finetune.py [--resolution 16] [--digits 400] [--mnist 1000]
       [--autoencoder-steps 200] [--parent-steps 300] [--n 50 100] [--lr 1e-3] [--tune-warmup 0.5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import training_config  # noqa: E402 - after the checkout is on the path
os.environ.setdefault("LDMFLOW_HOME", tempfile.mkdtemp(prefix="ldmflow-bench-"))

from ldmflow.flows import runtime  # noqa: E402

runtime.configure()
runtime.prefect_api()  # the local API the CLI starts and keeps, not an ephemeral server per run


def export_class_folders(root: Path, counts: dict[str, int]) -> Path:
    """The first ``count`` images of each built-in as ``root/LABEL/NAME-INDEX.png``."""
    from ldmflow.data import builtin

    for name, count in counts.items():
        dataset = builtin.load(f"builtin:{name}")
        for index in range(count):
            folder = root / str(int(dataset.labels[index]))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}-{index:05d}.png").write_bytes(dataset.png(index))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--digits", type=int, default=400, help="built-in digits used")
    parser.add_argument("--mnist", type=int, default=1000, help="MNIST digits used (a tenth of them a class)")
    parser.add_argument("--autoencoder-steps", type=int, default=200)
    parser.add_argument("--parent-steps", type=int, default=300)
    parser.add_argument("--n", type=int, nargs="+", default=[50, 100], help="fine-tuning steps N (scratch runs 3N)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of both fine-tuned and scratch runs")
    parser.add_argument("--tune-warmup", type=float, default=0.5,
                        help="fine-tuned runs' warm-up, as a share of their N steps")
    args = parser.parse_args()

    from ldmflow.data import cluster
    from ldmflow.data.precompute import PrecomputeConfig
    from ldmflow.data.sharding import ShardConfig
    from ldmflow.flows import shard as shard_flow
    from ldmflow.flows.precompute import precompute_flow
    from ldmflow.training import autoencoder, evaluation, stage_configs
    from ldmflow.training.stage_configs import DiffusionConfig
    from ldmflow.training.train import train

    scoring = evaluation.EvaluationConfig(num_samples=400, reference_samples=1000, steps=10, kid_subset_size=50)

    def accuracies(trained) -> tuple[float, float]:
        """Class accuracy on the training grid and on the evaluation's 400 samples."""
        scored = evaluation.evaluate(trained.model_uri, scoring).metrics["class_accuracy"]
        return trained.metrics["class_accuracy"], scored

    cluster.ensure_ray()
    root = Path(tempfile.mkdtemp(prefix="ldmflow-bench-finetune-"))
    digits, mnist, joint = (str(root / name) for name in ("digits", "mnist", "joint"))
    folders = export_class_folders(root / "joint-png", {"digits": args.digits, "mnist": args.mnist})
    for source, dest, limit in (("builtin:digits", digits, args.digits), ("builtin:mnist", mnist, args.mnist),
                                (str(folders), joint, 0)):
        shard_flow.run(source, dest, ShardConfig(resolution=args.resolution, shard_size=100, limit=limit), progress=False)

    ae = autoencoder.train(joint, training_config(stage_configs.AutoencoderConfig, 
        steps=args.autoencoder_steps, batch_size=32, workers=1, lr=2e-3, warmup_steps=5,
        checkpoint_every=args.autoencoder_steps, log_every=50, scale_samples=128,
        model_name="bench-joint-autoencoder", experiment="bench-finetune"), progress=False)
    for images in (digits, mnist):
        precompute_flow(images, f"{images}-latents", ae.model_uri, PrecomputeConfig(actors=1), progress=False)

    run = dict(batch_size=32, workers=1, log_every=50, sample_steps=10, shuffle_buffer=100, experiment="bench-finetune")
    parent = train(f"{digits}-latents", training_config(DiffusionConfig, 
        **run, steps=args.parent_steps, lr=2e-3, warmup_steps=20, checkpoint_every=args.parent_steps,
        model_name="bench-digits"), progress=False)
    as_is = train(f"{mnist}-latents", training_config(DiffusionConfig, 
        **run, steps=1, lr=1e-9, warmup_steps=0, checkpoint_every=1, init_from=parent.model_uri,
        model_name="bench-parent-on-mnist"), progress=False)
    print(f"autoencoder PSNR {ae.metrics['psnr']:.1f} dB; parent: digits accuracy "
          f"{parent.metrics['class_accuracy']:.3f}, MNIST accuracy as it is (grid, 400 samples) "
          + " ".join(f"{a:.3f}" for a in accuracies(as_is)))

    print(f"{'N':>5} {'score':>12} {'fine-tuned at N':>16} {'scratch at 3N':>14} {'ratio':>6}")
    for n in args.n:
        tuned = accuracies(train(f"{mnist}-latents", training_config(DiffusionConfig, 
            **run, steps=n, lr=args.lr, warmup_steps=max(1, round(args.tune_warmup * n)), checkpoint_every=n,
            init_from=parent.model_uri, model_name="bench-finetuned"), progress=False))
        scratch = accuracies(train(f"{mnist}-latents", training_config(DiffusionConfig, 
            **run, steps=3 * n, lr=args.lr, warmup_steps=5, checkpoint_every=3 * n,
            model_name="bench-scratch"), progress=False))
        for score, t, s in zip(("grid", "400 samples"), tuned, scratch):
            print(f"{n:>5} {score:>12} {t:>16.3f} {s:>14.3f} {t / max(s, 1e-9):>6.2f}", flush=True)


if __name__ == "__main__":
    main()
