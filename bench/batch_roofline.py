#!/usr/bin/env python
"""Where one network call's time goes at small batches: the bundled model's roofline question.

Issue 13's goal 2 asks for 85 % of the CPU's float32 matmul rate when sampling. At 64 images a
call pgraft's sampler reaches it (bench/sampling.py); at one image a call it does not. This bench
says why, for the network ``pgraft sample`` runs on the CPU (channels_last weights, the forward
replayed from its TorchScript trace, ``models.traced``), at each ``--batches`` size, one thread:

1. The call: seconds per call, the network's FLOPs (``torch.utils.flop_counter``), the achieved
   GFLOP/s and their share of a 1024^2 float32 ``torch.mm`` measured in the same run.
2. The split of that call by operator family (``torch.profiler``, each aten op's self CPU time):
   convolutions, matmuls (addmm, bmm, attention), normalisation, element-wise and the rest (views,
   copies, allocation, the wrappers' own dispatch). Shares of the profiled time, which the profiler
   inflates (``profiled ms``: about 30 % more than unprofiled at one image, mostly in the tiny view and
   allocation ops, so "other" reads high). ``torch.utils.flop_counter`` counts no FLOPs for the CPU's
   flash attention (about 3 % of the UNet's FLOPs), so GFLOP/s reads slightly low.
3. Each convolution shape of the call, timed alone: ``F.conv2d`` (torch's own choice of kernel:
   for float32 at batch 1 with small images, its native im2col + GEMM) against oneDNN's
   ``mkldnn_convolution`` called directly (its weights reordered on every call) and oneDNN with the
   weights packed once for the shape (``torch.ops.mkldnn._convolution_pointwise``, what inductor's
   ``freezing`` calls), the largest difference of each oneDNN output from torch's, and the sum of the
   fastest: what a per-shape choice of kernel could at most save.

    OMP_NUM_THREADS=1 python bench/batch_roofline.py                       # digits, batches 1 8 64
    OMP_NUM_THREADS=1 python bench/batch_roofline.py --batches 1 --calls 300
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling import matmul_rate  # noqa: E402

ELEMENTWISE = {"silu", "add", "mul", "div", "sub", "exp", "sin", "cos", "neg", "cat", "pow", "sigmoid", "clamp",
               "upsample_nearest2d", "rsqrt", "sqrt", "where", "fill"}


def family(name: str) -> str:
    """An aten op's family: conv, matmul (linear, bmm, attention), norm, element-wise, or other (views,
    copies, allocation, dispatch wrappers such as ``aten::linear``'s own time)."""
    short = name.removeprefix("aten::").strip("_")
    if "conv" in short:
        return "conv"
    if short in {"addmm", "bmm", "mm", "matmul", "baddbmm"} or "scaled_dot_product" in short:
        return "matmul"
    if "norm" in short:
        return "norm"
    if short in ELEMENTWISE:
        return "elementwise"
    return "other"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits", help="model to load (default: the bundled digits flow)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="images per call (default 1 8 64)")
    p.add_argument("--calls", type=int, default=200, help="timed calls per batch size at batch 1; fewer for larger (default 200)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--matmul-seconds", type=float, default=0.5, help="each of the matmul rate's 3 windows (default 0.5)")
    return p.parse_args()


