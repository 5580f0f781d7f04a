#!/usr/bin/env python
"""Fine-tuning throughput: pgraft's finetune stage against the plain diffusers training loop.

Side by side in one process, the same network, batch, precision, optimizer (AdamW, lr 1e-4),
gradient clipping (1.0) and, for LoRA rows, the same adapter (pgraft's ``add_lora`` targets and
rank, peft on both sides):

* ``pgraft``: ``stages.finetune.run_finetune`` (GRAFT, cutoff 0) on a kept set of random states,
  ``--warmup + --steps`` steps in one call; the clock runs from the end of the ``--warmup``-th step
  to the end of the last one (read from the progress bar's ``advance``), so the stage's setup (run
  store, optimizer, accelerate, the final weights file) is outside the timed window.
* ``plain``: the loop of diffusers' ``train_text_to_image_lora.py`` / ``train_unconditional.py``:
  noise, timesteps, ``unet(...)``, MSE, backward, clip, step; frozen weights in the autocast
  dtype and the adapter in float32 (as that script does), prompts tokenized once (its dataset does)
  and encoded every step; its setup is also outside the window (``--warmup`` steps first).

Each side runs in its own process (spawned; the parent only hands out the rounds, one at a time), as
each runs for a user: ``--allocator as-run`` (the default) gives pgraft's process what the ``pgraft``
command does at start (``io.host.tune_allocator``: glibc's mmap and trim thresholds fixed, so a step's
freed activations stay on the heap) and the plain loop's glibc's defaults, as a diffusers script runs;
``default`` or ``tuned`` give both sides the same allocator (the loops alone). The minor page faults
a step costs are printed beside the times. pgraft's process is marked as one command as the ``pgraft``
command marks itself (``io.host.one_command_process``: its model's imports are collected and frozen when
they end, not rescanned during the timed steps).

Models: the bundled ``digits`` flow (all weights and LoRA rows) and the tests' tiny Stable Diffusion
pipeline (``tests/conftest.py build_tiny_sd_pipeline``; LoRA). The rows of a model are interleaved
over ``--repeats`` rounds and the median round is reported; ``--profile`` prints each row's top
functions (cProfile, one round).

    python bench/finetune_speed.py                          # float32, see --help
    python bench/finetune_speed.py --precision bf16 --steps 20 --repeats 3
    python bench/finetune_speed.py --allocator default      # both sides with glibc's defaults
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PROMPTS = ["a red circle", "two cats", "a blue cube", "a dog"]  # within the tiny tokenizer's 16 tokens


class ClockBar:
    """A progress bar that notes when each step ends (the timed window of a pgraft row)."""

    def __init__(self) -> None:
        self.ends: list[tuple[float, float, int]] = []

    def add_task(self, *a: Any, **k: Any) -> int:
        return 0

    def advance(self, *a: Any, **k: Any) -> None:
        self.ends.append(clocks())


def clocks() -> tuple[float, float, int]:
    """(wall seconds, this process's CPU seconds, its minor page faults): on a loaded machine the CPU
    seconds of a one-thread run are what the work costs; the wall clock also counts the waits for a core."""
    return time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def tiny_sd_folder(root: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_sd_pipeline

    return build_tiny_sd_pipeline(root / "tiny-sd")


Clocked = Callable[[int, int], tuple[float, float, int]]


def pgraft_row(source: str, batch: int, lora_rank: int, precision: str) -> Clocked:
    """pgraft's finetune stage: ``run(warmup, steps)`` -> (wall s, CPU s, page faults) of the last ``steps``."""
    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.io.recipes import FinetuneConfig
    from pgraft_cli.io.runstore import RunStore
    from pgraft_cli.stages.finetune import KeptSet, run_finetune

    model = load_model(source)
    g = torch.Generator().manual_seed(0)
    y = torch.randn((8 * batch, *model.sample_shape), generator=g)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(y))] if model.conditioning == "text" else None
    kept = KeptSet(y=y, t_c=0.0, x0=y, prompts=prompts)

    def run(warmup: int, steps: int) -> tuple[float, float]:
        cfg = FinetuneConfig(steps=warmup + steps, batch_size=batch, lora_rank=lora_rank, mixed_precision=precision,
                             checkpoint_every=10**6, max_grad_norm=1.0, seed=len(run.calls))
        run.calls.append(cfg)
        bar = ClockBar()
        with tempfile.TemporaryDirectory() as d, RunStore(Path(d)) as store:
            run_finetune(model, kept, cfg, store, bar)
        start, end = bar.ends[warmup - 1], bar.ends[-1]
        return tuple(b - a for a, b in zip(start, end))  # type: ignore[return-value]
    run.calls = []  # type: ignore[attr-defined]
    run.model = model  # type: ignore[attr-defined]
    return run


