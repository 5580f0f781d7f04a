"""How far reduced-precision arithmetic moves the numbers `pgraft correct` and `pgraft evaluate` report: FID's
features, and through them FID and the copy test's same-image tolerance.

    python bench/feature_precision.py

Why: on an Ampere or later GPU torch runs cuDNN's float32 convolutions in TF32 by default (10 mantissa bits in
each product, float32 sums), and ``torch.set_float32_matmul_precision("high" / "medium")`` does it to matmuls
too ("medium": bf16 products in oneDNN's CPU matmuls). pgraft computes features and rewards inside
``io.host.ieee_float32`` (full float32 everywhere); this bench measures what that block protects, on this CPU,
by emulating the reduced products: before every convolution and linear layer of the feature network its input
and its weight are rounded to TF32 (or bf16), then multiplied in float32, which is what a tensor core's TF32
mode computes up to the order of its float32 sums. Two rounding rules, which bracket the hardware's (it reads
the low bits as zero, or rounds ties away from zero): to nearest (even), and truncation. Linear layers are
rounded too, while torch's default GPU settings put only convolutions in TF32 (and "medium" only matmuls in
bf16 on a CPU): an upper bound for those. bf16 autocast (a real torch path, not an emulation) runs every
layer's products and outputs in bf16.

Networks: the bundled digits classifier (FID's features for the bundled model) and the judge (a pixel MLP). For
each arithmetic, on the held-out digits (``digits-test``) against their float32 features:

- the distance between an image's two feature vectors, as a share of the float32 rows' RMS spread (the unit of
  ``core.metrics.COPY_SAME_IMAGE``, 1e-2: the copy test counts a held-out row that near a training row as that
  training image);
- FID of the held-out digits (features in that arithmetic) against the training digits (``digits-train``,
  float32: a reference computed once, e.g. on a CPU, reused with samples featured on a GPU), and its change
  from the float32 FID.

The first row is float32 in another batch size: float32's own noise floor, which the other rows are read
against. Numbers depend on the network: a 2048-d Inception at 299 x 299 (not shipped: weights need the network)
adds many more rounded layers than these; the bench says how large the effect is on the networks at hand.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from pgraft_cli.core.metrics import COPY_SAME_IMAGE, distances, rms_spread
from pgraft_cli.io.checkpoints import CLASSIFIER_PATH, JUDGE_PATH, load_classifier
from pgraft_cli.io.data import load_data


def round_mantissa(x: Tensor, bits: int, nearest: bool = True) -> Tensor:
    """``x`` (float32) with only ``bits`` of its 23 mantissa bits, rounded to nearest even or truncated
    (TF32: 10 bits; bf16: 7). Infinities and NaNs are not expected (features of images in [0, 1])."""
    drop = 23 - bits
    i = x.contiguous().view(torch.int32)
    if nearest:
        half = (1 << (drop - 1)) - 1
        i = i + half + ((i >> drop) & 1)  # ties to even
    return (i & ~((1 << drop) - 1)).view(torch.float32)


@contextlib.contextmanager
def rounded_products(net: nn.Module, bits: int, nearest: bool) -> Iterator[None]:
    """Every ``nn.Conv2d`` / ``nn.Linear`` of ``net`` multiplies ``bits``-bit operands (float32 sums)."""
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    saved = [m.weight.data.clone() for m in layers]
    hooks = []
    try:
        for m in layers:
            m.weight.data = round_mantissa(m.weight.data, bits, nearest)
            hooks.append(m.register_forward_pre_hook(lambda _m, args: (round_mantissa(args[0], bits, nearest), *args[1:])))
        yield
    finally:
        for h in hooks:
            h.remove()
        for m, w in zip(layers, saved):
            m.weight.data = w


def features(fn: Callable[[Tensor], Tensor], images: Tensor, batch: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([fn(chunk).double() for chunk in images.split(batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="images a call (the float32 row uses a quarter)")
    args = parser.parse_args()
    test, train = load_data("digits-test", (1, 16, 16)), load_data("digits-train", (1, 16, 16))
    print(f"held-out digits {len(test)}, training digits {len(train)}; COPY_SAME_IMAGE = {COPY_SAME_IMAGE:g} of the "
          f"RMS spread\n")
    print("| features | arithmetic | same image: max distance / RMS spread | median | FID held-out vs training | "
          "change from float32 |")
    print("|---|---|---:|---:|---:|---:|")
    for label, path in (("classifier", CLASSIFIER_PATH), ("judge", JUDGE_PATH)):
        net = load_classifier(path)

        def fn(x: Tensor) -> Tensor:
            return net.features(x * 2 - 1)

        exact = features(fn, test, args.batch)
        reference = features(fn, train, args.batch)
        spread = rms_spread(exact)
        fid0 = distances(exact, reference, kid_subsets=10)["fid"]
        variants: list[tuple[str, Callable[[], contextlib.AbstractContextManager], int]] = [
            ("float32, a quarter of the batch", contextlib.nullcontext, max(1, args.batch // 4)),
            ("TF32 products, rounded to nearest", lambda: rounded_products(net, 10, True), args.batch),
            ("TF32 products, truncated", lambda: rounded_products(net, 10, False), args.batch),
            ("bf16 products, rounded to nearest", lambda: rounded_products(net, 7, True), args.batch),
            ("bf16 autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16), args.batch),
        ]
        print(f"| {label} | float32 (the reference) | 0 | 0 | {fid0:.4f} | |")
        for name, block, batch in variants:
            with block():
                other = features(fn, test, batch)
            d = (other - exact).norm(dim=1) / spread
            fid = distances(other, reference, kid_subsets=10)["fid"]
            print(f"| {label} | {name} | {float(d.max()):.2e} | {float(d.median()):.2e} | {fid:.4f} | {fid - fid0:+.2e} |")


if __name__ == "__main__":
    main()
