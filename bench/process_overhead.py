#!/usr/bin/env python
"""What a ``pgraft`` process pays besides its work: start-up imports, the model's load, the interpreter's exit.

    git archive BASE | tar -x -C /tmp/base                 # a baseline tree
    python bench/process_overhead.py --trees /tmp/base . --rounds 5 --run RUN
    python bench/process_overhead.py --trees /tmp/base . --rounds 4 --full   # the whole main job, fresh

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

With ``--full``, the README's main job instead, from scratch in a fresh run directory (about a minute
a run on the 2-core box): wall seconds, every stage's seconds, the process's peak RSS and CPU seconds
(user and system, ``os.wait4``), the seconds the hypervisor stole from the machine meanwhile
(``/proc/stat``; a VM's neighbours taking its CPUs show there, not in the process's CPU seconds),
the held-out FIDs, and whether every tensor of each run's ``corrected.safetensors`` and of every shard
it wrote (inversion, both evaluations) has the same bytes as the first tree's run of the same round.
The trees' order alternates round by round (ABBA over two rounds), so a drift of the machine's speed
within the sitting falls on both. It also prints this machine's float32 matmul rate (1024^2 ``torch.mm`` at
torch's default thread count, ``sampling.matmul_rate``) before and after the sitting, as one record of the
machine's speed. It does not capture all of this VM's drift: the eleventh session saw the main job's wall
time move by 10 % between sittings while this rate stayed at 202-219 GFLOP/s.

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
from typing import Callable

STAGES = ("load", "inversion", "corrector_training", "sampling", "evaluation", "report")  # the main job's
COLUMNS = ("inspect", "correct", "load", "evaluation", "report", "outside")
FULL = ("wall", *STAGES, "outside", "peak_rss_mb", "cpu_s", "steal_s")


def steal_seconds() -> float:
    """The machine's CPU time stolen by the hypervisor since boot, all CPUs together (``/proc/stat``'s
    ``steal``; 0 where there is no such file)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def timed(tree: Path, args: list[str]) -> tuple[float, str, dict[str, float]]:
    """Wall seconds, stdout and ``peak_rss_mb``, ``cpu_s`` (user and system) and ``steal_s`` (the seconds
    the hypervisor stole meanwhile) of ``python -m pgraft_cli ARGS`` in TREE."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        stolen = steal_seconds()
        tic = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "pgraft_cli", *args], cwd=tree, env=env, stdout=out, stderr=err,
                                text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - tic
        usage_row = {"peak_rss_mb": usage.ru_maxrss / 1024,  # Linux: kilobytes
                     "cpu_s": usage.ru_utime + usage.ru_stime, "steal_s": steal_seconds() - stolen}
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{tree}: pgraft {' '.join(args)} failed:\n{err.read()[-2000:]}")
        return wall, out.read(), usage_row


def tensor_bytes(run: Path) -> dict[str, bytes]:
    """Every tensor of the run's corrected file and of its stages' shards, as raw bytes, by file and key."""
    import torch
    from safetensors.torch import load_file

    files = [run / "corrected.safetensors", *sorted(run.glob("*/shard-*.safetensors"))]
    return {f"{f.relative_to(run)}:{k}": t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            for f in files for k, t in load_file(str(f)).items()}


def sampled_images(num: int, shard: int, lane: int) -> int:
    """The images a sampling stage runs its networks on to keep ``num``: each shard of ``shard`` images runs
    every lane-aligned lane of ``lane`` images that meets it, whole (``stages.sample``: a lane's padding
    rows are computed, then dropped)."""
    total = 0
    for start in range(0, num, shard):
        end = min(start + shard, num)
        total += len(range(start - start % lane, end, lane)) * lane
    return total


def stage_flops(summary: dict, base_steps: int, train_steps: int, batch: int, train_flops: int,
                sampled: dict[str, int]) -> dict[str, float]:
    """The convolution and matmul FLOPs of the main job's three compute stages (``flop_counter``'s
    counts, which leave out normalisations, activations and the solver's own arithmetic), from its
    ``--json`` summary's FLOPs a network call per image: the inversion's solver calls and its round trip
    (``base_steps`` calls) on every image, ``train_steps x batch`` corrector training images at
    ``train_flops`` (forward + backward) each, and each evaluation's ``sampled`` images (``base``,
    ``corrected``; padding included: :func:`sampled_images`) at its sampler's FLOPs per image."""
    inv = summary["inversion"]
    return {"inversion": inv["num"] * (inv["iterations_mean"] + base_steps) * summary["base"]["flops_calls"]["base_call"],
            "corrector_training": train_steps * batch * train_flops,
            "sampling": sum(sampled[k] * summary[k]["flops_per_image"] for k in ("base", "corrected"))}


