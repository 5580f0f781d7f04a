"""The main job's corrector: held-out FID against training steps (and inverted images), one training run.

    OMP_NUM_THREADS=1 python bench/corrector_curve.py --budgets 0 50 100 200 400 800 1500 --num 2000

The ``inverse-noise`` recipe (``--set`` overrides it) on the bundled digits flow: invert the first
``--images`` training digits (cached under ``--out``), then train one flow corrector for the largest
budget and take its EMA weights at every budget on the way. The learning rate is constant after the
warm-up and the EMA's warm-up depends on the step only, so the weights at step S of this run are
those of a run trained for S steps. Each budget's corrector -> base is sampled ``--num`` times
(evaluation seed 1, the recipe's) and its FID measured against held-out ``digits-test`` and against
``digits-train`` with the bundled classifier's features, the main job's protocol; budget 0 is the
base (no corrector). ``--sample-steps 4 16`` measures each budget's corrector at each count of
its Euler steps when sampling (the same weights). Seconds are the cumulative training wall time
at that budget.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgraft_cli.io.checkpoints import load_model  # noqa: E402
from pgraft_cli.io.data import data_rows, iter_data  # noqa: E402
from pgraft_cli.io.recipes import SampleConfig, load_recipe  # noqa: E402
from pgraft_cli.io.runstore import RunStore  # noqa: E402
from pgraft_cli.models.corrector import NoiseCorrector  # noqa: E402
from pgraft_cli.report.ui import progress  # noqa: E402
from pgraft_cli.stages.correct import corrector_loop, corrector_network, corrector_step_loss, run_invert  # noqa: E402
from pgraft_cli.stages.evaluate import classifier_features, evaluate_model, reference  # noqa: E402
from pgraft_cli.stages.sample import resolve_lane  # noqa: E402
from pgraft_cli.stages.train_loop import Training, train  # noqa: E402


def parse_common(ap: argparse.ArgumentParser, out: str) -> argparse.Namespace:
    """Add the options every corrector bench shares (--set, --out, --quiet) and parse."""
    ap.add_argument("--set", dest="sets", action="append", default=[], help="recipe override, KEY=VALUE")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "runs" / out)
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args()


def digits_setup(a: argparse.Namespace):
    """The inverse-noise recipe on ``a.images`` digits with ``a.sets``, the digits model, classifier features."""
    rec = load_recipe("inverse-noise", [f"correct.num_images={a.images}", *a.sets])
    return rec, rec.correct, load_model("digits"), classifier_features()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=int, nargs="+", default=[0, 50, 100, 200, 400, 800, 1500])
    ap.add_argument("--images", type=int, default=0, help="training digits to invert (0 = all 1078)")
    ap.add_argument("--num", type=int, default=2000, help="samples per budget")
    ap.add_argument("--sample-steps", type=int, nargs="+", default=None,
                    help="the corrector's Euler steps when sampling, each measured at every budget (default: the recipe's)")
    a = parse_common(ap, "corrector-curve")
    rec, cfg, model, feats = digits_setup(a)
    refs = {name: reference(feats, iter_data(name, model.image_shape)) for name in ("digits-test", "digits-train")}
    budgets = sorted(set(a.budgets))
    rows = []
    with RunStore(a.out) as store, progress(not a.quiet) as bar:
        tic = time.perf_counter()
        noises, inv, _ = run_invert(model, data_rows("digits-train", model.image_shape).head(cfg.num_images), cfg,
                                    resolve_lane(model, SampleConfig(num=cfg.invert_shard_size,
                                                                     batch_size=cfg.invert_shard_size)).lane, store, bar)
        invert_seconds = time.perf_counter() - tic
        torch.manual_seed(cfg.seed)
        network, model_config = corrector_network(cfg, model.sample_shape)
        opt = torch.optim.AdamW(network.parameters(), lr=cfg.corrector_learning_rate, weight_decay=0.0)
        run = Training(list(network.named_parameters()), store.root / "unused-state", ema={
            n: p.detach().clone() for n, p in network.named_parameters()})
        snapshots: dict[int, tuple[dict[str, torch.Tensor], float]] = {}
        step_loss, start = corrector_step_loss(network, noises, cfg), time.perf_counter()

        def snapshot_then_step(step: int) -> torch.Tensor:
            if step in budgets:  # the EMA after `step` steps, before this one
                snapshots[step] = ({n: v.clone() for n, v in run.ema.items()}, time.perf_counter() - start)
            return step_loss(step)

        last = max(budgets)
        loop = corrector_loop(cfg)
        loop.steps, loop.checkpoint_every = last, 10**9
        network.train()
        train(run, opt, snapshot_then_step, loop, bar, "training corrector", network.state_dict, save=False)
        snapshots[last] = ({n: p.detach().clone() for n, p in network.named_parameters()}, time.perf_counter() - start)
        network.eval().requires_grad_(False)
        sample_cfg = SampleConfig(num=a.num, seed=rec.evaluate.seed, steps=cfg.base_steps,
                                  batch_size=rec.sample.batch_size, lane=rec.sample.lane)
        for budget, steps in [(b, s) for b in budgets for s in (a.sample_steps or [cfg.corrector_sample_steps])]:
            if budget:
                weights, seconds = snapshots[budget]
                network.load_state_dict(weights, strict=False)
                model.corrector = NoiseCorrector(cfg.corrector, cfg.base_steps, steps,
                                                 network=network, model_config=model_config)
            elif steps != (a.sample_steps or [cfg.corrector_sample_steps])[0]:
                continue  # the base has no corrector steps
            else:
                model.corrector, seconds = None, 0.0
            m = evaluate_model(model, None, sample_cfg, feats, store, bar, f"curve-{budget}-s{steps}-{a.num}",
                               real_features=refs["digits-test"], also_against={"digits-train": refs["digits-train"]})
            rows.append((budget, steps if budget else 0, seconds, m["fid"], m["also_against"]["digits-train"]["fid"]))
    load = os.getloadavg()
    print(f"\ncorrector: {cfg.corrector}, {sum(p.numel() for p in network.parameters()):,} parameters, "
          f"{cfg.corrector_batch_size} per step, lr {cfg.corrector_learning_rate}")
    print(f"inversion: {inv['used']} of {inv['num']} images kept, {inv['iterations_mean']:.1f} network calls per image, "
          f"{invert_seconds:.1f} s (cached when 0); {a.num} samples per budget; load average {load[0]:.1f} {load[1]:.1f}")
    print("| corrector training steps | sampling steps | training s | FID test (clf) | FID train (clf) |")
    print("|---:|---:|---:|---:|---:|")
    for budget, steps, seconds, fid_test, fid_train in rows:
        print(f"| {budget if budget else '0 (base)'} | {steps} | {seconds:.1f} | {fid_test:.3f} | {fid_train:.3f} |")


if __name__ == "__main__":
    main()
