#!/usr/bin/env python
"""Text-to-image sampling: ``pgraft``'s sample stage against the family's diffusers pipeline, side by side.

One random-weight pipeline (``bench/real_size.py``'s builder: the released config values of Stable
Diffusion 2.1-base (``--size sd2``) or SDXL base (``sdxl``), a tiny tokenizer, the real-size text
encoders; ``tiny`` / ``tiny-sdxl``: the same layouts at the smoke test's scale) at a small
resolution, in one process, the weights shared by both sides (one copy in memory); for each image
count N (``--nums``), after a warm-up of each, ``--repeats`` rounds with the methods interleaved
(rotating the order), the median round reported (and the fastest and slowest rounds' stage seconds):

* ``diffusers``: ``pipe(prompt, num_images_per_prompt=N, output_type="np")``: the prompt encoded,
  N latents denoised with guidance 7.5 (one UNet call on 2N rows per step), the VAE decode, the
  images as float arrays in memory;
* ``pgraft``: ``run_sample`` with one lane of N (``lane = batch_size = N``): the per-image seeded
  noise, the prompt encoded, the same sampler steps and guidance, the VAE decode, the images as
  uint8 in memory (``work``), then the shard written (safetensors, sha256, fsync) (``stage``);
* ``pgraft (before)``: the same stage with every row's prompt through the text encoders in one batch
  (N + N rows: SD before its prompts were deduplicated, SDXL and SD3 before they were encoded alone);
* ``pgraft (K/V per call)``: the same stage with the cross-attention keys and values projected at every
  call, as diffusers does (``stages.sample.reused_cross_attention`` off): the control for that reuse,
  whose images are checked to be the same bytes (``same bytes``, printed at the end).

Nothing writes PNGs (``pgraft sample --out`` does that after the stage). ``text rows`` counts the
text encoder's rows per run (hooked on its forward); ``syncs`` (CUDA only) the host synchronisations
of one run (``torch.cuda.set_sync_debug_mode``). ``ratio`` is diffusers' seconds over pgraft's stage
seconds (above 1: pgraft is faster). ``batch-independent`` says whether a row's conditioning (pooled
projection included) is that of its prompt encoded alone when other prompts share the batch, on
this device and dtype (the same-seed-same-bytes promise across lanes and prompt lists).

    python bench/text_sampling.py --cache /tmp/text-bench            # SD2 size, 64 px, 2 steps, N = 1, 8
    python bench/text_sampling.py --size sdxl --resolution 128 --steps 1 --repeats 3
    python bench/text_sampling.py --size tiny --resolution 32 --steps 1 --repeats 1
    python bench/text_sampling.py --resolution 512 --steps 20 --device cuda --dtype bfloat16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from real_size import PROMPT, SIZES, NoBar, build_pipeline  # noqa: E402

GUIDANCE = 7.5


def count_rows(encoder: torch.nn.Module, counter: list[int]) -> None:
    encoder.register_forward_pre_hook(
        lambda m, args, kwargs: counter.append((args[0] if args else kwargs["input_ids"]).shape[0]), with_kwargs=True)


def per_row_encode(model: Any, prompts: list[str], class_labels: Any, guidance_scale: float,
                   distilled_guidance: Any = None) -> Any:
    """The encoding before: the family's ``encode_text`` on every row's prompt at once, duplicates included."""
    cond = model.adapter.encode_text(model.pipeline, prompts, model.device, guidance_scale > 1.0, model.sample_shape)
    cond.guidance_scale, cond.distilled_guidance = guidance_scale, distilled_guidance
    return cond


def synced(device: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` with the device's queue drained before and after (so its time is all of its work)."""
    def run() -> Any:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        return out
    return run


def count_syncs(device: str, fn: Callable[[], Any]) -> int | None:
    """How many times one run of ``fn`` makes the host wait for the GPU (None off CUDA)."""
    if not device.startswith("cuda"):
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def batch_independent(model: Any, n: int) -> bool:
    """Whether ``model.encode``'s rows of ``PROMPT`` beside other prompts equal ``PROMPT`` encoded alone."""
    with torch.inference_mode():
        mixed, alone = model.encode([PROMPT, "a", "b c"] * n, None, GUIDANCE), model.encode([PROMPT], None, GUIDANCE)
    pairs = [(mixed.prompt_embeds, alone.prompt_embeds), (mixed.negative_prompt_embeds, alone.negative_prompt_embeds),
             (mixed.pooled, alone.pooled), (mixed.negative_pooled, alone.negative_pooled)]
    return all(a is None or torch.equal(a[::3], b.expand_as(a[::3])) for a, b in pairs)


