"""Class-conditioned inverse noise correction against the unconditional corrector and the base.

    OMP_NUM_THREADS=1 python bench/class_correction.py               # 3 seeds
    OMP_NUM_THREADS=1 python bench/class_correction.py --seeds 0     # a quick look

1. The class-conditional digits flow of ``bench/guidance.py`` (trained there, reused when saved).
2. Inverts ``--num-train`` images of ``digits-train`` under their own labels (its ``--steps``-step
   Euler sampler, conditional branch alone, guidance 1), one class per batch: the solver drops
   converged rows, and a batch of one class keeps the labels aligned with the rows still iterating.
3. Fits two diagonal Gaussian correctors on the inverted noises: one for all classes
   (``fit_gaussian_diag``) and one per class (``fit_gaussian_diag_by_class``); and two full-covariance ones
   (``correct.corrector = "gaussian"``): one for all classes (``fit_gaussian``) and one per class
   (``fit_gaussian_by_class``: each class's own mean with the tied within-class covariance where a class
   has no more images than dimensions; before, such a class took the pooled fit, so with 60 images a
   class of 256 dimensions the per-class corrector was the "full unconditional" row exactly).
4. For each seed, samples ``--eval-num`` images (class i mod 10, the same noises for every method)
   with the base sampler, the unconditional corrector and the class-conditioned one, and reports FID
   to the held-out ``digits-test`` (bundled classifier's features) and label accuracy, with the
   paired per-seed difference class - unconditional.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from guidance import label_accuracy, train_class_flow  # noqa: E402
from paired import mean_std, paired_t, paired_text  # noqa: E402

from pgraft_cli.core.metrics import distances  # noqa: E402
from pgraft_cli.core.samplers import invert, sample  # noqa: E402
from pgraft_cli.io.checkpoints import load_classifier, load_model  # noqa: E402
from pgraft_cli.io.data import load_digits  # noqa: E402
from pgraft_cli.models.corrector import (fit_gaussian, fit_gaussian_by_class, fit_gaussian_diag,  # noqa: E402
                                         fit_gaussian_diag_by_class)
from pgraft_cli.models.loaded import Cond  # noqa: E402
from pgraft_cli.stages.evaluate import CLASSIFIER_PATH, classifier_features  # noqa: E402

METHODS = ("base", "unconditional", "class", "full unconditional", "full class")


def denoiser(model, label: int):
    return lambda x, t: model.predict(x, t, Cond(class_labels=torch.full((len(x),), label, dtype=torch.long)))


def invert_by_class(model, images: torch.Tensor, labels: torch.Tensor, grid: torch.Tensor, args) -> tuple:
    noises, rms = torch.empty_like(images), torch.empty(len(images))
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero()[:, 0]
        x0 = images[rows] * 2 - 1
        z, _ = invert(denoiser(model, c), model.schedule, x0, grid, args.iterations, args.tol)
        back, _ = sample(denoiser(model, c), model.schedule, z, grid)
        noises[rows], rms[rows] = z, (back - x0).flatten(1).pow(2).mean(1).sqrt()
    return noises, rms


def sample_method(model, noise: torch.Tensor, labels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(noise)
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero()[:, 0]
        out[rows], _ = sample(denoiser(model, c), model.schedule, noise[rows], grid)
    return model.decode(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num-train", type=int, default=600, help="training images inverted")
    p.add_argument("--eval-num", type=int, default=500)
    p.add_argument("--steps", type=int, default=8, help="base sampler steps")
    p.add_argument("--iterations", type=int, default=24)
    p.add_argument("--tol", type=float, default=2e-3)
    p.add_argument("--flow", type=Path, default=ROOT / "bench" / "runs" / "guidance" / "class-flow.safetensors")
    p.add_argument("--flow-steps", type=int, default=1000)
    args = p.parse_args()
    model = load_model(str(train_class_flow(args.flow, args.flow_steps)))
    grid = model.schedule.grid(args.steps)
    classifier, feats = load_classifier(CLASSIFIER_PATH), classifier_features()
    test_feats = feats(load_digits(split="test")[0])
    images, labels = load_digits(split="train")
    images, labels = images[:args.num_train], labels[:args.num_train]
    tic = time.time()
    with torch.inference_mode():
        noises, rms = invert_by_class(model, images, labels, grid, args)
    keep = rms <= 0.05
    print(f"inverted {len(images)} images in {time.time() - tic:.0f}s: round-trip RMS mean {float(rms.mean()):.2e}, "
          f"kept {int(keep.sum())}", flush=True)
    mean, std = fit_gaussian_diag(noises[keep])
    mean_c, std_c = fit_gaussian_diag_by_class(noises[keep], labels[keep], 10)
    full_mean, full_chol = fit_gaussian(noises[keep])
    class_mean, class_chol, chol_of = fit_gaussian_by_class(noises[keep], labels[keep], 10)
    rows = []
    for seed in args.seeds:
        e = torch.randn((args.eval_num, *model.sample_shape), generator=torch.Generator().manual_seed(seed))
        y = torch.arange(args.eval_num) % 10
        flat = e.flatten(1).double()
        per_class = class_mean[y] + torch.einsum("bij,bj->bi", class_chol[chol_of[y]], flat)
        starts = {"base": e, "unconditional": (mean + std * flat).float().reshape(e.shape),
                  "class": (mean_c[y] + std_c[y] * flat).float().reshape(e.shape),
                  "full unconditional": (full_mean + flat @ full_chol.T).float().reshape(e.shape),
                  "full class": per_class.float().reshape(e.shape)}
        row = {"seed": seed}
        with torch.inference_mode():
            for method, noise in starts.items():
                imgs = sample_method(model, noise, y, grid)
                row[method] = {"fid": distances(feats(imgs), test_feats)["fid"],
                               "accuracy": label_accuracy(imgs, y, classifier)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = ["| method | FID vs digits-test | label accuracy |", "|---|---|---|"]
    for m in METHODS:
        lines.append(f"| {m} | {mean_std([r[m]['fid'] for r in rows], 2)} | {mean_std([r[m]['accuracy'] for r in rows], 3)} |")
    if len(rows) > 1:
        for one, other in (("class", "unconditional"), ("class", "base"), ("full class", "full unconditional"),
                           ("full class", "class")):
            d = paired_t([r[one]["fid"] for r in rows], [r[other]["fid"] for r in rows])
            lines.append(f"| {one} - {other} (paired FID) | {' '.join(paired_text(d, 2))} | |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
