"""GRAFT vs P-GRAFT on the bundled digits flow: reward, target fraction, FID and diversity per cutoff.

    python bench/pgraft.py                                   # cutoffs 0 .25 .5 .75, 3 seeds
    python bench/pgraft.py --cutoffs 0 0.5 --seeds 0 --num 512 --steps 100   # a quick look

Reward: the bundled digits classifier's log-probability of ``--digit`` (``classifier:digits:3``).
Every method gets the same budget: ``--rounds`` rounds of ``--num`` sampled trajectories (Euler,
``--sample-steps``), top 1 of 4 kept, ``--steps`` training steps of batch ``--batch`` at the same
learning rate (full fine-tuning). Cutoff 0 is GRAFT; c > 0 is P-GRAFT (the tuned model runs
t in (c, 1], the base [0, c]). Each tuned model and the base are then sampled ``--eval-num`` times
(the same seeds for every method) and measured:

- reward: mean log p(digit | image) under the classifier (the training reward);
- target %: the fraction the classifier labels as the digit;
- FID (class): Frechet distance of classifier features to the real digits of that class (1797
  digits hold about 180 of each), so it rewards looking like real 3s, not like any digit;
- diversity: mean pairwise distance of classifier features among the generated images that are
  classified as the digit, over the same for the real images of that class (1.0 = as diverse).

Runs are resumable run stores under ``--out``; the table (mean +- std over seeds) is printed and
saved as JSON beside them. ``--target renoise`` adds P-GRAFT with the re-noise reading at c = 0.5.
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
from pgraft_cli.data import load_digits  # noqa: E402
from pgraft_cli.evaluate import classifier_features, distances  # noqa: E402
from pgraft_cli.finetune import run_rounds  # noqa: E402
from pgraft_cli.nets import load_classifier  # noqa: E402
from pgraft_cli.evaluate import CLASSIFIER_PATH  # noqa: E402
from pgraft_cli.recipes import SampleConfig, load_recipe  # noqa: E402
from pgraft_cli.rewards import parse_reward  # noqa: E402
from pgraft_cli.runstore import RunStore  # noqa: E402
from pgraft_cli.sample import Conditions, load_images, run_sample  # noqa: E402
from pgraft_cli.ui import progress  # noqa: E402


def pairwise_mean(f: torch.Tensor) -> float:
    d = torch.cdist(f, f)
    n = len(f)
    return float(d.sum() / (n * (n - 1))) if n > 1 else float("nan")


def measure(images: torch.Tensor, digit: int, reward, classifier, feats, real_feats, real_div: float) -> dict:
    with torch.inference_mode():
        logits = classifier(images * 2 - 1)
    is_digit = logits.argmax(1) == digit
    f = torch.from_numpy(feats(images))
    out = {"reward": float(reward(images).mean()), "target_fraction": float(is_digit.double().mean()),
           "fid_class": distances(f.numpy(), real_feats, kid_subsets=2)["fid"]}
    out["diversity"] = pairwise_mean(f[is_digit][:1000]) / real_div if int(is_digit.sum()) > 1 else float("nan")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cutoffs", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--digit", type=int, default=3)
    p.add_argument("--num", type=int, default=1024, help="sampled trajectories per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sample-steps", type=int, default=16)
    p.add_argument("--steps", type=int, default=200, help="training steps per round")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-num", type=int, default=1000)
    p.add_argument("--target", choices=["intermediate", "renoise"], action="append", default=None,
                   help="training targets to compare (default: intermediate; renoise adds c = 0.5 renoise)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "runs" / "pgraft")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="print one table from the results.json of several runs (e.g. seeds run in parallel) and exit")
    args = p.parse_args()
    if args.merge:  # one table from several runs' results.json (seeds run in parallel)
        merged: dict[str, dict] = {}
        for path in args.merge:
            data = json.loads(path.read_text())
            for row in data["rows"]:
                if row["method"] in merged and not row["method"].startswith("real"):
                    merged[row["method"]]["seeds"] += row["seeds"]
                else:
                    merged.setdefault(row["method"], row)
        print_table(list(merged.values()), data["args"])
        return
    targets = args.target or ["intermediate"]

    reward = parse_reward(f"classifier:digits:{args.digit}")
    classifier = load_classifier(CLASSIFIER_PATH)
    feats = classifier_features()
    real, labels = load_digits()
    real_digit = real[labels == args.digit]
    real_feats = feats(real_digit)
    with torch.inference_mode():  # the same subset rule as for generated images: those classified as the digit
        real_is_digit = classifier(real_digit * 2 - 1).argmax(1) == args.digit
    real_div = pairwise_mean(torch.from_numpy(real_feats)[real_is_digit])
    real_row = {"method": f"real digits '{args.digit}'", "seeds": [measure(real_digit, args.digit, reward, classifier,
                                                                           feats, real_feats, real_div)]}
    methods = [("base", None, "intermediate")]
    methods += [("GRAFT" if c == 0 else f"P-GRAFT c={c:g}", c, "intermediate") for c in args.cutoffs]
    if "renoise" in targets:
        methods.append(("P-GRAFT c=0.5 (renoise)", 0.5, "renoise"))
    rows = [real_row]
    for name, cutoff, target in methods:
        per_seed = []
        for seed in args.seeds:
            tag = "base" if cutoff is None else f"c{cutoff:g}-{target}"
            rec = load_recipe("pgraft", [
                f"sample.num={args.num}", f"sample.steps={args.sample_steps}", f"sample.seed={100 * seed}",
                f"finetune.cutoff={cutoff or 0.0}", f"finetune.rounds={args.rounds}", f"finetune.steps={args.steps}",
                f"finetune.batch_size={args.batch}", f"finetune.learning_rate={args.lr}", f"finetune.seed={seed}",
                f"finetune.target={target}", f"score.reward=classifier:digits:{args.digit}",
                "filter.rule=top_k", "filter.k=1", "filter.m=4"])
            model = load_model("digits")
            tic = time.perf_counter()
            with RunStore(args.out / tag / f"seed{seed}") as store, progress(not args.quiet) as bar:
                if cutoff is not None:
                    run_rounds(model, rec, reward, Conditions(), store, bar)
                cfg = SampleConfig(num=args.eval_num, seed=10_000 + seed, steps=args.sample_steps, batch_size=256)
                run_sample(model, cfg, Conditions(), store, bar, stage_name="bench-eval")
                images = load_images(store.root, "bench-eval")
            m = measure(images, args.digit, reward, classifier, feats, real_feats, real_div)
            m["seconds"] = time.perf_counter() - tic
            per_seed.append(m)
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()), flush=True)
        rows.append({"method": name, "cutoff": cutoff, "target": target, "seeds": per_seed})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": rows}, indent=2))
    print_table(rows, {k: str(v) for k, v in vars(args).items()})


def _ms(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def print_table(rows: list[dict], a: dict[str, str]) -> None:
    """The markdown table (mean +- std over seeds); ``a`` holds the run's arguments as strings."""
    header = ["method", "reward (log p)", "target %", "FID (class)", "diversity"]
    lines = [header]
    for r in rows:
        s = r["seeds"]
        lines.append([r["method"], _ms([x["reward"] for x in s]), _ms([100 * x["target_fraction"] for x in s], 1),
                      _ms([x["fid_class"] for x in s]), _ms([x["diversity"] for x in s])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(out))
    seeds = len(next(r for r in rows if r["method"] == "base")["seeds"])
    print(f"\n{seeds} seeds; per method {a['rounds']} rounds x {a['num']} trajectories ({a['sample_steps']} "
          f"Euler steps), top 1 of 4, {a['steps']} steps x batch {a['batch']} at lr {a['lr']}; {a['eval_num']} "
          f"evaluation samples; torch {torch.__version__}.")


if __name__ == "__main__":
    main()
