"""Guidance on the tuned segment: ``finetune.tuned_guidance = "none"`` against ``"reapply"``.

    OMP_NUM_THREADS=1 python bench/guidance.py                       # cutoffs 0 0.5, 3 seeds
    OMP_NUM_THREADS=1 python bench/guidance.py --seeds 0 --cutoffs 0.5   # a quick look

1. Trains a small class-conditional digits flow (UNet2DModel, 10 classes + the null class 10) on
   ``digits-train`` with 10 % label dropout, so classifier-free guidance is defined; it is saved with
   ``pgraft.null_class = 10``.
2. For each seed and cutoff, one GRAFT/P-GRAFT round with guidance scale ``--guidance``: sample
   ``--num`` trajectories (i mod 10 classes), score them with a label-agnostic reward (the bundled
   classifier's log-probability of its own argmax: "looks like some digit, clearly"), keep the top 1
   of every 4 of one class, fine-tune on the kept set. The training does not depend on the option,
   so the same tuned weights are sampled both ways (one round; later rounds would also differ in
   what they keep).
3. Samples ``--eval-num`` images (same seeds, same classes) from the tuned model with each option,
   and reports: the kept set's reward, the tuned sampler's reward, their gap (0 = the sampler
   reproduces what it was trained on), FID of the samples to the kept set (the same question,
   in distribution), label accuracy (the classifier's argmax equals the conditioned class) and FID
   to the held-out ``digits-test``. FID uses the bundled classifier's features.

Everything is seeded; run stores under ``--out`` make reruns resume. The table (mean +- std over
seeds, and the per-seed paired difference none - reapply) is printed and saved as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgraft_cli.io.checkpoints import load_model, save_pgraft_safetensors  # noqa: E402
from pgraft_cli.io.data import load_digits  # noqa: E402
from pgraft_cli.stages.evaluate import CLASSIFIER_PATH, classifier_features  # noqa: E402
from pgraft_cli.core.metrics import distances  # noqa: E402
from pgraft_cli.stages.finetune import load_kept_set, round_stage, run_rounds  # noqa: E402
from pgraft_cli.models.loaded import tuned_identity  # noqa: E402
from pgraft_cli.io.checkpoints import load_classifier  # noqa: E402
from pgraft_cli.io.recipes import load_recipe  # noqa: E402
from pgraft_cli.stages.rewards import Reward  # noqa: E402
from pgraft_cli.io.runstore import RunStore  # noqa: E402
from pgraft_cli.stages.sample import Conditions, load_images, run_sample  # noqa: E402
from pgraft_cli.report.ui import progress  # noqa: E402

NULL = 10
FLOW_CONFIG = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [32, 64, 64],
               "layers_per_block": 1, "down_block_types": ["DownBlock2D"] * 3, "up_block_types": ["UpBlock2D"] * 3,
               "norm_num_groups": 8, "num_class_embeds": NULL + 1}
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}


def train_class_flow(out: Path, steps: int, dropout: float = 0.1, seed: int = 0) -> Path:
    """Flow matching ``|v(x_t, t, y) - (e - x0)|^2`` with y replaced by the null class w.p. ``dropout``."""
    from diffusers import UNet2DModel

    if out.is_file():
        return out
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = load_digits(split="train")
    data = images * 2 - 1
    net = UNet2DModel(**FLOW_CONFIG)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(data), (64,), generator=g)
        x0, y = data[idx], labels[idx].clone()
        y[torch.rand(len(y), generator=g) < dropout] = NULL
        e = torch.randn(x0.shape, generator=g)
        t = torch.rand(len(x0), generator=g)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * e
        loss = F.mse_loss(net(xt, t * 1000, class_labels=y).sample, e - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"class flow step {step:5d} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    provenance = {"created_by": "bench/guidance.py", "steps": steps, "label_dropout": dropout, "seed": seed,
                  "data": "digits-train", "train_seconds": round(time.time() - start, 1)}
    save_pgraft_safetensors(out, net, "UNet2DModel", FLOW_CONFIG, SCHEDULER, provenance,
                            extra={"pgraft.kind": "model", "pgraft.null_class": str(NULL),
                                   "pgraft.label_dropout": str(dropout), "pgraft.data": "digits-train"})
    return out


def confidence_reward() -> Reward:
    """``max_k log p(k | x)`` under the bundled classifier: label-agnostic "clearly some digit"."""
    classifier = load_classifier(CLASSIFIER_PATH)

    def fn(images: torch.Tensor, prompts) -> torch.Tensor:
        return torch.log_softmax(classifier(images * 2 - 1).double(), -1).max(-1).values

    return Reward("confidence", fn, batch_size=256, spec="bench:classifier-confidence")


def label_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier) -> float:
    with torch.inference_mode():
        return float((classifier(images * 2 - 1).argmax(1) == labels).double().mean())


def one_config(model_path: Path, cutoff: float, seed: int, args, reward, classifier, feats, test_feats) -> dict:
    """One round at ``cutoff``, then the tuned model sampled with each ``tuned_guidance``."""
    rec = load_recipe("pgraft", [
        f"sample.num={args.num}", f"sample.steps={args.sample_steps}", f"sample.seed={seed}",
        "sample.batch_size=80", "sample.lane=16", f"sample.guidance_scale={args.guidance}",
        "filter.rule='top_k'", "filter.k=1", "filter.m=4",
        f"finetune.cutoff={cutoff}", "finetune.rounds=1", f"finetune.steps={args.steps}",
        "finetune.batch_size=32", f"finetune.learning_rate={args.lr}", f"finetune.seed={seed}"])
    model = load_model(str(model_path))
    run = args.out / f"c{cutoff}-s{seed}"
    out: dict = {"cutoff": cutoff, "seed": seed}
    with RunStore(run) as store, progress(args.quiet) as bar:
        rounds = run_rounds(model, rec, reward, Conditions(), store, bar)
        kept = load_kept_set(store.root, round_stage("sample", 1), round_stage("filter", 1), 0.0)
        kept_images = model.decode(kept.x0)
        out["kept_reward"] = rounds[0]["kept_reward_mean"]
        out["sampled_reward"] = rounds[0]["sampled"]["reward_mean"]
        kept_feats = feats(kept_images)
        eval_cfg = replace(rec.sample, num=args.eval_num, seed=1000 + seed, capture_at=None)
        labels = torch.arange(args.eval_num) % NULL
        for option in ("none", "reapply"):
            model.tuned_guidance = option
            model.identity = tuned_identity(model)
            run_sample(model, eval_cfg, Conditions(), store, bar, stage_name=f"eval-{option}")
            images = load_images(store.root, f"eval-{option}")
            f = feats(images)
            r = float(reward(images).mean())
            out[option] = {"reward": r, "gap": r - out["kept_reward"],
                           "fid_to_kept": distances(f, kept_feats)["fid"],
                           "label_accuracy": label_accuracy(images, labels, classifier),
                           "fid_to_test": distances(f, test_feats)["fid"]}
    return out


def base_row(model_path: Path, seed: int, args, reward, classifier, feats, test_feats) -> dict:
    """The base model, guided, on the evaluation seeds (what fine-tuning starts from)."""
    rec = load_recipe("pgraft", [f"sample.steps={args.sample_steps}", "sample.batch_size=80",
                                 f"sample.guidance_scale={args.guidance}"])
    model = load_model(str(model_path))
    cfg = replace(rec.sample, num=args.eval_num, seed=1000 + seed)
    with RunStore(args.out / f"base-s{seed}") as store, progress(args.quiet) as bar:
        run_sample(model, cfg, Conditions(), store, bar)
        images = load_images(store.root)
    f = feats(images)
    labels = torch.arange(args.eval_num) % NULL
    return {"reward": float(reward(images).mean()), "label_accuracy": label_accuracy(images, labels, classifier),
            "fid_to_test": distances(f, test_feats)["fid"]}


def _ms(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def table(rows: list[dict], bases: list[dict]) -> str:
    keys = ("reward", "gap", "fid_to_kept", "label_accuracy", "fid_to_test")
    lines = ["| cutoff | tuned_guidance | kept reward | sampler reward | gap (sampler - kept) | FID to kept set | "
             "label accuracy | FID to digits-test |", "|---|---|---|---|---|---|---|---|"]
    lines.append(f"| base (guided) | - | - | {_ms([b['reward'] for b in bases])} | - | - | "
                 f"{_ms([b['label_accuracy'] for b in bases])} | {_ms([b['fid_to_test'] for b in bases])} |")
    for cutoff in sorted({r["cutoff"] for r in rows}):
        mine = [r for r in rows if r["cutoff"] == cutoff]
        kept = _ms([r["kept_reward"] for r in mine])
        for option in ("none", "reapply"):
            cells = [_ms([r[option][k] for r in mine]) for k in keys]
            lines.append(f"| {cutoff} | {option} | {kept} | " + " | ".join(cells) + " |")
        diffs = [_ms([r["none"][k] - r["reapply"][k] for r in mine]) for k in keys]
        lines.append(f"| {cutoff} | none - reapply (paired) | - | " + " | ".join(diffs) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cutoffs", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--guidance", type=float, default=2.5)
    p.add_argument("--num", type=int, default=400, help="sampled trajectories (40 per class, groups of 4)")
    p.add_argument("--sample-steps", type=int, default=8)
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-num", type=int, default=400)
    p.add_argument("--flow-steps", type=int, default=1000, help="training steps of the class-conditional flow")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "runs" / "guidance")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    model_path = train_class_flow(args.out / "class-flow.safetensors", args.flow_steps)
    reward, classifier, feats = confidence_reward(), load_classifier(CLASSIFIER_PATH), classifier_features()
    test_feats = feats(load_digits(split="test")[0])
    bases = [base_row(model_path, s, args, reward, classifier, feats, test_feats) for s in args.seeds]
    rows = []
    for seed in args.seeds:
        for cutoff in args.cutoffs:
            tic = time.time()
            rows.append(one_config(model_path, cutoff, seed, args, reward, classifier, feats, test_feats))
            print(f"cutoff {cutoff} seed {seed}: {json.dumps(rows[-1])} ({time.time() - tic:.0f}s)", flush=True)
    text = table(rows, bases)
    print(text)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "base": bases, "rows": rows, "table": text}, indent=2))


if __name__ == "__main__":
    main()
