"""Training losses as pure functions of tensors: the P-GRAFT target from the cutoff and flow matching.

The P-GRAFT loss (docs/methods.md): kept states ``y`` at the cutoff time ``c`` are data for the
forward kernel from ``c``, and the model is trained only at ``t in (c, 1]``. With ``c = 0`` this is
exactly the ordinary flow-matching / denoising loss on final samples (GRAFT).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PgraftError
from .samplers import NoiseSchedule, _rows


def intermediate_target(schedule: NoiseSchedule, y: Tensor, e: Tensor, t: Tensor, c: Tensor | float
                        ) -> tuple[Tensor, Tensor]:
    """``(x_t, target)`` for kept states ``y`` at time ``c``, noise ``e`` and times ``t > c`` (per row).

    Flow: ``x_t = a y + s e`` with ``a = (1 - t)/(1 - c)``, ``s^2 = t^2 - a^2 c^2``; the conditional
    score is ``-e / s`` and ``v = -(x + t score)/(1 - t)``, which simplifies to the form stable at
    ``t = 1``: ``v* = e (t + (1 - t) c^2 / (1 - c)^2) / s - y / (1 - c)`` (``e - y`` at ``c = 0``).
    Diffusion: ``a = sqrt(abar_t / abar_c)``, ``s^2 = 1 - a^2``, ``e* = sqrt(1 - abar_t) e / s``, and
    ``x0* = (x_t - sqrt(1 - abar_t) e*) / sqrt(abar_t)``, converted to the model's prediction type.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    c = torch.as_tensor(c, dtype=torch.float64).expand_as(t)
    a, s2 = schedule.kernel(t, c)
    s = s2.clamp_min(1e-12).sqrt()
    if schedule.family == "flow":
        coef = (t + (1 - t) * c**2 / (1 - c) ** 2) / s
        a_, s_, coef_, inv = (_rows(v, y) for v in (a, s, coef, 1 / (1 - c)))
        return a_ * y + s_ * e, coef_ * e - inv * y
    a_t, s_t = schedule.alpha_sigma(t)
    a_, s_, at_, st_ = (_rows(v, y) for v in (a, s, a_t, s_t))
    x_t = a_ * y + s_ * e
    eps = st_ * e / s_
    x0 = (x_t - st_ * eps) / at_
    return x_t, schedule.from_x0_eps(x_t, x0, eps, t)


def training_times(schedule: NoiseSchedule, n: int, cutoff: float, generator: torch.Generator) -> Tensor:
    """``n`` times uniform on ``(cutoff, 1]`` (diffusion: integer timesteps above ``cutoff * T``)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if schedule.family == "flow":
        return cutoff + (1 - cutoff) * (1 - u)
    T = schedule.num_train_timesteps
    low = int(cutoff * T) + 1  # smallest timestep strictly above the cutoff
    if low > T - 1:
        raise PgraftError(f"cutoff {cutoff} leaves no training timesteps below {T}; lower --cutoff")
    return (low + (u * (T - low)).floor().clamp(max=T - 1 - low)) / T


def kernel_weight(schedule: NoiseSchedule, t: Tensor, c: Tensor | float) -> Tensor:
    """Per-row loss weight ``s^2 / sigma_t^2``: the kernel-from-c noise over the model's own noise.

    As ``t -> c`` the kernel's noise ``s -> 0`` and the target's noise term grows like ``1/s``
    (denoising score matching at small noise), so unweighted gradients are dominated by rows near
    the cutoff. A weight that depends on t only leaves the minimiser at every t unchanged (the
    conditional mean), and this one keeps the target's noise term O(1). It is exactly 1 at c = 0.
    """
    _, s2 = schedule.kernel(t, c)
    sigma_t = schedule.alpha_sigma(t)[1]
    return (s2.clamp_min(0) / sigma_t**2).clamp(max=1.0)


def finetune_loss(pred: Tensor, target: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """(Weighted) mean squared error in float32: its minimiser at each t is the tilted field."""
    err = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if weight is None:
        return err.mean()
    return (weight.to(err) * err).mean()


def flow_matching_loss(network: nn.Module, schedule: NoiseSchedule, z: Tensor, e: Tensor, t: Tensor) -> Tensor:
    """``E |v(x_t, t) - (e - z)|^2`` on a flow ``schedule``'s path ``x_t = (1 - t) z + t e`` (N(0, I) at
    t = 1, data z at t = 0); the network takes the schedule's timesteps. It is the P-GRAFT loss at
    ``c = 0`` (``intermediate_target``), in the data's dtype."""
    return F.mse_loss(network(schedule.noised(z, e, t), schedule.timestep(t)).sample, e - z)
