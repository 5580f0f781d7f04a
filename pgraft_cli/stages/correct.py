"""Inverse noise correction (docs/methods.md section 3): invert data, fit a noise corrector, compose.

1. ``run_invert``: freeze the base model and invert its N-step deterministic sampler ``T`` (a
   flow's Euler, a diffusion model's DDIM with eta = 0) on every real image (backward Euler,
   Anderson-accelerated, per image: ``samplers.invert_sampler``); check
   ``T(T^-1(x)) - x`` per image, drop images whose RMS exceeds ``correct.max_reconstruction_rms``
   and refuse to go on when more than ``correct.max_dropped_fraction`` are dropped. Sharded, resumable.
2. ``run_train_corrector``: train a small flow (:class:`NoiseCorrector`; a UNet, or with
   ``corrector = "mlp"`` a residual MLP on the flattened noise) from N(0, I) to the
   inverted noises with the flow-matching loss in the shared loop (``train_loop.py``); checkpoints and resumes
   bit-exactly (every step's randomness is seeded by ``(seed, step)``; optimizer state is kept in
   safetensors, never pickled). Or ``corrector = "gaussian"``: the cheapest baseline, a Gaussian
   with the inverted noises' mean and covariance (more images than dimensions only), or
   ``"gaussian-diag"``: per-dimension mean and std.
3. Sampling composes ``e ~ N(0, I) -> corrector -> corrected noise -> base sampler T``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.gaussian import colour
from ..core.losses import flow_matching_loss
from ..core.samplers import invert_sampler, sample
from ..errors import PgraftError
from ..io.checkpoints import model_key
from ..io.data import DataRows
from ..io.host import native_cpu_bf16
from ..io.recipes import CorrectConfig
from ..io.runstore import Dist, RunStore, derive_seed, rows_digest, tensor_digest
from ..models.corrector import (MLPFlow, NoiseCorrector, fit_gaussian, fit_gaussian_by_class, fit_gaussian_diag,
                                fit_gaussian_diag_by_class, fit_gaussian_on_text, precision_label)
from ..models.loaded import LoadedModel
from .sample import (all_threads_key, check_stop, lanes_side_by_side, map_lanes, network_memory_format, resolve_memory_format,
                     resumed_lane, reused_cross_attention, traced_networks)
from .train_loop import LoopConfig, Training, adam_path, loss_summary, train


# ----------------------------------------------------------------------------------------------
# The corrector's network


def corrector_network(cfg: CorrectConfig, sample_shape: tuple[int, int, int],
                      extra: Optional[dict[str, Any]] = None) -> tuple[Any, dict[str, Any]]:
    """The untrained network of a ``flow`` (UNet2DModel; ``extra`` config keys: its class embedding) or
    ``mlp`` (:class:`MLPFlow`) corrector, and its config."""
    if cfg.corrector == "mlp":
        config = {"sample_shape": list(sample_shape), "width": cfg.corrector_width, "blocks": cfg.corrector_blocks}
        return MLPFlow(**config), config
    from diffusers import UNet2DModel

    config = {**corrector_config(cfg, sample_shape), **(extra or {})}
    return UNet2DModel(**config), config


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

# The inversion's shards never read the corrector's keys, nor the per-image gate (its verdict is
# recomputed from the shards on every run, so raising a limit never throws the inversion away), nor
# the seed unless it seeds the data noise.
GATE_KEYS = ("max_reconstruction_rms", "max_dropped_fraction")


def invert_config(cfg: CorrectConfig) -> dict[str, Any]:
    config = {k: v for k, v in asdict(cfg).items()
              if not k.startswith("corrector") and k not in GATE_KEYS and (k != "seed" or cfg.data_noise > 0)}
    if cfg.inversion_tol_last is not None:  # shards without the flag can't tell which step missed (read_inversion)
        config["converged_per_image"] = True
    return config


# Training never reads these: checkpoints resume bit-exactly at any interval, and the corrector's
# sampling steps are used when it samples (they are in the sample stages' keys via model_key).
NOT_TRAINING_KEYS = ("corrector_checkpoint_every", "corrector_sample_steps", "corrector_sampler")
# Each network kind reads only its own architecture keys (the other kind's settings change nothing).
OTHER_KIND_KEYS = {"flow": ("corrector_width", "corrector_blocks"),
                   "mlp": ("corrector_channels", "corrector_layers", "corrector_attention")}


def training_config(cfg: CorrectConfig) -> dict[str, Any]:
    """The corrector-training stage's key: the [correct] section less what this kind never reads."""
    unread = NOT_TRAINING_KEYS + OTHER_KIND_KEYS.get(cfg.corrector, ())
    return {k: v for k, v in asdict(cfg).items() if k not in unread}


