#!/usr/bin/env python
"""Sampling throughput: pgraft's sampler and ``pgraft sample`` against the plain diffusers loop.

All methods run the SAME network (the bundled ``digits`` flow model, a diffusers ``UNet2DModel``
with a ``FlowMatchEulerDiscreteScheduler`` config), the same number of Euler steps and the same
batch of ``--batch`` images, side by side in one process, after a warm-up, over ``--repeats``
rounds (the median round is reported). Within a round the in-process methods are interleaved batch
by batch (rotating the order), so bursts of load from other processes hit every method alike:

1. ``diffusers loop``: the canonical hand-written loop of the diffusers docs,
   ``scheduler.set_timesteps(steps)``, then ``v = unet(x, t).sample; x = scheduler.step(v, t, x)
   .prev_sample`` for every ``t`` in ``scheduler.timesteps``, on batches of B images.
2. ``pgraft sampler (lane = B)``: ``pgraft_cli.core.samplers.sample`` driving ``model.predict`` with the
   whole batch of B images as one lane (one network call per step sees B images).
3. ``pgraft sampler (lane = L)``: what ``pgraft sample`` does by default: B images per shard, cut
   into lanes of L = 16 images (one network call per step sees L images).
4. ``pgraft sample CLI``: the command end to end in a subprocess (process start, imports, model
   load, noise, sampling, safetensors shards, PNGs), reported twice: wall clock, and the JSON
   ``images_per_second`` (the sample stage only: noise, sampling, decode, shard writing).

5. ``pgraft sampler, channels_last``: method 3 with the network's weights in channels_last memory
   format: what ``pgraft sample`` runs on the CPU by default (``sample.memory_format = "auto"``,
   ``stages.sample.network_memory_format``); method 3 is ``sample.memory_format = "contiguous"``, the
   bytes of before (the convolutions round differently). The CLI rows run the default.
6. ``pgraft sampler, channels_last + torch.compile`` (``--compile``): method 5 with the network
   compiled as ``--set sample.compile=true`` compiles it (``torch.compile``, inductor, static shapes,
   after the stage's channels_last weights); the first call's seconds (the compile) are printed apart,
   and the largest difference from method 5's samples (its kernels round differently). Against
   method 7, the CPU's default: at one image a call the traced forward is the faster.
   ``--compile-options freezing cpp_wrapper`` compiles it with those inductor options instead,
   set through ``torch._inductor.config.patch`` around the compiling first call. One variant a run:
   a second ``torch.compile`` of the same network with the same (default) options replays the first
   one's compiled code. With the CLI rows, ``--compile`` also runs ``pgraft sample --set
   sample.compile=true`` each round (its compile included in its seconds; inductor's cache warm from
   the in-process compile).
7. ``pgraft sampler, channels_last + traced``: method 5 inside ``stages.sample.traced_networks``,
   as ``pgraft sample`` runs on the CPU (full lanes replayed from a TorchScript trace checked bitwise
   against eager, ``models.traced``) when the run makes ``TRACE_MIN_CALLS`` full-lane calls; the
   trace (about 0.25 s, once per process) is made in the warm-up, like oneDNN's kernels. Its samples
   are bitwise method 5's (checked and printed).

Beside each rate the table prints the network's achieved GFLOP/s (``torch.utils.flop_counter``'s
count of one call, per image and step, times steps and images, over the seconds) and its share of
the float32 matmul rate (a 1024^2 ``torch.mm`` at the same thread count) measured in the same run.

Methods 1-3 and 5 time the sampling loop only (``torch.inference_mode``, float32, the model's device):
the initial noise (pgraft's per-image seeded noise, the same tensors for every method) is drawn
before the clock starts.

It also checks that methods 1 and 2 compute the same thing: both are Euler on the flow ODE, but
diffusers' grid is ``sigmas = linspace(1, 1/T, N)`` plus a final 0 (so its last step is the tiny
``1/T -> 0``), while pgraft's is ``linspace(1, 0, N + 1)``. With the native grids the outputs differ
a little (a different discretisation of the same ODE); with diffusers' sigmas passed to pgraft's
sampler as its grid they agree to float32 rounding (bitwise, on CPU). And it shows why pgraft
fixes the lane: the same images sampled with lane = B and lane = 16 differ in the last float bits.

On a shared machine, a busy CPU makes torch's multi-threaded kernels stall (each op waits for its
slowest, descheduled thread): watch the load averages printed, and use ``--threads 1`` there.

    python bench/sampling.py                      # defaults, see --help
    python bench/sampling.py --num 512 --steps 16 --batch 64 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=512, help="images per measurement (default 512)")
    p.add_argument("--steps", type=int, default=16, help="Euler steps (default 16)")
    p.add_argument("--batch", type=int, default=64, help="batch B: images per diffusers batch / pgraft shard (default 64)")
    p.add_argument("--lane", type=int, default=None, help="pgraft's lane for method 3 (default: the recipe default, 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per method; the median is reported (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice); also set for the CLI")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="digits", help="model to load (default: the bundled digits flow)")
    p.add_argument("--no-cli", action="store_true", help="skip method 4 (the CLI subprocess)")
    p.add_argument("--compile", action="store_true", help="add method 6 (torch.compile; minutes of compiling on a CPU)")
    p.add_argument("--compile-options", nargs="+", default=[], metavar="OPTION",
                   help="with --compile, compile method 6 with these inductor options set to True (e.g. freezing "
                        "cpp_wrapper); one variant a run: a process reuses its first compile of a network")
    p.add_argument("--json", type=Path, default=None, help="also write the raw timings to this file")
    args = p.parse_args()
    if args.compile_options and not args.compile:
        p.error("--compile-options applies to the compiled row: add --compile")
    from pgraft_cli.io.recipes import SampleConfig

    args.lane = args.lane or (16 if SampleConfig().lane == "auto" else SampleConfig().lane)  # auto: min(16, num)
    if args.batch % args.lane:
        p.error(f"--batch ({args.batch}) must be a multiple of the lane ({args.lane}), as for pgraft sample --batch-size")
    if min(args.num, args.steps, args.batch, args.repeats) < 1:
        p.error("--num, --steps, --batch and --repeats must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------
# The methods. Each samples ONE batch: images start..end-1 (end - start <= B) from `noise`, the
# initial noise of all images, padded to whole lanes.


def diffusers_loop(unet: torch.nn.Module, scheduler_config: dict, steps: int) -> Callable:
    from diffusers import FlowMatchEulerDiscreteScheduler

    def run(noise: torch.Tensor, start: int, end: int) -> torch.Tensor:
        with torch.inference_mode():
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
            scheduler.set_timesteps(steps)
            x = noise[start:end]
            for t in scheduler.timesteps:
                v = unet(x, t).sample
                x = scheduler.step(v, t, x).prev_sample
        return x

    return run


def pgraft_sampler(model, steps: int, lane: int) -> Callable:
    """pgraft's sampler on one shard, cut into lanes of `lane` images (as ``pgraft sample`` does)."""
    from pgraft_cli.models.loaded import Cond
    from pgraft_cli.core.samplers import sample

    def run(noise: torch.Tensor, start: int, end: int) -> torch.Tensor:
        cond = Cond()
        outs = []
        with torch.inference_mode():
            grid = model.schedule.grid(steps)
            for first in range(start, end, lane):
                # like pgraft sample: the last lane is padded with the next images' noise, then dropped
                x, _ = sample(lambda x, t: model.predict(x, t, cond), model.schedule,
                              noise[first:first + lane], grid)
                outs.append(x[: end - first])
        return torch.cat(outs)

    return run


