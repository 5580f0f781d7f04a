"""Cost of measure_flops' cache key (core.metrics.structure of the predict key) against one count.

    OMP_NUM_THREADS=1 PYTHONPATH=TREE python bench/flop_key.py   # run once per tree, side by side

Prints, for the digits UNet and the digits UNet with a rank-4 LoRA (its tuned call, adapter on), the
key's first (cold: code digests not yet cached) and fastest of 10 (warm) time, and the fastest of 5 of
one predict count; in CPU ms of this process (steadier than wall time on a shared box).
"""

from __future__ import annotations

import time

import torch

from pgraft_cli.core.metrics import measure_flops, structure
from pgraft_cli.io.checkpoints import load_model
from pgraft_cli.models.lora import add_lora
from pgraft_cli.stages import evaluate


def key_of(model, x, cond, at):
    if hasattr(evaluate, "predict_key"):
        return ("predict", at, evaluate.predict_key(model, x, cond))
    return ("predict", at, (model.network, model.tuned, model.lora, model.cutoff, model.tuned_guidance,
                             model.null_class, model.conditioning, model.model_class, model.model_config,
                             model.schedule, model.autocast, x, cond))


def ms(fn) -> float:
    start = time.process_time()
    fn()
    return 1000 * (time.process_time() - start)


def main() -> None:
    print("| model | key chars | key ms cold | key ms warm | count ms | key/count |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("digits", "digits + LoRA r4"):
        model = load_model("digits")
        if name.endswith("r4"):
            add_lora(model.network, rank=4, alpha=4)
            model.lora, model.cutoff = True, 0.5
        x = torch.zeros((1, *model.sample_shape))
        cond = model.encode(None, [0] if model.conditioning == "class" else None, guidance_scale=1.0)
        at = 1.0 if model.lora else 0.5  # the LoRA model's tuned call, adapter on
        t = torch.tensor(at, dtype=torch.float64)
        model.network_at(t)
        key = key_of(model, x, cond, at)
        cold = ms(lambda: structure(key))
        warm = min(ms(lambda: structure(key)) for _ in range(10))
        count = min(ms(lambda: measure_flops(lambda: model.predict(x, t, cond))) for _ in range(5))
        print(f"| {name} | {len(structure(key))} | {cold:.1f} | {warm:.1f} | {count:.1f} | {warm / count:.1%} |")


if __name__ == "__main__":
    main()
