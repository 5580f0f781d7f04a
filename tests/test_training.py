"""The pieces every training loop shares: the EMA with warm-up."""

from __future__ import annotations

import math

import torch

from pgraft_cli.core.training import ema_decay, ema_update_


def test_ema_warm_up_leaves_almost_nothing_of_the_initial_weights():
    """The share of the initial weights after n steps is prod_k decay_k: ~0 with the warm-up
    (0.999 ** 1500 = 22 % without it)."""
    share = math.prod(ema_decay(step, 0.999) for step in range(1500))
    assert share < 1e-3
    assert ema_decay(0, 0.999) == 0.1 and ema_decay(10**6, 0.999) == 0.999


def test_ema_update_is_the_convex_combination():
    ema, p = [torch.zeros(3)], [torch.ones(3)]
    ema_update_(ema, p, 0.75)
    torch.testing.assert_close(ema[0], torch.full((3,), 0.25))
