"""Noise schedules, time grids and the deterministic sampler, in pgraft's time convention.

Continuous time t in [0, 1]: t = 1 is pure noise, t = 0 is data, and every model is written as
``x_t = alpha(t) x_0 + sigma(t) e`` with ``e ~ N(0, I)``:

- flow (rectified flow / flow matching): ``alpha = 1 - t``, ``sigma = t``; the network predicts the
  velocity ``v = e - x_0`` and one Euler step is ``x' = x + (t' - t) v``.
- diffusion (DDPM/DDIM): ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)`` with ``abar`` the
  scheduler's ``alphas_cumprod`` at integer timestep ``t * T``; the network predicts ``e``, ``v`` or
  ``x_0`` and one DDIM (eta = 0) step is ``x' = alpha(t') x0_hat + sigma(t') e_hat``.

A sampler is one loop over a grid ``1 = t_0 > ... > t_N = 0`` (k-diffusion style): no hidden state,
the grid is passed in, and ``sample`` can hand back the state at any grid time on the way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch
from torch import Tensor

Family = Literal["flow", "diffusion"]
PredictionType = Literal["flow", "epsilon", "v_prediction", "sample"]

# A denoiser maps (x_t, t) to the network's native prediction for a batch; t is a 0-d tensor.
Denoiser = Callable[[Tensor, Tensor], Tensor]


def betas_for_schedule(
    beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float
) -> Tensor:
    """The betas of a diffusers DDPM/DDIM scheduler config (float64)."""
    T = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float64
        )
    raise ValueError(f"unsupported beta_schedule '{beta_schedule}' (linear, scaled_linear, squaredcos_cap_v2)")


@dataclass(frozen=True)
class NoiseSchedule:
    """``x_t = alpha(t) x_0 + sigma(t) e`` for one model family, plus its timestep convention."""

    family: Family
    prediction_type: PredictionType
    num_train_timesteps: int = 1000
    shift: float = 1.0  # flow only: sigma-shift of SD3-style schedulers
    alphas_cumprod: Optional[Tensor] = field(default=None, repr=False, compare=False)

    @classmethod
    def flow(cls, num_train_timesteps: int = 1000, shift: float = 1.0) -> "NoiseSchedule":
        return cls("flow", "flow", num_train_timesteps, shift)

    @classmethod
    def diffusion(
        cls,
        prediction_type: PredictionType = "epsilon",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> "NoiseSchedule":
        betas = betas_for_schedule(beta_schedule, num_train_timesteps, beta_start, beta_end)
        abar = torch.cumprod(1.0 - betas, dim=0)
        return cls("diffusion", prediction_type, num_train_timesteps, 1.0, abar)

    # -- the schedule ---------------------------------------------------------------------------
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha(t), sigma(t))``; for diffusion, t = 0 means clean data (alpha = 1)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.family == "flow":
            return 1.0 - t, t
        assert self.alphas_cumprod is not None
        pos = (t * self.num_train_timesteps).clamp(0, self.num_train_timesteps - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = pos - lo
        abar = (1 - w) * self.alphas_cumprod[lo] + w * self.alphas_cumprod[hi]
        abar = torch.where(t <= 0, torch.ones_like(abar), abar)
        return abar.sqrt(), (1.0 - abar).sqrt()

    def timestep(self, t: Tensor) -> Tensor:
        """The network's timestep input for time t (diffusers convention: ``t * T``)."""
        return t * self.num_train_timesteps

    def grid(self, steps: int) -> Tensor:
        """The sampling grid ``t_0 > t_1 > ... > t_N = 0`` (float64, length ``steps + 1``).

        Flow: uniform in t from 1 to 0, then sigma-shifted ``s t / (1 + (s - 1) t)``.
        Diffusion: DDIM "trailing" integer timesteps ``round(T - k T / N) - 1`` divided by T,
        then 0 (the final step returns the x_0 prediction, as DDIM with ``set_alpha_to_one``).
        """
        if steps < 1:
            raise ValueError("steps must be >= 1")
        if self.family == "flow":
            u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
            return self.shift * u / (1.0 + (self.shift - 1.0) * u)
        T = self.num_train_timesteps
        if steps >= T:
            raise ValueError(f"diffusion sampling needs steps < num_train_timesteps ({T})")
        k = torch.arange(steps, dtype=torch.float64)
        timesteps = torch.round(T - k * T / steps) - 1
        return torch.cat([timesteps / T, torch.zeros(1, dtype=torch.float64)])

    # -- parameterisations ---------------------------------------------------------------------
    def to_x0_eps(self, x: Tensor, pred: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Convert a native prediction at time t into ``(x0_hat, e_hat)``.

        flow: ``x0 = x - t v``, ``e = x + (1 - t) v``;  epsilon: ``x0 = (x - s e) / a``;
        v_prediction (``v = a e - s x0``): ``x0 = a x - s v``, ``e = s x + a v``;
        sample: ``e = (x - a x0) / s``.
        """
        a, s = (v.to(x.dtype) for v in self.alpha_sigma(t))
        if self.prediction_type == "flow":
            return x - s * pred, x + a * pred
        if self.prediction_type == "epsilon":
            return (x - s * pred) / a, pred
        if self.prediction_type == "v_prediction":
            return a * x - s * pred, s * x + a * pred
        if self.prediction_type == "sample":
            return pred, (x - a * pred) / s
        raise ValueError(f"unknown prediction_type {self.prediction_type}")

    def from_x0_eps(self, x: Tensor, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The native prediction whose ``to_x0_eps`` is ``(x0, eps)`` (the training target form).

        flow: ``v = e - x0``; epsilon: ``e``; v_prediction: ``a e - s x0``; sample: ``x0``.
        ``t`` may be a 0-d tensor or one time per batch row.
        """
        a, s = (_rows(v, x) for v in self.alpha_sigma(t))
        if self.prediction_type == "flow":
            return eps - x0
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            return a * eps - s * x0
        if self.prediction_type == "sample":
            return x0
        raise ValueError(f"unknown prediction_type {self.prediction_type}")

    def step(self, x: Tensor, pred: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """One deterministic solver step from t to t_next (flow: Euler; diffusion: DDIM, eta=0)."""
        if self.family == "flow":
            return x + (t_next - t).to(x.dtype) * pred
        x0, eps = self.to_x0_eps(x, pred, t)
        a, s = (v.to(x.dtype) for v in self.alpha_sigma(t_next))
        return a * x0 + s * eps


CUTOFF_TOL = 1e-9


def above_cutoff(t: Tensor, cutoff: float) -> Tensor:
    """``t > cutoff`` with a float tolerance: a grid time that rounds onto the cutoff counts as *at* it.

    The one rule for where a P-GRAFT hand-over happens: the sampler captures the state at the first
    grid time that is not above the cutoff, and the base model runs from there (``network_at``).
    """
    return torch.as_tensor(t, dtype=torch.float64) > cutoff + CUTOFF_TOL


def _rows(v: Tensor, x: Tensor) -> Tensor:
    """A 0-d or per-row (B,) coefficient shaped to broadcast against ``x`` (B, ...)."""
    v = v.to(device=x.device, dtype=x.dtype)
    return v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim == 1 else v


def sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    noise: Tensor,
    grid: Tensor,
    capture_at: Optional[float] = None,
    callback: Optional[Callable[[int], None]] = None,
) -> tuple[Tensor, Optional[tuple[Tensor, float]]]:
    """Run the deterministic sampler from ``noise`` at ``grid[0]`` down to ``grid[-1]``.

    Returns the final state and, when ``capture_at`` is given, ``(x_c, t_c)``: the state at the
    first grid time ``t_c <= capture_at`` (the hand-over point for P-GRAFT).
    """
    x = noise
    captured = None
    capture_index = None
    if capture_at is not None:
        capture_index = int(torch.nonzero(~above_cutoff(grid, capture_at))[0])
        if capture_index == 0:
            captured = (x.clone(), float(grid[0]))
    for k in range(len(grid) - 1):
        t, t_next = grid[k], grid[k + 1]
        x = schedule.step(x, denoiser(x, t), t, t_next)
        if capture_index is not None and k + 1 == capture_index:
            captured = (x.clone(), float(t_next))
        if callback is not None:
            callback(k)
    return x, captured


def invert(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x0: Tensor,
    grid: Tensor,
    iterations: int = 8,
    tol: float = 1e-5,
    callback: Optional[Callable[[int], None]] = None,
) -> tuple[Tensor, int]:
    """Invert the deterministic sampler ``T``: find the noise that ``sample`` maps onto ``x0``.

    Walks the grid backwards. For each step ``y = F(x) = step(x, pred(x, t_k), t_k, t_{k+1})`` it
    solves for ``x`` by the fixed-point iteration ``x <- x + (y - F(x))``, starting from ``x = y``.
    For a flow ``F(x) = x + (t_{k+1} - t_k) v(x, t_k)``, so this is exactly backward Euler,
    ``x <- y - (t_{k+1} - t_k) v(x, t_k)``, which converges when the step times the Lipschitz
    constant of ``v`` is below 1. Stops a step early once the update's largest entry is ``< tol``.
    Returns the noise and the largest number of iterations any step used.
    """
    x = x0
    most = 0
    for k in range(len(grid) - 2, -1, -1):
        t, t_next = grid[k], grid[k + 1]
        y = x
        guess = y
        used = 0
        for used in range(1, iterations + 1):
            update = y - schedule.step(guess, denoiser(guess, t), t, t_next)
            guess = guess + update
            if float(update.abs().max()) < tol:
                break
        most = max(most, used)
        x = guess
        if callback is not None:
            callback(k)
    return x, most
