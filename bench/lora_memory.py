#!/usr/bin/env python
"""Peak RSS of bf16 LoRA fine-tuning steps on the CPU: what ``frozen_layers_in`` keeps of the float32 base.

While a LoRA adapter trains under bf16 autocast, ``models.lora.frozen_layers_in`` holds the frozen
linear and convolution weights in bf16 and keeps what gives the float32 weights back at the end.
Rows, each a fresh subprocess reporting its own peak RSS (``ru_maxrss``), on a pipeline built by
``bench/real_size.py`` from its released config with random weights: pgraft's finetune stage today
(on the CPU: the weights' own storage, no copy), the old ``frozen_layers_in`` patched in (``.to("cpu")``
of each weight: on the CPU the same storage), the GPU path forced on the CPU (``host="none"``: only the
bits bf16 drops kept, ``split_bf16``), the frozen layers left in float32 (autocast casting them per
call), and the plain diffusers LoRA loop (frozen weights in bf16, nothing kept). Each pgraft row
prints the adapter's checksum: they must agree bit for bit.

    OMP_NUM_THREADS=1 python bench/lora_memory.py --size sd2 --resolution 64 --steps 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MODES = ("pgraft today", "pgraft before (.to('cpu') kept)", "pgraft low bits kept (GPU path)", "pgraft float32 frozen",
         "diffusers LoRA loop")


@contextlib.contextmanager
def old_frozen_layers_in(network: Any, dtype: Any) -> Iterator[list[Any]]:
    """``frozen_layers_in`` as it was: every frozen float32 weight kept on the host until exit."""
    from pgraft_cli.models.lora import AUTOCAST_LAYERS

    first, originals = next(network.parameters(), None), []
    for module in network.modules():
        if isinstance(module, AUTOCAST_LAYERS) and not any(p is first for p in module.parameters(recurse=False)):
            for p in module.parameters(recurse=False):
                if not p.requires_grad and p.dtype == torch.float32:
                    originals.append((p, p.data.to("cpu")))
                    p.data = p.data.to(dtype)
    try:
        yield []
    finally:
        for p, data in originals:
            p.data = data.to(p.device)


def child(mode: str, folder: Path, steps: int, batch: int) -> None:
    from real_size import PROMPT, NoBar, diffusers_lora, latents_shape

    import pgraft_cli.stages.finetune as finetune

    if mode == MODES[1]:
        finetune.frozen_layers_in = old_frozen_layers_in
    elif mode == MODES[2]:
        from pgraft_cli.models.lora import frozen_layers_in

        finetune.frozen_layers_in = lambda network, dtype: frozen_layers_in(network, dtype, host="none")
    elif mode == MODES[3]:
        finetune.frozen_layers_in = lambda network, dtype: contextlib.nullcontext([])
    if mode == MODES[4]:
        diffusers_lora(folder, batch, "cpu", torch.bfloat16)(steps)
        checksum = None
    else:
        from pgraft_cli.io.checkpoints import load_model
        from pgraft_cli.io.recipes import FinetuneConfig
        from pgraft_cli.io.runstore import RunStore
        from pgraft_cli.models.lora import lora_state
        from pgraft_cli.stages.finetune import KeptSet

        y = torch.randn(latents_shape(folder, 4 * batch), generator=torch.Generator().manual_seed(0))
        model = load_model(str(folder))
        cfg = FinetuneConfig(steps=steps, batch_size=batch, lora_rank=16, mixed_precision="bf16",
                             checkpoint_every=10**6, max_grad_norm=1.0)
        with tempfile.TemporaryDirectory() as d, RunStore(Path(d)) as store:
            finetune.run_finetune(model, KeptSet(y=y, t_c=0.0, x0=y, prompts=[PROMPT] * len(y)), cfg, store, NoBar())
        state = lora_state(model.network)
        checksum = float(sum(v.double().abs().sum() for v in state.values()))
        frozen = sum(p.numel() for n, p in model.network.named_parameters() if "lora_" not in n)
        assert all(p.dtype == torch.float32 for p in model.network.parameters())
    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "adapter_checksum": checksum}
    if checksum is not None:
        out["frozen_parameters"] = frozen
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="sd2", choices=["tiny", "sd2", "sdxl"])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cache", type=Path, default=None, help="where the built pipeline is kept (default: a temp dir)")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        return child(a.mode, Path(a.folder), a.steps, a.batch)
    from real_size import build_pipeline

    cache = a.cache or Path(tempfile.mkdtemp(prefix="pgraft-lora-memory-"))
    folder = build_pipeline(a.size, cache / f"{a.size}-{a.resolution}", a.resolution)
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode, "--folder", str(folder), "--steps", str(a.steps),
               "--batch", str(a.batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        rows.append((mode, json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": proc.stderr[-300:]}))
    load = os.getloadavg()
    frozen = next((r["frozen_parameters"] for _, r in rows if "frozen_parameters" in r), 0)
    print(f"{a.size} at {a.resolution} px, {a.steps} bf16 LoRA step(s) of batch {a.batch}, rank 16, CPU, "
          f"{frozen / 1e6:.0f} M frozen parameters; load average {load[0]:.1f} {load[1]:.1f}")
    print("| row | peak RSS GB | adapter checksum |")
    print("|---|---:|---:|")
    for mode, r in rows:
        checksum = "-" if r.get("adapter_checksum") is None else f"{r['adapter_checksum']:.10g}"
        print(f"| {mode} | {r.get('peak_rss_gb', float('nan')):.2f} | {checksum} | {r.get('error', '')}")


if __name__ == "__main__":
    main()