def traced_sampler(model, steps: int, lane: int, num: int) -> Callable:
    """``pgraft_sampler`` inside the sample stage's ``traced_networks`` (a run of ``num`` images)."""
    from pgraft_cli.stages.sample import traced_networks

    inner = pgraft_sampler(model, steps, lane)

    def run(noise: torch.Tensor, start: int, end: int) -> torch.Tensor:
        with traced_networks(model, lane, num // lane * steps):
            return inner(noise, start, end)

    return run


def channels_last_copy(model):
    """The model with its network's weights in channels_last memory format (NHWC convolutions)."""
    import copy

    other = copy.copy(model)
    other.network = copy.deepcopy(model.network).to(memory_format=torch.channels_last)
    return other


def compiled_copy(model):
    """The model with its network compiled as ``sample.compile`` compiles it (``torch.compile``, inductor,
    static shapes; compiled on its first call)."""
    import copy

    other = copy.copy(model)
    other.network = torch.compile(model.network, dynamic=False)
    return other


def inductor_options(options: tuple[str, ...]):
    """Inductor's global config with ``options`` set to True, for a compile (a first call) under it. (With
    ``torch.compile(options={"freezing": True})`` the digits samples were bitwise the default compile's;
    under this patch they were not, and faster.)"""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(**dict.fromkeys(options, True))


def flops_per_image_step(model, lane: int) -> float:
    """``torch.utils.flop_counter``'s count of one network call on a lane, per image."""
    from torch.utils.flop_counter import FlopCounterMode

    from pgraft_cli.models.loaded import Cond

    x = torch.zeros((lane, *model.sample_shape), dtype=model.dtype, device=model.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.predict(x, torch.tensor(0.5, dtype=torch.float64), Cond())
    return counter.get_total_flops() / lane


def matmul_rate(size: int = 1024, seconds: float = 0.5, rounds: int = 3) -> float:
    """FLOP/s of a float32 ``torch.mm`` of two ``size`` x ``size`` matrices at the current thread
    count: the best of ``rounds`` windows of ``seconds`` (the machine's roofline for this code)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = 0.0
    for _ in range(rounds):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b)
            n += 1
        best = max(best, 2 * size**3 * n / (time.perf_counter() - start))
    return best


def run_cli(args: argparse.Namespace, num: int, env: dict, extra: tuple[str, ...] = ()) -> tuple[float, dict]:
    """`pgraft sample` (with the ``extra`` arguments) in a fresh run directory; returns (wall seconds, its JSON
    summary)."""
    tmp = Path(tempfile.mkdtemp(prefix="pgraft-bench-"))
    try:
        cmd = [sys.executable, "-m", "pgraft_cli", "sample", args.model, "--num", str(num),
               "--steps", str(args.steps), "--batch-size", str(args.batch), "--seed", str(args.seed),
               "--run-dir", str(tmp / "run"), "--out", str(tmp / "png"), "--quiet", "--json", *extra]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"pgraft sample failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        if summary.get("generated_now") != num:
            raise SystemExit(f"pgraft sample generated {summary.get('generated_now')} images, expected {num}")
        return wall, summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


DIFFUSERS_SCRIPT = """
import sys, time, torch
from pathlib import Path
from PIL import Image
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel
folder, out, num, steps, batch, seed = sys.argv[1], Path(sys.argv[2]), *map(int, sys.argv[3:7])
unet = UNet2DModel.from_pretrained(folder).eval()
scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
out.mkdir(parents=True, exist_ok=True)
g = torch.Generator().manual_seed(seed)
tic = time.perf_counter()
with torch.inference_mode():
    for start in range(0, num, batch):
        size = unet.config.sample_size
        x = torch.randn((min(batch, num - start), unet.config.in_channels, size, size), generator=g)
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        images = ((x + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
        for i, im in enumerate(images):
            Image.fromarray(im[0].numpy()).save(out / f"{start + i:05d}.png")
print(time.perf_counter() - tic)
"""


def run_diffusers_script(args: argparse.Namespace, folder: Path, num: int, env: dict) -> tuple[float, float]:
    """The plain diffusers equivalent of ``pgraft sample`` as a script: load, sample, write PNGs."""
    tmp = Path(tempfile.mkdtemp(prefix="pgraft-bench-"))
    try:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", DIFFUSERS_SCRIPT, str(folder), str(tmp / "png"), str(num),
                               str(args.steps), str(args.batch), str(args.seed)], capture_output=True, text=True,
                              env=env, cwd=tmp)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"the diffusers script failed:\n{proc.stderr[-3000:]}")
        return wall, float(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------


def equivalence_check(model, unet, scheduler_config: dict, steps: int, noise: torch.Tensor) -> dict:
    """Max |diffusers loop - pgraft sampler| on the same noise, native grids and the shared grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from pgraft_cli.models.loaded import Cond
    from pgraft_cli.core.samplers import sample

    d = diffusers_loop(unet, scheduler_config, steps)(noise, 0, len(noise))
    cond = Cond()
    with torch.inference_mode():
        native, _ = sample(lambda x, t: model.predict(x, t, cond), model.schedule, noise, model.schedule.grid(steps))
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(steps)
        shared, _ = sample(lambda x, t: model.predict(x, t, cond), model.schedule, noise,
                           scheduler.sigmas.to(torch.float64))
    return {
        "images": len(noise),
        "diffusers_grid": [round(float(s), 4) for s in scheduler.sigmas],
        "pgraft_grid": [round(float(s), 4) for s in model.schedule.grid(steps)],
        "native_max_abs": float((d - native).abs().max()),
        "native_mean_abs": float((d - native).abs().mean()),
        "shared_max_abs": float((d - shared).abs().max()),
        "sample_range": float(d.abs().max()),
    }


def print_table(rows: list[dict], title: str) -> None:
    headers = ["method", "steps", "batch", "images", "seconds", "images/s", "ratio vs diffusers", "GFLOP/s",
               "of matmul"]
    cells = [[r["method"], str(r["steps"]), str(r["batch"]), str(r["images"]), f"{r['seconds']:.2f}",
              f"{r['ips']:.2f}", f"{r['ratio']:.2f}x", f"{r['gflops']:.1f}", f"{100 * r['of_matmul']:.0f} %"]
             for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i == 0 else "right")
        for c in cells:
            table.add_row(*c)
        Console(width=140).print(table)
    except ImportError:  # pragma: no cover
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for c in cells:
            print("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths))))
    # A markdown copy, for bench/RESULTS.md
    print()
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|")
    for c in cells:
        print("| " + " | ".join(c) + " |")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.stages.sample import initial_noise

    model = load_model(args.model)
    if model.family != "flow" or model.model_class != "UNet2DModel" or model.conditioning != "none":
        raise SystemExit(f"{args.model}: this benchmark needs an unconditional flow UNet2DModel (got "
                         f"{model.family} {model.model_class}, {model.conditioning})")
    model.network.eval()
    unet = model.network
    scheduler_config = dict(model.scheduler_config)
    threads = torch.get_num_threads()
    from pgraft_cli.io.host import describe_cpu

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}; "
          f"{describe_cpu()}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"model {args.model}: {model.model_class}, {model.parameter_count():,} parameters, sample shape "
          f"{model.sample_shape}, {scheduler_config.get('_class_name')}, {model.dtype}, {model.device}")

    padded = -(-args.num // args.lane) * args.lane
    noise = initial_noise(args.seed, list(range(padded)), model.sample_shape).to(model.device, model.dtype)

    eq = equivalence_check(model, unet, scheduler_config, args.steps, noise[: args.lane])
    print(f"\nequivalence on {eq['images']} images, same noise (samples span +-{eq['sample_range']:.2f}):")
    print(f"  diffusers grid: {eq['diffusers_grid']}")
    print(f"  pgraft grid:    {eq['pgraft_grid']}")
    print(f"  diffusers loop vs pgraft sampler, native grids:          max |diff| = {eq['native_max_abs']:.3e}"
          f" (mean {eq['native_mean_abs']:.3e}; the grids differ, see above)")
    print(f"  diffusers loop vs pgraft sampler on diffusers' sigmas:   max |diff| = {eq['shared_max_abs']:.3e}")
    if args.batch != args.lane:
        first = min(args.batch, args.num)
        whole = pgraft_sampler(model, args.steps, args.batch)(noise, 0, first)
        lanes = pgraft_sampler(model, args.steps, args.lane)(noise, 0, first)
        eq["lane_batch_max_abs"] = float((whole - lanes).abs().max())
        eq["lane_batch_equal"] = bool(torch.equal(whole, lanes))
        print(f"  pgraft sampler, same {first} images, lane = {args.batch} vs lane = {args.lane}: max |diff| = "
              f"{eq['lane_batch_max_abs']:.3e} ({'bitwise equal' if eq['lane_batch_equal'] else 'not bitwise equal'}: "
              "the network's float rounding depends on how many images share a call)")

    # name -> factory(steps) -> run(noise, start, end) for one batch
    factories: dict[str, Callable[[int], Callable]] = {
        "diffusers loop": lambda steps: diffusers_loop(unet, scheduler_config, steps),
        f"pgraft sampler (lane = {args.batch})": lambda steps: pgraft_sampler(model, steps, args.batch),
    }
    if args.lane != args.batch:
        factories[f"pgraft sampler (lane = {args.lane})"] = lambda steps: pgraft_sampler(model, steps, args.lane)
    nhwc = channels_last_copy(model)
    cl_name = f"pgraft sampler, channels_last (lane = {args.lane}; untraced)"
    factories[cl_name] = lambda steps: pgraft_sampler(nhwc, steps, args.lane)
    first = min(args.lane, args.num)
    cl_diff = (pgraft_sampler(nhwc, args.steps, args.lane)(noise, 0, first)
               - pgraft_sampler(model, args.steps, args.lane)(noise, 0, first)).abs().max()
    print(f"  pgraft sampler, channels_last vs contiguous weights, same {first} images: max |diff| = {cl_diff:.3e}")
    from pgraft_cli.stages.sample import TRACE_MIN_CALLS

    traces = args.num // args.lane * args.steps >= TRACE_MIN_CALLS
    tr_name = (f"pgraft sampler, channels_last + traced (lane = {args.lane}; the CPU default)" if traces else
               f"pgraft sampler, channels_last + traced (lane = {args.lane}; below TRACE_MIN_CALLS: eager)")
    factories[tr_name] = lambda steps: traced_sampler(nhwc, steps, args.lane, args.num)
    tr_equal = torch.equal(traced_sampler(nhwc, args.steps, args.lane, args.num)(noise, 0, first),
                           pgraft_sampler(nhwc, args.steps, args.lane)(noise, 0, first))
    eq["traced_bitwise_untraced"] = tr_equal
    print(f"  pgraft sampler, channels_last traced vs untraced, same {first} images: "
          f"{'bitwise equal' if tr_equal else 'NOT bitwise equal'}")
    if args.compile:
        options = tuple(args.compile_options)
        label = f"torch.compile{' with ' + ' + '.join(options) if options else ''}"
        compiled = compiled_copy(nhwc)  # the stage compiles after network_memory_format: the channels_last weights
        tic = time.perf_counter()
        with inductor_options(options):  # static shapes: this first call is the only compile
            out = pgraft_sampler(compiled, args.steps, args.lane)(noise, 0, first)
        eq["compile_seconds"] = time.perf_counter() - tic
        eq["compiled_max_abs"] = float((out - pgraft_sampler(nhwc, args.steps, args.lane)(noise, 0, first)).abs().max())
        print(f"  pgraft sampler, {label}: first call (compile + {args.steps} steps) {eq['compile_seconds']:.1f} s; "
              f"vs eager channels_last, same {first} images: max |diff| = {eq['compiled_max_abs']:.3e}")
        factories[f"pgraft sampler, channels_last + {label} (lane = {args.lane}; other bytes)"] = (
            lambda steps: pgraft_sampler(compiled, steps, args.lane))
    methods = {name: make(args.steps) for name, make in factories.items()}
    per_image_step = flops_per_image_step(model, args.lane)
    print(f"network FLOPs per image and step (torch.utils.flop_counter): {per_image_step / 1e6:.1f} M")
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)

    # Warm-up: every method once on one batch with 2 steps (allocator, oneDNN kernels, imports);
    # the CLI once on one batch, so its imports and the model file are in the page cache.
    print("\nwarm-up ...", flush=True)
    for make in factories.values():
        make(2)(noise, 0, min(args.batch, args.num))
    folder = Path(tempfile.mkdtemp(prefix="pgraft-bench-model-"))
    if not args.no_cli:  # the same network as a diffusers model folder, for the plain script
        unet.save_pretrained(str(folder))
        from diffusers import FlowMatchEulerDiscreteScheduler

        FlowMatchEulerDiscreteScheduler.from_config(scheduler_config).save_pretrained(str(folder / "scheduler"))
        run_cli(argparse.Namespace(**{**vars(args), "steps": 2}), min(args.batch, args.num), env)
        run_diffusers_script(argparse.Namespace(**{**vars(args), "steps": 2}), folder, min(args.batch, args.num), env)

    # Each round: every in-process method samples all `num` images, interleaved batch by batch
    # (the order rotates from batch to batch), so a burst of load from elsewhere hits every method
    # alike; then the CLI samples the same `num` images. A method's time for a round is the sum of
    # its batches. The CLI's place in the round rotates too.
    batches = [(start, min(start + args.batch, args.num)) for start in range(0, args.num, args.batch)]
    names = list(methods)
    matmul_before = matmul_rate()
    times: dict[str, list[float]] = {name: [] for name in methods}
    cli_wall: list[float] = []
    script_wall: list[float] = []
    script_loop: list[float] = []
    cli_json: list[dict] = []
    compiled_cli: list[tuple[float, dict]] = []  # with --compile: the CLI with sample.compile = true

    def cli_round(r: int) -> None:
        wall, summary = run_cli(args, args.num, env)
        cli_wall.append(wall)
        cli_json.append(summary)
        s_wall, s_loop = run_diffusers_script(args, folder, args.num, env)
        script_wall.append(s_wall)
        script_loop.append(s_loop)
        print(f"  round {r + 1}: pgraft sample CLI: {wall:.2f}s wall, {summary['seconds']:.2f}s sampling; "
              f"diffusers script: {s_wall:.2f}s wall, {s_loop:.2f}s sampling + PNGs", flush=True)
        if args.compile:  # inductor's cache: warm from the in-process compile above (the same cache directory)
            compiled_cli.append(run_cli(args, args.num, env, ("--set", "sample.compile=true")))
            print(f"  round {r + 1}: pgraft sample CLI, sample.compile=true: {compiled_cli[-1][0]:.2f}s wall, "
                  f"{compiled_cli[-1][1]['seconds']:.2f}s sampling (the compile included)", flush=True)

    for r in range(args.repeats):
        cli_first = not args.no_cli and r % 2 == 1
        if cli_first:
            cli_round(r)
        spent = dict.fromkeys(names, 0.0)
        for b, (start, end) in enumerate(batches):
            k = (b + r) % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                methods[name](noise, start, end)
                spent[name] += time.perf_counter() - t0
        for name in names:
            times[name].append(spent[name])
        print(f"  round {r + 1}: " + ", ".join(f"{n}: {spent[n]:.2f}s" for n in names), flush=True)
        if not args.no_cli and not cli_first:
            cli_round(r)

    matmul = max(matmul_rate(), matmul_before)  # before and after the rounds, the better (load comes and goes)
    print(f"float32 matmul rate (1024^2 torch.mm, {threads} threads): {matmul_before / 1e9:.1f} GFLOP/s before the "
          f"rounds, {matmul / 1e9:.1f} GFLOP/s the better of before and after")
    base = statistics.median(times["diffusers loop"])
    base_ips = args.num / base
    rows = []
    for name, ts in times.items():
        s = statistics.median(ts)
        rows.append({"method": name, "steps": args.steps, "batch": args.batch, "images": args.num,
                     "seconds": s, "ips": args.num / s, "ratio": (args.num / s) / base_ips})
    if cli_wall:
        s = statistics.median(script_wall)
        rows.append({"method": "diffusers script in a subprocess, wall clock (load, sample, PNGs)", "steps": args.steps,
                     "batch": args.batch, "images": args.num, "seconds": s, "ips": args.num / s,
                     "ratio": (args.num / s) / base_ips})
        s = statistics.median(cli_wall)
        rows.append({"method": f"pgraft sample CLI (lane = {args.lane}), wall clock", "steps": args.steps,
                     "batch": args.batch, "images": args.num, "seconds": s, "ips": args.num / s,
                     "ratio": (args.num / s) / base_ips})
        s = statistics.median(j["seconds"] for j in cli_json)
        ips = statistics.median(j["images_per_second"] for j in cli_json)
        rows.append({"method": f"pgraft sample CLI (lane = {args.lane}), JSON images_per_second", "steps": args.steps,
                     "batch": args.batch, "images": args.num, "seconds": s, "ips": ips, "ratio": ips / base_ips})
    if compiled_cli:
        s = statistics.median(wall for wall, _ in compiled_cli)
        rows.append({"method": f"pgraft sample CLI (lane = {args.lane}), sample.compile=true, wall clock",
                     "steps": args.steps, "batch": args.batch, "images": args.num, "seconds": s, "ips": args.num / s,
                     "ratio": (args.num / s) / base_ips})
        s = statistics.median(j["seconds"] for _, j in compiled_cli)
        rows.append({"method": f"pgraft sample CLI (lane = {args.lane}), sample.compile=true, JSON seconds (compile "
                     "included)", "steps": args.steps, "batch": args.batch, "images": args.num, "seconds": s,
                     "ips": args.num / s, "ratio": (args.num / s) / base_ips})
    for row in rows:  # the network's FLOPs only (the CLI rows' seconds also hold loading, noise, PNGs)
        row["gflops"] = per_image_step * args.steps * args.num / row["seconds"] / 1e9
        row["of_matmul"] = row["gflops"] * 1e9 / matmul
    load = os.getloadavg()
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in load)}")
    if load[1] > 1.25 * (os.cpu_count() or 1):
        print("WARNING: the machine was busy with other work during the run (5-minute load average "
              f"{load[1]:.1f} on {os.cpu_count()} CPUs): timings are unreliable. With several threads per "
              "process, a busy CPU makes torch's intra-op barriers wait on descheduled threads; try --threads 1.")
    print()
    print_table(rows, f"sampling throughput, median of {args.repeats} (torch {torch.__version__}, {threads} threads)")
    print("\nall rounds (seconds):")
    for name, ts in times.items():
        print(f"  {name}: {', '.join(f'{t:.2f}' for t in ts)}")
    if cli_wall:
        print(f"  pgraft sample CLI wall: {', '.join(f'{t:.2f}' for t in cli_wall)}")
        json_seconds = ", ".join(f"{j['seconds']:.2f}" for j in cli_json)
        print(f"  pgraft sample CLI sampling (JSON seconds): {json_seconds}")
    if compiled_cli:
        walls = ", ".join(f"{wall:.2f}" for wall, _ in compiled_cli)
        seconds = ", ".join(f"{j['seconds']:.2f}" for _, j in compiled_cli)
        print(f"  pgraft sample CLI, sample.compile=true, wall: {walls}; JSON seconds: {seconds}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "equivalence": eq,
                                         "times": times, "cli_wall": cli_wall, "cli_json": cli_json,
                                         "rows": rows, "torch": torch.__version__, "threads": threads,
                                         "matmul_flops": matmul, "flops_per_image_step": per_image_step}, indent=2))


if __name__ == "__main__":
    main()
