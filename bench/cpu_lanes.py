"""The main job's evaluation sampling (and inversion) on the CPU at several lanes and memory formats, one run
(``--device cuda``: on a GPU, under the CLI's default bf16 autocast there, every variant warmed once; the
``ms a call`` column then tells a host-bound call, flat as the lane grows, from a GPU-bound one, which grows
with it. The CPU seconds are no host share on a GPU: CUDA's default wait spins the host while it waits).

    OMP_NUM_THREADS=1 python bench/cpu_lanes.py --num 256 --lanes 16 32 64 128 256 --rounds 2 \
        --corrected bench/runs/corrected-after.safetensors
    OMP_NUM_THREADS=1 python bench/cpu_lanes.py --num 256 --lanes 64 --formats contiguous channels_last \
        --invert 128 --rounds 5

Each variant (a lane L and a memory format) samples the same ``--num`` images through the stage's
own shard code (``stages.sample._shard_tensors``: noise, the corrector where there is one, 8 Euler
steps of the base, decode to uint8) with ``lane = L`` and ``batch_size = num``, its base network's
weights in the format for the run (``stages.sample.network_memory_format``, as ``run_sample`` does;
the conversion is inside the clock); variants interleave within each round (the order rotates) so
load from other processes hits each alike. Reports the median round's seconds (wall and CPU,
``time.process_time``), images/s, GFLOP/s (``torch.utils.flop_counter``'s count of one image, times
the images), the CPU-seconds ratio to the first variant, and the largest difference of the uint8
images from the first variant's (a lane is a different batch, a format other kernels, so the bytes
may move by a rounding).

``--invert N`` also inverts the first N training digits per format through the invert stage's own
shard code (``stages.correct._invert_shard``, the inverse-noise recipe's solver settings, at the
largest lane): CPU seconds, network calls per image (the solver stops each image on its own
residual, so a format's rounding may move the count) and the largest noise difference.

    python bench/cpu_lanes.py --device cuda --num 1024 --lanes 16 64 256 --invert 256 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgraft_cli.io.checkpoints import load_model  # noqa: E402
from pgraft_cli.io.data import data_rows  # noqa: E402
from pgraft_cli.io.host import describe_device  # noqa: E402
from pgraft_cli.io.recipes import SampleConfig, load_recipe  # noqa: E402
from pgraft_cli.pipelines.skeleton import place  # noqa: E402
from pgraft_cli.stages.correct import _invert_shard  # noqa: E402
from pgraft_cli.stages.sample import Conditions, _shard_tensors, network_memory_format  # noqa: E402


def interleaved(variants: dict[str, Callable[[], torch.Tensor]], rounds: int) -> tuple[dict, dict, dict]:
    """Each variant once per round, the order rotating: (wall seconds, CPU seconds, first output) per variant."""
    names = list(variants)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    outs: dict[str, torch.Tensor] = {}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            tic, ctic = time.perf_counter(), time.process_time()
            out = variants[name]()
            wall[name].append(time.perf_counter() - tic)
            cpu[name].append(time.process_time() - ctic)
            outs.setdefault(name, out)
    return wall, cpu, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lanes", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--formats", nargs="+", default=["contiguous"], choices=["contiguous", "channels_last"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--invert", type=int, default=0, help="also invert this many training digits per format")
    ap.add_argument("--corrected", default=None, help="a corrected .safetensors (its base is the bundled digits)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (float32 weights, the CLI's default autocast)")
    a = ap.parse_args()

    def placed(name: str):  # as every verb places a model: weights, the default autocast, the corrector
        model = load_model(name)
        place(model, a.device, None, "auto")
        return model

    models = {"base": placed("digits")}
    if a.corrected:
        models["corrected"] = placed(a.corrected)
    indices = list(range(a.num))
    cfg = SampleConfig(num=a.num, seed=1, steps=a.steps, batch_size=a.num)

    def run(model, lane: int, fmt: str) -> torch.Tensor:
        with torch.inference_mode(), network_memory_format(model, fmt):
            return _shard_tensors(model, replace(cfg, lane=lane), Conditions(), indices, lambda n: None)["images"]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {a.num} images, {a.steps} steps, "
          f"on {describe_device(a.device) or a.device}")
    for name, model in models.items():
        with torch.inference_mode():
            with FlopCounterMode(display=False) as fc:
                _shard_tensors(model, replace(cfg, num=1, lane=1), Conditions(), [0], lambda n: None)
            per_image = fc.get_total_flops()
        variants = {(lane, fmt): (lambda lane=lane, fmt=fmt: run(model, lane, fmt)) for lane in a.lanes for fmt in a.formats}
        for lane, fmt in (variants if a.device.startswith("cuda") else [(a.lanes[0], f) for f in a.formats]):
            run(model, lane, fmt)  # warm-up (on a GPU each lane: its first call of a shape sets up kernels)
        load = [os.getloadavg()[0]]
        wall, cpu, images = interleaved(variants, a.rounds)
        load.append(os.getloadavg()[0])
        first = next(iter(variants))
        base = statistics.median(cpu[first])
        print(f"\n{name}: {per_image / 1e6:.0f} MFLOPs per image; median of {a.rounds} rounds; "
              f"load average (1 min) {load[0]:.1f} -> {load[1]:.1f}")
        calls_per_lane = a.steps + (model.corrector.calls() if model.corrector is not None else 0)
        print(f"| lane | memory format | seconds | CPU seconds | images/s | GFLOP/s | ms a call | CPU speed vs {first[0]} "
              f"{first[1]} | max uint8 diff vs {first[0]} {first[1]} |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for (lane, fmt) in variants:
            s, c = statistics.median(wall[(lane, fmt)]), statistics.median(cpu[(lane, fmt)])
            diff = int((images[(lane, fmt)].int() - images[first].int()).abs().max())
            calls = -(-a.num // lane) * calls_per_lane  # network calls of the variant (base and corrector)
            print(f"| {lane} | {fmt} | {s:.2f} | {c:.2f} | {a.num / s:.1f} | {per_image * a.num / s / 1e9:.0f} | "
                  f"{1e3 * s / calls:.2f} | {base / c:.2f}x | {diff} |")
        print("rounds (CPU seconds): " + "; ".join(f"{lane} {fmt}: " + ", ".join(f"{c:.2f}" for c in cpu[(lane, fmt)])
                                                  for lane, fmt in variants))
    if a.invert:
        invert_formats(models["base"], a)


def invert_formats(model, a: argparse.Namespace) -> None:
    """The invert stage's shard code on the first ``a.invert`` training digits, once per format per round."""
    rec = load_recipe("inverse-noise")
    x0 = model.encode_images(data_rows(model.default_data, model.image_shape)[0:a.invert].float()).float()
    lane = max(a.lanes)

    def run(fmt: str) -> dict[str, torch.Tensor]:
        with network_memory_format(model, fmt):
            return _invert_shard(model, x0, rec.correct, lane, lambda n: None)  # CPU tensors: the GPU drained

    load = os.getloadavg()[0]
    wall, cpu, outs = interleaved({fmt: (lambda fmt=fmt: run(fmt)) for fmt in a.formats}, a.rounds)
    first = a.formats[0]
    calls = {fmt: float(outs[fmt]["iterations"].double().mean()) + rec.correct.base_steps for fmt in a.formats}
    print(f"\ninversion: {a.invert} training digits, lane {lane}, tol {rec.correct.inversion_tol}, median of "
          f"{a.rounds} rounds; load average (1 min) {load:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"| memory format | seconds | CPU seconds | network calls per image (+ round trip) | CPU ms per call and image "
          f"| CPU speed vs {first} | max noise diff vs {first} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for fmt in a.formats:
        s, c = statistics.median(wall[fmt]), statistics.median(cpu[fmt])
        diff = float((outs[fmt]["noise"] - outs[first]["noise"]).abs().max())
        print(f"| {fmt} | {s:.2f} | {c:.2f} | {calls[fmt]:.2f} | {1e3 * c / calls[fmt] / a.invert:.3f} | "
              f"{statistics.median(cpu[first]) / c:.2f}x | {diff:.1e} |")
    print("rounds (CPU seconds): " + "; ".join(f"{fmt}: " + ", ".join(f"{c:.2f}" for c in cpu[fmt]) for fmt in a.formats))


if __name__ == "__main__":
    main()