# ----------------------------------------------------------------------------------------------
# Stage 1: inversion


def _model_space(model: LoadedModel, images: Tensor, lane: int) -> Tensor:
    return torch.cat([model.encode_images(chunk.to(model.device, model.dtype)).float().cpu()
                      for chunk in images.split(lane)])


def check_correctable(model: LoadedModel, cfg: CorrectConfig, labels: Optional[Tensor] = None,
                      captions: Optional[Sequence[str]] = None, check_data: bool = True) -> None:
    """Inverse noise correction inverts a deterministic sampler (a flow's Euler or a diffusion model's
    DDIM, eta = 0) under each image's condition: a class model needs the data's labels, in its range;
    a text model its captions and a pooled text embedding (the corrector's input: docs/methods.md).
    A network corrector trained under bf16 autocast needs the device to have it (before inverting anything)."""
    if cfg.corrector in ("flow", "mlp"):
        corrector_autocast(cfg, model.device)
    if model.conditioning == "text":
        model.pooled_text([""])  # refuses, in one line, a family without one
    if not check_data:
        return
    if model.conditioning == "class":
        n = model.num_classes or 0
        if labels is None:
            raise PgraftError(f"{model.source} is class-conditioned but the data carries no labels; pass the digits "
                              f"data, or an .npz/.safetensors file with a 'labels' array beside 'images'")
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < n):
            raise PgraftError(f"the data has labels {int(labels.min())}..{int(labels.max())} but {model.source} has "
                              f"classes 0..{n - 1}; pass data labelled for this model")
    if model.conditioning == "text" and captions is None:
        raise PgraftError(f"{model.source} is text-to-image: each image is inverted under its caption; pass "
                          f"--captions FILE (one per line, in data order) or put captions.txt in the image folder")


