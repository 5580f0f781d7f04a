"""The noise corrector of inverse noise correction: a model from N(0, I) to the base sampler's inverse noises."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..core.gaussian import colour
from ..core.ridge import ridge_fit
from ..core.samplers import NoiseSchedule, sample, sample_heun
from ..errors import PgraftError


def precision_label(dtype: Any, autocast: Any = None) -> str:
    """How a network computes, in words: its weights' dtype, and the autocast it runs under if any
    (``torch.float32`` or ``"torch.float32"`` alike), e.g. ``"float32 weights under bfloat16 autocast"``."""
    weights = str(dtype).removeprefix("torch.")
    return weights if autocast is None else f"{weights} weights under {str(autocast).removeprefix('torch.')} autocast"


@dataclass
class NoiseCorrector:
    """Maps N(0, I) noise to the base sampler's inverse-noise distribution.

    ``kind = "flow"``: a small diffusers UNet2DModel flow (``v = e - z``, t = 1 noise, t = 0 the
    corrected noise z) integrated with ``steps`` steps of ``sampler`` (``euler``, or ``heun``: two
    network calls a step, ``core.samplers.sample_heun``); it computes in its network's dtype
    (timesteps in float32) and returns the caller's dtype. ``kind = "mlp"``: the same flow with an
    :class:`MLPFlow` network on the flattened sample. ``kind = "gaussian"``: ``z = mean + L e``
    with ``L`` the Cholesky factor of the inverted noises' covariance; ``"gaussian-diag"``:
    ``z = mean + std * e`` per dimension (no network calls).

    A class-conditioned corrector (``conditioning = "class"``) holds one fit per class: ``mean``
    (C, D), ``std`` (C, D) or ``chol`` (K, D, D) with ``chol_of`` (C,) naming each class's factor (a
    shared factor, pooled or tied, is stored once, not per class), or a flow network with a class embedding
    (``num_class_embeds = C``); each row takes its class's. A text-conditioned one
    (``conditioning = "text"``) takes each sample's pooled text embedding ``c`` (E,): the Gaussian
    kinds' mean is ``mean + c @ weight`` (a ridge regression, :func:`fit_gaussian_on_text`; ``weight``
    (E, D)) with one ``std``/``chol`` from the residuals; the flow's network gets
    ``projection(c)`` as its class embedding (``class_embed_type = "identity"``). Any prompt works,
    seen in training or not.
    """

    kind: str
    base_steps: int
    steps: int = 0
    sampler: str = "euler"  # the flow's integrator: "euler" | "heun"
    network: Optional[nn.Module] = None
    model_config: Optional[dict[str, Any]] = None
    mean: Optional[Tensor] = None
    chol: Optional[Tensor] = None
    std: Optional[Tensor] = None
    conditioning: str = "none"  # "none" | "class" | "text"
    weight: Optional[Tensor] = None  # text Gaussians: (E, D), the mean's map of the pooled embedding
    projection: Optional[nn.Linear] = None  # text flow: pooled embedding -> the network's class embedding
    chol_of: Optional[Tensor] = None  # class -> row of ``chol`` (None: row c is class c's)
    # The sampler it was fitted to: the guidance a conditioned base was inverted with, the autocast, and
    # the base's weights' dtype (None: a file from before it was recorded)
    guidance_scale: Optional[float] = None
    autocast: Optional[str] = None
    dtype: Optional[str] = None

    schedule = NoiseSchedule.flow()

    @staticmethod
    def schedule_config() -> dict[str, Any]:
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}

    def fitted_precision(self, dtype: Any) -> str:
        """The base sampler's precision the inverted noises came from (:func:`precision_label`);
        ``dtype`` stands in for the weights' dtype where the file predates its record."""
        return precision_label(self.dtype or dtype, self.autocast)

    def condition_of(self, prompts: Optional[list[str]], classes: Optional[list[int]],
                     pooled_text: Callable[[list[str]], Tensor]) -> Optional[Tensor]:
        """Each row's condition: its class (long), its prompt's pooled text embedding (``pooled_text``,
        the base model's), or None for an unconditioned corrector."""
        if self.conditioning == "class":
            assert classes is not None
            return torch.tensor(classes, dtype=torch.long)
        if self.conditioning == "text":
            assert prompts is not None
            return pooled_text(prompts).float()
        return None

    def velocity(self, z: Tensor, t: Tensor, condition: Optional[Tensor] = None) -> Tensor:
        assert self.network is not None
        timestep = self.schedule.timestep(t).to(device=z.device, dtype=torch.float32).expand(z.shape[0])
        own = next(self.network.parameters()).dtype  # callers (FLOPs probes) may pass the base model's dtype
        if self.conditioning != "none" and condition is None:  # a FLOPs probe: any condition costs the same
            condition = (torch.zeros(z.shape[0], dtype=torch.long) if self.projection is None
                         else torch.zeros(z.shape[0], self.projection.in_features))
        if condition is None:
            return self.network(z.to(own), timestep).sample
        labels = condition.to(z.device) if self.projection is None else self.projection(condition.to(z.device, own))
        return self.network(z.to(own), timestep, class_labels=labels).sample

    @torch.no_grad()
    def __call__(self, noise: Tensor, condition: Optional[Tensor] = None) -> Tensor:
        """Corrected noise for ``noise``; ``condition`` is each row's class or pooled text embedding
        (:meth:`condition_of`) for a conditioned corrector."""
        if self.conditioning != "none" and condition is None:
            raise ValueError("a conditioned noise corrector needs each row's condition (condition_of)")
        if self.network is None:
            assert self.mean is not None
            flat = noise.reshape(noise.shape[0], -1).double()
            g = None if condition is None else condition.to(self.mean.device)
            per_row = g is not None and self.weight is None  # class fits: one row of parameters per class
            if self.weight is not None:  # text: the regression's mean, one spread
                mean = self.mean.double() + g.double() @ self.weight.double()
            else:
                mean = self.mean.double() if g is None else self.mean[g].double()
            if self.kind == "gaussian-diag":
                spread = flat * (self.std[g].double() if per_row else self.std.double())
            elif not per_row:
                spread = flat @ self.chol.double().T
            else:  # one matmul per factor used, never a (B, D, D) gather
                factor = g if self.chol_of is None else self.chol_of.to(g.device)[g]
                spread = torch.empty_like(flat)
                for k in factor.unique().tolist():
                    rows = factor == k
                    spread[rows] = flat[rows] @ self.chol[k].double().T
            return (mean + spread).to(noise.dtype).reshape(noise.shape)
        own = next(self.network.parameters()).dtype
        if self.mean is not None:  # a flow from the Gaussian source N(mean, L L^T)
            noise = colour(noise, self.mean.to(noise.device), self.chol.to(noise.device))
        velocity, grid = (lambda x, t: self.velocity(x, t, condition)), self.schedule.grid(self.steps)
        if self.sampler == "heun":
            return sample_heun(velocity, noise.to(own), grid).to(noise.dtype)
        return sample(velocity, self.schedule, noise.to(own), grid)[0].to(noise.dtype)

    @property
    def calls(self) -> int:
        """Network calls per image of a flow corrector: ``steps`` (Euler) or ``2 steps`` (Heun)."""
        return self.steps * (2 if self.sampler == "heun" else 1)

    def to(self, device: Any, dtype: Optional[torch.dtype] = None) -> "NoiseCorrector":
        if self.network is not None:
            self.network.to(device=device, **({"dtype": dtype} if dtype is not None else {}))
        if self.projection is not None:
            self.projection.to(device=device, **({"dtype": dtype} if dtype is not None else {}))
        for name in ("mean", "chol", "std", "weight", "chol_of"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def map_flops(self) -> int:
        """FLOPs per image of a Gaussian corrector (a multiply-add is 2, as torch's flop counter):
        ``2 D^2`` for the Cholesky matmul, ``2 D`` for the diagonal form, and a text fit's mean ``c W``
        (``2 E D``, E the pooled embedding's width)."""
        assert self.mean is not None
        dim = self.mean.shape[-1]
        mean = 0 if self.weight is None else 2 * self.weight.shape[0] * dim
        return 2 * dim * (1 if self.kind == "gaussian-diag" else dim) + mean

    def parameter_count(self) -> int:
        if self.network is None:
            return 0
        return sum(p.numel() for p in self.network.parameters()) + (
            0 if self.projection is None else sum(p.numel() for p in self.projection.parameters()))


@dataclass
class VelocityOutput:
    """What :class:`MLPFlow` (and a traced UNet, ``models.traced``) returns: the prediction as ``.sample``, as a
    diffusers UNet's output."""

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


def fit_gaussian_by_class(noises: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class mean ``(C, D)``, Cholesky factors ``(K, D, D)`` and each class's factor ``(C,)`` (float64).

    A class with more samples than dimensions has its own mean and covariance. A class with at least 2 has
    its own mean and shares the pooled within-class covariance (LDA's tied covariance: the scatter about
    each class's own mean, ``N - C`` degrees of freedom, where that leaves more than D). A class with fewer,
    or all of them where the tied covariance has too few degrees of freedom, takes the pooled fit
    (``fit_gaussian``: the unconditional mean and covariance; it refuses when the pool itself is too small).
    Shared factors are stored once (``K D^2`` for K distinct factors, not ``C D^2``). (Before, every class
    without its own covariance took the pooled mean too: on the digits, 108 images a class of 256
    dimensions, the class-conditioned corrector was the unconditional one.)
    """
    pooled_mean, pooled_chol = fit_gaussian(noises)
    flat = noises.reshape(noises.shape[0], -1).double()
    dim = flat.shape[1]
    counts = torch.bincount(labels.long(), minlength=num_classes)[:num_classes]
    means = {c: flat[labels == c].mean(0) for c in range(num_classes) if counts[c] >= 2}
    residuals = torch.cat([flat[labels == c] - m for c, m in means.items()]) if means else flat[:0]
    dof = len(residuals) - len(means)
    tied = None
    if dof > dim:
        cov = residuals.T @ residuals / dof + 1e-5 * torch.eye(dim, dtype=torch.float64)
        tied = torch.linalg.cholesky(cov)
    mean, chol_of, factors = pooled_mean.repeat(num_classes, 1), torch.zeros(num_classes, dtype=torch.long), [pooled_chol]
    shares = [c for c in means if counts[c] <= dim] if tied is not None else []
    if shares:
        factors.append(tied)
        for c in shares:
            mean[c], chol_of[c] = means[c], 1
    for c in means:
        if counts[c] > dim:
            mean[c], own = fit_gaussian(flat[labels == c])
            chol_of[c] = len(factors)
            factors.append(own)
    return mean, torch.stack(factors), chol_of


RIDGE_SCALES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # lam = scale * mean squared centred embedding norm


def fit_gaussian_on_text(noises: Tensor, embeds: Tensor, kind: str) -> tuple[Tensor, Tensor, Tensor, dict[str, float]]:
    """The text-conditioned Gaussian corrector: ``z = mean + c @ weight + spread(e)``.

    The mean is the ridge regression of the noises on the pooled text embeddings ``c``
    (:func:`core.ridge.ridge_fit`), its ``lam = s tr(Xc Xc^T) / N`` with ``s`` the one of
    ``RIDGE_SCALES`` of least leave-one-out error; the spread is ``std`` (``gaussian-diag``) or the
    Cholesky factor (``gaussian``) of the residuals. Returns ``(mean, weight, spread, info)``, info
    with the chosen ``ridge``, its leave-one-out error per row and that of the pooled mean
    (``mean_i ||y_i - ybar||^2 (N / (N - 1))^2``), and ``loo_gain = 1 - ridge / pooled``: the share of
    a held-out image's squared mean error the text embedding explains (0 or less: it does not help).
    """
    y = noises.reshape(len(noises), -1).double()
    x = embeds.reshape(len(embeds), -1).double()
    num = len(y)
    if num < 3:
        raise PgraftError(f"a text-conditioned corrector needs at least 3 images (got {num}); raise correct.num_images")
    scale = float((x - x.mean(0)).pow(2).sum()) / num or 1.0
    fits = [(s * scale, *ridge_fit(x, y, s * scale)) for s in RIDGE_SCALES]
    lam, mean, weight, loo = min(fits, key=lambda f: f[3])
    residual = y - mean - x @ weight
    spread = fit_gaussian_diag(residual)[1] if kind == "gaussian-diag" else fit_gaussian(residual)[1]
    pooled = float((y - y.mean(0)).pow(2).sum(1).mean()) * (num / (num - 1)) ** 2
    info = {"ridge": lam, "loo_mse": loo / y.shape[1], "loo_mse_pooled": pooled / y.shape[1],
            "loo_gain": 1 - loo / pooled if pooled > 0 else 0.0}
    return mean, weight, spread, info
