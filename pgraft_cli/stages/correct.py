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
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from ..core.ema import ema_decay, ema_update_
from ..core.losses import flow_matching_loss
from ..core.samplers import invert, sample
from ..errors import PgraftError
from ..io.checkpoints import model_key
from ..io.recipes import CorrectConfig
from ..io.runstore import RunStore, derive_seed, load_training_state, save_training_state, tensor_digest
from ..models.corrector import NoiseCorrector, fit_gaussian, fit_gaussian_diag
from ..models.loaded import Cond, LoadedModel

# ----------------------------------------------------------------------------------------------
# The corrector's network


def corrector_config(cfg: CorrectConfig, sample_shape: tuple[int, int, int]) -> dict[str, Any]:
    """A diffusers UNet2DModel config for the corrector, from the recipe's width and depth keys."""
    c, h, _ = sample_shape
    widths = list(cfg.corrector_channels)
    down = ["DownBlock2D"] + ["AttnDownBlock2D" if cfg.corrector_attention else "DownBlock2D"] * (len(widths) - 1)
    up = ["AttnUpBlock2D" if cfg.corrector_attention else "UpBlock2D"] * (len(widths) - 1) + ["UpBlock2D"]
    return {"sample_size": h, "in_channels": c, "out_channels": c, "block_out_channels": widths,
            "layers_per_block": cfg.corrector_layers, "down_block_types": down, "up_block_types": up,
            "norm_num_groups": min(8, widths[0]), "attention_head_dim": widths[-1] // 2}


# ----------------------------------------------------------------------------------------------
# Stage keys: the whole [correct] section, less the keys a stage provably never reads

# The corrector's keys: only training the corrector and sampling it read them, never the inversion.
def invert_config(cfg: CorrectConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if not k.startswith("corrector")}


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


def run_invert(model: LoadedModel, images: Tensor, cfg: CorrectConfig, lane: int,
               store: RunStore, bar: Any) -> tuple[Tensor, dict[str, Any]]:
    """Invert every image (in shards of ``cfg.invert_shard_size``); returns the kept noises and stats.

    An image whose round trip ``RMS(T(T^-1(x)) - x)`` exceeds ``max_reconstruction_rms`` is dropped
    from training and counted; more than ``max_dropped_fraction`` dropped fails the stage.
    """
    from safetensors.torch import load_file, save_file

    check_correctable(model)
    size = cfg.invert_shard_size
    num_shards = math.ceil(len(images) / size)
    config = {**invert_config(cfg), "lane": lane}
    stage = store.stage("invert", config, {"model": model_key(model), "data": tensor_digest(images)}, num_shards)
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
    shards = [load_file(str(stage.shard_path(k))) for k in range(num_shards)]
    stats, kept = inversion_stats({key: torch.cat([s[key] for s in shards]) for key in shards[0]}, cfg)
    if stats["dropped"] > cfg.max_dropped_fraction * stats["num"]:
        raise PgraftError(
            f"inversion failed for {stats['dropped']} of {stats['num']} images (round-trip RMS > "
            f"correct.max_reconstruction_rms = {cfg.max_reconstruction_rms}), more than correct.max_dropped_fraction = "
            f"{cfg.max_dropped_fraction}; raise correct.inversion_iterations (now {cfg.inversion_iterations}) or "
            f"correct.base_steps, set correct.data_noise = 1e-3, or raise those limits"
        )
    if store.is_main and not stage.done:
        stats_path = store.write_json("invert/stats.json", stats)
        stage.finish([stage.shard_path(k) for k in range(num_shards)] + [stats_path])
    return kept, stats


def _invert_shard(model: LoadedModel, chunk: Tensor, cfg: CorrectConfig, lane: int, advance: Any) -> dict[str, Tensor]:
    """Noise, round-trip error, network evaluations and fixed-point residual of each image of a shard."""
    grid = model.schedule.grid(cfg.base_steps)
    cond = Cond()
    fn = lambda x, t: model.predict(x, t, cond)  # noqa: E731
    out: dict[str, list[Tensor]] = {"noise": [], "err": [], "iterations": [], "residual": []}
    with torch.inference_mode():
        for part in chunk.split(lane):
            part = part.to(model.device, model.dtype)
            z, info = invert(fn, model.schedule, part, grid, cfg.inversion_iterations, cfg.inversion_tol)
            back, _ = sample(fn, model.schedule, z, grid)
            for key, value in (("noise", z.float()), ("err", (back - part).float().reshape(len(part), -1)),
                               ("iterations", info.iterations), ("residual", info.residual)):
                out[key].append(value.cpu())
            advance(len(part))
    err = torch.cat(out.pop("err"))
    return {**{k: torch.cat(v) for k, v in out.items()}, "rms": err.pow(2).mean(1).sqrt(), "max": err.abs().amax(1)}


def inversion_stats(shard: dict[str, Tensor], cfg: CorrectConfig) -> tuple[dict[str, Any], Tensor]:
    """Round-trip error, convergence and dropped counts, and the kept noises' statistics."""
    rms, iters = shard["rms"], shard["iterations"]
    keep = rms <= cfg.max_reconstruction_rms
    kept = shard["noise"][keep]
    flat = kept.flatten(1)
    counts = torch.bincount(iters)
    stats = {
        "reconstruction_rms_mean": float(rms.mean()), "reconstruction_rms_max": float(rms.max()),
        "reconstruction_abs_max": float(shard["max"].max()), "num": len(rms),
        "converged": int((shard["residual"] < cfg.inversion_tol).sum()), "dropped": int((~keep).sum()),
        "used": len(kept), "max_reconstruction_rms": cfg.max_reconstruction_rms,
        "iterations_mean": float(iters.double().mean()), "iterations_max": int(iters.max()),
        "iterations_cap": cfg.inversion_iterations * cfg.base_steps,
        "iterations_histogram": {str(n): int(c) for n, c in enumerate(counts.tolist()) if c},
        "residual_max": float(shard["residual"].max()),
    }
    if len(kept):
        stats.update(noise_mean=float(flat.mean()), noise_std=float(flat.std()),
                     noise_norm_mean=float(flat.norm(dim=1).mean() / math.sqrt(flat.shape[1])))
    return stats, kept


# ----------------------------------------------------------------------------------------------
# Stage 2: training the corrector


def run_train_corrector(noises: Tensor, sample_shape: tuple[int, int, int], cfg: CorrectConfig, base_id: str,
                        store: RunStore, bar: Any, device: Any = "cpu") -> tuple[NoiseCorrector, dict[str, Any]]:
    """Train (or resume, or fit) the corrector on the inverted noises."""
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
        data = noises.to(device)
        task = bar.add_task("training corrector", total=cfg.corrector_train_steps, completed=start, unit="step")
        network.train()
        for step in range(start, cfg.corrector_train_steps):
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, "corrector-step", step))
            idx = torch.randint(0, len(data), (cfg.corrector_batch_size,), generator=g)
            e = torch.randn((cfg.corrector_batch_size, *sample_shape), generator=g).to(device)
            t = torch.rand(cfg.corrector_batch_size, generator=g).to(device)
            for group in opt.param_groups:
                group["lr"] = cfg.corrector_learning_rate * min(1.0, (step + 1) / cfg.corrector_warmup)
            loss = flow_matching_loss(network, data[idx], e, t)
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