def run_invert(model: LoadedModel, images: Tensor | DataRows, cfg: CorrectConfig, lane: int,
               store: RunStore, bar: Any, dist: Dist = Dist(), guidance_scale: float = 1.0,
               auto_lane: bool = False, memory_format: str = "auto",
               distilled_guidance: Optional[float] = None) -> tuple[Tensor, dict[str, Any], Tensor]:
    """Invert every image (in shards of ``cfg.invert_shard_size``); returns the kept noises, stats and
    which images were kept (a mask).

    A conditioned model inverts each image under its own condition (``DataRows.labels`` or
    ``.captions``), with ``guidance_scale`` where the model is guided (``distilled_guidance``, the guidance
    input of a guidance-distilled network such as Flux dev, where it reads one). An ``auto_lane`` (picked from
    free memory) gives way to the lane of the shards being resumed (``sample.resumed_lane``). The base
    network runs in ``memory_format`` (``sample.memory_format``, resolved and keyed as sampling does).

    ``images`` is a tensor or :class:`DataRows`: only the rows of shards not done are read, and the
    stage key hashes the rows batch by batch, so memory holds one shard of data, not the data set.
    Afterwards only the kept noises are in memory (the corrector's training set, see
    :func:`read_inversion`). Under several processes each inverts its shards (``dist``); all read all.

    An image whose round trip ``RMS(T(T^-1(x)) - x)`` exceeds ``max_reconstruction_rms`` is dropped
    from training and counted; more than ``max_dropped_fraction`` dropped fails the run (the shards
    stay: the gate is judged again on every run, so raising a limit never inverts again).
    """
    labels, captions = getattr(images, "labels", None), getattr(images, "captions", None)
    check_correctable(model, cfg, labels, captions)
    size = cfg.invert_shard_size
    num_shards = math.ceil(len(images) / size)
    base = {**invert_config(cfg), "memory_format": resolve_memory_format(model, memory_format)}
    if model.autocast is not None:  # the network ran under autocast (model.autocast), as it samples
        base["autocast"] = str(model.autocast)
    inputs = {"model": model_key(model), "data": rows_digest(images)}
    if model.conditioning != "none":  # each image's condition, and the guidance it is inverted with
        base["guidance_scale"] = guidance_scale if model.guided else None
        if model.distilled:  # only guidance-distilled networks (Flux dev) read it
            base["distilled_guidance"] = distilled_guidance
        inputs["conditions"] = (tensor_digest(labels) if model.conditioning == "class" else
                                hashlib.sha256(json.dumps(list(captions)).encode()).hexdigest())

    def config_for(lane: int) -> dict[str, Any]:  # the key's config at a lane: side by side or not follows from it
        together = lanes_side_by_side(model, lane)
        return {**base, "lane": lane, **({} if together is None else {"lanes_side_by_side": together}),
                **all_threads_key(model, together is not None)}

    if auto_lane:
        lane = resumed_lane(store, "invert", config_for, inputs, lane)
    config = config_for(lane)
    together = config.get("lanes_side_by_side")
    task = None

    def todo(mine: list[int]) -> None:
        nonlocal task
        task = bar.add_task("inverting", total=sum(min(size, len(images) - k * size) for k in mine), unit="img")

    def work(k: int) -> dict[str, Tensor]:
        chunk = _model_space(model, images[k * size:(k + 1) * size], lane)  # read and encoded only when not done
        if cfg.data_noise > 0:  # the paper's LSUN trick: tiny noise makes inversion stable
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, "data-noise", k))
            chunk = chunk + cfg.data_noise * torch.randn(chunk.shape, generator=g)
        rows = slice(k * size, (k + 1) * size)
        classes = labels[rows].tolist() if model.conditioning == "class" else None
        prompts = list(captions[rows]) if model.conditioning == "text" else None
        return _invert_shard(model, chunk, cfg, lane, lambda n: bar.advance(task, n), classes, prompts, guidance_scale,
                             together, distilled_guidance)

    # each full lane makes at least two solver calls and one round-trip call a step
    full_lane_calls = len(images) // lane * 3 * cfg.base_steps
    with (network_memory_format(model, config["memory_format"]), traced_networks(model, lane, full_lane_calls),
          reused_cross_attention(model)):
        stage = store.run_sharded("invert", config, inputs, num_shards, work, dist, todo=todo, stamp=True)
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
        store.write_json("invert/stats.json", stats)  # this run's gate, not part of the cached shards
    return kept, stats, per_image["rms"] <= cfg.max_reconstruction_rms


def _invert_shard(model: LoadedModel, chunk: Tensor, cfg: CorrectConfig, lane: int, advance: Any,
                  classes: Optional[list[int]] = None, prompts: Optional[list[str]] = None,
                  guidance_scale: float = 1.0, side_by_side: Optional[int] = None,
                  distilled_guidance: Optional[float] = None) -> dict[str, Tensor]:
    """Noise, round-trip error, network evaluations, largest fixed-point residual and whether every step
    met its own tolerance, of each image of a shard, each inverted under its own class or prompt where
    given; lane by lane (``map_lanes``: ``side_by_side`` lanes at a time, one thread each, where given)."""
    grid = model.schedule.grid(cfg.base_steps)
    stop = threading.Event()  # set when lanes side by side are left early (a lane failed, Ctrl-C)

    def one_lane(start: int) -> dict[str, Tensor]:
        part = chunk[start:start + lane].to(model.device, torch.float32)
        members = slice(start, start + len(part))
        cond = model.encode(None if prompts is None else prompts[members],
                            None if classes is None else classes[members], guidance_scale, distilled_guidance)
        # The solver's iterate stays in float32 whatever the model's dtype (bf16 rounding alone is
        # the size of the tolerance); only the network runs as it samples: in the model's dtype, under
        # the sampler's autocast (model.autocast), so the corrector fits the sampler it is used with.
        # The solver names the rows still iterating, so each keeps its own condition: the same
        # conditioning object while the rows are the same (a text network's cross-attention reuses
        # its keys and values for it: models.cross_attention).
        picked: dict[str, Any] = {}

        def fn32(x: Tensor, t: Tensor, rows: Tensor) -> Tensor:
            check_stop(stop, "inversion")  # the other lanes are being given up: end this one at its next call
            key = tuple(rows.tolist())
            if picked.get("rows") != key:
                picked.update(rows=key, cond=cond.rows(rows))
            with model.autocast_context():
                return model.predict(x.to(model.dtype), t, picked["cond"]).float()

        z, info = invert_sampler(fn32, model.schedule, part, grid, cfg.inversion_iterations, cfg.inversion_tol,
                                 cfg.inversion_memory, row_indexed=True, tol_last=cfg.inversion_tol_last)
        with model.autocast_context():  # the round trip, as run_sample samples
            back, _ = sample(lambda x, t: model.predict(x, t, cond), model.schedule, z.to(model.dtype), grid)
        advance(len(part))
        return {"noise": z.float().cpu(), "err": (back.float() - part).reshape(len(part), -1).cpu(),
                "iterations": info.iterations.cpu(), "residual": info.residual.cpu(), "converged": info.converged.cpu()}

    with torch.inference_mode():
        lanes = map_lanes(one_lane, range(0, len(chunk), lane), side_by_side, stop)
    out = {k: torch.cat([one[k] for one in lanes]).contiguous() for k in lanes[0]}
    err = out.pop("err")
    return {**out, "rms": err.pow(2).mean(1).sqrt(), "max": err.abs().amax(1)}


