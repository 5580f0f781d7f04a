"""Inverse noise correction on the bundled digits flow: FID against measured FLOPs, base vs corrected.

    python bench/inverse_noise.py                         # steps 2 4 8 16 32, 3 seeds, 2000 samples
    python bench/inverse_noise.py --steps 2 4 8 --seeds 0 1 --num 2000 --out bench/runs/inverse-noise

For every base step count N it inverts the digits through the N-step Euler sampler (once), trains a
flow corrector and fits the Gaussian baseline (mean + covariance of the inverted noises) on the
inverted noises, then samples ``--num`` images per seed from: the base sampler at N steps,
corrector -> base (N base steps + the corrector's steps) and Gaussian -> base. FID and KID use the
bundled digits classifier's features against all 1797 digits; FLOPs per image are measured with
torch.utils.flop_counter. Everything lives in resumable run stores under ``--out``, so an
interrupted benchmark picks up where it stopped. Prints one table (mean +- std over seeds) and
writes it as JSON next to the runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgraft_cli.checkpoints import load_model  # noqa: E402
from pgraft_cli.correct import NoiseCorrector, fit_gaussian, run_invert, run_train_corrector  # noqa: E402
from pgraft_cli.data import load_digits  # noqa: E402
from pgraft_cli.evaluate import classifier_features, evaluate_model  # noqa: E402
from pgraft_cli.recipes import SampleConfig, load_recipe  # noqa: E402
from pgraft_cli.runstore import RunStore  # noqa: E402
from pgraft_cli.ui import progress  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "runs" / "inverse-noise")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="recipe override for the inverse-noise recipe, e.g. correct.corrector_train_steps=3000")
    parser.add_argument("--iterations", type=int, default=0,
                        help="fixed-point iterations per inversion step (default: max(12, 96 / steps); "
                             "few-step grids take big steps and need more)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    model = load_model("digits")
    real, _ = load_digits()
    feats = classifier_features()
    real_feats = feats(real)
    rows = []
    for n in args.steps:
        iterations = args.iterations or max(12, -(-96 // n))
        rec = load_recipe("inverse-noise", [f"correct.base_steps={n}", f"correct.inversion_iterations={iterations}",
                                            *args.sets])
        to_invert = real[: rec.correct.num_images] if rec.correct.num_images else real
        with RunStore(args.out / f"steps-{n}") as store, progress(not args.quiet) as bar:
            tic = time.perf_counter()
            noises, inv = run_invert(model, to_invert, "digits", rec.correct, rec.sample.lane, store, bar)
            corrector, info = run_train_corrector(noises, model.sample_shape, rec.correct, model.identity, store, bar)
            mean, chol = fit_gaussian(noises)
            gaussian = NoiseCorrector("gaussian", n, mean=mean.float(), chol=chol.float())
            prep = time.perf_counter() - tic
            for name, corr in (("base", None), ("flow corrector", corrector), ("gaussian", gaussian)):
                results = []
                for seed in args.seeds:
                    cfg = SampleConfig(num=args.num, seed=100 + seed, steps=n, batch_size=256, lane=rec.sample.lane)
                    model.corrector = corr
                    stage = f"eval-{name.split()[0]}-seed{seed}"
                    results.append(evaluate_model(model, None, cfg, feats, store, bar, stage, 10, real_features=real_feats))
                model.corrector = None
                rows.append({"steps": n, "sampler": name, "seeds": args.seeds, "num": args.num,
                             "fid": [r["fid"] for r in results], "kid": [r["kid"] for r in results],
                             "nfe": results[0]["nfe"], "flops_per_image": results[0]["flops_per_image"],
                             "seconds_per_image": [r["seconds_per_image"] for r in results],
                             "inversion_rms": inv["reconstruction_rms_mean"], "prep_seconds": prep,
                             "corrector_parameters": info["parameters"] if name == "flow corrector" else 0})
    print_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def print_table(rows: list[dict]) -> None:
    header = ["base steps", "sampler", "NFE", "MFLOPs/img", "FID (mean ± std)", "KID x1e3", "ms/img", "inv. RMS"]
    lines = [header]
    for r in rows:
        lines.append([str(r["steps"]), r["sampler"], str(r["nfe"]), f"{r['flops_per_image'] / 1e6:.1f}",
                      _ms(r["fid"]), _ms([1e3 * k for k in r["kid"]]),
                      f"{1000 * statistics.mean(r['seconds_per_image']):.2f}", f"{r['inversion_rms']:.4f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(out))
    seeds, num = rows[0]["seeds"], rows[0]["num"]
    print(f"\n{len(seeds)} seeds x {num} samples; FID/KID with the bundled digits classifier's features "
          f"against all 1797 digits; FLOPs measured by torch.utils.flop_counter; torch {torch.__version__}.")


if __name__ == "__main__":
    main()
