#!/usr/bin/env python
"""One GPU, bf16: ``pgraft`` sampling and LoRA fine-tuning against diffusers at SD2 size.

Builds a random-weight Stable Diffusion 2.1-base-size pipeline (``bench/real_size.py``'s builder:
its released config values, tiny tokenizer, real-size text encoder), then, in one process:

* images/s of pgraft's sample stage (lane = N, bf16 weights) against ``StableDiffusionPipeline``
  (bf16) at N = 8 and 32 images, ``--steps`` DDIM steps, guidance 7.5 (both decode with the VAE);
* LoRA fine-tuning steps/s of pgraft's finetune stage (float32 master weights, bf16 autocast, the
  frozen layers held in bf16 while training) against the plain ``train_text_to_image_lora``-style
  loop (bf16 frozen weights, float32 adapter), both timing steps only (setup outside the clock);
* peak memory (``torch.cuda.max_memory_allocated``) of each row;
* model FLOPs utilisation: the row's FLOPs (``torch.utils.flop_counter`` on one UNet call, one VAE
  decode, one training step) per second over the GPU's dense bf16 peak (``--peak-tflops``; H100/H200
  SXM: 989).

A warm-up run (2 steps) precedes each row's ``--repeats`` timed runs (the median reported, with
the slowest and fastest run's rates beside it); a row that runs out of memory is reported as
such and the others go on. The table is printed and the rows written as JSON to ``--out``.

    python bench/gpu.py --out gpu.json                       # SD2 size, 512 px, 20 steps, on cuda
    python bench/gpu.py --size tiny --resolution 32 --steps 2 --nums 2 --batch 2 --device cpu --out x.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from real_size import ROWS, build_pipeline, latents_shape, timed  # noqa: E402

PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: str, given: float | None) -> float | None:
    if given:
        return given * 1e12
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), None)


def count_flops(fn: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def flops_per_row(folder: Path, kind: str, n: int, steps: int, device: str, dtype: torch.dtype) -> int:
    """FLOPs of one run: UNet calls on 2N latents (guidance) x steps + one VAE decode of N, or
    ``steps`` training steps (counted on the plain loop's step: both do the same work)."""
    if kind == "LoRA":
        run = ROWS["diffusers LoRA step"](folder, n, device, dtype)
        return steps * count_flops(run.step)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=dtype).to(device)
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=dtype).to(device)
    x = torch.randn(latents_shape(folder, n), device=device, dtype=dtype)
    states = torch.randn(2 * n, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    t = torch.full((2 * n,), 500.0, device=device)
    extra: dict[str, Any] = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embeddings and six time ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2 * n, pooled, device=device, dtype=dtype),
                                       "time_ids": torch.zeros(2 * n, 6, device=device, dtype=dtype)}}
    with torch.inference_mode():
        per_call = count_flops(lambda: unet(torch.cat([x, x]), t, states, **extra))
        decode = count_flops(lambda: vae.decode(x))
    return steps * per_call + decode


def measure(name: str, folder: Path, n: int, steps: int, device: str, dtype: torch.dtype,
            repeats: int = 1) -> dict[str, Any]:
    """One row: a warm-up run, then ``repeats`` timed runs; the median's seconds, the fastest and the
    slowest run's, and the peak memory over all of them."""
    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    run = ROWS[name](folder, n, device, dtype)
    run(2)  # warm-up: kernels chosen, memory pools grown
    # steps only: pgraft's LoRA row keeps its stage's setup outside
    runs = [timed(run, steps, device) for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    del run
    return {"seconds": statistics.median(runs), "seconds_min": min(runs), "seconds_max": max(runs), "peak_gb": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="sd2", choices=["sd2", "sdxl", "tiny"])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="sampler steps per sample row")
    p.add_argument("--train-steps", type=int, default=10, help="timed LoRA steps per training row")
    p.add_argument("--nums", type=int, nargs="+", default=[8, 32], help="images per sample row")
    p.add_argument("--batch", type=int, default=8, help="LoRA training batch")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per row after its warm-up, at least 1 (the median is reported: with an even count, "
                        "the mean of the middle two)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    p.add_argument("--cache", type=Path, default=None, help="keep the built pipeline here (default: a temp dir)")
    p.add_argument("--out", type=Path, required=True, help="the rows as JSON")
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: give at least 1")
    dtype = getattr(torch, args.dtype)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="pgraft-gpu-"))
    t0 = time.perf_counter()
    folder = build_pipeline(args.size, cache / f"{args.size}-{args.resolution}", args.resolution,
                            device=args.device, dtype=dtype)
    peak = peak_flops(args.device, args.peak_tflops)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"device {device_name}; {args.size} at {args.resolution} px, {args.dtype}; built in {time.perf_counter() - t0:.0f}s")
    plan = [(f"{who} sample", n, args.steps, "images/s") for n in args.nums for who in ("pgraft", "diffusers")]
    plan += [(f"{who} LoRA step", args.batch, args.train_steps, "steps/s") for who in ("pgraft", "diffusers")]
    rows: list[dict[str, Any]] = []
    print(f"{'row':<22}{'N':>4}{'rate':>10} {'unit':<9}{'peak GB':>9}{'TFLOP/s':>9}{'MFU':>7}  rate min-max")
    for name, n, steps, unit in plan:
        row: dict[str, Any] = {"row": name, "n": n, "steps": steps, "unit": unit}
        try:
            row.update(measure(name, folder, n, steps, args.device, dtype, args.repeats))
            work = n if unit == "images/s" else steps
            row["rate"], row["rate_min"], row["rate_max"] = (work / row[k] for k in ("seconds", "seconds_max", "seconds_min"))
            flops = flops_per_row(folder, "LoRA" if "LoRA" in name else "sample", n, steps, args.device, dtype)
            row["tflops_per_s"] = flops / row["seconds"] / 1e12
            row["mfu"] = flops / row["seconds"] / peak if peak else None
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"out of memory: {str(e).splitlines()[0][:120]}"
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        rows.append(row)
        if "error" in row:
            print(f"{name:<22}{n:>4}  {row['error']}")
        else:
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
            peak_gb = f"{row['peak_gb']:.1f}" if row["peak_gb"] is not None else "-"
            print(f"{name:<22}{n:>4}{row['rate']:>10.3f} {unit:<9}{peak_gb:>9}{row['tflops_per_s']:>9.2f}{mfu:>7}  {row['rate_min']:.3f}-{row['rate_max']:.3f}")
        args.out.write_text(json.dumps({"device": device_name, "size": args.size, "resolution": args.resolution,
                                        "dtype": args.dtype, "peak_flops": peak, "rows": rows}, indent=2))
    print(f"total {time.perf_counter() - t0:.0f}s; rows in {args.out}")


if __name__ == "__main__":
    main()
