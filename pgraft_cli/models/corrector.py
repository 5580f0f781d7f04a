"""The noise corrector of inverse noise correction: a model from N(0, I) to the base sampler's inverse noises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..core.samplers import NoiseSchedule, sample
from ..errors import PgraftError


@dataclass
class NoiseCorrector:
    """Maps N(0, I) noise to the base sampler's inverse-noise distribution.

    ``kind = "flow"``: a small diffusers UNet2DModel flow (``v = e - z``, t = 1 noise, t = 0 the
    corrected noise z) integrated with ``steps`` Euler steps; it computes in its network's dtype
    (timesteps in float32) and returns the caller's dtype. ``kind = "gaussian"``: ``z = mean + L e``
    with ``L`` the Cholesky factor of the inverted noises' covariance; ``"gaussian-diag"``:
    ``z = mean + std * e`` per dimension (no network calls).
    """

    kind: str
    base_steps: int
    steps: int = 0
    network: Optional[nn.Module] = None
    model_config: Optional[dict[str, Any]] = None
    mean: Optional[Tensor] = None
    chol: Optional[Tensor] = None
    std: Optional[Tensor] = None

    schedule = NoiseSchedule.flow()

    @staticmethod
    def schedule_config() -> dict[str, Any]:
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}

    def velocity(self, z: Tensor, t: Tensor) -> Tensor:
        assert self.network is not None
        timestep = self.schedule.timestep(t).to(device=z.device, dtype=torch.float32).expand(z.shape[0])
        own = next(self.network.parameters()).dtype  # callers (FLOPs probes) may pass the base model's dtype
        return self.network(z.to(own), timestep).sample

    @torch.no_grad()
    def __call__(self, noise: Tensor) -> Tensor:
        if self.network is None:
            assert self.mean is not None
            flat = noise.reshape(noise.shape[0], -1).double()
            spread = flat * self.std.double() if self.kind == "gaussian-diag" else flat @ self.chol.double().T
            return (self.mean.double() + spread).to(noise.dtype).reshape(noise.shape)
        own = next(self.network.parameters()).dtype
        z, _ = sample(self.velocity, self.schedule, noise.to(own), self.schedule.grid(self.steps))
        return z.to(noise.dtype)

    def to(self, device: Any, dtype: Optional[torch.dtype] = None) -> "NoiseCorrector":
        if self.network is not None:
            self.network.to(device=device, **({"dtype": dtype} if dtype is not None else {}))
        for name in ("mean", "chol", "std"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def map_flops(self) -> int:
        """FLOPs per image of a Gaussian corrector (a multiply-add is 2, as torch's flop counter):
        ``2 D^2`` for the Cholesky matmul, ``2 D`` for the diagonal form."""
        assert self.mean is not None
        dim = self.mean.numel()
        return 2 * dim * (1 if self.kind == "gaussian-diag" else dim)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.network.parameters()) if self.network is not None else 0


MAX_FULL_COVARIANCE_DIM = 16384  # a D x D float64 covariance above this is > 2 GB


def fit_gaussian(noises: Tensor, jitter: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Mean and Cholesky factor of the covariance of (N, ...) samples (float64).

    Refused when ``N <= D`` (the covariance has rank < D: samples would stay in the span of the
    training noises, plus jitter) or ``D > MAX_FULL_COVARIANCE_DIM`` (it would not fit in memory).
    """
    flat = noises.reshape(noises.shape[0], -1).double()
    num, dim = flat.shape
    if num <= dim or dim > MAX_FULL_COVARIANCE_DIM:
        raise PgraftError(f"a full-covariance Gaussian corrector needs more images than dimensions and at most "
                          f"{MAX_FULL_COVARIANCE_DIM} dimensions (got {num} images of dimension {dim}); set "
                          f"correct.corrector = \"gaussian-diag\" (per-dimension mean and std) or \"flow\"")
    mean = flat.mean(0)
    cov = torch.cov(flat.T) + jitter * torch.eye(flat.shape[1], dtype=torch.float64)
    return mean, torch.linalg.cholesky(cov)


def fit_gaussian_diag(noises: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and standard deviation of (N, ...) samples (float64, unbiased std)."""
    flat = noises.reshape(noises.shape[0], -1).double()
    return flat.mean(0), flat.std(0)


def fit_gaussian_diag_by_class(noises: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class, per-dimension mean and std of (N, ...) samples: ``(C, D)`` each (float64).

    The class-conditioned corrector ``z = mean[y] + std[y] * e``; a class with fewer than 2 samples
    takes the pooled fit (``fit_gaussian_diag``).
    """
    pooled_mean, pooled_std = fit_gaussian_diag(noises)
    flat = noises.reshape(noises.shape[0], -1).double()
    mean, std = pooled_mean.repeat(num_classes, 1), pooled_std.repeat(num_classes, 1)
    for c in range(num_classes):
        rows = flat[labels == c]
        if len(rows) >= 2:
            mean[c], std[c] = rows.mean(0), rows.std(0)
    return mean, std
