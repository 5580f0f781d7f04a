"""One UNet forward on the CPU, contiguous against channels_last weights, in CPU seconds.

    OMP_NUM_THREADS=1 python bench/memory_format.py --size sd2 --latent 16 --rounds 4
    OMP_NUM_THREADS=1 python bench/memory_format.py --size tiny --rounds 6 --reps 20
    OMP_NUM_THREADS=1 python bench/memory_format.py --size cifar32 --batch 8 --rounds 4
    OMP_NUM_THREADS=1 python bench/memory_format.py --size church256 --batch 1 --rounds 2

What decides ``stages.sample.resolve_memory_format``'s ``"auto"``: random weights at SD2 size
(``bench/real_size.py``'s released config; 865 M parameters, about 3.5 GB) or the tests' tiny SD
UNet (UNet2DConditionModel, a batch of 2: one prompt under classifier-free guidance), or a
UNet2DModel from a released config (``UNET2D``: google/ddpm-cifar10-32, 35.7 M parameters, and
google/ddpm-church-256, 113.7 M) or the bundled digits UNet itself (``digits``, 1.2 M, 16 px), at
``--batch`` images of the config's sample size; the two formats interleaved round by round (the
order alternates), ``time.process_time`` per forward, the median reported with the largest output
difference. The digits UNet is also measured through the stage code by ``bench/cpu_lanes.py --formats``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

TINY = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, norm_num_groups=32)
# UNet2DModel configs as released (config.json values that differ from diffusers' defaults).
_DDPM = dict(in_channels=3, out_channels=3, layers_per_block=2, downsample_padding=0, flip_sin_to_cos=False,
             freq_shift=1, norm_eps=1e-6, attention_head_dim=None)
UNET2D = {
    "cifar32": dict(_DDPM, sample_size=32, block_out_channels=(128, 256, 256, 256),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "church256": dict(_DDPM, sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                      down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4),
}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def network(size: str, latent: int, batch: int):
    """The network and a forward over a fixed random batch: ``(net, forward, what)``."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    torch.manual_seed(0)
    if size in ("tiny", "sd2"):
        config = TINY
        if size == "sd2":
            from real_size import SD2

            config = SD2["unet"]
        net = UNet2DConditionModel(**config).eval()
        x = torch.randn(batch, net.config.in_channels, latent, latent)
        t, text = torch.full((batch,), 500.0), torch.randn(batch, 77, net.config.cross_attention_dim)
        return net, lambda: net(x, t, text).sample, f"{size} UNet2DConditionModel, latent {latent}"
    if size == "digits":
        from pgraft_cli.io.checkpoints import load_model

        net = load_model("digits").network.eval()
    else:
        net = UNet2DModel(**UNET2D[size]).eval()
    side = net.config.sample_size
    x, t = torch.randn(batch, net.config.in_channels, side, side), torch.full((batch,), 500.0)
    millions = sum(p.numel() for p in net.parameters()) / 1e6
    return net, lambda: net(x, t).sample, f"{size} UNet2DModel ({millions:.1f} M parameters), {side} px"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "sd2", "digits", *UNET2D], default="tiny")
    ap.add_argument("--latent", type=int, default=8, help="latent side of the text UNets (sd2: 16 is 128 px)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=1, help="forwards per round and format")
    a = ap.parse_args()
    net, forward, what = network(a.size, a.latent, a.batch)
    seconds: dict[str, list[float]] = {name: [] for name in FORMATS}
    with torch.inference_mode():
        reference = forward()
        for r in range(a.rounds):
            for name in list(FORMATS)[:: 1 if r % 2 == 0 else -1]:
                net.to(memory_format=FORMATS[name])
                tic = time.process_time()
                for _ in range(a.reps):
                    out = forward()
                seconds[name].append((time.process_time() - tic) / a.reps)
                if name == "channels_last":
                    diff = float((out - reference).abs().max())
    c, cl = (statistics.median(seconds[name]) for name in FORMATS)
    print(f"{what}, batch {a.batch}, {torch.get_num_threads()} thread(s), median of "
          f"{a.rounds}: contiguous {c:.4f} s, channels_last {cl:.4f} s CPU per forward; channels_last speed "
          f"{c / cl:.3f}x; max |diff| {diff:.1e}; load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
