"""Inverse noise correction on the bundled digits flow, against a held-out split and a compute-matched control.

    OMP_NUM_THREADS=1 python bench/inverse_noise.py --stage control --seeds 0 1 2 &   # the controls, 2 processes
    OMP_NUM_THREADS=1 python bench/inverse_noise.py --stage control --seeds 3 4; wait
    OMP_NUM_THREADS=1 python bench/inverse_noise.py --steps 4 &                       # one process per step count
    OMP_NUM_THREADS=1 python bench/inverse_noise.py --steps 8; wait
    python bench/inverse_noise.py                                                     # cached: the tables

The bundled flow was trained on ``digits-train`` (1078 images); ``digits-test`` (360) is held out and
``digits-judge`` (359) trained the judge (``pgraft_cli.io.data.digits_split``). For every base step
count N (Euler) the train split is inverted through the N-step sampler once; then, for every seed s:

- ``corrector``: a flow corrector trained on the inverted noises with ``correct.seed = s`` (the
  ``inverse-noise`` recipe, ``--corrector-steps`` training steps), sampled as corrector -> base;
- ``gaussian``: mean + full covariance of the inverted noises (no training), -> base;
- ``control``: the base flow trained further on digits-train with the corrector's training budget
  **matched in FLOPs** (forward + backward of one training image measured with
  ``torch.utils.flop_counter`` for both networks; the same batch, so fewer steps), seed s, sampled at
  the same N base steps;
- ``base``: the bundled flow at N steps.

Each is sampled ``--num`` times from sampling seed 100 + s. FID and KID are computed against
digits-test (held out) and against digits-train, with the bundled classifier's features and with the
judge's (another architecture trained on digits-judge). The corrected noises' mean, std and Fréchet
distance (in noise space, 256-d) are compared with the inverted noises'. Tables: mean +- std over
seeds, and paired per-seed differences with 95 % t-intervals. Everything is resumable under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from paired import mean_std, paired_t, paired_text  # noqa: E402
from pgraft_cli.io.checkpoints import load_model, save_pgraft_safetensors  # noqa: E402
from pgraft_cli.models.corrector import NoiseCorrector, fit_gaussian  # noqa: E402
from pgraft_cli.stages.correct import corrector_config, run_invert, run_train_corrector  # noqa: E402
from pgraft_cli.core.losses import flow_matching_loss  # noqa: E402
from pgraft_cli.io.data import load_digits  # noqa: E402
from pgraft_cli.demo.train import FlowTraining, fit_flow  # noqa: E402
from pgraft_cli.stages.evaluate import CLASSIFIER_PATH, JUDGE_PATH, classifier_features, evaluate_model, reference  # noqa: E402
from pgraft_cli.core.metrics import FidKid  # noqa: E402
from pgraft_cli.io.recipes import SampleConfig, load_recipe  # noqa: E402
from pgraft_cli.io.runstore import RunStore  # noqa: E402
from pgraft_cli.stages.sample import iter_images  # noqa: E402
from pgraft_cli.report.ui import progress  # noqa: E402

METHODS = ("base", "control", "gaussian", "corrector")
FID_KEYS = ("classifier/test", "classifier/train", "judge/test", "judge/train")


def train_step_flops(network: torch.nn.Module, shape: tuple[int, int, int]) -> int:
    """FLOPs of forward + backward of the flow-matching loss for one training image (flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(network).float().train().requires_grad_(True)
    z = torch.zeros(1, *shape)
    with FlopCounterMode(display=False) as counter:
        flow_matching_loss(net, NoiseCorrector.schedule, z, torch.ones_like(z), torch.full((1,), 0.5)).backward()
    return int(counter.get_total_flops())


def control_budget(model, correct_cfg) -> dict[str, int]:
    """The control's steps: ``round(S_c * F_c / F_b)`` at the corrector's batch, with ``F`` the
    measured training FLOPs per image of the corrector (c) and the base (b), ``S_c`` its steps."""
    from diffusers import UNet2DModel

    corrector_net = UNet2DModel(**corrector_config(correct_cfg, model.sample_shape))
    f_c, f_b = train_step_flops(corrector_net, model.sample_shape), train_step_flops(model.network, model.sample_shape)
    steps = max(1, round(correct_cfg.corrector_train_steps * f_c / f_b))
    return {"corrector_steps": correct_cfg.corrector_train_steps, "batch": correct_cfg.corrector_batch_size,
            "corrector_flops_per_image": f_c, "base_flops_per_image": f_b, "control_steps": steps,
            "corrector_training_flops": correct_cfg.corrector_train_steps * correct_cfg.corrector_batch_size * f_c,
            "control_training_flops": steps * correct_cfg.corrector_batch_size * f_b}


def control_model(out: Path, seed: int, budget: dict[str, int], train_x: torch.Tensor):
    """The bundled flow trained ``budget['control_steps']`` more steps on digits-train (cached as a file)."""
    path = out / "control" / f"seed{seed}.safetensors"
    if not path.is_file():
        model = load_model("digits")
        settings = FlowTraining(seed=seed, steps=budget["control_steps"], batch_size=budget["batch"])
        torch.manual_seed(1000 + seed)
        tic = time.perf_counter()
        loss = fit_flow(model.network, train_x * 2 - 1, settings, torch.Generator().manual_seed(1000 + seed), log=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_pgraft_safetensors(path, model.network, model.model_class, model.model_config, model.scheduler_config,
                                {"created_by": "bench/inverse_noise.py control", "budget": budget, "seed": seed,
                                 "final_loss": float(loss), "train_seconds": round(time.perf_counter() - tic, 1)},
                                extra={"pgraft.kind": "model", "pgraft.data": "digits-train"})
        print(f"control seed {seed}: {settings.steps} steps, loss {float(loss):.4f}", flush=True)
    return load_model(str(path))


def noise_stats(z: torch.Tensor, ref: FidKid) -> dict[str, float]:
    """Mean, std (over all elements) and Fréchet distance to the inverted noises (256-d) of (N, ...) noises."""
    flat = z.reshape(len(z), -1).double()
    ref.reset_generated()
    ref.update(flat, real=False)
    return {"noise_mean": float(flat.mean()), "noise_std": float(flat.std()), "noise_fd": ref.compute()["fid"]}


def fids(store: RunStore, stage: str, feats: dict, refs: dict[str, FidKid]) -> dict[str, dict[str, float]]:
    """FID and KID of a sample stage against every (features, split) reference."""
    for r in refs.values():
        r.reset_generated()
    for _, images in iter_images(store.root, stage):
        for name, f in feats.items():
            x = f(images)
            for split in ("test", "train"):
                refs[f"{name}/{split}"].update(x, real=False)
    return {k: {m: v for m, v in r.compute().items() if m in ("fid", "kid")} for k, r in refs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--num", type=int, default=1000, help="samples per method and seed")
    parser.add_argument("--corrector-steps", type=int, default=500,
                        help="corrector training steps (the recipe ships 1500; 500 fits 5 seeds x 2 step counts)")
    parser.add_argument("--iterations", type=int, default=0,
                        help="inversion iterations per step, at most (default: the recipe's)")
    parser.add_argument("--stage", choices=["all", "control"], default="all",
                        help="control: only train the seeds' controls (run first, in parallel)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="inverse-noise recipe override")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "runs" / "inverse-noise")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    model = load_model("digits")
    train_x, _ = load_digits(split="train")
    test_x, _ = load_digits(split="test")
    base_rec = load_recipe("inverse-noise", [f"correct.corrector_train_steps={args.corrector_steps}", *args.sets])
    budget = control_budget(model, base_rec.correct)
    if args.stage == "control":
        for seed in args.seeds:
            control_model(args.out, seed, budget, train_x)
        return
    feats = {"classifier": classifier_features(CLASSIFIER_PATH), "judge": classifier_features(JUDGE_PATH)}
    refs = {f"{n}/{s}": reference(f, x) for n, f in feats.items() for s, x in (("test", test_x), ("train", train_x))}
    records, noise_rows = [], []
    # The floor: real held-out digits against the train split (FID of two real samples of one distribution).
    real = {"steps": 0, "method": "real digits-test", "seed": None, "nfe": 0, "flops_per_image": 0,
            "seconds_per_image": 0.0}
    for name, f in feats.items():
        r = refs[f"{name}/train"]
        r.reset_generated()
        r.update(f(test_x), real=False)
        real[f"{name}/train"] = r.compute()["fid"]
    records.append(real)
    for n in args.steps:
        its = [f"correct.inversion_iterations={args.iterations}"] if args.iterations else []
        inv_rec = load_recipe("inverse-noise", [f"correct.base_steps={n}", *its,
                                                f"correct.corrector_train_steps={args.corrector_steps}", *args.sets])
        with RunStore(args.out / f"steps-{n}" / "invert") as store, progress(not args.quiet) as bar:
            noises, inv, _ = run_invert(model, train_x, inv_rec.correct, inv_rec.sample.lane, store, bar)
        noise_ref = FidKid(noises[0].numel())
        noise_ref.update(noises.reshape(len(noises), -1), real=True)
        mean, chol = fit_gaussian(noises)
        gaussian = NoiseCorrector("gaussian", n, mean=mean.float(), chol=chol.float())
        noise_rows.append({"steps": n, "source": "inverted (target)", "noise_mean": inv["noise_mean"],
                           "noise_std": inv["noise_std"], "noise_fd": 0.0, "inversion": inv})
        for seed in args.seeds:
            rec = load_recipe("inverse-noise", [f"correct.base_steps={n}", f"correct.seed={seed}",
                                                f"correct.corrector_train_steps={args.corrector_steps}", *args.sets])
            control = control_model(args.out, seed, budget, train_x)
            with RunStore(args.out / f"steps-{n}" / f"seed{seed}") as store, progress(not args.quiet) as bar:
                corrector, info = run_train_corrector(noises, model.sample_shape, rec.correct, model.identity, store, bar)
                e = torch.randn((args.num, *model.sample_shape), generator=torch.Generator().manual_seed(100 + seed))
                for name, m, corr in (("base", model, None), ("control", control, None), ("gaussian", model, gaussian),
                                      ("corrector", model, corrector)):
                    m.corrector = corr
                    cfg = SampleConfig(num=args.num, seed=100 + seed, steps=n, batch_size=256, lane=rec.sample.lane)
                    res = evaluate_model(m, None, cfg, None, store, bar, f"eval-{name}")
                    m.corrector = None
                    rec_row = {"steps": n, "method": name, "seed": seed, "nfe": res["nfe"],
                               "flops_per_image": res["flops_per_image"], "seconds_per_image": res["seconds_per_image"],
                               "inversion_rms": inv["reconstruction_rms_mean"]}
                    for key, d in fids(store, f"eval-{name}", feats, refs).items():
                        rec_row[key], rec_row[key.replace("/", "/kid-")] = d["fid"], d["kid"]
                    records.append(rec_row)
                    print(f"N={n} seed {seed} {name}: " + ", ".join(f"{k} {rec_row[k]:.3f}" for k in FID_KEYS), flush=True)
                for name, corr in (("N(0, I) (base)", None), ("gaussian", gaussian), ("corrector", corrector)):
                    z = corr(e) if corr is not None else e
                    noise_rows.append({"steps": n, "source": name, "seed": seed, **noise_stats(z, noise_ref)})
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "budget": budget, "records": records,
              "noise": noise_rows, "torch": torch.__version__}
    (args.out / f"results-{'-'.join(map(str, args.steps))}.json").write_text(json.dumps(result, indent=2))
    print_tables(result)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in [header, *rows]]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def print_tables(result: dict) -> None:
    recs, b = result["records"], result["budget"]
    steps = sorted({r["steps"] for r in recs if r["steps"]})
    rows = []
    for r in (x for x in recs if x["seed"] is None):
        rows.append([r["method"], "-", "-", "-", "-", f"{r['classifier/train']:.3f}", "-", f"{r['judge/train']:.3f}", "-"])
    for n in steps:
        for method in METHODS:
            rs = [r for r in recs if r["steps"] == n and r["method"] == method]
            rows.append([method, str(n), str(rs[0]["nfe"]), f"{rs[0]['flops_per_image'] / 1e6:.1f}",
                         *(mean_std([r[k] for r in rs]) for k in FID_KEYS),
                         f"{1000 * sum(r['seconds_per_image'] for r in rs) / len(rs):.2f}"])
    print(_table(["method", "N", "NFE", "MFLOPs/img", "FID test (clf)", "FID train (clf)", "FID test (judge)",
                  "FID train (judge)", "ms/img"], rows))
    seeds = sorted({r["seed"] for r in recs if r["seed"] is not None})
    print(f"\n{len(seeds)} seeds x {result['args']['num']} samples; control: {b['control_steps']} base steps of batch "
          f"{b['batch']} = {b['control_training_flops'] / 1e12:.2f} TFLOPs vs the corrector's {b['corrector_steps']} steps = "
          f"{b['corrector_training_flops'] / 1e12:.2f} TFLOPs; torch {result['torch']}.\n")
    noise = []
    for n in steps:
        for src in ("inverted (target)", "N(0, I) (base)", "gaussian", "corrector"):
            rs = [r for r in result["noise"] if r["steps"] == n and r["source"] == src]
            noise.append([str(n), src, mean_std([r["noise_mean"] for r in rs], 4), mean_std([r["noise_std"] for r in rs], 4),
                          mean_std([r["noise_fd"] for r in rs])])
    print(_table(["N", "noise", "mean", "std", "Fréchet dist. to inverted"], noise) + "\n")
    paired = []
    for n in steps:
        by = {m: sorted((r for r in recs if r["steps"] == n and r["method"] == m), key=lambda r: r["seed"]) for m in METHODS}
        for other in ("base", "control", "gaussian"):
            for key in ("classifier/test", "judge/test"):
                p = paired_t([r[key] for r in by["corrector"]], [r[key] for r in by[other]])
                paired.append([str(n), f"corrector - {other}", key, *paired_text(p)])
    print(_table(["N", "paired difference", "FID", "mean [95 % t-interval]", "seeds < 0"], paired))


if __name__ == "__main__":
    main()