def run_flops(run: Path, summary: dict, train_flops: int) -> dict[str, float]:
    """:func:`stage_flops` of the main job's run directory RUN: the settings it resolved (``recipe.toml``'s
    ``[correct]``, each evaluation's ``settings.json``)."""
    from pgraft_cli.io.recipes import tomllib  # (tomli on Python 3.10)

    correct = tomllib.loads((run / "recipe.toml").read_text())["correct"]
    sampled = {}
    for k in ("base", "corrected"):
        settings = json.loads((run / f"evaluate-{k}" / "settings.json").read_text())
        sampled[k] = sampled_images(settings["num"], settings["batch_size"], settings["lane"])
    return stage_flops(summary, correct["base_steps"], correct["corrector_train_steps"], correct["corrector_batch_size"],
                       train_flops, sampled)


def corrector_train_flops(corrected: Path) -> int:
    """Forward + backward FLOPs of one training image of the corrector in CORRECTED
    (``inverse_noise.train_step_flops``)."""
    from inverse_noise import train_step_flops

    from pgraft_cli.io.checkpoints import load_model

    loaded = load_model(str(corrected))
    return train_step_flops(loaded.corrector.network, loaded.sample_shape)


def main_job(tree: Path, run: Path) -> dict[str, float]:
    """The README's main job in RUN: wall, every stage's seconds, ``outside`` (wall - the stages), peak RSS,
    the held-out FIDs and the compute stages' FLOPs (:func:`run_flops`, ``flops_`` + the stage)."""
    wall, out, usage = timed(tree, ["correct", "digits", "--recipe", "inverse-noise", "--run-dir", str(run), "--json"])
    summary = json.loads(out)
    stages = summary["stage_seconds"]
    from pgraft_cli.errors import PgraftError

    try:
        flops = run_flops(run, summary, corrector_train_flops(Path(summary["out"])))
    except (KeyError, OSError, ValueError, PgraftError) as e:  # a tree whose run records differ: no FLOPs for it
        print(f"{tree}: its FLOPs not counted ({type(e).__name__}: {e})", flush=True)
        flops = {}
    return {**{k: stages.get(k, 0.0) for k in STAGES}, "wall": wall,
            "outside": wall - sum(stages.values()), **usage,
            "fid_base": summary["base"]["fid"], "fid_corrected": summary["corrected"]["fid"],
            **{f"flops_{k}": v for k, v in flops.items()}}


def reference_rate(before: float, after: float) -> float:
    """The matmul rate the stages are held against: the faster of the sitting's two readings, so the
    share printed is the lower one and the floor the lower one."""
    return max(before, after)


def roofline(rows: list[dict[str, float]], rate: float) -> None:
    """Per compute stage: TFLOPs (:func:`stage_flops`), median seconds, the GFLOP/s they imply, and that
    against ``rate`` (the float32 1024^2 matmul rate, FLOP/s: a measured rate, not the CPU's peak); then the
    three stages' seconds at that rate."""
    print("| stage | TFLOPs | seconds | GFLOP/s | of matmul | seconds at the matmul rate |")
    print("|---|---:|---:|---:|---:|---:|")
    total = seconds = 0.0
    for stage in ("inversion", "corrector_training", "sampling"):
        flops = statistics.median(r[f"flops_{stage}"] for r in rows)
        s = statistics.median(r[stage] for r in rows)
        total, seconds = total + flops, seconds + s
        print(f"| {stage} | {flops / 1e12:.2f} | {s:.2f} | {flops / s / 1e9:.1f} | {flops / s / rate:.0%} | "
              f"{flops / rate:.1f} |")
    print(f"| the three | {total / 1e12:.2f} | {seconds:.2f} | {total / seconds / 1e9:.1f} | "
          f"{total / seconds / rate:.0%} | {total / rate:.1f} |")


def one_round(tree: Path, run: Path | None, scratch: Path) -> dict[str, float]:
    row = {"inspect": timed(tree, ["inspect", "digits", "--json"])[0]}
    if run is not None:
        copy = scratch / "run"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run, copy)
        job = main_job(tree, copy)
        row.update({k: job[k] for k in COLUMNS[2:]}, correct=job["wall"])
    return row


