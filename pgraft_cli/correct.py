"""Inverse noise correction (docs/methods.md section 3): invert data, fit a noise corrector, compose.

1. ``run_invert``: freeze the base flow and invert its N-step Euler sampler ``T`` on every real
   image (backward Euler, Anderson-accelerated, per image: ``samplers.invert``); check
   ``T(T^-1(x)) - x`` per image, drop images whose RMS exceeds ``correct.max_reconstruction_rms``
   and refuse to go on when more than ``correct.max_dropped_fraction`` are dropped. Sharded, resumable.
2. ``run_train_corrector``: train a small flow (:class:`NoiseCorrector`) from N(0, I) to the
   inverted noises with the flow-matching loss; checkpoints to the run directory and resumes
   bit-exactly (every step's randomness is seeded by ``(seed, step)``; optimizer state is kept in
   safetensors, never pickled). Or ``corrector = "gaussian"``: the cheapest baseline, a Gaussian
   with the inverted noises' mean and covariance (more images than dimensions only), or
   ``"gaussian-diag"``: per-dimension mean and std.
3. Sampling composes ``e ~ N(0, I) -> corrector -> corrected noise -> base sampler T``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoints import model_key
from .data import DataRows
from .errors import PgraftError
from .models import Cond, LoadedModel
from .recipes import CorrectConfig
from .runstore import RunStore, derive_seed, load_training_state, save_training_state, rows_digest, tensor_digest
from .samplers import NoiseSchedule, invert, sample
from .training import ema_decay, ema_update_

# ----------------------------------------------------------------------------------------------
# The corrector


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


def corrector_config(cfg: CorrectConfig, sample_shape: tuple[int, int, int]) -> dict[str, Any]:
    """A diffusers UNet2DModel config for the corrector, from the recipe's width and depth keys."""
    c, h, _ = sample_shape
    widths = list(cfg.corrector_channels)
    down = ["DownBlock2D"] + ["AttnDownBlock2D" if cfg.corrector_attention else "DownBlock2D"] * (len(widths) - 1)
    up = ["AttnUpBlock2D" if cfg.corrector_attention else "UpBlock2D"] * (len(widths) - 1) + ["UpBlock2D"]
    return {"sample_size": h, "in_channels": c, "out_channels": c, "block_out_channels": widths,
            "layers_per_block": cfg.corrector_layers, "down_block_types": down, "up_block_types": up,
            "norm_num_groups": min(8, widths[0]), "attention_head_dim": widths[-1] // 2}


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


# ----------------------------------------------------------------------------------------------
# Stage keys: the whole [correct] section, less the keys a stage provably never reads

# The inversion's shards never read the corrector's keys, nor the per-image gate (its verdict is
# recomputed from the shards on every run, so raising a limit never throws the inversion away), nor
# the seed unless it seeds the data noise.
GATE_KEYS = ("max_reconstruction_rms", "max_dropped_fraction")


def invert_config(cfg: CorrectConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items()
            if not k.startswith("corrector") and k not in GATE_KEYS and (k != "seed" or cfg.data_noise > 0)}


# Training never reads these: checkpoints resume bit-exactly at any interval, and the corrector's
# sampling steps are used when it samples (they are in the sample stages' keys via model_key).
NOT_TRAINING_KEYS = ("corrector_checkpoint_every", "corrector_sample_steps")


# ----------------------------------------------------------------------------------------------
# Stage 1: inversion


def _model_space(model: LoadedModel, images: Tensor, lane: int) -> Tensor:
    return torch.cat([model.encode_images(chunk.to(model.device, model.dtype)).float().cpu()
                      for chunk in images.split(lane)])


def check_correctable(model: LoadedModel) -> None:
    """Inverse noise correction needs an unconditioned flow (the conditioned case is not supported yet)."""
    if model.family != "flow":
        raise PgraftError(f"inverse noise correction needs a flow model; {model.source} is a {model.family} model "
                          f"(pass --kind flow only if it really is a flow)")
    if model.conditioning != "none":
        raise PgraftError(f"inverse noise correction supports unconditioned flows only; {model.source} is "
                          f"{model.conditioning}-conditioned (use an unconditional model, or fine-tune with pgraft run)")


def run_invert(model: LoadedModel, images: Tensor | DataRows, cfg: CorrectConfig, lane: int,
               store: RunStore, bar: Any) -> tuple[Tensor, dict[str, Any]]:
    """Invert every image (in shards of ``cfg.invert_shard_size``); returns the kept noises and stats.

    ``images`` is a tensor or :class:`DataRows`: only the rows of shards not done are read, and the
    stage key hashes the rows batch by batch, so memory holds one shard of data, not the data set.
    Afterwards only the kept noises are in memory (the corrector's training set, see
    :func:`read_inversion`).

    An image whose round trip ``RMS(T(T^-1(x)) - x)`` exceeds ``max_reconstruction_rms`` is dropped
    from training and counted; more than ``max_dropped_fraction`` dropped fails the stage.
    """
    from safetensors.torch import save_file

    check_correctable(model)
    size = cfg.invert_shard_size
    num_shards = math.ceil(len(images) / size)
    config = {**invert_config(cfg), "lane": lane}
    stage = store.stage("invert", config, {"model": model_key(model), "data": rows_digest(images)}, num_shards)
    if not stage.done:
        todo = [k for k in range(num_shards) if not stage.shard_done(k)]
        task = bar.add_task("inverting", total=sum(min(size, len(images) - k * size) for k in todo), unit="img")
        for k in todo:
            chunk = _model_space(model, images[k * size:(k + 1) * size], lane)  # encoded only when not done
            if cfg.data_noise > 0:  # the paper's LSUN trick: tiny noise makes inversion stable
                g = torch.Generator().manual_seed(derive_seed(cfg.seed, "data-noise", k))
                chunk = chunk + cfg.data_noise * torch.randn(chunk.shape, generator=g)
            with stage.write_shard(k) as tmp:
                save_file(_invert_shard(model, chunk, cfg, lane, lambda n: bar.advance(task, n)), str(tmp))
    per_image, kept = read_inversion([stage.shard_path(k) for k in range(num_shards)], cfg)
    stats = inversion_stats(per_image, kept, cfg)
    if stats["dropped"] > cfg.max_dropped_fraction * stats["num"]:
        raise PgraftError(
            f"inversion failed for {stats['dropped']} of {stats['num']} images (round-trip RMS > "
            f"correct.max_reconstruction_rms = {cfg.max_reconstruction_rms}), more than correct.max_dropped_fraction = "
            f"{cfg.max_dropped_fraction}; raise correct.inversion_iterations (now {cfg.inversion_iterations}) or "
            f"correct.base_steps, set correct.data_noise = 1e-3, or raise those limits"
        )
    if store.is_main:
        if not stage.done:
            stage.finish([stage.shard_path(k) for k in range(num_shards)])
        store.write_json("invert/stats.json", stats)  # this run's gate, not part of the cached shards
    return kept, stats


def _invert_shard(model: LoadedModel, chunk: Tensor, cfg: CorrectConfig, lane: int, advance: Any) -> dict[str, Tensor]:
    """Noise, round-trip error, network evaluations and fixed-point residual of each image of a shard."""
    grid = model.schedule.grid(cfg.base_steps)
    cond = Cond()
    fn = lambda x, t: model.predict(x, t, cond)  # noqa: E731
    # The solver's iterate stays in float32 whatever the model's dtype (bf16 rounding alone is the
    # size of the tolerance); the round trip runs the sampler as it samples, in the model's dtype.
    fn32 = lambda x, t: model.predict(x.to(model.dtype), t, cond).float()  # noqa: E731
    out: dict[str, list[Tensor]] = {"noise": [], "err": [], "iterations": [], "residual": []}
    with torch.inference_mode():
        for part in chunk.split(lane):
            part = part.to(model.device, torch.float32)
            z, info = invert(fn32, model.schedule, part, grid, cfg.inversion_iterations, cfg.inversion_tol)
            back, _ = sample(fn, model.schedule, z.to(model.dtype), grid)
            for key, value in (("noise", z.float()), ("err", (back.float() - part).reshape(len(part), -1)),
                               ("iterations", info.iterations), ("residual", info.residual)):
                out[key].append(value.cpu())
            advance(len(part))
    err = torch.cat(out.pop("err"))
    return {**{k: torch.cat(v) for k, v in out.items()}, "rms": err.pow(2).mean(1).sqrt(), "max": err.abs().amax(1)}


PER_IMAGE_KEYS = ("rms", "max", "iterations", "residual")  # one number per image in each shard


def read_inversion(paths: list[Path], cfg: CorrectConfig) -> tuple[dict[str, Tensor], Tensor]:
    """Every image's per-image numbers (``PER_IMAGE_KEYS``) and the kept noises (round-trip RMS at
    most ``max_reconstruction_rms``), in image order.

    The kept noises are the corrector's training set, so they are in memory; nothing else is: each
    shard's noises are read alone and only its kept rows are copied into one preallocated tensor.
    """
    from safetensors import safe_open

    columns: dict[str, list[Tensor]] = {key: [] for key in PER_IMAGE_KEYS}
    for path in paths:
        with safe_open(str(path), "pt") as f:
            for key in PER_IMAGE_KEYS:
                columns[key].append(f.get_tensor(key))
            shape = f.get_slice("noise").get_shape()[1:]
    keep = torch.cat(columns["rms"]) <= cfg.max_reconstruction_rms
    kept, row = torch.empty((int(keep.sum()), *shape)), 0
    for path, mask in zip(paths, keep.split([len(r) for r in columns["rms"]])):
        if mask.any():
            with safe_open(str(path), "pt") as f:
                noise = f.get_tensor("noise")[mask]
            kept[row:row + len(noise)], row = noise, row + len(noise)
    return {key: torch.cat(parts) for key, parts in columns.items()}, kept


def inversion_stats(per_image: dict[str, Tensor], kept: Tensor, cfg: CorrectConfig) -> dict[str, Any]:
    """Round-trip error, convergence and dropped counts, and the kept noises' statistics."""
    rms, iters = per_image["rms"], per_image["iterations"]
    keep = rms <= cfg.max_reconstruction_rms
    flat = kept.flatten(1)
    counts = torch.bincount(iters)
    stats = {
        "reconstruction_rms_mean": float(rms.mean()), "reconstruction_rms_max": float(rms.max()),
        "reconstruction_abs_max": float(per_image["max"].max()), "num": len(rms),
        "converged": int((per_image["residual"] < cfg.inversion_tol).sum()), "dropped": int((~keep).sum()),
        "used": len(kept), "max_reconstruction_rms": cfg.max_reconstruction_rms,
        "iterations_mean": float(iters.double().mean()), "iterations_max": int(iters.max()),
        "iterations_cap": cfg.inversion_iterations * cfg.base_steps,
        "iterations_histogram": {str(n): int(c) for n, c in enumerate(counts.tolist()) if c},
        "residual_max": float(per_image["residual"].max()),
    }
    if len(kept):
        stats.update(noise_mean=float(flat.mean()), noise_std=float(flat.std()),
                     noise_norm_mean=float(flat.norm(dim=1).mean() / math.sqrt(flat.shape[1])))
    return stats


# ----------------------------------------------------------------------------------------------
# Stage 2: training the corrector


def flow_matching_loss(network: nn.Module, z: Tensor, e: Tensor, t: Tensor) -> Tensor:
    """``E |v(x_t, t) - (e - z)|^2`` with ``x_t = (1 - t) z + t e``: N(0, I) at t = 1, data z at t = 0."""
    tt = t.view(-1, *([1] * (z.ndim - 1)))
    xt = (1 - tt) * z + tt * e
    return F.mse_loss(network(xt, t * 1000).sample, e - z)


def run_train_corrector(noises: Tensor, sample_shape: tuple[int, int, int], cfg: CorrectConfig, base_id: str,
                        store: RunStore, bar: Any, device: Any = "cpu") -> tuple[NoiseCorrector, dict[str, Any]]:
    """Train (or resume, or fit) the corrector on the inverted noises.

    ``noises`` (the kept ones, from :func:`run_invert`) is the one data set held in memory, in host
    memory: each step moves only its batch to ``device``.
    """
    from diffusers import UNet2DModel
    from safetensors.torch import load_file, save_file

    config = {k: v for k, v in asdict(cfg).items() if k not in NOT_TRAINING_KEYS}
    inputs = {"base": base_id, "noises": tensor_digest(noises), "device_type": torch.device(device).type}
    stage = store.stage("train_corrector", config, inputs)
    if cfg.corrector == "gaussian":
        mean, chol = fit_gaussian(noises)
        corrector = NoiseCorrector("gaussian", cfg.base_steps, 0, mean=mean.float(), chol=chol.float())
        return corrector, {"kind": "gaussian", "parameters": 0}
    if cfg.corrector == "gaussian-diag":
        mean, std = fit_gaussian_diag(noises)
        corrector = NoiseCorrector("gaussian-diag", cfg.base_steps, 0, mean=mean.float(), std=std.float())
        return corrector, {"kind": "gaussian-diag", "parameters": 0}
    model_config = corrector_config(cfg, sample_shape)
    torch.manual_seed(cfg.seed)
    network = UNet2DModel(**model_config).to(device)
    ema = UNet2DModel(**model_config).to(device)
    ema.load_state_dict(network.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(network.parameters(), lr=cfg.corrector_learning_rate, weight_decay=0.0)
    state_path = stage.dir / "state.safetensors"
    start, losses = 0, []
    if state_path.exists():
        start, losses, model_state, ema_state = load_training_state(state_path, list(network.parameters()), opt)
        network.load_state_dict(model_state)
        ema.load_state_dict(ema_state)
    if not stage.done:
        task = bar.add_task("training corrector", total=cfg.corrector_train_steps, completed=start, unit="step")
        network.train()
        for step in range(start, cfg.corrector_train_steps):
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, "corrector-step", step))
            idx = torch.randint(0, len(noises), (cfg.corrector_batch_size,), generator=g)
            e = torch.randn((cfg.corrector_batch_size, *sample_shape), generator=g).to(device)
            t = torch.rand(cfg.corrector_batch_size, generator=g).to(device)
            for group in opt.param_groups:
                group["lr"] = cfg.corrector_learning_rate * min(1.0, (step + 1) / cfg.corrector_warmup)
            # the training set stays in host memory; only each step's batch goes to the device
            loss = flow_matching_loss(network, noises[idx].to(device), e, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            opt.step()
            ema_update_(ema.parameters(), network.parameters(), ema_decay(step, cfg.corrector_ema))
            losses.append(round(float(loss.detach()), 6))
            bar.advance(task, 1)
            if (step + 1) % cfg.corrector_checkpoint_every == 0 and step + 1 < cfg.corrector_train_steps:
                save_training_state(state_path, network.state_dict(), ema.state_dict(), list(network.parameters()),
                                    opt, step + 1, losses)
        final = ema if cfg.corrector_ema > 0 else network
        with stage.write_shard(0) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in final.state_dict().items()}, str(tmp),
                      metadata={"losses": json.dumps(losses)})
        if store.is_main:
            stage.finish([stage.shard_path(0)])
    from safetensors import safe_open

    weights = load_file(str(stage.shard_path(0)))
    with safe_open(str(stage.shard_path(0)), "pt") as f:
        losses = json.loads(f.metadata().get("losses", "[]"))
    network.load_state_dict(weights)
    network.eval().requires_grad_(False)
    corrector = NoiseCorrector("flow", cfg.base_steps, cfg.corrector_sample_steps, network=network,
                               model_config=model_config)
    recent = losses[-50:]
    return corrector, {"kind": "flow", "parameters": corrector.parameter_count(),
                       "final_loss": sum(recent) / len(recent) if recent else None,
                       "loss_curve": losses[:: max(1, len(losses) // 200)]}


# ----------------------------------------------------------------------------------------------
# The corrected checkpoint: one self-describing safetensors


def save_corrected(path: Path | str, corrector: NoiseCorrector, base: LoadedModel, metrics: dict[str, Any],
                   recipe: dict[str, Any], extra_provenance: Optional[dict[str, Any]] = None) -> Path:
    """Write the corrector, the base model's identity and sampler, and the measured metrics."""
    from .checkpoints import save_pgraft_safetensors

    base_info = {
        "source": base.source, "identity": base.identity, "model_class": base.model_class,
        "model_config": base.model_config, "scheduler_config": base.scheduler_config,
        "solver": "euler", "steps": corrector.base_steps,
    }
    extra = {
        "pgraft.kind": "corrector",
        "pgraft.corrector_type": corrector.kind,
        "pgraft.corrector_steps": str(corrector.steps),
        "pgraft.base": json.dumps(base_info, sort_keys=True, default=list),
        "pgraft.metrics": json.dumps(metrics, sort_keys=True, default=float),
    }
    if base.default_data:
        extra["pgraft.data"] = base.default_data
    if base.default_eval_data:
        extra["pgraft.eval_data"] = base.default_eval_data
    provenance = {"created_by": "pgraft correct", "recipe": recipe, **(extra_provenance or {})}
    if corrector.network is None:
        state = {"mean": corrector.mean, **({"std": corrector.std} if corrector.kind == "gaussian-diag"
                                            else {"chol": corrector.chol})}
        return save_pgraft_safetensors(path, None, "Gaussian", {"dim": int(corrector.mean.numel())},  # type: ignore[arg-type]
                                       NoiseCorrector.schedule_config(), provenance, extra, state=state)
    return save_pgraft_safetensors(path, corrector.network, "UNet2DModel", corrector.model_config or {},
                                   NoiseCorrector.schedule_config(), provenance, extra)


def load_corrected(path: Path, metadata: dict[str, str], base: Optional[str], kind: str,
                   allow_pickle: bool) -> LoadedModel:
    """Load a corrector file and its base model (stored source, or ``--base``); check the base's hash."""
    from .checkpoints import build_network, load_base_for, load_state, read_safetensors

    state, metadata = read_safetensors(path)
    info = json.loads(metadata["pgraft.base"])
    base_model = load_base_for(path, info, base, kind, allow_pickle)
    corrector_type = metadata.get("pgraft.corrector_type", "flow")
    base_steps = int(info["steps"])
    if corrector_type in ("gaussian", "gaussian-diag"):
        corrector = NoiseCorrector(corrector_type, base_steps, 0, mean=state["mean"], chol=state.get("chol"),
                                   std=state.get("std"))
    else:
        config = json.loads(metadata["pgraft.model_config"])
        network = build_network("UNet2DModel", config)
        load_state(network, state, str(path))
        network.eval().requires_grad_(False)
        corrector = NoiseCorrector("flow", base_steps, int(metadata.get("pgraft.corrector_steps", "4")),
                                   network=network, model_config=config)
    base_model.corrector = corrector
    base_model.source = str(path)
    base_model.source_kind = "pgraft-corrector"
    base_model.provenance = json.loads(metadata.get("pgraft.provenance", "{}"))
    base_model.metadata = metadata
    base_model.base_identity = base_model.identity
    from .runstore import sha256_file

    base_model.identity = sha256_file(path)
    return base_model
