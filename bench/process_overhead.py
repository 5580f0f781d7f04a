#!/usr/bin/env python
"""What a ``pgraft`` process pays besides its work: start-up imports, the model's load, the interpreter's exit.

    git archive BASE | tar -x -C /tmp/base                 # a baseline tree
    python bench/process_overhead.py --trees /tmp/base . --rounds 5 --run RUN

Each tree runs as users run it, ``python -m pgraft_cli`` in a fresh process (``PYTHONPATH=TREE``, in the
tree), the trees interleaved round by round with their order alternating, after one warm-up call each
(the page cache). Two commands per tree and round:

- ``inspect``: ``pgraft inspect digits --json``: the interpreter, torch and diffusers imported, the
  bundled model loaded, a table printed, the interpreter's exit. Wall seconds.
- ``cached correct`` (with ``--run``): the README's main job re-run on a fresh copy of RUN, a finished
  main-job run directory, so that every stage is read from its cache except the evaluation (FID, KID
  on the cached samples) and the report. Wall seconds, the JSON's ``load`` / ``evaluation`` /
  ``report`` stage seconds, and ``outside``: wall minus every stage's seconds (interpreter start,
  imports before the load, argument parsing, the exit).

Prints the median of each column per tree and the median of the paired (same round) differences.
Every tree must read RUN's cache (the same stage keys); a tree that recomputes a stage shows it in the
stage seconds.
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

COLUMNS = ("inspect", "correct", "load", "evaluation", "report", "outside")


def timed(tree: Path, args: list[str]) -> tuple[float, str]:
    """Wall seconds and stdout of ``python -m pgraft_cli ARGS`` in TREE."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pgraft_cli", *args], cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if done.returncode != 0:
        raise SystemExit(f"{tree}: pgraft {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return wall, done.stdout


def one_round(tree: Path, run: Path | None, scratch: Path) -> dict[str, float]:
    row = {"inspect": timed(tree, ["inspect", "digits", "--json"])[0]}
    if run is not None:
        copy = scratch / "run"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run, copy)
        wall, out = timed(tree, ["correct", "digits", "--recipe", "inverse-noise", "--run-dir", str(copy), "--json"])
        stages = json.loads(out)["stage_seconds"]
        row.update(correct=wall, load=stages.get("load", 0.0), evaluation=stages.get("evaluation", 0.0),
                   report=stages.get("report", 0.0), outside=wall - sum(stages.values()))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", nargs="+", type=Path, default=[Path(".")])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--run", type=Path, help="a finished main-job run directory (pgraft correct digits --recipe inverse-noise)")
    a = ap.parse_args()
    trees = [t.resolve() for t in a.trees]
    rows: dict[Path, list[dict[str, float]]] = {t: [] for t in trees}
    before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="overhead-") as d:
        for t in trees:  # warm-up: the page cache, .pyc files
            one_round(t, a.run, Path(d))
        for r in range(a.rounds):
            for t in (trees if r % 2 == 0 else trees[::-1]):
                rows[t].append(one_round(t, a.run, Path(d)))
    cols = [c for c in COLUMNS if c in rows[trees[0]][0]]
    print(f"load average {before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; {a.rounds} rounds; "
          f"median wall seconds (correct: cached re-run; outside: wall - stages)\n")
    print("| tree | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for t in trees:
        print(f"| {t} | " + " | ".join(f"{statistics.median(x[c] for x in rows[t]):.2f}" for c in cols) + " |")
    for t in trees[1:]:
        diffs = [statistics.median(b[c] - a_[c] for a_, b in zip(rows[trees[0]], rows[t])) for c in cols]
        print(f"| {t} - {trees[0]}, paired | " + " | ".join(f"{x:+.2f}" for x in diffs) + " |")
    print("\neach round (" + ", ".join(cols) + "):")
    for t in trees:
        print(t, [" ".join(f"{x[c]:.2f}" for c in cols) for x in rows[t]])


if __name__ == "__main__":
    main()