def table(rows: dict[Path, list[dict[str, float]]], cols: list[str] | tuple[str, ...],
          extra: Callable[[Path], str] | None = None) -> None:
    """A markdown table: each tree's medians, then each later tree's paired (same round) median differences
    from the first tree; ``extra(tree)`` adds a last column."""
    trees = list(rows)
    tail = " | held-out FID base -> corrected" if extra else ""
    print("| tree | " + " | ".join(cols) + tail + " |")
    print("|---|" + "---:|" * len(cols) + ("---|" if extra else ""))
    for t in trees:
        print(f"| {t} | " + " | ".join(f"{statistics.median(x[c] for x in rows[t]):.2f}" for c in cols)
              + (f" | {extra(t)}" if extra else "") + " |")
    for t in trees[1:]:
        diffs = [statistics.median(b[c] - a_[c] for a_, b in zip(rows[trees[0]], rows[t])) for c in cols]
        print(f"| {t} - {trees[0]}, paired | " + " | ".join(f"{x:+.2f}" for x in diffs) + (" | " if extra else "") + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", nargs="+", type=Path, default=[Path(".")])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--run", type=Path, help="a finished main-job run directory (pgraft correct digits --recipe inverse-noise)")
    ap.add_argument("--full", action="store_true", help="the whole main job from scratch instead (no warm-up run)")
    a = ap.parse_args()
    trees = [t.resolve() for t in a.trees]
    if a.full:
        return full(trees, a.rounds)
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
    table(rows, cols)
    print("\neach round (" + ", ".join(cols) + "):")
    for t in trees:
        print(t, [" ".join(f"{x[c]:.2f}" for c in cols) for x in rows[t]])


def full(trees: list[Path], rounds: int) -> None:
    import torch
    from sampling import matmul_rate

    from pgraft_cli.io.host import describe_cpu  # here, not after a sitting of many minutes

    rows: dict[Path, list[dict[str, float]]] = {t: [] for t in trees}
    same: dict[Path, list[bool]] = {t: [] for t in trees[1:]}
    before = os.getloadavg()
    rate_before = matmul_rate()
    with tempfile.TemporaryDirectory(prefix="overhead-full-") as d:
        for r in range(rounds):
            order = trees if r % 4 in (0, 3) else trees[::-1]  # ABBA: A B, B A, B A, A B, ...
            runs = {}
            for t in order:
                runs[t] = Path(d) / t.name / "run"
                shutil.rmtree(runs[t], ignore_errors=True)
                row = main_job(t, runs[t])
                rows[t].append(row)
                print(f"round {r + 1} {t}: " + " ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
            first = tensor_bytes(runs[trees[0]])
            for t in trees[1:]:
                same[t].append(tensor_bytes(runs[t]) == first)
    rate_after = matmul_rate()
    print(f"\n{describe_cpu()}")
    print(f"load average {before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; float32 1024^2 matmul on "
          f"{torch.get_num_threads()} threads {rate_before / 1e9:.1f} GFLOP/s before, {rate_after / 1e9:.1f} after; "
          f"{rounds} rounds (ABBA); median seconds; peak RSS of the process in MB\n")
    def fids(t: Path) -> str:
        pairs = sorted({(round(x["fid_base"], 3), round(x["fid_corrected"], 3)) for x in rows[t]})
        return ", ".join(f"{b} -> {c}" for b, c in pairs)

    table(rows, FULL, fids)
    rate = reference_rate(rate_before, rate_after)
    for t in (t for t in trees if "flops_inversion" in rows[t][0]):
        print(f"\n{t}: the compute stages against the matmul rate ({rate / 1e9:.1f} GFLOP/s, the faster of before and "
              f"after; FLOPs by torch.utils.flop_counter)\n")
        roofline(rows[t], rate)
    for t in trees[1:]:
        walls = [b["wall"] - a_["wall"] for a_, b in zip(rows[trees[0]], rows[t])]
        print(f"\n{t}: paired wall differences {' '.join(f'{w:+.2f}' for w in walls)} (mean {statistics.mean(walls):+.2f}); "
              f"every tensor's bytes equal to {trees[0]}'s in {sum(same[t])} of {len(same[t])} rounds")


if __name__ == "__main__":
    main()
