"""The main job's evaluation sampling on the CPU at several lanes (images per network call), one run.

    OMP_NUM_THREADS=1 python bench/cpu_lanes.py --num 256 --lanes 16 32 64 128 256 --rounds 2 \
        --corrected bench/runs/corrected-after.safetensors

Each variant samples the same ``--num`` images through the stage's own shard code
(``stages.sample._shard_tensors``: noise, the corrector where there is one, 8 Euler steps of the
base, decode to uint8) with ``lane = L`` and ``batch_size = num``; variants interleave within each
round (the order rotates) so load from other processes hits each alike. Reports the median round's
seconds, images/s, GFLOP/s (``torch.utils.flop_counter``'s count of one image, times the images),
the ratio to lane 16 (the automatic lane before), and the largest difference of the uint8 images
from lane 16's (a lane is a different batch, so the bytes may move by a rounding).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgraft_cli.io.checkpoints import load_model  # noqa: E402
from pgraft_cli.io.recipes import SampleConfig  # noqa: E402
from pgraft_cli.stages.sample import Conditions, _shard_tensors  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lanes", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--corrected", default=None, help="a corrected .safetensors (its base is the bundled digits)")
    a = ap.parse_args()
    models = {"base": load_model("digits")}
    if a.corrected:
        models["corrected"] = load_model(a.corrected)
    indices = list(range(a.num))
    cfg = SampleConfig(num=a.num, seed=1, steps=a.steps, batch_size=a.num)

    def run(model, lane: int) -> torch.Tensor:
        return _shard_tensors(model, replace(cfg, lane=lane), Conditions(), indices, lambda n: None)["images"]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {a.num} images, {a.steps} steps")
    for name, model in models.items():
        with torch.inference_mode():
            with FlopCounterMode(display=False) as fc:
                _shard_tensors(model, replace(cfg, num=1, lane=1), Conditions(), [0], lambda n: None)
            per_image = fc.get_total_flops()
            run(model, a.lanes[0])  # warm-up
            seconds = {lane: [] for lane in a.lanes}
            images = {}
            load = [os.getloadavg()[0]]
            for r in range(a.rounds):
                order = a.lanes[r % len(a.lanes):] + a.lanes[:r % len(a.lanes)]
                for lane in order:
                    tic = time.perf_counter()
                    out = run(model, lane)
                    seconds[lane].append(time.perf_counter() - tic)
                    images.setdefault(lane, out)
            load.append(os.getloadavg()[0])
        base = statistics.median(seconds[a.lanes[0]])
        print(f"\n{name}: {per_image / 1e6:.0f} MFLOPs per image; median of {a.rounds} rounds; "
              f"load average (1 min) {load[0]:.1f} -> {load[1]:.1f}")
        print(f"| lane | seconds | images/s | GFLOP/s | speed vs lane {a.lanes[0]} | max uint8 diff vs lane {a.lanes[0]} |")
        print("|---:|---:|---:|---:|---:|---:|")
        for lane in a.lanes:
            s = statistics.median(seconds[lane])
            diff = int((images[lane].int() - images[a.lanes[0]].int()).abs().max())
            print(f"| {lane} | {s:.2f} | {a.num / s:.1f} | {per_image * a.num / s / 1e9:.0f} | {base / s:.2f}x | {diff} |")


if __name__ == "__main__":
    main()