PER_IMAGE_KEYS = ("rms", "max", "iterations", "residual", "converged")  # one number per image in each shard


def read_inversion(paths: list[Path], cfg: CorrectConfig) -> tuple[dict[str, Tensor], Tensor]:
    """Every image's per-image numbers (``PER_IMAGE_KEYS``) and the kept noises (round-trip RMS at
    most ``max_reconstruction_rms``), in image order.

    The kept noises are the corrector's training set, so they are in memory; nothing else is: each
    shard's noises are read alone and only its kept rows are copied into one preallocated tensor.
    A shard written before ``converged`` was stored reads it as ``residual < inversion_tol``: exact
    with one tolerance (``invert_config`` keys a stage with ``inversion_tol_last`` apart from those).
    """
    from safetensors import safe_open

    columns: dict[str, list[Tensor]] = {key: [] for key in PER_IMAGE_KEYS}
    for path in paths:
        with safe_open(str(path), "pt") as f:
            for key in PER_IMAGE_KEYS:
                columns[key].append(f.get_tensor(key) if key != "converged" or key in f.keys()
                                    else f.get_tensor("residual") < cfg.inversion_tol)
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
        "converged": int(per_image["converged"].sum()), "dropped": int((~keep).sum()),
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


def corrector_conditions(model: LoadedModel, labels: Optional[Tensor], captions: Optional[Sequence[str]],
                         lane: int) -> dict[str, Any]:
    """How the corrector is conditioned on the kept images' conditions: ``conditioning`` and each
    image's ``condition``: its class (and ``num_classes``) or its caption's pooled text embedding
    (encoded ``lane`` captions at a time)."""
    if labels is not None:
        return {"conditioning": "class", "condition": labels, "num_classes": int(model.num_classes or 0)}
    if captions is not None:
        embeds = [model.pooled_text(list(captions[i:i + lane])).cpu() for i in range(0, len(captions), lane)]
        return {"conditioning": "text", "condition": torch.cat(embeds), "num_classes": 0}
    return {"conditioning": "none", "condition": None, "num_classes": 0}


def corrector_precision(cfg: CorrectConfig, device: Any) -> str:
    """``corrector_mixed_precision`` resolved: ``auto`` is ``bf16`` on a CPU that multiplies bf16 natively
    (``io.host.native_cpu_bf16``: measured 10 % faster a training step at 2 threads, FID unchanged: bench/RESULTS.md),
    else ``no``: emulated bf16 is slower than float32, and on GPUs the corrector's step was not measured."""
    if cfg.corrector_mixed_precision != "auto":
        return cfg.corrector_mixed_precision
    return "bf16" if torch.device(device).type == "cpu" and native_cpu_bf16() else "no"


