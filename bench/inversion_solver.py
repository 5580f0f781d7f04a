"""The main job's inversion (bundled digits flow, 8 Euler steps, tol 5e-3) at several lanes and solver
settings, one run.

    OMP_NUM_THREADS=1 python bench/inversion_solver.py --num 256 --lanes 16 64 256
    OMP_NUM_THREADS=1 python bench/inversion_solver.py --num 256 --lanes 64 --settings "" tol_last=0.01 memory=5

``--settings``: each a comma-separated list of ``invert`` keywords (``tol``, ``tol_last``, ``memory``,
``iterations``) over the defaults ``--tol`` and ``--iterations``; "" is those defaults.

Inverts the first ``--num`` training digits with ``core.samplers.invert`` as the invert stage does
(the network in float32 on rows the solver names, ``lane`` images solved together: rows drop out of
the network's batch as they converge), then the round trip. Reports per lane: seconds, network
calls per image (the solver's; + 8 for the round trip), images per network call (the batch the
network sees), calls per grid step (first inverted step first), the round trip's RMS and max, the images over
the recipe's gate (RMS 0.02), and
the largest difference of the noises from the first row's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgraft_cli.core.samplers import invert, sample  # noqa: E402
from pgraft_cli.io.checkpoints import load_model  # noqa: E402
from pgraft_cli.io.data import data_rows  # noqa: E402
from pgraft_cli.models.loaded import Cond  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--lanes", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--tol", type=float, default=5e-3)
    ap.add_argument("--iterations", type=int, default=24)
    ap.add_argument("--settings", nargs="+", default=[""])
    a = ap.parse_args()
    model = load_model("digits")
    rows = data_rows(model.default_data, model.image_shape)
    x0 = model.encode_images(rows[0:a.num].float()).float()
    grid = model.schedule.grid(8)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {a.num} images, tol {a.tol}")
    print("| setting | lane | seconds | calls per image | images per call | calls per step (t=0 step first) | "
          "round-trip RMS mean / max | over 0.02 | max abs | max noise diff vs first row | load |")
    print("|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|")
    first = None
    for setting, lane in [(s, lane) for s in a.settings for lane in a.lanes]:
        solver = {"iterations": a.iterations, "tol": a.tol, "memory": 3}
        for part in filter(None, setting.split(",")):
            key, value = part.split("=")
            solver[key] = int(value) if key in ("memory", "iterations") else float(value)
        calls, seen = defaultdict(int), [0]

        def fn(x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            calls[float(t)] += len(x)
            seen[0] += 1
            return model.predict(x, t, Cond()).float()

        tic = time.perf_counter()
        noises, backs = [], []
        with torch.inference_mode():
            for part in x0.split(lane):
                z, _ = invert(fn, model.schedule, part, grid, row_indexed=True, **solver)
                back, _ = sample(lambda x, t: model.predict(x, t, Cond()), model.schedule, z, grid)
                noises.append(z)
                backs.append(back)
        seconds = time.perf_counter() - tic
        z, back = torch.cat(noises), torch.cat(backs)
        err = (back - x0).flatten(1)
        rms = err.pow(2).mean(1).sqrt()
        first = z if first is None else first
        per_step = " ".join(f"{calls[float(t)] / a.num:.1f}" for t in grid[:-1].flip(0))
        total = sum(calls.values())
        print(f"| {setting or 'default'} | {lane} | {seconds:.1f} | {total / a.num:.2f} | {total / seen[0]:.1f} | {per_step} | "
              f"{float(rms.mean()):.2e} / {float(rms.max()):.2e} | {int((rms > 0.02).sum())} | {float(err.abs().max()):.2e} | "
              f"{float((z - first).abs().max()):.1e} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
