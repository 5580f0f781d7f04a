"""The pieces every training loop shares: the learning rate's warm-up and decay, the EMA with warm-up."""

from __future__ import annotations

import math

import torch

import pytest

from pgraft_cli.core.training import ema_decay, ema_update_, scheduled_lr, warmup_lr


def test_ema_warm_up_leaves_almost_nothing_of_the_initial_weights():
    """The share of the initial weights after n steps is prod_k decay_k: ~0 with the warm-up
    (0.999 ** 1500 = 22 % without it)."""
    share = math.prod(ema_decay(step, 0.999) for step in range(1500))
    assert share < 1e-3
    assert ema_decay(0, 0.999) == 0.1 and ema_decay(10**6, 0.999) == 0.999


def test_scheduled_lr_warms_up_then_decays_by_the_closed_forms():
    """After a warm-up of w steps, p = (step - w) / (S - w): cosine lr (1 + cos(pi p)) / 2, linear
    lr (1 - p), constant lr; during the warm-up all three are warmup_lr."""
    lr, w, steps = 2e-3, 10, 110
    for decay in ("constant", "cosine", "linear"):
        assert [scheduled_lr(lr, k, w, steps, decay) for k in range(w)] == [warmup_lr(lr, k, w) for k in range(w)]
        assert scheduled_lr(lr, w, w, steps, decay) == pytest.approx(lr)
    assert scheduled_lr(lr, 60, w, steps, "cosine") == pytest.approx(lr / 2)  # p = 1/2
    assert scheduled_lr(lr, 35, w, steps, "cosine") == pytest.approx(lr * (1 + math.cos(math.pi / 4)) / 2)
    assert scheduled_lr(lr, 85, w, steps, "linear") == pytest.approx(lr / 4)  # p = 3/4
    assert scheduled_lr(lr, 109, w, steps, "linear") == pytest.approx(lr / 100)
    assert scheduled_lr(lr, 109, w, steps, "constant") == lr
    cosine = [scheduled_lr(lr, k, w, steps, "cosine") for k in range(w, steps)]
    assert all(a > b > 0 for a, b in zip(cosine, cosine[1:]))


def test_ema_update_is_the_convex_combination():
    ema, p = [torch.zeros(3)], [torch.ones(3)]
    ema_update_(ema, p, 0.75)
    torch.testing.assert_close(ema[0], torch.full((3,), 0.25))


def test_ema_update_is_the_per_tensor_lerp_bit_for_bit():
    """One foreach lerp over all the pairs gives the bytes of ``e.lerp_(p, 1 - decay)`` per pair, for
    mixed shapes and dtypes over a run of warm-up decays."""
    g = torch.Generator().manual_seed(0)
    shapes, dtypes = [(3,), (4, 5), (2, 3, 3, 3), ()], [torch.float32, torch.bfloat16, torch.float32, torch.float64]
    ema = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
    loop = [e.clone() for e in ema]
    for step in range(30):
        params = [torch.randn(s, generator=g).to(d).requires_grad_(d.is_floating_point) for s, d in zip(shapes, dtypes)]
        decay = ema_decay(step, 0.998)
        ema_update_(ema, params, decay)
        for e, p in zip(loop, params):
            e.lerp_(p.detach(), 1.0 - decay)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(ema, loop))
    assert not torch.equal(ema[1], torch.zeros_like(ema[1]))
    ema_update_([], [], 0.5)  # no parameters: nothing to do


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


def test_the_loop_sets_each_steps_learning_rate_by_its_decay(tmp_path):
    from pgraft_cli.stages.train_loop import LoopConfig, Training, train

    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([w], lr=0.1)

    def step_loss(step: int) -> torch.Tensor:
        loss = w.square().sum()
        loss.backward()
        return loss.detach()

    seen: list[float] = []
    cfg = LoopConfig(steps=12, learning_rate=0.1, warmup=2, checkpoint_every=100, decay="linear")
    train(Training([("w", w)], tmp_path / "s"), opt, step_loss, cfg, _Bar(), "t", dict,
          on_step=lambda step, loss, lr: seen.append(lr))
    assert seen == pytest.approx([scheduled_lr(0.1, k, 2, 12, "linear") for k in range(12)])
    assert seen[2] == pytest.approx(0.1) and seen[-1] == pytest.approx(0.01)
