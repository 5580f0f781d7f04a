"""The training losses: the corrector's flow-matching loss is the P-GRAFT loss at cutoff 0."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from pgraft_cli.core.losses import finetune_loss, flow_matching_loss, intermediate_target, kernel_weight
from pgraft_cli.core.samplers import NoiseSchedule


class TimeAwareNet(nn.Module):
    """A stand-in network whose prediction depends on both x_t and the timestep, as diffusers' do."""

    def forward(self, x, timestep):
        return SimpleNamespace(sample=0.3 * x - 0.2 + (timestep / 1000).reshape(-1, 1, 1, 1) * x.flip(-1))


def test_the_corrector_loss_is_the_pgraft_loss_at_cutoff_zero():
    g = torch.Generator().manual_seed(0)
    z, e = torch.randn(64, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(64, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01
    schedule, net = NoiseSchedule.flow(), TimeAwareNet()
    x_t, target = intermediate_target(schedule, z, e, t, 0.0)
    torch.testing.assert_close(x_t, schedule.noised(z, e, t))
    torch.testing.assert_close(target, e - z)
    assert bool((kernel_weight(schedule, t, 0.0) == 1).all())  # no reweighting without a cutoff
    pgraft = finetune_loss(net(x_t, schedule.timestep(t)).sample, target, kernel_weight(schedule, t, 0.0))
    torch.testing.assert_close(flow_matching_loss(net, schedule, z, e, t).float(), pgraft, rtol=1e-6, atol=0)
