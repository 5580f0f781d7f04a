#!/usr/bin/env python
"""Peak memory of ``pgraft evaluate`` and ``pgraft correct`` against run size: streamed (today)
and materialised (before).

Each point is a fresh subprocess that runs one verb end to end and reports its own peak resident
set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) at exit. Workloads:

1. ``evaluate digits`` (``--digits N...``): the bundled 1x16x16 flow and classifier features,
   against the bundled digits.
2. ``evaluate rgb-S`` (``--rgb N...``): a tiny random UNet (flow scheduler) making 3xSxS images,
   features from a tiny TorchScript stand-in for clean-fid's Inception (``--inception-weights``, so
   each image is resized to 299 x 299 as with the real network), against a uint8 ``.safetensors``
   of N images.
3. ``correct rgb-S`` (``--correct N...``): the same model and features; N data images inverted
   (1 Euler step, every image kept), a 2-step corrector training, base and corrected evaluation of
   ``--correct-eval`` samples against the N images. The kept noises (the corrector's training set,
   N x 3 x S x S float32) are in memory by design: that, and nothing else, should grow with N.

``streamed`` is the first run with today's code, sampling (and inversion, training) included.
``materialised`` re-runs the same command in the same run directory (its stages are cached, so
this point measures the readers and the metrics) with the readers of the old code patched in:
every generated image loaded at once (``load_images``), every data image at once (``load_data``,
for the reference and the inversion) and every inversion shard with every key (``read_inversion``);
it must print the same FID and KID bits. ``--cached`` adds the cached re-run with today's code.

    OMP_NUM_THREADS=1 python bench/memory.py                       # defaults, see --help
    OMP_NUM_THREADS=1 python bench/memory.py --digits 500 8000 --rgb 500 2000 4000 --correct 500 2000 4000 --size 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs in each fresh subprocess: report peak RSS at exit; in "materialised" mode, patch in the
# old readers (all generated images, then all reference images, in memory at once).
CHILD = r"""
import atexit, json, resource, sys
atexit.register(lambda: print("PGRAFT_MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr))
mode, args = sys.argv[1], sys.argv[2:]
if mode == "materialised":
    import torch
    import pgraft_cli.stages.correct as correct, pgraft_cli.io.data as data, pgraft_cli.stages.sample as sample
    from safetensors.torch import load_file
    from pgraft_cli.io.runstore import RunStore
    load_data = data.load_data
    def all_images(run_dir, stage_name="sample"):  # the old reader: every shard, every key, at once
        shards = [load_file(str(p)) for p in RunStore(run_dir, is_main=False).stage(stage_name).paths()]
        index = torch.cat([s["index"] for s in shards])
        images = torch.cat([s["images"] for s in shards]).permute(0, 3, 1, 2).float() / 255.0
        sizes = [len(s["index"]) for s in shards]  # fed in the shards' sizes: the same sums, so the same FID
        yield from zip(index.split(sizes), images.split(sizes))
    sample.iter_images = all_images
    data.iter_data = lambda spec, shape, batch=256: load_data(spec, shape)
    def all_rows(spec, shape):  # the old correct: every data image at once
        images = load_data(spec, shape)
        return data.DataRows(len(images), lambda a, b: images[a:b])
    data.data_rows = all_rows
    def all_shards(paths, cfg):  # the old inversion reader: every shard with every key, concatenated
        shards = [load_file(str(p)) for p in paths]
        whole = {key: torch.cat([s[key] for s in shards]) for key in shards[0]}
        keep = whole["rms"] <= cfg.max_reconstruction_rms
        return {key: whole[key] for key in correct.PER_IMAGE_KEYS}, whole["noise"][keep]
    correct.read_inversion = all_shards
sys.argv = ["pgraft", *args]
try:  # the pgraft executable's entry (a one-command process: io.host.one_command_process)
    from pgraft_cli.cli import console as entry
except ImportError:  # trees before the seventh session
    from pgraft_cli.cli import main as entry
entry()
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--digits", type=int, nargs="*", default=[], help="evaluate: sample counts of the digits model")
    p.add_argument("--rgb", type=int, nargs="*", default=[500, 2000, 4000], help="evaluate: sample counts of the tiny RGB model")
    p.add_argument("--correct", type=int, nargs="*", default=[500, 2000, 4000], help="correct: data images of the tiny RGB model")
    p.add_argument("--correct-eval", type=int, default=200, help="correct: samples per evaluation (base, corrected)")
    p.add_argument("--size", type=int, default=64, help="image side of the tiny RGB model")
    p.add_argument("--steps", type=int, default=1, help="sampler steps (memory does not depend on them)")
    p.add_argument("--cached", action="store_true", help="also measure the cached re-run with today's code")
    p.add_argument("--workdir", type=Path, default=None, help="where run directories go (default: a temp dir)")
    return p.parse_args()


def tiny_rgb_model(folder: Path, size: int) -> Path:
    """A DDPMPipeline folder holding a tiny random UNet2DModel and a flow-matching scheduler."""
    import torch
    from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    DDPMPipeline(unet=unet, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)).save_pretrained(
        folder, safe_serialization=True)
    return folder


class TinyInception:
    """Builds clean-fid's TorchScript call signature around one strided convolution (8 features)."""

    @staticmethod
    def save(path: Path) -> Path:
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 8, 3, stride=4)

            def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
                return self.conv(x / 255.0).mean(dim=(2, 3))

        torch.manual_seed(0)
        torch.jit.save(torch.jit.script(Net()), str(path))
        return path


