"""The maths every training loop shares (fine-tuning and the noise corrector): warm-up, decay and EMA."""

from __future__ import annotations

import math
from typing import Iterable, Literal

import torch
from torch import Tensor

Decay = Literal["constant", "cosine", "linear"]


def warmup_lr(learning_rate: float, step: int, warmup: int) -> float:
    """The learning rate at 0-based ``step``: linear warm-up ``lr * min(1, (step + 1) / warmup)``, then
    ``lr`` (no warm-up when ``warmup`` is 0)."""
    return learning_rate * min(1.0, (step + 1) / warmup) if warmup else learning_rate


def scheduled_lr(learning_rate: float, step: int, warmup: int, steps: int, decay: Decay = "constant") -> float:
    """The learning rate at 0-based ``step`` of ``steps``: :func:`warmup_lr`'s warm-up, then with
    ``p = (step - warmup) / (steps - warmup)`` in [0, 1): ``lr`` (constant), ``lr (1 + cos(pi p)) / 2``
    (cosine) or ``lr (1 - p)`` (linear), both falling from ``lr`` towards 0 at the end of training."""
    if decay == "constant" or step < warmup:
        return warmup_lr(learning_rate, step, warmup)
    p = (step - warmup) / max(1, steps - warmup)
    return learning_rate * (0.5 * (1 + math.cos(math.pi * p)) if decay == "cosine" else 1 - p)


def ema_decay(step: int, ema: float) -> float:
    """The EMA decay at 0-based ``step`` with warm-up: ``min(ema, (1 + step) / (10 + step))``.

    Without the warm-up the initial weights keep a share ``ema^n`` after n steps (22 % for 0.999
    over 1500 steps); with it their share is ``prod_k decay_k``, which vanishes within a few steps.
    """
    return min(ema, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update_(ema_params: Iterable[Tensor], params: Iterable[Tensor], decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * p`` for each pair, in place: ``ema.lerp_(p, 1 - decay)``,
    as one ``torch._foreach_lerp_`` over all the pairs (on the CPU the same per-tensor lerp, bit for bit)."""
    ema_params, params = list(ema_params), [p.detach() for p in params]
    if ema_params:  # the foreach ops refuse an empty list
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