def corrector_autocast(cfg: CorrectConfig, device: Any) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """The context of the corrector's training forward: none, or with ``corrector_mixed_precision = "bf16"``
    (or ``auto`` resolved to it) bf16 autocast (weights, optimizer and EMA stay float32; the loss is float32,
    as autocast runs ``mse_loss``). Refuses, in one line, a device whose torch has no bf16 autocast."""
    if corrector_precision(cfg, device) == "no":
        return contextlib.nullcontext
    kind = torch.device(device).type
    with warnings.catch_warnings():  # torch raises for some devices and warns and disables itself for others
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(kind, dtype=torch.bfloat16):
                supported = torch.is_autocast_enabled(kind)
        except RuntimeError:
            supported = False
    if not supported:
        raise PgraftError(f'correct.corrector_mixed_precision = "bf16" needs bf16 autocast, which torch has not on '
                          f'this {kind} device; set correct.corrector_mixed_precision = "no"')
    return lambda: torch.autocast(kind, dtype=torch.bfloat16)


def corrector_step_loss(network: Any, noises: Tensor, cfg: CorrectConfig, device: Any = "cpu",
                        condition: Optional[Tensor] = None, projection: Optional[nn.Module] = None,
                        source: Optional[tuple[Tensor, Tensor]] = None) -> Any:
    """``step_loss(step)`` of the corrector: the flow-matching loss on a batch seeded by ``(seed, step)``, backward.

    ``condition`` holds each noise's class label or pooled text embedding (through ``projection``),
    given to the network as its class embedding. ``source = (mean, L)``: the flow starts from
    ``N(mean, L L^T)`` (``e`` coloured, ``core.gaussian.colour``) instead of N(0, I)."""
    shape = tuple(noises.shape[1:])
    autocast = corrector_autocast(cfg, device)

    def step_loss(step: int) -> Tensor:
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "corrector-step", step))
        idx = torch.randint(0, len(noises), (cfg.corrector_batch_size,), generator=g)
        e = torch.randn((cfg.corrector_batch_size, *shape), generator=g).to(device)
        t = torch.rand(cfg.corrector_batch_size, generator=g).to(device)
        if source is not None:
            e = colour(e, *source)
        # the training set stays in host memory; only each step's batch goes to the device
        labels = None if condition is None else condition[idx].to(device)
        if projection is not None:
            labels = projection(labels)
        net = network if labels is None else lambda x, ts: network(x, ts, class_labels=labels)
        with autocast():
            loss = flow_matching_loss(net, NoiseCorrector.schedule, noises[idx].to(device), e, t)
        loss.backward()
        return loss.detach()

    return step_loss


def corrector_loop(cfg: CorrectConfig) -> LoopConfig:
    return LoopConfig(cfg.corrector_train_steps, cfg.corrector_learning_rate, cfg.corrector_warmup,
                      cfg.corrector_ema, max_grad_norm=1.0, checkpoint_every=cfg.corrector_checkpoint_every,
                      decay=cfg.corrector_lr_decay)


