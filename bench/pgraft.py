"""GRAFT vs P-GRAFT on the bundled digits flow, judged by a classifier that is not the reward.

    OMP_NUM_THREADS=1 python bench/pgraft.py --seeds 0 1 2 3 --quiet &              # two processes
    OMP_NUM_THREADS=1 python bench/pgraft.py --seeds 4 5 6 7 --quiet --out bench/runs/pgraft-b; wait
    python bench/pgraft.py --merge bench/runs/pgraft/results.json bench/runs/pgraft-b/results.json

Reward (training): the bundled CNN classifier's log-probability of ``--digit`` (``classifier:digits:3``,
trained on digits-train). Judge: the bundled pixel MLP (``classifier:judge:3``, another architecture
trained on digits-judge, data neither the flow nor the reward saw). Every method gets the same
budget: ``--rounds`` rounds of ``--num`` sampled trajectories (Euler, ``--sample-steps``), top 1 of 4
kept, ``--steps`` full fine-tuning steps of batch ``--batch`` at ``--lr``. Cutoff 0 is GRAFT; c > 0
is P-GRAFT (the tuned network runs t in (c, 1], the base [0, c]). Each model is sampled
``--eval-num`` times (sampling seed 10000 + s for every method) and measured:

- reward / judge reward: mean log p(digit | image) under the reward classifier / under the judge;
  their difference is the reward-hacking gap (what the reward claims beyond what the judge sees);
- target % / judge %: the fraction each classifier labels as the digit;
- FID (judge): Fréchet distance of the judge's 32-d features of all samples to the real digits of
  that class in digits-test (held out from flow, reward and judge);
- diversity: mean pairwise judge-feature distance among samples the judge labels as the digit,
  over the same for the real ones (1.0 = as diverse).

Tables: mean +- std over seeds, and the paired per-seed difference P-GRAFT - GRAFT (each P-GRAFT
cutoff) with its 95 % t-interval. Runs are resumable run stores under ``--out``.
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

from paired import mean_std, paired_t, paired_text  # noqa: E402
from pgraft_cli.io.checkpoints import load_model  # noqa: E402
from pgraft_cli.io.data import load_digits  # noqa: E402
from pgraft_cli.stages.evaluate import CLASSIFIER_PATH, JUDGE_PATH, classifier_features  # noqa: E402
from pgraft_cli.core.metrics import distances  # noqa: E402
from pgraft_cli.stages.finetune import run_rounds  # noqa: E402
from pgraft_cli.io.checkpoints import load_classifier  # noqa: E402
from pgraft_cli.io.recipes import SampleConfig, load_recipe  # noqa: E402
from pgraft_cli.stages.rewards import parse_reward  # noqa: E402
from pgraft_cli.io.runstore import RunStore  # noqa: E402
from pgraft_cli.stages.sample import Conditions, load_images, run_sample  # noqa: E402
from pgraft_cli.report.ui import progress  # noqa: E402

COLUMNS = [("reward", "reward (log p)", 3), ("judge_reward", "judge reward (log p)", 3), ("gap", "gap", 3),
           ("target", "target %", 1), ("judge_target", "judge %", 1), ("fid_judge", "FID (judge)", 3),
           ("diversity", "diversity", 3)]


def pairwise_mean(f: torch.Tensor) -> float:
    d = torch.cdist(f, f)
    n = len(f)
    return float(d.sum() / (n * (n - 1))) if n > 1 else float("nan")


class Judge:
    """Measures a set of images against the reward and the judge (features of the real class computed once)."""

    def __init__(self, digit: int):
        self.digit = digit
        self.reward, self.judge_reward = parse_reward(f"classifier:digits:{digit}"), parse_reward(f"classifier:judge:{digit}")
        self.judge, self.feats = load_classifier(JUDGE_PATH), classifier_features(JUDGE_PATH)
        self.classifier = load_classifier(CLASSIFIER_PATH)
        images, labels = load_digits(split="test")
        self.real = images[labels == digit]
        self.real_feats = self.feats(self.real)
        self.real_div = pairwise_mean(self.real_feats[self._is_digit(self.judge, self.real)])

    def _is_digit(self, net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return net(images * 2 - 1).argmax(1) == self.digit

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        r, jr = self.reward(images), self.judge_reward(images)
        f, is_digit = self.feats(images), self._is_digit(self.judge, images)
        out = {"reward": float(r.mean()), "judge_reward": float(jr.mean()), "gap": float(r.mean() - jr.mean()),
               "target": 100 * float(self._is_digit(self.classifier, images).double().mean()),
               "judge_target": 100 * float(is_digit.double().mean()),
               "fid_judge": distances(f, self.real_feats)["fid"]}
        out["diversity"] = pairwise_mean(f[is_digit][:1000]) / self.real_div if int(is_digit.sum()) > 1 else float("nan")
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cutoffs", type=float, nargs="+", default=[0.0, 0.25])
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--digit", type=int, default=3)
    p.add_argument("--num", type=int, default=768, help="sampled trajectories per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sample-steps", type=int, default=16)
    p.add_argument("--steps", type=int, default=150, help="training steps per round")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-num", type=int, default=800)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "runs" / "pgraft")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="print one table from the results.json of several runs (seeds run in parallel) and exit")
    args = p.parse_args()
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        print_tables(parts[0]["real"], [r for part in parts for r in part["records"]], parts[0]["args"])
        return

    judge = Judge(args.digit)
    real = judge(judge.real)
    methods = [("base", None)] + [("GRAFT" if c == 0 else f"P-GRAFT c={c:g}", c) for c in args.cutoffs]
    records = []
    for seed in args.seeds:
        for name, cutoff in methods:
            rec = load_recipe("pgraft", [
                f"sample.num={args.num}", f"sample.steps={args.sample_steps}", f"sample.seed={100 * seed}",
                f"finetune.cutoff={cutoff or 0.0}", f"finetune.rounds={args.rounds}", f"finetune.steps={args.steps}",
                f"finetune.batch_size={args.batch}", f"finetune.learning_rate={args.lr}", f"finetune.seed={seed}",
                f"score.reward=classifier:digits:{args.digit}", "filter.rule=top_k", "filter.k=1", "filter.m=4"])
            model = load_model("digits")
            tic = time.perf_counter()
            with RunStore(args.out / ("base" if cutoff is None else f"c{cutoff:g}") / f"seed{seed}") as store, \
                    progress(not args.quiet) as bar:
                if cutoff is not None:
                    run_rounds(model, rec, judge.reward, Conditions(), store, bar)
                cfg = SampleConfig(num=args.eval_num, seed=10_000 + seed, steps=args.sample_steps, batch_size=256)
                run_sample(model, cfg, Conditions(), store, bar, stage_name="bench-eval")
                m = judge(load_images(store.root, "bench-eval"))
            records.append({"method": name, "cutoff": cutoff, "seed": seed, **m, "seconds": time.perf_counter() - tic})
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {m[k]:.3f}" for k, _, _ in COLUMNS), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "real": real, "records": records}, indent=2))
    print_tables(real, records, {k: str(v) for k, v in vars(args).items()})


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in [header, *rows]]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def print_tables(real: dict, records: list[dict], a: dict[str, str]) -> None:
    """Mean +- std per method, then paired P-GRAFT - GRAFT differences with 95 % t-intervals."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    rows = [["real test digits", *(f"{real[k]:.{d}f}" for k, _, d in COLUMNS)]]
    for m in methods:
        rs = [r for r in records if r["method"] == m]
        rows.append([m, *(mean_std([r[k] for r in rs], d) for k, _, d in COLUMNS)])
    print(_table(["method", *(h for _, h, _ in COLUMNS)], rows))
    seeds = sorted({r["seed"] for r in records})
    print(f"\n{len(seeds)} seeds; per method {a['rounds']} rounds x {a['num']} trajectories ({a['sample_steps']} Euler "
          f"steps), top 1 of 4, {a['steps']} steps x batch {a['batch']} at lr {a['lr']}; {a['eval_num']} evaluation "
          f"samples; torch {torch.__version__}.\n")
    graft = sorted((r for r in records if r["cutoff"] == 0.0), key=lambda r: r["seed"])
    paired = []
    for m in methods:
        rs = sorted((r for r in records if r["method"] == m and r["cutoff"]), key=lambda r: r["seed"])
        if not rs or [r["seed"] for r in rs] != [r["seed"] for r in graft]:
            continue
        for k, h, d in COLUMNS:
            paired.append([f"{m} - GRAFT", h, *paired_text(paired_t([r[k] for r in rs], [r[k] for r in graft]), d)])
    print(_table(["paired difference", "metric", "mean [95 % t-interval]", "seeds < 0"], paired))


if __name__ == "__main__":
    main()
