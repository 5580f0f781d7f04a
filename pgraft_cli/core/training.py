"""The maths every training loop shares (fine-tuning and the noise corrector): warm-up and EMA."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor


def warmup_lr(learning_rate: float, step: int, warmup: int) -> float:
    """The learning rate at 0-based ``step``: linear warm-up ``lr * min(1, (step + 1) / warmup)``, then
    ``lr`` (no warm-up when ``warmup`` is 0)."""
    return learning_rate * min(1.0, (step + 1) / warmup) if warmup else learning_rate


def ema_decay(step: int, ema: float) -> float:
    """The EMA decay at 0-based ``step`` with warm-up: ``min(ema, (1 + step) / (10 + step))``.

    Without the warm-up the initial weights keep a share ``ema^n`` after n steps (22 % for 0.999
    over 1500 steps); with it their share is ``prod_k decay_k``, which vanishes within a few steps.
    """
    return min(ema, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update_(ema_params: Iterable[Tensor], params: Iterable[Tensor], decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * p`` for each pair, in place."""
    for e, p in zip(ema_params, params):
        e.lerp_(p.detach(), 1.0 - decay)