def plain_row(source: str, batch: int, lora_rank: int, precision: str) -> Clocked:
    """The plain diffusers loop on the same network (loaded afresh), adapter and batch."""
    from peft import LoraConfig, inject_adapter_in_model

    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.models.lora import add_lora

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    model = load_model(source)  # diffusers' own objects: the UNet, and the pipeline's encoder
    unet = model.network
    if lora_rank:
        unet.requires_grad_(False).to(dtype)
        targets = add_lora(load_model(source).network, lora_rank, lora_rank)  # pgraft's targets, on a probe copy
        # what UNet2DConditionModel.add_adapter does (UNet2DModel has no such method)
        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights=True,
                                           target_modules=targets), unet)
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()  # train_text_to_image_lora: the trainable adapter in float32
    else:
        params = list(unet.requires_grad_(True).parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    text = model.conditioning == "text"
    g = torch.Generator().manual_seed(1)
    data = torch.randn((8 * batch, *model.sample_shape), generator=g)
    if text:
        from diffusers import DDPMScheduler

        pipe = model.pipeline
        encoder = pipe.text_encoder.requires_grad_(False).to(dtype)
        ids = pipe.tokenizer([PROMPTS[i % len(PROMPTS)] for i in range(len(data))], padding="max_length",
                             max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet.train()
    auto = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    def step(k: int) -> None:
        idx = torch.randint(0, len(data), (batch,))
        x0 = data[idx]
        noise = torch.randn_like(x0)
        if text:
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,))
            with auto:
                states = encoder(ids[idx], return_dict=False)[0]
                pred = unet(noise_scheduler.add_noise(x0, noise, t), t, states, return_dict=False)[0]
            target = noise
        else:  # train_unconditional's loop for a flow: x_t = (1 - t) x0 + t noise, velocity target
            t = torch.rand(batch)
            x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
            with auto:
                pred = unet(x_t, t * 1000, return_dict=False)[0]
            target = noise - x0
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run(warmup: int, steps: int) -> tuple[float, float, int]:
        for k in range(warmup):
            step(k)
        start = clocks()
        for k in range(steps):
            step(k)
        return tuple(b - a for a, b in zip(start, clocks()))  # type: ignore[return-value]
    return run


