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
from typing import Any, Callable, Literal, Optional

import torch
from torch import Tensor

from ..errors import PgraftError

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

    def kernel(self, t: Tensor, c: Tensor | float) -> tuple[Tensor, Tensor]:
        """``(a, s2)`` of the forward kernel from time ``c`` to ``t > c``: ``x_t = a x_c + sqrt(s2) e``.

        Flow: ``a = (1 - t) / (1 - c)``, ``s2 = t^2 - a^2 c^2``. Diffusion: ``a = alpha_t / alpha_c``,
        ``s2 = 1 - a^2``. ``s2`` is unclamped: it is 0 at ``t = c`` and may round below 0 there (float64).
        """
        t = torch.as_tensor(t, dtype=torch.float64)
        c = torch.as_tensor(c, dtype=torch.float64).expand_as(t)
        if self.family == "flow":
            a = (1 - t) / (1 - c)
            return a, t**2 - a**2 * c**2
        a = self.alpha_sigma(t)[0] / self.alpha_sigma(c)[0]
        return a, 1 - a**2

    def noised(self, x0: Tensor, e: Tensor, t: Tensor) -> Tensor:
        """``x_t = alpha(t) x0 + sigma(t) e`` for per-row times ``t``, in ``x0``'s dtype (flow: ``(1 - t) x0 + t e``)."""
        if self.family == "flow":
            tt = _rows(t, x0)
            return (1 - tt) * x0 + tt * e
        a, s = (_rows(v, x0) for v in self.alpha_sigma(t))
        return a * x0 + s * e

    def timestep(self, t: Tensor) -> Tensor:
        """The network's timestep input for time t (diffusers convention: ``t * T``)."""
        return t * self.num_train_timesteps

    def grid(self, steps: int) -> Tensor:
        """The sampling grid ``t_0 > t_1 > ... > t_N = 0`` (float64, length ``steps + 1``).

        Flow: uniform in t from 1 to 0, then sigma-shifted ``s t / (1 + (s - 1) t)``.
        Diffusion: DDIM "trailing" integer timesteps ``round(T - k T / N) - 1`` divided by T,
        then 0 (the final step returns the x_0 prediction, as DDIM with ``set_alpha_to_one``). Above
        ``2T/3`` steps the last of them would be timestep 0, which ``alpha_sigma`` reads as the data
        (alpha = 1): refused.
        """
        if steps < 1:
            raise ValueError("steps must be >= 1")
        if self.family == "flow":
            u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
            return self.shift * u / (1.0 + (self.shift - 1.0) * u)
        T = self.num_train_timesteps
        if steps >= T:
            raise PgraftError(f"diffusion sampling with {steps} steps needs fewer than the model's {T} training "
                              f"timesteps; use at most {2 * T // 3} steps")
        k = torch.arange(steps, dtype=torch.float64)
        timesteps = torch.round(T - k * T / steps) - 1
        if timesteps[-1] < 1:  # integer timestep 0 is a noise level in diffusers; here t = 0 is the data
            raise PgraftError(f"diffusion sampling with {steps} steps of {T} puts its last step at timestep 0, "
                             f"which pgraft reads as the data itself; use at most {2 * T // 3} steps")
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


def sample_heun(velocity: Denoiser, noise: Tensor, grid: Tensor) -> Tensor:
    """Integrate a flow ``dx/dt = v(x, t)`` from ``noise`` at ``grid[0]`` to ``grid[-1]`` by Heun's
    method (2nd order, two calls a step): ``d = v(x, t)``, ``x' = x + h (d + v(x + h d, t')) / 2``
    with ``h = t' - t``. Exact where ``v`` is affine in t and constant in x (the trapezoid rule)."""
    x = noise
    for t, t_next in zip(grid[:-1], grid[1:]):
        h = (t_next - t).to(x.dtype)
        d = velocity(x, t)
        x = x + h / 2 * (d + velocity(x + h * d, t_next))
    return x


@dataclass
class InversionInfo:
    """How ``invert`` went, per image: network evaluations used (summed over the grid's steps), the
    largest fixed-point residual ``RMS(y - F(x))`` left at any step, and whether every step's residual
    was below that step's own tolerance (``tol``, or ``tol_last`` at the data's step)."""

    iterations: Tensor  # (B,) int64
    residual: Tensor  # (B,) float64
    converged: Tensor  # (B,) bool