def reference_images(path: Path, n: int, size: int) -> Path:
    """``n`` random uint8 3 x size x size images in a .safetensors file (tensor ``images``)."""
    import torch
    from safetensors.torch import save_file

    images = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    save_file({"images": images}, str(path))
    return path


def measure(mode: str, args: list[str]) -> tuple[float, float, dict]:
    """(peak RSS in MiB, seconds, the JSON summary) of one fresh ``pgraft`` process."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, *args, "--json"], capture_output=True, text=True,
                          env=env, cwd=REPO)
    seconds = time.perf_counter() - tic
    if proc.returncode != 0:
        raise SystemExit(f"{mode} {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    kb = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PGRAFT_MAXRSS_KB"))
    return kb / 1024, seconds, json.loads(proc.stdout.strip().splitlines()[-1])


def correct_args(n: int, args: argparse.Namespace) -> list[str]:
    """``pgraft correct`` on n data images, shrunk to seconds: every image kept, 2 training steps."""
    sets = {"correct.num_images": n, "correct.base_steps": args.steps, "correct.inversion_iterations": 2,
            "correct.max_reconstruction_rms": 1e9, "correct.corrector_train_steps": 2, "correct.corrector_batch_size": 8,
            "correct.corrector_sample_steps": 1, "evaluate.num": args.correct_eval, "evaluate.kid_subsets": 10}
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def main() -> None:
    args = parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pgraft-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    points = [("evaluate", "digits", "1x16x16", n, ["digits", "--data", "digits", "--num", str(n), "--steps", str(args.steps)])
              for n in args.digits]
    if args.rgb or args.correct:
        model = tiny_rgb_model(work / "tiny-rgb", args.size)
        weights = TinyInception.save(work / "tiny-inception.pt")
        shape, name = f"3x{args.size}x{args.size}", f"rgb-{args.size}"
        for verb, counts in (("evaluate", args.rgb), ("correct", args.correct)):
            for n in counts:
                data = work / f"reference-{n}.safetensors"
                if not data.exists():
                    reference_images(data, n, args.size)
                common = [str(model), "--data", str(data), "--inception-weights", str(weights)]
                extra = (["--num", str(n), "--steps", str(args.steps)] if verb == "evaluate" else correct_args(n, args))
                points.append((verb, name, shape, n, common + extra))
    rows = []
    for verb, name, shape, n, cmd in points:
        full = [verb, *cmd, "--run-dir", str(work / f"run-{verb}-{name}-{n}")]
        first, t_first, summary = measure("streamed", full)
        cached, _, again = measure("streamed", full) if args.cached else (float("nan"), 0.0, summary)
        old, _, before = measure("materialised", full)
        fids = [(s.get("fid"), s.get("kid")) if verb == "evaluate" else (s["corrected"]["fid"], s["corrected"]["kid"])
                for s in (summary, again, before)]
        assert fids[0] == fids[1] == fids[2], fids  # the same bits by every reader
        rows.append((verb, name, shape, n, fids[0][0], first, cached, old, t_first))
        print(f"{verb} {name} {shape} n={n}: streamed {first:.0f} MiB, "
              + (f"streamed (cached) {cached:.0f} MiB, " if args.cached else "")
              + f"materialised {old:.0f} MiB, {t_first:.0f}s", file=sys.stderr, flush=True)
    columns = ["verb", "model", "image", "N", "FID", "peak RSS streamed (MiB)",
               *(["streamed, cached run (MiB)"] if args.cached else []), "materialised, cached run (MiB)", "s (streamed)"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for verb, name, shape, n, fid, first, cached, old, t in rows:
        cells = [verb, name, shape, n, f"{fid:.3f}", f"{first:.0f}", *([f"{cached:.0f}"] if args.cached else []),
                 f"{old:.0f}", f"{t:.0f}"]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
