"""Does the corrected sampler copy its training digits? The data-copying test of Meehan, Chaudhuri and
Dasgupta (AISTATS 2020, "A non-parametric test to detect data-copying in generative models"), global
form, on a corrected checkpoint of the main job (`pgraft correct digits --recipe inverse-noise`).

    python bench/memorisation.py --corrected RUN/corrected.safetensors --seeds 1 2 3

Why: the corrector is fitted on the inversions of the 1078 training digits (``digits-train``), the
same images the bundled base flow was trained on, and held-out FID cannot tell a sampler that copies
them from one that generalises (the training split itself is at FID 0.1 from the held-out one). So:
for a set of images S, ``d(S)`` are the Euclidean distances of its images to their nearest training
digit, in pixels (the sampler's uint8 images as floats in [0, 1], 16 x 16) and in the bundled
classifier's features (FID's). The held-out digits Q (``digits-test``, 360 images) give the reference
``d(Q)``: how near an unseen real digit's nearest training digit is. Printed per set and space:

- ``Z``: the Mann-Whitney U test's z-score (``pgraft_cli.core.metrics.copy_stats``, which `pgraft correct`
  runs in the FID features on unconditional models with held-out data) of ``d(S)`` against ``d(Q)``, ``U`` the number of pairs with
  ``d(s) > d(q)`` (ties count half), ``Z = (U - m n / 2) / sigma`` with the tie-corrected null
  variance (ties occur only where distances are equal, e.g. at 0 for copies). Near 0 (it is
  N(0, 1) under the null; the judge digits are the control): S is as far from the training digits as unseen real digits are. Below 0: nearer (the paper reads its cell-wise
  average of these ``C_T << 0`` as data-copying); above 0: farther (under-fitting, or a sampler off the
  data). ``AUC = U / (m n)``, the same comparison free of the sample sizes (0.5 under the null).
- the median and the minimum of ``d(S)``, and the share of S nearer than the 5th percentile of ``d(Q)``
  (about 5 % for a set drawn like Q). The global ``Z`` follows the majority of S: 5 % of copies move it by
  about 2, within what samplers differ by (the copier rows); a minimum far below the held-out digits'
  shows copies (an 8-bit copy lies about 0.01 from its digit), not shifted or noised ones, and the share
  shows near ones only where it rises clearly above the unseen digits'.

Sets: the base sampler and corrector -> base, each ``--num`` images from each evaluation seed with the
main job's protocol (the corrector's base steps, the recipe's lanes and shards, the same noises for
both: at seed 1 these are the main job's own evaluation images); as controls, the judge split
(``digits-judge``, 359 unseen real digits) and copiers: corrector -> base with ``--shares`` (5 %, 25 % and
50 %) of its images replaced by training digits, rounded to 8 bits as the sampler stores its images (so a
copy lies a little off its training digit, which is not on that grid), and a regional copier: the corrected
images in one k-means cell (classifier features; its largest, its median one, and half of the median one)
replaced by 8-bit training digits of that cell. A second table gives the cell-wise statistic `pgraft correct` prints (``core.metrics.cell_copy_stat``: C_T,
the paper's held-out-weighted mean of the cells' Z, the lowest cell's Z and its Bonferroni p). The last table pairs the corrected sampler with the base over the
seeds.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from paired import paired_t, paired_text  # noqa: E402

from pgraft_cli.core.metrics import (COPY_CELL_MIN_HELDOUT, COPY_CELL_MIN_SAMPLES, copy_cells, kmeans,  # noqa: E402
                                    nearest_centre, nearest_distances)
from pgraft_cli.errors import PgraftError  # noqa: E402
from pgraft_cli.io.checkpoints import load_model  # noqa: E402
from pgraft_cli.io.data import load_data  # noqa: E402
from pgraft_cli.io.recipes import SampleConfig, load_recipe  # noqa: E402
from pgraft_cli.io.runstore import RunStore  # noqa: E402
from pgraft_cli.report.ui import progress  # noqa: E402
from pgraft_cli.stages.evaluate import CopyReference, classifier_features, copying  # noqa: E402
from pgraft_cli.stages.sample import Conditions, load_images, run_sample, to_uint8  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corrected", required=True, help="a corrected checkpoint of the main job (corrected.safetensors)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--num", type=int, default=1000, help="images per sampler and seed")
    ap.add_argument("--out", default="bench/runs/memorisation", help="run directory for the samples (resumable)")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.05, 0.25, 0.5],
                    help="copiers: these shares of the corrected images replaced by training digits")
    a = ap.parse_args()
    if a.num < 2:
        ap.error("--num must be at least 2")
    if not Path(a.corrected).is_file():
        sys.exit(f"error: no corrected checkpoint at {a.corrected}; run `pgraft correct digits --recipe inverse-noise "
                 f"--run-dir RUN` and pass --corrected with the checkpoint it writes")
    try:
        base, corrected = load_model("digits"), load_model(a.corrected)
    except PgraftError as exc:  # a corrupt file, or a corrector whose base cannot be found
        sys.exit(f"error: {exc}")
    if corrected.corrector is None:
        sys.exit(f"error: {a.corrected} holds no corrector; pass the checkpoint `pgraft correct` wrote")
    if corrected.base_identity != base.identity:
        sys.exit(f"error: {a.corrected} corrects another base model, not the bundled digits flow; pass a checkpoint "
                 f"of `pgraft correct digits`")
    shape, recipe = base.image_shape, load_recipe("inverse-noise").sample  # the main job's shards and lanes
    train, test, judge = (load_data(f"digits-{split}", shape).float() for split in ("train", "test", "judge"))
    spaces = {"pixels": lambda x: x.reshape(len(x), -1), "classifier": classifier_features()}
    train_in = {name: fn(train) for name, fn in spaces.items()}

    refs = {}  # the CLI's copy reference in each space (stages.evaluate.copy_reference, from tensors)
    for name, fn in spaces.items():
        held = fn(test)
        refs[name] = CopyReference("digits-train", train_in[name], nearest_distances(held, train_in[name]),
                                   kmeans(train_in[name], copy_cells(len(test), a.num)), held)
    centres = {name: r.centres for name, r in refs.items()}

    def measure(images: Tensor) -> dict[str, dict[str, Any]]:
        return {name: copying(fn(images), refs[name])["copying"] for name, fn in spaces.items()}

    rows: list[tuple[str, str, dict[str, dict[str, Any]]]] = [
        ("held-out digits (the reference, by construction)", "-", measure(test)),
        ("judge digits (unseen, control)", "-", measure(judge))]
    per_seed: dict[str, dict[str, list[float]]] = {"base": {k: [] for k in spaces}, "corrected": {k: [] for k in spaces}}
    with RunStore(a.out) as store, progress(False) as bar:
        for seed in a.seeds:
            cfg = SampleConfig(num=a.num, seed=seed, steps=corrected.corrector.base_steps, batch_size=recipe.batch_size,
                               lane=recipe.lane)
            images = {}
            for name, model in (("base", base), ("corrected", corrected)):
                stage = f"{name}-seed{seed}"
                run_sample(model, cfg, Conditions(), store, bar, stage_name=stage)
                images[name] = load_images(store.root, stage)
                stats = measure(images[name])
                rows.append((name if name == "base" else "corrector -> base", str(seed), stats))
                for k in spaces:
                    per_seed[name][k].append(stats[k]["z"])
            g = torch.Generator().manual_seed(seed)
            for share in a.shares:
                k_copies = max(1, round(share * len(images["corrected"])))
                # as the sampler would store a copy: 8 bits a pixel (load_images' grid)
                copies = to_uint8(train[torch.randperm(len(train), generator=g)[:k_copies]]).permute(0, 3, 1, 2) / 255.0
                copier = torch.cat([images["corrected"][k_copies:], copies])
                rows.append((f"copier: corrected, {share:.0%} of it training digits", str(seed), measure(copier)))
            # regional copiers: the corrected images of one classifier cell (the largest, then the median one by its
            # count of them) replaced by training digits of that cell, all of them, then half
            space = "classifier"
            cell_of = nearest_centre(spaces[space](images["corrected"]), centres[space])
            train_cell = nearest_centre(train_in[space], centres[space])
            order = torch.bincount(cell_of, minlength=len(centres[space])).argsort(descending=True)
            for which, cell, share in (("largest", order[0], 1.0), ("median", order[len(order) // 2], 1.0),
                                       ("median", order[len(order) // 2], 0.5)):
                pool = (train_cell == cell).nonzero().flatten()
                inside = (cell_of == cell).nonzero().flatten()
                replaced = inside[:round(share * len(inside))]
                regional = images["corrected"].clone()
                picks = pool[torch.randint(len(pool), (len(replaced),), generator=g)]
                regional[replaced] = to_uint8(train[picks]).permute(0, 3, 1, 2) / 255.0
                rows.append((f"regional copier: corrected, {share:.0%} of its {which} classifier cell ({len(replaced)} of "
                             f"{len(inside)} images) training digits", str(seed), measure(regional)))
            print(f"seed {seed} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)

    print(f"\nNearest-training-digit distances against the held-out digits' ({len(test)} images, "
          f"{len(train)} training digits)\n")
    head = ["Z", "AUC", "median d", "min d", "nearer than 5 % of held-out"]
    print("| set | seed | " + " | ".join(f"{h} {k}" for k in spaces for h in head) + " |")
    print("|---|---:|" + "---:|" * (len(head) * len(spaces)))
    for name, seed, st in rows:
        cells = [f"{st[k]['z']:+.2f} | {st[k]['auc']:.3f} | {st[k]['median']:.3f} | {st[k]['min']:.3f} | "
                 f"{st[k]['near']:.1%}" for k in spaces]
        print(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    print(f"\nCell-wise (the CLI's: k-means cells of the training digits, cells with more than {COPY_CELL_MIN_SAMPLES} "
          f"images and at least {COPY_CELL_MIN_HELDOUT} held-out digits): C_T, the lowest cell's Z and its Bonferroni p\n")
    print("| set | seed | " + " | ".join(f"{h} {k}" for k in spaces for h in ("C_T", "lowest cell Z", "p", "cells used")) + " |")
    print("|---|---:|" + "---:|" * (4 * len(spaces)))
    for name, seed, st in rows:
        cell = {k: st[k]["cells"] for k in spaces}
        cells = [" | ".join(["-"] * 3 + [f"0 of {cell[k]['cells']}"]) if cell[k]["c_t"] is None else
                 f"{cell[k]['c_t']:+.2f} | {cell[k]['z_min']:+.2f} | {cell[k]['p_min']:.2g} | "
                 f"{cell[k]['cells_used']} of {cell[k]['cells']}" for k in spaces]
        print(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    if len(a.seeds) > 1:
        print("\n| space | Z corrected - Z base, mean [95 % t-interval] | seeds where corrected is lower |")
        print("|---|---:|---:|")
        for k in spaces:
            text, below = paired_text(paired_t(per_seed["corrected"][k], per_seed["base"][k]), 2)
            print(f"| {k} | {text} | {below} |")


if __name__ == "__main__":
    main()
