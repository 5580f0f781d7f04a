"""The training loop's own overhead: torch's AdamW paths and the EMA update, side by side.

    OMP_NUM_THREADS=1 python bench/optimizer_paths.py --steps 400 --rounds 3

On the parameters of the main job's corrector (the recipe's UNet2DModel) and of the bundled digits
network (what a digits fine-tune trains), replays the same gradients through ``steps`` AdamW steps
on each of torch's paths: single-tensor (its CPU default: ``torch.optim`` picks foreach only for
parameters on the devices of ``torch.utils._foreach_utils._get_foreach_kernels_supported_devices``,
which leaves out the CPU, and never picks fused by itself), ``foreach=True`` and ``fused=True``;
and the EMA as a per-tensor ``lerp_`` loop against one ``torch._foreach_lerp_``. Rounds are
interleaved; CPU seconds (``time.process_time``) per ``steps``, the median of the rounds, and whether
the parameters end on the single-tensor path's bytes (else the largest difference).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pgraft_cli.io.checkpoints import load_model  # noqa: E402
from pgraft_cli.io.recipes import load_recipe  # noqa: E402
from pgraft_cli.stages.correct import corrector_network  # noqa: E402

PATHS = {"single-tensor (CPU default)": {"foreach": False}, "foreach=True": {"foreach": True}, "fused=True": {"fused": True}}


def adamw(start, grads, steps, path):
    params = [t.clone().requires_grad_() for t in start]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0, **path)
    seconds = 0.0
    for step in range(steps):
        for p, g in zip(params, grads[step % len(grads)]):
            p.grad = g
        tic = time.process_time()
        opt.step()
        seconds += time.process_time() - tic
    return seconds, [p.detach() for p in params]


def ema(start, grads, steps, foreach):
    avg = [t.clone() for t in start]
    seconds = 0.0
    for step in range(steps):
        weight = 1.0 - min(0.999, (1 + step) / (10 + step))
        tic = time.process_time()
        if foreach:
            torch._foreach_lerp_(avg, grads[step % len(grads)], weight)
        else:
            for e, g in zip(avg, grads[step % len(grads)]):
                e.lerp_(g, weight)
        seconds += time.process_time() - tic
    return seconds, avg


ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--steps", type=int, default=400)
ap.add_argument("--rounds", type=int, default=3)
a = ap.parse_args()
torch.manual_seed(0)
networks = {"corrector": corrector_network(load_recipe("inverse-noise", []).correct, (1, 16, 16))[0],
            "digits base": load_model("digits").network}
print("| parameters | tensors | numbers | update | CPU s per", a.steps, "steps | same bytes as the default |")
print("|---|---:|---:|---|---:|---|")
for label, net in networks.items():
    start = [p.detach().clone() for p in net.parameters()]
    grads = [[torch.randn_like(t) for t in start] for _ in range(4)]
    runs = {name: [] for name in [*PATHS, "EMA lerp_ loop (before)", "EMA _foreach_lerp_"]}
    ends = {}
    for _ in range(a.rounds):
        for name, path in PATHS.items():
            s, ends[name] = adamw(start, grads, a.steps, path)
            runs[name].append(s)
        for name, foreach in (("EMA lerp_ loop (before)", False), ("EMA _foreach_lerp_", True)):
            s, ends[name] = ema(start, grads, a.steps, foreach)
            runs[name].append(s)
    for name, seconds in runs.items():
        ref = ends["EMA lerp_ loop (before)" if name.startswith("EMA") else "single-tensor (CPU default)"]
        diff = max(float((x - y).abs().max()) for x, y in zip(ends[name], ref))
        print(f"| {label} | {len(start)} | {sum(t.numel() for t in start):,} | {name} | "
              f"{statistics.median(seconds):.3f} | {'yes' if diff == 0 else f'no (max diff {diff:.1e})'} |")