def pgraft_run(model: Any, n: int, steps: int, before: bool = False, reuse: bool = True,
               images: Optional[dict[str, Any]] = None) -> Callable[[], dict[str, float]]:
    """One ``run_sample`` of N images; ``before``: every row's prompt encoded; ``reuse=False``: the
    cross-attention keys and values projected at every call. ``images[True/False]`` keeps the last
    images of each ``reuse`` setting."""
    from safetensors import safe_open

    from pgraft_cli.io.recipes import SampleConfig
    from pgraft_cli.io.runstore import RunStore
    from pgraft_cli.stages import sample as stage_module
    from pgraft_cli.stages.sample import Conditions, run_sample

    cfg = SampleConfig(num=n, steps=steps, batch_size=n, lane=n, guidance_scale=GUIDANCE)

    def run() -> dict[str, float]:
        saved, saved_reuse = type(model).encode, stage_module.reused_cross_attention
        if before:
            type(model).encode = per_row_encode
        if not reuse:
            stage_module.reused_cross_attention = lambda m, enabled=True: saved_reuse(m, False)
        try:
            with tempfile.TemporaryDirectory() as d, RunStore(Path(d)) as store:
                tic = time.perf_counter()
                result = run_sample(model, cfg, Conditions(prompts=[PROMPT]), store, NoBar())
                stage = time.perf_counter() - tic
                with safe_open(str(result.shards[0]), "pt") as f:  # the stamp: seconds of work(k)
                    work = float(f.metadata()["pgraft.seconds"])
                    if images is not None and not before:
                        images[reuse] = f.get_tensor("images")
        finally:
            type(model).encode, stage_module.reused_cross_attention = saved, saved_reuse
        return {"work": work, "stage": stage}
    return run


def diffusers_run(pipe: Any, n: int, steps: int) -> Callable[[], dict[str, float]]:
    def run() -> dict[str, float]:
        tic = time.perf_counter()
        pipe(PROMPT, num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=GUIDANCE,
             output_type="np", generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - tic
        return {"work": seconds, "stage": seconds}
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="sd2", choices=list(SIZES))
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--nums", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-before", action="store_true", help="skip the pgraft (before) rows")
    p.add_argument("--no-control", action="store_true", help="skip the pgraft (K/V per call) rows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="the weights' dtype on both sides")
    p.add_argument("--cache", type=Path, default=None, help="keep the built pipeline here (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from pgraft_cli.io.checkpoints import load_model

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()  # the tiny tokenizer truncates the prompt: said once here
    cache = args.cache or Path(tempfile.mkdtemp(prefix="pgraft-text-bench-"))
    dtype = getattr(torch, args.dtype)
    folder = build_pipeline(args.size, cache / f"{args.size}-{args.resolution}", args.resolution, args.device, dtype)
    model = load_model(str(folder)).to(args.device, dtype)
    # diffusers' own pipeline class on the very modules pgraft loaded: one copy of the weights
    pipe = type(model.pipeline)(**model.pipeline.components)
    pipe.set_progress_bar_config(disable=True)
    counter: list[int] = []
    count_rows(pipe.text_encoder, counter)
    from pgraft_cli.io.host import describe_device

    device = describe_device(args.device) or args.device
    print(f"{args.size} at {args.resolution} px, {args.steps} steps, guidance {GUIDANCE}, {args.dtype} on {device}; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    results, same_bytes = [], []
    for n in args.nums:
        images: dict[bool, Any] = {}
        methods = {"diffusers": diffusers_run(pipe, n, args.steps), "pgraft": pgraft_run(model, n, args.steps, images=images)}
        if not args.no_before:
            methods["pgraft (before)"] = pgraft_run(model, n, args.steps, before=True)
        if not args.no_control:
            methods["pgraft (K/V per call)"] = pgraft_run(model, n, args.steps, reuse=False, images=images)
        methods = {name: synced(args.device, run) for name, run in methods.items()}
        syncs = {name: count_syncs(args.device, run) for name, run in methods.items()}
        times: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
        text_rows: dict[str, int] = {}
        for name, run in methods.items():  # warm-up, and the text encoder's rows of one run
            counter.clear()
            run()
            text_rows[name] = sum(counter)
        order = list(methods)
        for r in range(args.repeats):
            for name in order[r % len(order):] + order[: r % len(order)]:
                times[name].append(methods[name]())
        if len(images) == 2:
            same_bytes.append(bool(torch.equal(images[True], images[False])))
        base = statistics.median(t["stage"] for t in times["diffusers"])
        for name, ts in times.items():
            row = {"n": n, "method": name, "text_rows": text_rows[name], "syncs": syncs[name],
                   "work_s": statistics.median(t["work"] for t in ts), "stage_s": statistics.median(t["stage"] for t in ts),
                   "stage_min_s": min(t["stage"] for t in ts), "stage_max_s": max(t["stage"] for t in ts)}
            row["ratio"] = base / row["stage_s"]
            results.append(row)
    print(f"{'N':>3}  {'method':<22}{'text rows':>10}{'syncs':>7}{'work s':>9}{'stage s':>9}{'ratio':>7}  stage min-max")
    for row in results:
        syncs = "-" if row["syncs"] is None else str(row["syncs"])
        print(f"{row['n']:>3}  {row['method']:<22}{row['text_rows']:>10}{syncs:>7}{row['work_s']:>9.3f}"
              f"{row['stage_s']:>9.3f}{row['ratio']:>7.2f}  {row['stage_min_s']:.3f}-{row['stage_max_s']:.3f}")
    if same_bytes:
        print(f"same bytes with the keys and values reused as projected at every call: {all(same_bytes)}")
    equal = batch_independent(model, max(args.nums))
    print(f"batch-independent (a prompt's rows beside others = encoded alone, {args.device} {args.dtype}): {equal}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end; ratio = diffusers s / this row's stage s")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "resolution": args.resolution, "steps": args.steps,
                                         "device": device, "dtype": args.dtype, "batch_independent": equal,
                                         "same_bytes_with_reuse": all(same_bytes) if same_bytes else None,
                                         "rows": results}, indent=2))


if __name__ == "__main__":
    main()
