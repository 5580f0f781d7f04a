"""The main job's base sampling (bundled digits flow, 8 Euler steps, lanes of 16) under three knobs, one run.

    OMP_NUM_THREADS=1 python bench/sampling_knobs.py --num 256 --rounds 3

Variants, interleaved lane by lane in every round (so load from other processes hits each alike),
all under ``torch.inference_mode`` as ``pgraft sample`` runs: ``1 thread`` (the baseline),
``2 threads`` (``torch.set_num_threads(2)`` around the call), ``channels_last`` (the network and
each lane in ``torch.channels_last``; 1 thread). Reports each variant's median round in images/s,
its ratio to the baseline, and whether its images equal the baseline's bit for bit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgraft_cli.core.samplers import sample  # noqa: E402
from pgraft_cli.io.checkpoints import load_model  # noqa: E402
from pgraft_cli.models.loaded import Cond  # noqa: E402
from pgraft_cli.stages.sample import initial_noise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lane", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    model = load_model("digits")
    grid = model.schedule.grid(a.steps)
    lanes = initial_noise(1, list(range(a.num)), model.sample_shape).split(a.lane)
    cond = Cond()
    fn = lambda x, t: model.predict(x, t, cond)  # noqa: E731

    def run(x: torch.Tensor, threads: int, channels_last: bool) -> torch.Tensor:
        torch.set_num_threads(threads)
        model.network.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out, _ = sample(fn, model.schedule, x, grid)
        return out.contiguous()

    variants = {"1 thread": (1, False), "2 threads": (2, False), "channels_last": (1, True)}
    seconds = {v: [] for v in variants}
    images = {v: [] for v in variants}
    load = [os.getloadavg()[0]]
    with torch.inference_mode():
        run(lanes[0], 1, False)  # warm-up
        for r in range(a.rounds):
            spent = dict.fromkeys(variants, 0.0)
            for k, lane in enumerate(lanes):
                order = list(variants)[k % 3:] + list(variants)[:k % 3]
                for v in order:
                    tic = time.perf_counter()
                    out = run(lane, *variants[v])
                    spent[v] += time.perf_counter() - tic
                    if r == 0:
                        images[v].append(out)
            for v in variants:
                seconds[v].append(spent[v])
    load.append(os.getloadavg()[0])
    base = statistics.median(seconds["1 thread"])
    print(f"\n{a.num} images, {a.steps} Euler steps, lanes of {a.lane}, median of {a.rounds} rounds; "
          f"load average (1 min) {load[0]:.1f} -> {load[1]:.1f}; torch {torch.__version__}")
    print("| variant | seconds | images/s | ratio vs 1 thread | same bytes as 1 thread |")
    print("|---|---:|---:|---:|---|")
    ref = torch.cat(images["1 thread"])
    for v in variants:
        s = statistics.median(seconds[v])
        same = torch.equal(torch.cat(images[v]), ref)
        diff = "yes" if same else f"no (max diff {float((torch.cat(images[v]) - ref).abs().max()):.1e})"
        print(f"| {v} | {s:.2f} | {a.num / s:.1f} | {base / s:.2f}x | {diff} |")


if __name__ == "__main__":
    main()
