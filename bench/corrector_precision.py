"""Does a corrector's precision mismatch matter? Fitted under one sampler precision, sampled under another.

    OMP_NUM_THREADS=1 python bench/corrector_precision.py --images 256 --num 1000

On the bundled digits flow (``inverse-noise`` recipe, ``--set`` overrides it): invert the first
``--images`` training digits twice, once with the base network in float32 and once under bf16
autocast (``model.autocast = bf16``, as a GPU run does by default), train one flow corrector on each
inversion (the corrector itself always trains in float32), then sample the base alone and each
corrector -> base with the base in float32 and under bf16 autocast, ``--num`` images each (evaluation
seed 1), and measure FID against held-out ``digits-test`` with the bundled classifier's features.
Also printed: the RMS difference between the two inversions' noises of the same images (the
corrector's targets), beside their spread (about 1), and, for each sampler, the RMS difference of the
final samples under the two precisions from the same corrected noise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pgraft_cli.io.data import data_rows, iter_data  # noqa: E402
from pgraft_cli.io.recipes import SampleConfig  # noqa: E402
from pgraft_cli.io.runstore import RunStore  # noqa: E402
from pgraft_cli.report.ui import progress  # noqa: E402
from pgraft_cli.stages.correct import run_invert, run_train_corrector  # noqa: E402
from pgraft_cli.stages.evaluate import evaluate_model, reference  # noqa: E402
from pgraft_cli.stages.sample import resolve_lane  # noqa: E402
from corrector_curve import digits_setup, parse_common  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # the base network's autocast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256, help="training digits to invert")
    ap.add_argument("--num", type=int, default=1000, help="samples per cell")
    a = parse_common(ap, "corrector-precision")
    rec, cfg, model, feats = digits_setup(a)
    ref = reference(feats, iter_data("digits-test", model.image_shape))
    rows = data_rows("digits-train", model.image_shape).head(cfg.num_images)
    sample_cfg = resolve_lane(model, SampleConfig(num=a.num, seed=rec.evaluate.seed, steps=cfg.base_steps,
                                                  batch_size=rec.sample.batch_size, lane=rec.sample.lane))
    lane = int(sample_cfg.lane)
    noises, correctors, fid, finals = {}, {"none": None}, {}, {}
    with progress(not a.quiet) as bar:
        for fit, dtype in PRECISIONS.items():
            model.autocast = dtype
            with RunStore(a.out / f"fit-{fit}") as store:
                noises[fit], _, _ = run_invert(model, rows, cfg, lane, store, bar)
                correctors[fit], _ = run_train_corrector(noises[fit], model.sample_shape, cfg, model.identity, store, bar)
        with RunStore(a.out / "samples") as store:
            for fit, corrector in correctors.items():
                for run, dtype in PRECISIONS.items():
                    model.autocast, model.corrector = dtype, corrector
                    name = f"fit-{fit}-sample-{run}"
                    fid[fit, run] = evaluate_model(model, None, sample_cfg, feats, store, bar, name,
                                                   real_features=ref)["fid"]
                    finals[fit, run] = store.stage(name).tensors("samples")["samples"]
    both = min(len(noises["fp32"]), len(noises["bf16"]))  # both kept every image at these sizes
    target_rms = float((noises["bf16"][:both] - noises["fp32"][:both]).pow(2).mean().sqrt())
    load = os.getloadavg()
    print(f"\n{a.images} inverted digits ({len(noises['fp32'])} / {len(noises['bf16'])} kept, fp32 / bf16), "
          f"corrector {cfg.corrector} {cfg.corrector_train_steps} steps, {a.num} samples per cell, "
          f"load average {load[0]:.1f} {load[1]:.1f}")
    print(f"inverted noise, bf16 vs fp32 base: RMS difference {target_rms:.4f} (noise std "
          f"{float(noises['fp32'].std()):.3f})")
    print("| corrector fitted under | FID, sampled fp32 | FID, sampled bf16 | sample RMS fp32 vs bf16 |")
    print("|---|---:|---:|---:|")
    for fit in correctors:
        diff = float((finals[fit, "bf16"] - finals[fit, "fp32"]).pow(2).mean().sqrt())
        print(f"| {'no corrector (base)' if fit == 'none' else fit} | {fid[fit, 'fp32']:.3f} | "
              f"{fid[fit, 'bf16']:.3f} | {diff:.4f} |")


if __name__ == "__main__":
    main()
