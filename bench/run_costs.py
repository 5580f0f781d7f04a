#!/usr/bin/env python
"""Per-run fixed costs: one in-process run of each verb at tests/test_cache_keys.py's tiny settings.

Each tree (``--trees``, default: this one) runs in its own interpreter (``PYTHONPATH=TREE``), the
trees interleaved over ``--rounds``; a round runs every verb ``--repeats`` times in a fresh run
directory after one warm-up run (imports, the first run's lazy set-up), on the tests' tiny 1x16x16
flow UNet, through ``runner.invoke`` as in the test (report.html not rendered, as the test's
``fast_runs``; ``--report`` renders it). Reported: the median CPU
milliseconds (``time.process_time``) of a run per verb and tree, and the wall median beside it.
``--profile VERB`` prints that verb's top functions (cProfile, cumulative) in the first tree instead.

    python bench/run_costs.py                                    # this tree
    git archive BASE | tar -x -C /tmp/base                       # a baseline tree, then side by side:
    python bench/run_costs.py --trees /tmp/base . --rounds 3
    python bench/run_costs.py --profile finetune
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def worker(verbs: list[str], repeats: int, profile: bool, report: bool) -> None:
    """In the tree's interpreter: time each verb, print one JSON line {verb: [(cpu_ms, wall_ms), ...]}."""
    sys.path.insert(0, str(Path.cwd() / "tests"))  # the tree's own tests (their tiny settings)
    import numpy as np
    from test_cache_keys import VERBS
    from typer.testing import CliRunner

    from conftest import build_tiny_unet
    from pgraft_cli.cli import app
    from pgraft_cli.io.checkpoints import default_scheduler_config, save_pgraft_safetensors
    from pgraft_cli.io.data import load_digits

    root = Path(tempfile.mkdtemp(prefix="run-costs-"))
    os.environ["XDG_CACHE_HOME"] = str(root / "xdg-cache")  # reference statistics: never the real home
    unet = build_tiny_unet(channels=1, sample_size=16)
    model = save_pgraft_safetensors(root / "tiny-flow.safetensors", unet, "UNet2DModel", dict(unet.config),
                                    default_scheduler_config("flow"), {"created_by": "bench/run_costs.py"})
    data = root / "digits.npz"
    np.savez(data, images=load_digits()[0][:32].numpy())
    runner, times, count = CliRunner(), {}, iter(range(10**6))
    if not report:  # as tests/test_cache_keys.py's fast_runs: report.html only renders the artifacts
        from pgraft_cli.report import html

        html.render_report = lambda run_dir, run=None: Path(run_dir) / "report.html"

    def one(verb: str) -> None:
        command, recipe, settings, _ = VERBS[verb]
        args = [a for s in settings for a in ("--set", s)] + (["--data", str(data)] if verb != "sample" else [])
        result = runner.invoke(app, [command, str(model), "--recipe", recipe, "--run-dir",
                                     str(root / f"run-{next(count)}"), "--json", *args])
        assert result.exit_code == 0, (verb, result.output, result.exception)

    for verb in verbs:
        one(verb)  # warm-up
        if profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(repeats):
                one(verb)
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(60)
            continue
        times[verb] = []
        for _ in range(repeats):
            cpu, wall = time.process_time(), time.perf_counter()
            one(verb)
            times[verb].append(((time.process_time() - cpu) * 1e3, (time.perf_counter() - wall) * 1e3))
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", nargs="+", default=[str(REPO)], help="source trees to time side by side")
    parser.add_argument("--verbs", nargs="+", default=["sample", "evaluate", "correct", "finetune"])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the trees")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per verb in a round")
    parser.add_argument("--profile", default=None, help="cProfile this verb (first tree) instead of timing")
    parser.add_argument("--report", action="store_true", help="render report.html in every run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.verbs, args.repeats, args.profile is not None, args.report)
    trees = [str(Path(t).resolve()) for t in args.trees]
    results: dict[str, dict[str, list]] = {t: {v: [] for v in args.verbs} for t in trees}
    verbs = [args.profile] if args.profile else args.verbs
    for _ in range(1 if args.profile else args.rounds):
        for tree in trees[:1] if args.profile else trees:
            env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--repeats", str(args.repeats),
                       "--verbs", *verbs] + (["--profile", args.profile] if args.profile else []) \
                + (["--report"] if args.report else [])
            proc = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{tree}: {proc.stderr[-3000:]}")
            if args.profile:
                print(proc.stderr)
                return
            for verb, rows in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                results[tree][verb] += rows
    print(f"load average {os.getloadavg()[0]:.1f}; median ms per run ({args.rounds} rounds x {args.repeats} runs)")
    print(f"{'verb':>9} " + " ".join(f"{'CPU ' + Path(t).name:>16} {'wall':>7}" for t in trees)
          + ("   CPU ratio" if len(trees) > 1 else ""))
    for verb in args.verbs:
        meds = [(statistics.median(r[0] for r in results[t][verb]), statistics.median(r[1] for r in results[t][verb]))
                for t in trees]
        print(f"{verb:>9} " + " ".join(f"{c:>16.0f} {w:>7.0f}" for c, w in meds)
              + (f"   {meds[-1][0] / meds[0][0]:.2f}x" if len(trees) > 1 else ""))


if __name__ == "__main__":
    main()
