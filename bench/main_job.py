"""The README's main job (``pgraft correct digits --recipe inverse-noise``): per-stage seconds and FID,
the recipe's old values ("before") against its defaults ("after"), each in a fresh run directory.

    python bench/main_job.py                       # both jobs, then the common evaluation and the table
    python bench/main_job.py --jobs after          # one job (the other's cached result is reused)
    python bench/main_job.py --jobs none           # the table from cached results

Each job is the real command in a subprocess (``--json``, a fresh ``--run-dir``), timed by wall clock,
with the load average before and after it. Per-stage seconds come from the run's manifest (each
stage's start to finish: invert, train_corrector, evaluate-base, evaluate-corrected), so jobs run
by older code are timed the same way. The jobs' own FIDs use their own sample counts; for a like
for like comparison ``--common-num`` samples (evaluation seed 1) of the base and of each job's
corrected checkpoint are measured the same way (``pgraft evaluate``, classifier features, FID
against held-out ``digits-test``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent

# The inverse-noise recipe's values before issue 13 (README: held-out FID 5.03 -> 1.70, 11.5 min under load).
BEFORE = ["correct.num_images=0", "correct.inversion_iterations=24", "correct.inversion_tol=2e-3",
          "correct.corrector_train_steps=1500", "correct.corrector_batch_size=128", "evaluate.num=2000",
          "correct.corrector_sample_steps=4"]
# Cheaper correctors than the recipe's UNet flow (issue 13): no training, or an MLP flow (bench/RESULTS.md).
MLP = ["correct.corrector=mlp", "correct.corrector_width=256", "correct.corrector_blocks=2",
       "correct.corrector_train_steps=3000", "correct.corrector_sample_steps=64"]
# The defaults before the corrector's budget was moved from training to sampling steps (issue 13).
PREVIOUS = ["correct.corrector_train_steps=1500", "correct.corrector_sample_steps=4"]
# The defaults before the corrector's learning rate decayed (issue 13): 500 steps at a constant 1e-3.
CONSTANT_LR = ["correct.corrector_train_steps=500", "correct.corrector_learning_rate=1e-3",
               "correct.corrector_lr_decay=constant"]
# Before the CPU lane of 64 and the corrector's 4 Heun steps (issue 13): lanes of 16, 16 Euler corrector steps.
EULER_16 = ["correct.corrector_sampler=euler", "correct.corrector_sample_steps=16"]
JOBS = {"lane-16": ["sample.lane=16", *EULER_16], "euler-16": EULER_16, "constant-lr": CONSTANT_LR, "images-768": ["correct.num_images=768"], "before": BEFORE, "previous": PREVIOUS, "after": [], "gaussian": ["correct.corrector=gaussian"], "mlp": MLP,
        "images-512": ["correct.num_images=512"]}
STAGES = ("invert", "train_corrector", "evaluate-base", "evaluate-corrected")


def pgraft(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pgraft_cli", *args, "--json"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pgraft {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def run_job(name: str, out: Path) -> dict:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [x for s in JOBS[name] for x in ("--set", s)]
    load_before, tic = os.getloadavg()[0], time.perf_counter()
    summary = pgraft("correct", "digits", "--recipe", "inverse-noise", "--run-dir", str(run_dir), "--quiet", *sets)
    wall, load_after = time.perf_counter() - tic, os.getloadavg()[0]
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    result = {"wall": wall, "load": [load_before, load_after], "sets": JOBS[name], "summary": summary,
              "stage_seconds": {s: stages[s].get("seconds", 0.0) for s in STAGES if s in stages}}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


def common_fid(results: dict, num: int, out: Path) -> dict:
    """FID of the base and of each corrected checkpoint at ``num`` samples, the same protocol for all."""
    fids = {}
    for name, r in results.items():  # a job that sampled `num` already measured exactly this (seed 1, 8 steps)
        if r["summary"]["base"]["num"] == num:
            fids.setdefault("base", r["summary"]["base"]["fid"])
            fids[name] = r["summary"]["corrected"]["fid"]
    for label, model in [("base", "digits"), *((n, r["summary"]["out"]) for n, r in results.items())]:
        if label not in fids:
            run = pgraft("evaluate", model, "--num", str(num), "--seed", "1", "--steps", "8", "--quiet",
                         "--run-dir", str(out / f"common-{label}-{num}"))
            fids[label] = run["fid"]
    return fids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", nargs="+", default=["before", "after"], choices=[*JOBS, "none"])
    ap.add_argument("--common-num", type=int, default=2000, help="samples per model for the common FID (0: skip)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "runs" / "main-job")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for name in a.jobs:
        if name != "none":
            print(f"running the {name} job ...", file=sys.stderr, flush=True)
            run_job(name, a.out)
    results = {n: json.loads((a.out / f"{n}.json").read_text()) for n in JOBS if (a.out / f"{n}.json").exists()}
    fids = common_fid(results, a.common_num, a.out) if a.common_num else {}
    names = list(results)
    print(f"\n| | {' | '.join(names)} |\n|---|{'---:|' * len(names)}")
    rows = [("recipe overrides", lambda r: " ".join(r["sets"]) or "(recipe defaults)"),
            ("wall seconds (process start to exit)", lambda r: f"{r['wall']:.1f}"),
            *((f"  {s} s", lambda r, s=s: f"{r['stage_seconds'].get(s, float('nan')):.1f}") for s in STAGES),
            ("load average (1 min) before / after", lambda r: f"{r['load'][0]:.1f} / {r['load'][1]:.1f}"),
            ("images inverted", lambda r: str(r["summary"]["inversion"]["num"])),
            ("inversion network calls per image (+ 8 round trip)",
             lambda r: f"{r['summary']['inversion']['iterations_mean']:.1f}"),
            ("corrector training steps x batch", lambda r: "{corrector_train_steps} x {corrector_batch_size}".format(
                **tomllib.loads((Path(r["summary"]["run_dir"]) / "recipe.toml").read_text())["correct"])),
            ("samples per model (job)", lambda r: str(r["summary"]["base"]["num"])),
            ("held-out FID base -> corrected (job)",
             lambda r: f"{r['summary']['base']['fid']:.3f} -> {r['summary']['corrected']['fid']:.3f}")]
    for label, cell in rows:
        print(f"| {label} | {' | '.join(cell(results[n]) for n in names)} |")
    if fids:
        print(f"| held-out FID at {a.common_num} samples, base {fids['base']:.3f}: corrected | "
              f"{' | '.join(f'{fids[n]:.3f}' for n in names)} |")


if __name__ == "__main__":
    main()
