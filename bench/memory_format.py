"""One UNet2DConditionModel forward on the CPU, contiguous against channels_last weights, in CPU seconds.

    OMP_NUM_THREADS=1 python bench/memory_format.py --size sd2 --latent 16 --rounds 4
    OMP_NUM_THREADS=1 python bench/memory_format.py --size tiny --rounds 6 --reps 20

What decides ``stages.sample.CHANNELS_LAST_FAMILIES`` for the text UNet family: random weights at
SD2 size (``bench/real_size.py``'s released config; 865 M parameters, about 3.5 GB) or the tests'
tiny SD UNet, a batch of 2 (one prompt under classifier-free guidance), the two formats interleaved
round by round (the order alternates), ``time.process_time`` per forward, the median reported with
the largest output difference. The bundled digits UNet2DModel is measured through the stage code
by ``bench/cpu_lanes.py --formats``.
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
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def main() -> None:
    from diffusers import UNet2DConditionModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "sd2"], default="tiny")
    ap.add_argument("--latent", type=int, default=8, help="latent side (sd2: 16 is 128 px)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=1, help="forwards per round and format")
    a = ap.parse_args()
    if a.size == "sd2":
        from real_size import SD2

        config = SD2["unet"]
    else:
        config = TINY
    torch.manual_seed(0)
    net = UNet2DConditionModel(**config).eval()
    x = torch.randn(2, net.config.in_channels, a.latent, a.latent)
    t, text = torch.full((2,), 500.0), torch.randn(2, 77, net.config.cross_attention_dim)
    seconds: dict[str, list[float]] = {name: [] for name in FORMATS}
    with torch.inference_mode():
        reference = net(x, t, text).sample
        for r in range(a.rounds):
            for name in list(FORMATS)[:: 1 if r % 2 == 0 else -1]:
                net.to(memory_format=FORMATS[name])
                tic = time.process_time()
                for _ in range(a.reps):
                    out = net(x, t, text).sample
                seconds[name].append((time.process_time() - tic) / a.reps)
                if name == "channels_last":
                    diff = float((out - reference).abs().max())
    c, cl = (statistics.median(seconds[name]) for name in FORMATS)
    print(f"{a.size} UNet2DConditionModel, latent {a.latent}, batch 2, {torch.get_num_threads()} thread(s), median of "
          f"{a.rounds}: contiguous {c:.4f} s, channels_last {cl:.4f} s CPU per forward; channels_last speed "
          f"{c / cl:.3f}x; max |diff| {diff:.1e}; load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