def run_train_corrector(noises: Tensor, sample_shape: tuple[int, int, int], cfg: CorrectConfig, base_id: str,
                        store: RunStore, bar: Any, device: Any = "cpu",
                        conds: Optional[dict[str, Any]] = None) -> tuple[NoiseCorrector, dict[str, Any]]:
    """Train (or resume, or fit) the corrector on the inverted noises.

    ``noises`` (the kept ones, from :func:`run_invert`) is the one data set held in memory, in host
    memory: each step moves only its batch to ``device``. ``conds`` (:func:`corrector_conditions`)
    conditions it: per class, one Gaussian or a class embedding in the flow's network; per pooled
    text embedding, a ridge-regressed Gaussian mean or a projection into the flow's class embedding.
    """
    from safetensors.torch import load_file, save_file

    conds = conds or {"conditioning": "none", "condition": None, "num_classes": 0}
    kind, cond_of, num = conds["conditioning"], conds["condition"], conds["num_classes"]
    if cfg.corrector in ("flow", "mlp"):  # keyed as resolved (bytes differ); a Gaussian never reads it
        cfg = replace(cfg, corrector_mixed_precision=corrector_precision(cfg, device))
    config = training_config(cfg)
    path = adam_path(torch.device(device))
    inputs = {"base": base_id, "noises": tensor_digest(noises), "device_type": torch.device(device).type,
              "optimizer": f"adamw-{path}"}  # a corrector trained by another AdamW path is retrained
    if cond_of is not None:
        inputs["conditions"] = tensor_digest(cond_of)
    stage = store.open_stage("train_corrector", config, inputs)
    summary: dict[str, Any] = {"kind": cfg.corrector, "parameters": 0, "conditioning": kind}
    if cfg.corrector in ("gaussian", "gaussian-diag"):
        diag, spread_info, weight, chol_of = cfg.corrector == "gaussian-diag", {}, None, None
        if kind == "text":  # the mean a ridge map of the pooled text embedding, one spread
            mean, weight, spread, spread_info = fit_gaussian_on_text(noises, cond_of, cfg.corrector)
        elif kind == "class":  # per class; full covariance: each shared factor (pooled, tied) stored once (chol_of)
            mean, spread, *rest = (fit_gaussian_diag_by_class if diag else fit_gaussian_by_class)(noises, cond_of, num)
            chol_of = rest[0] if rest else None
        else:
            mean, spread = (fit_gaussian_diag if diag else fit_gaussian)(noises)
        corrector = NoiseCorrector(cfg.corrector, cfg.base_steps, 0, mean=mean.float(), conditioning=kind,
                                   weight=None if weight is None else weight.float(), chol_of=chol_of,
                                   **{("std" if diag else "chol"): spread.float()})
        return corrector, {**summary, **spread_info}
    if cfg.corrector == "mlp" and kind != "none":
        raise PgraftError(f'correct.corrector = "mlp" takes no {kind} condition; use flow, gaussian or gaussian-diag '
                          f'for a {kind}-conditioned model')
    # the Gaussian source: the inverted noises' mean and covariance, so the flow learns only the rest
    try:
        source = tuple(v.float() for v in fit_gaussian(noises)) if cfg.corrector_source == "gaussian" else None
    except PgraftError:
        raise PgraftError(f"correct.corrector_source = \"gaussian\" fits a full covariance, which needs more images "
                          f"than dimensions (got {len(noises)} of dimension {noises[0].numel()}); invert more images "
                          f"or set correct.corrector_source = \"normal\"") from None
    extra = {"num_class_embeds": num} if kind == "class" else {"class_embed_type": "identity"} if kind == "text" else {}
    projection = None  # text: the pooled embedding, projected to the time embedding's width, added to it
    torch.manual_seed(cfg.seed)
    network, model_config = corrector_network(cfg, sample_shape, extra)
    network = network.to(device)
    trained: nn.Module = network
    if kind == "text":
        projection = nn.Linear(cond_of.shape[1], network.time_embedding.linear_2.out_features).to(device)
        trained = nn.ModuleDict({"network": network, "projection": projection})
    if not stage.done:
        # fused: other bytes than torch's per-parameter CPU loop, the same held-out FID (bench/RESULTS.md)
        opt = torch.optim.AdamW(trained.parameters(), lr=cfg.corrector_learning_rate, weight_decay=0.0,
                                fused=True if path == "fused" else None)
        run = Training.resume(list(trained.named_parameters()), opt, stage.dir / "state.safetensors",
                              trained.load_state_dict)

        trained.train()
        train(run, opt, corrector_step_loss(network, noises, cfg, device, cond_of, projection,
                                            None if source is None else tuple(v.to(device) for v in source)),
              corrector_loop(cfg),
              bar, "training corrector", trained.state_dict)
        with stage.write_shard(0) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in trained.state_dict().items()}, str(tmp),
                      metadata={"losses": json.dumps(run.losses)})
        if store.is_main:
            stage.finish([stage.shard_path(0)])
    from safetensors import safe_open

    weights = load_file(str(stage.shard_path(0)))
    with safe_open(str(stage.shard_path(0)), "pt") as f:
        losses = json.loads(f.metadata().get("losses", "[]"))
    trained.load_state_dict(weights)
    trained.eval().requires_grad_(False)
    corrector = NoiseCorrector(cfg.corrector, cfg.base_steps, cfg.corrector_sample_steps, cfg.corrector_sampler, network=network,
                               model_config=model_config, conditioning=kind, projection=projection,
                               mean=None if source is None else source[0], chol=None if source is None else source[1])
    trained_in = precision_label(torch.float32, torch.bfloat16 if cfg.corrector_mixed_precision == "bf16" else None)
    return corrector, {**summary, "parameters": corrector.parameter_count(), "trained_precision": trained_in,
                       **loss_summary(losses)}


