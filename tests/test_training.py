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


class _Bar:
    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass


def test_the_loop_reads_tensor_losses_back_once_per_checkpoint_stretch_not_per_step(tmp_path, monkeypatch):
    """A step's loss stays a tensor (on a GPU: no host sync per step); the losses are read back at each
    checkpoint and at the end, and equal the per-step floats rounded as before."""
    from pgraft_cli.stages import train_loop
    from pgraft_cli.stages.train_loop import LoopConfig, Training, train

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    expected: list[float] = []

    def step_loss(step: int) -> torch.Tensor:
        loss = (w * (step + 1) / 3).square().sum()
        loss.backward()
        expected.append(round(float(loss.detach()), 6))
        return loss.detach()

    reads: list[int] = []
    real = train_loop._floats
    monkeypatch.setattr(train_loop, "_floats", lambda values: reads.append(len(values)) or real(values))
    saved: list[list[float]] = []
    monkeypatch.setattr(Training, "save", lambda self, opt, weights: saved.append(list(self.losses)))
    run = Training([("w", w)], tmp_path / "state.safetensors")
    train(run, opt, step_loss, LoopConfig(steps=10, learning_rate=0.1, checkpoint_every=4), _Bar(), "t", dict)
    assert reads == [4, 4, 2]  # two checkpoints (after steps 4 and 8), then the end
    assert saved == [expected[:4], expected[:8]]  # each checkpoint holds every loss so far
    assert run.losses == expected and all(type(v) is float for v in run.losses)