def invert(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x0: Tensor,
    grid: Tensor,
    iterations: int = 12,
    tol: float = 1e-5,
    memory: int = 3,
    callback: Optional[Callable[[int], None]] = None,
    row_indexed: bool = False,
    tol_last: Optional[float] = None,
) -> tuple[Tensor, InversionInfo]:
    """Invert the deterministic sampler ``T``: find the noise that ``sample`` maps onto ``x0``.

    Walks the grid backwards. Step k knows ``y = x_{k+1}`` and solves ``F(x) = y`` for ``x = x_k``,
    ``F(x) = step(x, pred(x, t_k), t_k, t_{k+1})``, as the fixed point of ``G(x) = x + y - F(x)``;
    for a flow ``G(x) = y - (t_{k+1} - t_k) v(x, t_k)``: backward Euler, a contraction when the step
    times the Lipschitz constant of ``v`` is below 1. With ``v = (x - x0_hat(x, t)) / t`` its Jacobian
    is ``(|dt| / t_k) (I - dx0_hat/dx)``: at most 1/2 for every step but the last, where ``|dt| = t_k``
    and the directions the denoiser ``x0_hat`` flattens (off the data) barely contract, so the last
    step converges slowly and real images may keep a residual there (``correct`` gates on it).

    - First guess ``G(y)`` with the previous step's prediction (no network call; exact for a
      constant field).
    - Anderson acceleration (type II, ``memory`` m) per image: with ``f_j = G(x_j) - x_j``,
      ``gamma = argmin_g |f_j - dF g|`` over the last m differences ``dF = [f_{i+1} - f_i]``, then
      ``x_{j+1} = G(x_j) - dG gamma`` with ``dG = [G(x_{i+1}) - G(x_i)]``. Safeguard: an image
      whose residual grew takes the plain step ``x_{j+1} = G(x_j)``; ``memory = 0`` is plain.
    - Each image stops on its own once ``RMS(f_j) < tol`` (taking ``G(x_j)``); at the sampler's last
      step (the first solved, into the data) once ``RMS(f_j) < tol_last`` (default ``tol``): that
      step maps a point x to ``x0 - f(x)``, so its residual is the round trip's error at the data and
      can be set against the data's resolution, not the other steps' need of a clean start. Only the
      images still iterating go through the network (so it must treat rows independently), at most
      ``iterations`` evaluations per step. With ``row_indexed`` the denoiser is called as
      ``denoiser(x, t, rows)``, ``rows`` the indices into ``x0`` of the rows it is given, so
      per-image conditioning (a class, a caption) can follow them.
    """
    x, pred = x0, None
    info = InversionInfo(torch.zeros(len(x0), dtype=torch.int64), torch.zeros(len(x0), dtype=torch.float64),
                         torch.ones(len(x0), dtype=torch.bool))
    for k in range(len(grid) - 2, -1, -1):
        t, t_next = grid[k], grid[k + 1]
        y = x

        def fixed_point_map(z: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
            p = denoiser(z, t, rows) if row_indexed else denoiser(z, t)
            return z + (y[rows] - schedule.step(z, p, t, t_next)), p

        guess = y if pred is None else 2 * y - schedule.step(y, pred, t, t_next)
        step_tol = tol if tol_last is None or k < len(grid) - 2 else tol_last
        x, pred, used, residual = _anderson(fixed_point_map, guess, iterations, step_tol, memory)
        info.iterations += used
        info.residual = torch.maximum(info.residual, residual)
        info.converged &= residual < step_tol  # each step against its own tolerance, not the loosest
        if callback is not None:
            callback(k)
    return x, info


def invert_ddim(denoiser: Denoiser, schedule: NoiseSchedule, x0: Tensor, grid: Tensor,
                **solver: Any) -> tuple[Tensor, InversionInfo]:
    """Invert the DDIM (eta = 0) sampler of a diffusion ``schedule``: the noise at ``grid[0]`` that
    ``sample`` maps onto ``x0``. ``solver``: ``invert``'s keywords (iterations, tol, memory, callback,
    row_indexed, tol_last); the ``InversionInfo`` is ``invert``'s.

    DDIM is Euler in the scaled state ``u = x / alpha`` over ``r = sigma / alpha`` (DDIM paper, eq. 14):
    ``x' = alpha' x0_hat + sigma' e_hat`` is ``u' = u + (r' - r) e_hat(alpha u, t)``. So this is
    ``invert`` (backward Euler, Anderson-accelerated) on that flow-like ODE, and ``x_T = alpha(t_0) u_0``.
    The fixed point on ``x`` itself has the linear part ``(1 - alpha' / alpha) x`` (``alpha' / alpha``
    up to ~3.3 on an 8-step linear schedule): no contraction, so plain iteration diverges and only
    Anderson's mixing rescues it (not always: NaN on a random-weight epsilon UNet, where this form
    stays finite); in ``u`` its Jacobian is ``(|dr| / r)(I - dx0_hat/dx)`` as for the flow. The residual and ``tol`` are in ``u`` units, which DDIM carries to the data
    unscaled (``u = x`` at ``t = 0``): the unit of the round-trip error. The iterate is float64
    (``u`` reaches ~1e2); the denoiser receives ``x`` in float64 and casts as it needs (and the
    rows it is given, with ``row_indexed``, as in ``invert``).
    """
    alpha, sigma = schedule.alpha_sigma(grid)
    ratio = sigma / alpha
    time_of = {float(r): t for r, t in zip(ratio, grid)}

    def eps(u: Tensor, r: Tensor, *rows: Tensor) -> Tensor:
        t = time_of[float(r)]
        x = u * schedule.alpha_sigma(t)[0]
        return schedule.to_x0_eps(x, denoiser(x, t, *rows), t)[1].double()

    u, info = invert(eps, NoiseSchedule.flow(), x0.double(), ratio, **solver)
    return (u * alpha[0]).to(x0.dtype), info


def invert_sampler(denoiser: Denoiser, schedule: NoiseSchedule, x0: Tensor, grid: Tensor, iterations: int = 12,
                   tol: float = 1e-5, memory: int = 3,
                   callback: Optional[Callable[[int], None]] = None,
                   row_indexed: bool = False, tol_last: Optional[float] = None) -> tuple[Tensor, InversionInfo]:
    """The inverse of ``sample`` for either family: ``invert`` (flow Euler) or ``invert_ddim`` (DDIM)."""
    solver = invert if schedule.family == "flow" else invert_ddim
    return solver(denoiser, schedule, x0, grid, iterations=iterations, tol=tol, memory=memory, callback=callback,
                  row_indexed=row_indexed, tol_last=tol_last)


def _anderson(fixed_point_map: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], x: Tensor, iterations: int,
              tol: float, memory: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Solve ``x = G(x)`` row by row (see ``invert``); returns x, the last prediction, evaluations, residual."""
    rows = torch.arange(len(x))  # the images still iterating (CPU indices)
    x, pred = x.clone(), None
    used = torch.zeros(len(x), dtype=torch.int64)
    residual = torch.full((len(x),), math.inf, dtype=torch.float64)
    history: list[tuple[Tensor, Tensor]] = []  # (G(x_j), f_j) of those rows, flat float64
    for _ in range(iterations):
        g, p = fixed_point_map(x[rows], rows)
        pred = p.new_empty((len(x), *p.shape[1:])) if pred is None else pred
        pred[rows] = p
        g64 = g.reshape(len(rows), -1).double()
        f = g64 - x[rows].reshape(len(rows), -1).double()
        size = f.pow(2).mean(1).sqrt().cpu()  # RMS, the unit of the round-trip gate
        grew = size > residual[rows]
        used[rows] += 1
        residual[rows] = size
        history = (history + [(g64, f)])[-(memory + 1):]
        x[rows] = _anderson_mix(history, grew.to(g64.device)).to(x.dtype).reshape(g.shape)
        done = size < tol
        x[rows[done]] = g[done.to(g.device)]  # a converged image takes its plain step
        rows, going = rows[~done], (~done).to(g64.device)
        if not len(rows):
            break
        history = [(a[going], b[going]) for a, b in history]
    return x, pred, used, residual


def _anderson_mix(history: list[tuple[Tensor, Tensor]], plain: Tensor) -> Tensor:
    """``G(x_j) - dG gamma`` with ``gamma = argmin |f_j - dF gamma|`` per row; ``G(x_j)`` where ``plain``."""
    g, f = history[-1]
    if len(history) < 2:
        return g
    dg = torch.stack([b[0] - a[0] for a, b in zip(history, history[1:])], -1)  # (B, D, m)
    df = torch.stack([b[1] - a[1] for a, b in zip(history, history[1:])], -1)
    gram = df.transpose(1, 2) @ df
    ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).amax(1).clamp_min(1e-300)  # keeps a flat history solvable
    eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
    gamma = torch.linalg.solve(gram + ridge[:, None, None] * eye, df.transpose(1, 2) @ f[..., None])
    mixed = g - (dg @ gamma)[..., 0]
    plain = plain | ~torch.isfinite(mixed).all(1)
    return torch.where(plain[:, None], g, mixed)