def per_call(fn, calls: int) -> float:
    for _ in range(max(3, calls // 10)):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def packed_onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride: tuple, padding: tuple, groups: int):
    """A call of oneDNN's convolution on ``x`` with ``w`` packed once for this input shape (as inductor's
    ``freezing`` packs it)."""
    packed = torch.ops.mkldnn._reorder_convolution_weight(w, list(padding), list(stride), [1, 1], groups, list(x.shape))
    return lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, b, list(padding), list(stride), [1, 1], groups,
                                                           "none", [], "")


def conv_shapes(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> dict[tuple, int]:
    """(input shape, weight shape, stride, padding, groups) -> how many times one call runs it."""
    seen: dict[tuple, int] = defaultdict(int)

    def hook(mod, inputs, _out):
        seen[(tuple(inputs[0].shape), tuple(mod.weight.shape), mod.stride, mod.padding, mod.groups)] += 1

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        net(x, t)
    finally:
        for h in handles:
            h.remove()
    return dict(seen)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.stages.sample import resolve_memory_format

    model = load_model(args.model)
    net = model.network.eval()
    fmt = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}[
        resolve_memory_format(model, "auto")]  # what `pgraft sample` runs here
    net.to(memory_format=fmt)
    matmul = matmul_rate(seconds=args.matmul_seconds)
    print(f"{args.model}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, sample {tuple(model.sample_shape)}, "
          f"weights {str(fmt).removeprefix('torch.')}, {args.threads} thread(s); float32 1024^2 matmul: {matmul / 1e9:.1f} GFLOP/s")
    print()
    print("| images a call | ms a call | profiled ms | MFLOP a call | GFLOP/s | of matmul | conv | matmul | norm | element-wise | other |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    conv_rows = {}
    from torch.utils.flop_counter import FlopCounterMode

    for batch in args.batches:
        x = torch.randn(batch, *model.sample_shape).contiguous(memory_format=fmt)
        t = torch.full((batch,), 500.0)
        calls = max(10, args.calls // batch)
        with torch.inference_mode():
            with warnings.catch_warnings():  # TracerWarnings on shape arithmetic, torch.jit's deprecation (as models.traced)
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(lambda a, b: net(a, b).sample, (x, t), check_trace=False)
            with torch.jit.optimized_execution(False):
                seconds = per_call(lambda: traced(x, t), calls)
                profiled = max(3, calls // 10)  # parsing the events costs more than the calls
                with torch.profiler.profile() as prof:
                    for _ in range(profiled):
                        traced(x, t)
            with FlopCounterMode(display=False) as counter:
                net(x, t)
            flops = counter.get_total_flops()
            split: dict[str, float] = defaultdict(float)
            for event in prof.key_averages():
                if event.key.startswith("aten::"):
                    split[family(event.key)] += event.self_cpu_time_total
            total = sum(split.values()) or 1.0
            conv_rows[batch] = conv_shapes(net, x, t)
        rate = flops / seconds
        print(f"| {batch} | {seconds * 1e3:.3f} | {total / profiled / 1e3:.3f} | {flops / 1e6:.1f} | {rate / 1e9:.1f} | "
              f"{rate / matmul:.0%} | "
              + " | ".join(f"{split[f] / total:.0%}" for f in ("conv", "matmul", "norm", "elementwise", "other")) + " |")
    print()
    print("Each convolution shape alone (µs a call; `count` = times per network call):")
    for batch, shapes in conv_rows.items():
        print()
        print(f"images a call: {batch}")
        print()
        print("| input | weight | stride | count | F.conv2d (torch's choice) | oneDNN | oneDNN, packed once | fastest "
              "| max abs diff, oneDNN / packed |")
        print("|---|---|---|---:|---:|---:|---:|---|---:|")
        chosen = onednn = packed_total = best = 0.0
        calls = max(20, args.calls // batch)
        with torch.inference_mode():
            for (xs, ws, stride, padding, groups), count in shapes.items():
                x = torch.randn(xs).contiguous(memory_format=fmt)
                w = torch.randn(ws).contiguous(memory_format=fmt)
                b = torch.randn(ws[0])
                kernels = {"torch": lambda: F.conv2d(x, w, b, stride, padding, 1, groups),
                           "oneDNN": lambda: torch.ops.aten.mkldnn_convolution(x, w, b, padding, stride, (1, 1), groups),
                           "oneDNN packed": packed_onednn(x, w, b, stride, padding, groups)}
                times = {name: per_call(fn, calls) for name, fn in kernels.items()}
                ref = kernels["torch"]()
                diffs = [(kernels[k]() - ref).abs().max().item() for k in ("oneDNN", "oneDNN packed")]
                a, c, p = times.values()
                chosen, onednn, best = chosen + a * count, onednn + c * count, best + min(times.values()) * count
                packed_total += p * count
                print(f"| {xs} | {ws} | {stride[0]} | {count} | {a * 1e6:.1f} | {c * 1e6:.1f} | {p * 1e6:.1f} | "
                      f"{min(times, key=times.get)} | {diffs[0]:.1e} / {diffs[1]:.1e} |")
        print(f"| all | | | | {chosen * 1e6:.0f} | {onednn * 1e6:.0f} | {packed_total * 1e6:.0f} | per shape: "
              f"{best * 1e6:.0f} ({(chosen - best) / chosen:.0%} less than torch's choice) | |")


if __name__ == "__main__":
    main()
