"""The test suite's wall and CPU time, serial against pytest-xdist workers, in one run.

    python bench/test_time.py                  # serial, then -n 2
    python bench/test_time.py --modes 1 2 4    # worker counts to time (1: no xdist)
    python bench/test_time.py -- -k recipes    # extra pytest arguments after --

Each mode is ``python -m pytest -q -p no:cacheprovider`` (plus ``-n N``) in a subprocess, timed by wall
clock and by the CPU seconds of it and its children (``resource.getrusage(RUSAGE_CHILDREN)``), with the
load average before and after it. The suite must pass in every mode; a table is printed at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(workers: int, extra: list[str]) -> dict:
    """One timed pytest run with ``workers`` xdist workers (1: plain pytest)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra]
    if workers > 1:
        command += ["-n", str(workers)]
    load_before = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"workers": workers, "wall": wall, "cpu": cpu, "rc": proc.returncode, "summary": last,
            "load": (load_before, os.getloadavg()[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", type=int, nargs="+", default=[1, 2], help="worker counts (1: no xdist)")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    rows = [run(n, extra) for n in args.modes]
    base = rows[0]["wall"]
    print(f"{'workers':>7} {'wall s':>8} {'vs first':>8} {'cpu s':>8} {'load':>11} {'rc':>3}  summary")
    for r in rows:
        print(f"{r['workers']:>7} {r['wall']:>8.1f} {r['wall'] / base:>7.2f}x {r['cpu']:>8.1f} "
              f"{r['load'][0]:>5.1f}-{r['load'][1]:<5.1f} {r['rc']:>3}  {r['summary']}")
    sys.exit(max(r["rc"] for r in rows))


if __name__ == "__main__":
    main()