def side(conn: Any, who: str, source: str, batch: int, lora_rank: int, precision: str, threads: Optional[int],
         tune: bool) -> None:
    """One side of a row in its own process: builds it, then runs each round the parent sends
    (``(warmup, steps, profile)``; ``None`` ends it) and sends back its clocks (or cProfile's table)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    if tune:
        from pgraft_cli.io.host import tune_allocator

        tune_allocator()  # what pgraft_cli.cli.main does before any command
    if who == "pgraft":  # a process that runs one pgraft job, as the pgraft command (cli.console) marks itself:
        from pgraft_cli.io.host import one_command_process  # the model's imports collected and frozen at once

        one_command_process()
    run = (pgraft_row if who == "pgraft" else plain_row)(source, batch, lora_rank, precision)
    while (job := conn.recv()) is not None:
        warmup, steps, profile = job
        if not profile:
            conn.send(run(warmup, steps))
            continue
        import cProfile
        import io
        import pstats

        prof, out = cProfile.Profile(), io.StringIO()
        prof.runcall(run, warmup, steps)
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
        conn.send(out.getvalue())


class Side:
    """The parent's handle on a :func:`side` process."""

    def __init__(self, *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")  # a fresh allocator; no forked OpenMP pool
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=side, args=(child, *args), daemon=True)
        self.proc.start()

    def __call__(self, warmup: int, steps: int, profile: bool = False) -> Any:
        self.conn.send((warmup, steps, profile))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the median is reported (default 3)")
    p.add_argument("--precision", default="no", choices=["no", "bf16"], help="autocast (default no: float32)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--models", nargs="+", default=["digits", "tiny-sd"], choices=["digits", "tiny-sd"])
    p.add_argument("--trained", nargs="+", default=["all", "lora"], choices=["all", "lora"],
                   help="the digits rows to run: all weights, LoRA (tiny-sd is LoRA only)")
    p.add_argument("--profile", action="store_true", help="print each row's top cProfile functions (one round)")
    p.add_argument("--allocator", default="as-run", choices=["as-run", "default", "tuned"],
                   help="as-run (default): pgraft's process tunes glibc malloc as the pgraft command does, the plain "
                        "loop's keeps glibc's defaults; default / tuned: both sides alike")
    args = p.parse_args()
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    from pgraft_cli.io.host import describe_cpu

    print(f"torch {torch.__version__}, {describe_cpu()}; precision {args.precision}, "
          f"allocator {args.allocator}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    tune = {"pgraft": args.allocator != "default", "plain": args.allocator == "tuned"}
    with tempfile.TemporaryDirectory() as d:
        sources = {"digits": "digits", "tiny-sd": str(tiny_sd_folder(Path(d)))} if "tiny-sd" in args.models else {"digits": "digits"}
        plan = [("digits", 0, 32), ("digits", args.rank, 32), ("tiny-sd", args.rank, 4)]
        plan = [row for row in plan if row[0] in args.models and ("lora" if row[1] else "all") in args.trained]
        print(f"{'model':<9}{'trained':<10}{'batch':>6}{'pgraft steps/s':>16}{'plain steps/s':>15}{'ratio':>7}"
              f"{'pgraft CPU-s/step':>19}{'plain CPU-s/step':>18}{'ratio':>7}{'pgraft faults/step':>20}"
              f"{'plain faults/step':>19}")
        for name, rank, batch in plan:
            runs = {who: Side(who, sources[name], batch, rank, args.precision, args.threads, tune[who])
                    for who in ("pgraft", "plain")}
            times: dict[str, list[tuple[float, float, int]]] = {who: [] for who in runs}
            for r in range(args.repeats):
                for who in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                    times[who].append(runs[who](args.warmup, args.steps))
            rate = {who: args.steps / statistics.median(w for w, _, _ in ts) for who, ts in times.items()}
            cpu = {who: statistics.median(c for _, c, _ in ts) / args.steps for who, ts in times.items()}
            faults = {who: statistics.median(f for _, _, f in ts) / args.steps for who, ts in times.items()}
            trained = f"LoRA r{rank}" if rank else "all"
            print(f"{name:<9}{trained:<10}{batch:>6}{rate['pgraft']:>16.2f}{rate['plain']:>15.2f}"
                  f"{rate['pgraft'] / rate['plain']:>7.2f}{cpu['pgraft']:>19.4f}{cpu['plain']:>18.4f}"
                  f"{cpu['plain'] / cpu['pgraft']:>7.2f}{faults['pgraft']:>20.0f}{faults['plain']:>19.0f}", flush=True)
            for who, run in runs.items():
                if args.profile:
                    print(f"--- {name} {trained} {who}: top functions by own time\n{run(1, args.steps, profile=True)}")
                run.close()


if __name__ == "__main__":
    main()
