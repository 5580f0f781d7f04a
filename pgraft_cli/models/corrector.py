"""The noise corrector of inverse noise correction: a model from N(0, I) to the base sampler's inverse noises."""

from __future__ import annotations

import math
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
    (timesteps in float32) and returns the caller's dtype. ``kind = "mlp"``: the same flow with an
    :class:`MLPFlow` network on the flattened sample. ``kind = "gaussian"``: ``z = mean + L e``
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


@dataclass
class VelocityOutput:
    """What :class:`MLPFlow` returns: the velocity as ``.sample``, as a diffusers UNet's output."""

    sample: Tensor


class MLPFlow(nn.Module):
    """A residual MLP velocity field ``v(x, timestep)`` on the flattened sample (D = C H W values).

    ``h = W_in x + b(t)``, ``b(t) = W_t2 silu(W_t1 sin_cos(timestep))``; each of ``blocks`` blocks adds
    ``W_2 silu(W_1 LN(h))`` to ``h``; ``v = W_out silu(LN(h))``, reshaped to the sample. ``W_out`` starts
    at zero, so an untrained corrector is the identity map. FLOPs: :func:`mlp_flow_flops`.
    """

    def __init__(self, sample_shape: list[int] | tuple[int, ...], width: int = 512, blocks: int = 2,
                 time_dim: int = 64) -> None:
        super().__init__()
        self.sample_shape, self.time_dim = tuple(sample_shape), time_dim
        dim = math.prod(self.sample_shape)
        self.inp = nn.Linear(dim, width)
        self.time = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(),
                                                  nn.Linear(width, width)) for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, timestep: Tensor) -> VelocityOutput:
        from diffusers.models.embeddings import get_timestep_embedding

        emb = get_timestep_embedding(timestep.reshape(-1).expand(x.shape[0]), self.time_dim).to(x.dtype)
        h = self.inp(x.reshape(x.shape[0], -1)) + self.time(emb)
        for block in self.blocks:
            h = h + block(h)
        return VelocityOutput(self.out(h).reshape(x.shape))


def mlp_flow_flops(dim: int, width: int, blocks: int, time_dim: int) -> int:
    """Matmul FLOPs of one :class:`MLPFlow` call per sample (a multiply-add is 2, as torch's counter):
    ``2 (D W + T W + W^2 + 2 B W^2 + W D)`` for input, time MLP, blocks and output layers."""
    return 2 * (dim * width + time_dim * width + width * width + 2 * blocks * width * width + width * dim)


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
