"""The finetune stage: GRAFT and P-GRAFT training on kept samples, and the composed model.

The loss (docs/methods.md section 2, derived there): kept states ``y`` at the cutoff time ``c`` are data for
the forward kernel from ``c``, and the model is trained only at ``t in (c, 1]``. With ``c = 0`` this
is exactly the ordinary flow-matching / denoising loss on final samples (GRAFT). The tuned model then
runs ``t in (c, 1]`` and the base model ``[0, c]`` (``LoadedModel.network_at``): two networks for
full fine-tuning, one network with its LoRA adapter switched off below ``c``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..core.losses import finetune_loss, intermediate_target, kernel_weight, training_times
from ..errors import PgraftError, StoppedError
from ..io.checkpoints import model_key
from ..io.recipes import FinetuneConfig
from ..io.runstore import RunStore, atomic_path, content_key, derive_seed
from ..models.loaded import Cond, LoadedModel, PromptCache, base_only, tuned_identity
from ..models.lora import add_lora, frozen_layers_in, lora_state, set_lora_enabled, set_lora_state
from .train_loop import LoopConfig, Training, adam_path, train

STAGE = "finetune"
# Encoded prompts a fine-tune keeps on its device for the whole run, outside any memory planning, so
# small: 256 MiB holds 1,134 prompts of SD 1.x (236 kB each in float32) or 422 of SDXL (636 kB),
# twice that in 16 bits; the prompts beyond it are encoded each time they come.
PROMPT_CACHE_BYTES = 256 << 20


# ----------------------------------------------------------------------------------------------
# Kept data and the model being trained


@dataclass
class KeptSet:
    """What a round trains on: states ``y`` at time ``t_c`` (0 for final samples) and conditioning."""

    y: Tensor
    t_c: float
    x0: Tensor
    class_labels: Optional[Tensor] = None
    prompts: Optional[list[str]] = None

    def digest(self) -> str:
        """sha256 of everything a round trains on (states, final samples, times, conditioning)."""
        return hashlib.sha256(json.dumps(content_key(self)).encode()).hexdigest()


def load_kept_set(run_dir: Path, sample_stage: str, filter_stage: str, cutoff: float) -> KeptSet:
    """The kept samples of a filter stage: states at the cutoff (P-GRAFT) or final samples (GRAFT)."""
    from .filter import load_kept
    from .score import sample_prompts

    rows = load_kept(run_dir, filter_stage)  # ascending sample indices; only their rows are read
    found = RunStore(run_dir, is_main=False).stage(sample_stage).rows(rows, "samples", "captured", "captured_t",
                                                                      "class_label", "prompt_index")
    x0 = found["samples"]
    if cutoff > 0:
        if "captured" not in found:
            raise PgraftError(f"the sample stage of {run_dir} did not capture states at the cutoff; sample with "
                              f"--capture-at {cutoff}")
        y, t_c = found["captured"], float(found["captured_t"][0])
    else:
        y, t_c = x0, 0.0
    labels = found.get("class_label")
    prompts = None
    if "prompt_index" in found:
        all_prompts = sample_prompts(run_dir, sample_stage) or [""]
        prompts = [all_prompts[int(i)] for i in found["prompt_index"]]
    return KeptSet(y.float(), t_c, x0.float(), labels, prompts)


AUTO_LORA_RANK = 16  # the adapter rank lora_rank = "auto" picks above finetune.lora_above parameters


def resolve_lora(model: LoadedModel, cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with ``lora_rank = "auto"`` decided: all weights (0) for a network of at most
    ``lora_above`` parameters, a LoRA adapter of rank ``AUTO_LORA_RANK`` above (a fixed rank is kept)."""
    if cfg.lora_rank != "auto":
        return cfg
    return replace(cfg, lora_rank=AUTO_LORA_RANK if model.parameter_count() > cfg.lora_above else 0)


def tuning_choice(model: LoadedModel, cfg: FinetuneConfig) -> str:
    """One line for the run's output: what is trained, and why when ``lora_rank`` was "auto"."""
    what = f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "all weights"
    return f"{what} of {model.parameter_count() / 1e6:.1f} M network parameters (finetune.lora_above {cfg.lora_above / 1e6:g} M)"


def prepare_tuning(model: LoadedModel, cfg: FinetuneConfig) -> nn.Module:
    """Make ``model`` a composed model and return the network to train (tuned copy, or the LoRA host).

    With full fine-tuning at cutoff 0 the base never runs while sampling; it waits on the CPU
    (``LoadedModel.to``), so the device holds one copy of the network.
    """
    cfg = resolve_lora(model, cfg)
    model.cutoff, model.tuned_guidance = cfg.cutoff, cfg.tuned_guidance
    if cfg.gradient_checkpointing:
        if not getattr(model.network, "_supports_gradient_checkpointing", False):
            raise PgraftError(f"{model.model_class} does not support gradient checkpointing; "
                              f"set finetune.gradient_checkpointing = false")
        model.network.enable_gradient_checkpointing()  # a deep copy below keeps it
    if cfg.lora_rank > 0:
        if not model.lora:
            with torch.random.fork_rng(devices=[]):  # a seeded adapter init: reruns are reproducible
                torch.manual_seed(cfg.seed)
                add_lora(model.network, cfg.lora_rank, cfg.lora_alpha)
            model.lora = True
        return model.network
    if model.tuned is None:
        device = model.device
        if cfg.cutoff == 0:  # the base leaves the device before the copy: it never holds two copies
            model.network.to("cpu")
        model.tuned = copy.deepcopy(model.network)
        model.to(device)  # places the tuned copy, and the base: on the CPU at cutoff 0
    return model.tuned


def trainable(network: nn.Module, lora: bool) -> list[tuple[str, nn.Parameter]]:
    if lora:
        for n, p in network.named_parameters():
            p.requires_grad_("lora_" in n)
    else:
        network.requires_grad_(True)
    return [(n, p) for n, p in network.named_parameters() if p.requires_grad]


def optimizer_path(cfg: FinetuneConfig, device: torch.device) -> str:
    """``train_loop.adam_path`` for Adam/AdamW; SGD takes torch's default. In the stage's key."""
    return adam_path(device) if cfg.optimizer in ("adamw", "adam") else "default"


def _optimizer(cfg: FinetuneConfig, params: list[nn.Parameter], path: str = "default") -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=0.9, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True if path == "fused" else None)


def _conditions(model: LoadedModel, kept: KeptSet, idx: Tensor, distilled_guidance: Optional[float],
                cache: Optional[PromptCache] = None) -> Cond:
    """The batch's conditioning, unguided: training fits the conditional branch only (see models.py);
    a guidance-distilled network (Flux dev) trains at the distilled guidance its samples were drawn with.
    The frozen text encoders give a prompt the same bits every step, so ``cache`` encodes it once."""
    labels = kept.class_labels[idx].tolist() if kept.class_labels is not None else None
    prompts = [kept.prompts[i] for i in idx.tolist()] if kept.prompts is not None else None
    return model.encode(prompts, labels, guidance_scale=1.0, distilled_guidance=distilled_guidance, cache=cache)


# ----------------------------------------------------------------------------------------------
# The stage


def run_finetune(model: LoadedModel, kept: KeptSet, cfg: FinetuneConfig, store: RunStore, bar: Any,
                 stage_name: str = STAGE, round_index: int = 1, barrier: Any = None,
                 distilled_guidance: Optional[float] = None, log: Any = None) -> dict[str, Any]:
    """Train (or resume, or reuse) one round's fine-tune; leaves ``model`` composed and tuned.

    ``log(values, step)`` (the ``--log-with`` trackers) gets ``train/loss`` and ``train/learning_rate``
    at every step, counted across rounds.

    Each optimizer step draws its batch, noise and times from a generator seeded by
    ``(seed, round, step, micro-batch)``; under several processes each takes its slice of that batch
    (so n processes train as one does), and the state (weights, EMA, optimizer moments)
    is checkpointed in safetensors every ``checkpoint_every`` steps, so a resumed run continues
    bit for bit (in float32 and bf16; fp16's loss-scaler state is not checkpointed). accelerate
    places and wraps the model (DDP under ``accelerate launch``); autocast and accumulation are here.
    """
    from accelerate import Accelerator
    from safetensors.torch import load_file, save_file

    check_precision(model, cfg)
    cfg = resolve_lora(model, cfg)
    if cfg.target == "renoise":
        y, t_c = kept.x0, 0.0  # the alternative reading: re-noise the final samples, train at t > c only
    else:
        y, t_c = kept.y, kept.t_c
    lora = cfg.lora_rank > 0
    path = optimizer_path(cfg, model.device)
    config = {**asdict(cfg), "round": round_index, "t_c": t_c, "optimizer_path": path,
              **({"distilled_guidance": distilled_guidance} if distilled_guidance is not None else {})}
    for unrelated in ("rounds", "checkpoint_every", "tuned_guidance"):  # they do not change this round's weights
        config.pop(unrelated)
    stage = store.open_stage(stage_name, config, {"model": model_key(model), "kept": kept.digest()})
    if barrier is not None:
        barrier()  # the main process may have cleared a stale stage; the others wait for that
    network = prepare_tuning(model, cfg)
    named = trainable(network, lora)
    opt = _optimizer(cfg, [p for _, p in named], path)
    weights_path = stage.dir / "weights.safetensors"

    def current_state() -> dict[str, Tensor]:
        return lora_state(network) if lora else network.state_dict()

    def load_weights(state: dict[str, Tensor]) -> None:
        set_lora_state(network, state) if lora else network.load_state_dict(state)

    if stage.done:
        load_weights(load_file(str(weights_path)))
        network.eval().requires_grad_(False)
        return json.loads((stage.dir / "result.json").read_text())
    run = Training.resume(named, opt, stage.dir / "state.safetensors", load_weights)
    # accelerate places the model and wraps it for several processes (DDP); mixed precision and
    # accumulation are done here, per call, because accelerate fixes them once per process.
    accelerator = Accelerator(device_placement=False, mixed_precision="no")  # not the launcher's: see above
    if lora:
        set_lora_enabled(network, True)  # sampling may have left it switched off
    net = accelerator.prepare(network)  # the optimizer is not wrapped: its wrapper adds nothing here but per-step checks
    schedule = model.schedule
    device, dtype = model.device, model.dtype
    rank = accelerator.process_index
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    net.train()

    world = accelerator.num_processes
    check_batch_split(cfg.batch_size, world)
    mine = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    prompts = PromptCache(PROMPT_CACHE_BYTES)  # the text encoders are never trained here

    def step_loss(step: int) -> Tensor:
        total = torch.zeros((), dtype=torch.float64, device=device)  # float64: as a Python float sum, no host sync
        for micro in range(cfg.grad_accum):
            # One global batch per micro-step (the seed's last 0 keeps one process's draws as they
            # were), split across the processes: DDP's mean of their means is the one-process loss.
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, round_index, step, micro, 0))
            idx = torch.randint(0, len(y), (cfg.batch_size,), generator=g)[mine]
            e = torch.randn((cfg.batch_size, *y.shape[1:]), generator=g)[mine]
            t = training_times(schedule, cfg.batch_size, max(cfg.cutoff, t_c), g)[mine]
            x_t, target = intermediate_target(schedule, y[idx].double(), e.double(), t, t_c)
            cond = _conditions(model, kept, idx, distilled_guidance, prompts)
            last = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(net):
                with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
                    pred = model.predict(x_t.to(device, dtype), t.to(device, torch.float32), cond, network=net)
                weight = kernel_weight(schedule, t, t_c).to(device, torch.float32)
                loss = finetune_loss(pred, target.to(device, torch.float32), weight)
                scaler.scale(loss / cfg.grad_accum).backward()
            total = total + loss.detach().double() / cfg.grad_accum
        return accelerator.reduce(total.float(), "mean") if world > 1 else total

    loop = LoopConfig(cfg.steps, cfg.learning_rate, cfg.warmup, cfg.ema, cfg.max_grad_norm, cfg.checkpoint_every)
    first = (round_index - 1) * cfg.steps

    def on_step(done: int, loss: float, lr: float) -> None:
        log({"train/loss": loss, "train/learning_rate": lr}, step=first + done)

    with frozen_layers_in(network, half if lora else None):  # the frozen base in autocast's dtype while it trains
        train(run, opt, step_loss, loop, bar, f"fine-tuning (round {round_index})", current_state, scaler,
              save=store.is_main, on_step=on_step if log is not None else None)
    network = accelerator.unwrap_model(net, keep_fp32_wrapper=False)
    network.eval().requires_grad_(False)
    if device.type != "cpu":  # a full gc.collect (0.1-0.5 s) and the device cache; on the CPU the return frees as much
        accelerator.free_memory()
    result = {"round": round_index, "steps": cfg.steps, "t_c": t_c, "kept": len(y), "lora": lora,
              "trainable_parameters": sum(p.numel() for p in run.params), **run.summary()}
    if store.is_main:
        stage.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(weights_path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in current_state().items()}, str(tmp))
        result_path = store.write_json(f"{stage_name}/result.json", result)
        stage.finish([weights_path, result_path])
        run.path.unlink(missing_ok=True)
    return result


# ----------------------------------------------------------------------------------------------
# The rounds: sample -> score -> filter -> fine-tune


def check_precision(model: LoadedModel, cfg: FinetuneConfig) -> None:
    """Float32 master weights, and fp16 autocast only on a GPU (checked before sampling anything)."""
    if cfg.mixed_precision == "fp16" and model.device.type == "cpu":
        raise PgraftError("finetune.mixed_precision = fp16 needs a GPU; use bf16 or no on the CPU")
    if model.dtype != torch.float32:
        raise PgraftError(f"fine-tuning keeps float32 master weights, but the model is loaded as {model.dtype}; "
                          f"set model.dtype = float32 and finetune.mixed_precision = bf16 (or fp16 on a GPU) for speed")


def check_groups(model: LoadedModel, recipe: Any, cond: Any) -> None:
    """Before sampling anything: top-K of M needs ``sample.num`` to fill whole groups of m per prompt."""
    if recipe.filter.rule == "threshold":
        return
    m, num = recipe.filter.m, recipe.sample.num
    per = 1
    if model.conditioning == "text":
        per = len(cond.prompts or [""])
    elif model.conditioning == "class" and cond.class_label is None:
        per = model.num_classes or 1
    if num % (m * per):
        what = {1: ""}.get(per, f" x {per} {'prompts' if model.conditioning == 'text' else 'classes'}")
        fix = -(-num // (m * per)) * m * per
        raise PgraftError(f"filter.rule {recipe.filter.rule} keeps the best of every group of m = {m} samples of a "
                          f"prompt, so sample.num ({num}) must be a multiple of {m}{what}; use --set sample.num={fix}")


def main_first(store: RunStore, barrier: Any, fn: Any) -> Any:
    """Run ``fn`` on the main process, then (after a barrier) on the others, which find it done."""
    if barrier is None:
        return fn()
    result = fn() if store.is_main else None
    barrier()
    return result if store.is_main else fn()


def round_stage(stage: str, round_index: int) -> str:
    """Stage names of round r: ``sample``, ``score`` ... for round 1, ``sample-r2`` ... after."""
    return stage if round_index == 1 else f"{stage}-r{round_index}"


def judge_stage(name: str, sample_stage: str) -> str:
    """The score stage of judge ``name`` on ``sample_stage``: ``judge-NAME-sample``, ``judge-NAME-sample-r2`` ..."""
    return f"judge-{name}-{sample_stage}"


def judge_means(store: RunStore, judges: dict[str, Any], bar: Any, sample_stage: str, process_index: int = 0,
                num_processes: int = 1, barrier: Any = None) -> dict[str, float]:
    """Each judge's mean over ``sample_stage``'s images, scored (and cached) like the training reward."""
    from .score import run_score

    return {name: float(run_score(store, judge, bar, sample_stage, judge_stage(name, sample_stage), process_index,
                                  num_processes, barrier).mean()) for name, judge in judges.items()}


def restore_round(model: LoadedModel, cfg: FinetuneConfig, store: RunStore, k: int) -> None:
    """Put back the weights round ``k``'s fine-tune wrote (``--stop-if``: the last model that passed)."""
    from safetensors.torch import load_file

    cfg = resolve_lora(model, cfg)
    network = prepare_tuning(model, cfg)
    state = load_file(str(store.root / round_stage(STAGE, k) / "weights.safetensors"))
    set_lora_state(network, state) if cfg.lora_rank > 0 else network.load_state_dict(state)
    model.identity = tuned_identity(model)


def check_batch_split(batch_size: int, world: int) -> None:
    """A training batch is split across the ``world`` processes: it must be a multiple of their number."""
    if batch_size % world:
        raise PgraftError(f"finetune.batch_size ({batch_size}) is split across the {world} processes, so it must "
                          f"be a multiple of {world}; use --set finetune.batch_size={-(-batch_size // world) * world}")


def round_seed(sample_seed: int, r: int, evaluate_seed: int) -> int:
    """Round r's sampling seed: the r-th of ``sample_seed, sample_seed + 1, ...`` other than ``evaluate_seed``,
    so the base and tuned evaluations never start from noises a round was trained on (image i's noise
    is seeded by (seed, i): with the recipes' seeds 0 and 1, round 2 drew the evaluation's noises)."""
    seed = sample_seed + r - 1
    return seed + 1 if sample_seed <= evaluate_seed <= seed else seed


def run_rounds(model: LoadedModel, recipe: Any, reward: Any, cond: Any, store: RunStore, bar: Any,
               process_index: int = 0, num_processes: int = 1, barrier: Any = None, measure: Any = None,
               judges: Optional[dict[str, Any]] = None, stop: Any = None, log: Any = None) -> list[dict[str, Any]]:
    """GRAFT (cutoff 0) or P-GRAFT: ``finetune.rounds`` rounds, each stage cached in ``store``.

    Round r samples ``sample.num`` trajectories from the current (composed) model with seed
    ``round_seed`` (``sample.seed + r - 1``, stepping over ``evaluate.seed``), capturing the state at the cutoff; scores the final images; keeps
    samples by the filter rule; and continues fine-tuning on what it kept. Each round's samples
    (the model entering the round, at no extra sampling cost) are also scored by every judge
    (``{name: reward}``, never optimised) and measured by ``measure(images, groups)`` (FID,
    precision/recall, within-prompt distance: ``stages.evaluate.sample_metrics``).

    ``stop(rounds)``, from round 2 on, returns why to stop (or None). When it fires at round r, the
    model entering round r failed: the rounds end there (round r's record says ``stopped``) and the
    model is put back to the last one whose samples passed, round r - 1's (after r - 2 rounds of
    fine-tuning); with r = 2 that is the base model and nothing was gained (:class:`StoppedError`).

    ``log(values, step)`` (the ``--log-with`` trackers) gets each round's measurements as ``round/...``
    at step ``(r - 1) x finetune.steps``, the training steps its samples' model had, and each step's loss.
    """
    from .filter import run_filter
    from .sample import load_images, run_sample
    from .score import reward_stats, run_score

    cfg = recipe.finetune
    check_precision(model, recipe.finetune)
    check_groups(model, recipe, cond)
    model.base_identity = model.base_identity or model.identity
    rounds: list[dict[str, Any]] = []
    for r in range(1, cfg.rounds + 1):
        names = {s: round_stage(s, r) for s in ("sample", "score", "filter", "finetune")}
        sample_cfg = replace(recipe.sample, seed=round_seed(recipe.sample.seed, r, recipe.evaluate.seed),
                             capture_at=cfg.cutoff if cfg.cutoff > 0 else recipe.sample.capture_at)
        run_sample(model, sample_cfg, cond, store, bar, process_index, num_processes, barrier, names["sample"])
        rewards = run_score(store, reward, bar, names["sample"], names["score"], process_index, num_processes, barrier)
        record: dict[str, Any] = {"round": r, "sampled": reward_stats(rewards), "fid": None,
                                  "judges": judge_means(store, judges or {}, bar, names["sample"], process_index,
                                                        num_processes, barrier)}
        if measure is not None and (store.is_main or stop is not None):  # every process decides to stop alike
            found = store.stage(names["sample"]).tensors("prompt_index", "class_label")
            groups = found.get("prompt_index", found.get("class_label", torch.zeros(len(rewards), dtype=torch.long)))
            record.update(measure(load_images(store.root, names["sample"]), groups))
        rounds.append(record)
        if log is not None:
            values = {"reward": record["sampled"]["reward_mean"], **{f"judge.{n}": v for n, v in record["judges"].items()},
                      **{k: record.get(k) for k in ("fid", "kid", "precision", "recall", "pairwise_distance")}}
            log({f"round/{k}": v for k, v in values.items() if v is not None}, step=(r - 1) * cfg.steps)
        reason = stop(rounds) if stop is not None and r > 1 else None
        if reason:
            record["stopped"] = reason
            if r == 2:
                raise StoppedError(f"stopped at round 2: {reason}; the model after 1 round failed, so no round passed "
                                   f"and no checkpoint was written (lower finetune.learning_rate or loosen --stop-if)")
            restore_round(model, cfg, store, r - 2)
            break
        summary = main_first(store, barrier, lambda: run_filter(store, recipe.filter, names["sample"], names["score"],
                                                                names["filter"]))
        kept = load_kept_set(store.root, names["sample"], names["filter"], cfg.cutoff)
        result = run_finetune(model, kept, cfg, store, bar, names["finetune"], r, barrier,
                              None if model.adapter.classifier_free else recipe.sample.distilled_guidance, log)
        model.identity = tuned_identity(model)
        record.update({"kept": summary.get("kept"), "kept_reward_mean": summary["reward_after"]["mean"],
                       "filter": summary, "finetune": {k: v for k, v in result.items() if k != "loss_curve"},
                       "loss_curve": result.get("loss_curve")})
    return rounds


def evaluate_pair(model: LoadedModel, recipe: Any, reward: Any, cond: Any, features: Any, store: RunStore,
                  bar: Any, refs: dict[str, Any], fid_data: Optional[str],
                  notes: Optional[list[str]] = None, judges: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Base and tuned model on the same seeds: reward mean/std, FID/KID against ``refs[fid_data]``
    (and the other named references in ``refs``), NFE, FLOPs, each judge's mean (``judges``);
    ``notes`` (why FID was skipped) on both."""
    from .evaluate import evaluate_model
    from ..io.recipes import SampleConfig

    cfg = SampleConfig(num=recipe.evaluate.num, seed=recipe.evaluate.seed,
                       steps=recipe.evaluate.steps or recipe.sample.steps, batch_size=recipe.sample.batch_size,
                       lane=recipe.sample.lane, guidance_scale=recipe.sample.guidance_scale,
                       distilled_guidance=recipe.sample.distilled_guidance, memory_format=recipe.sample.memory_format)
    common = dict(kid_subsets=recipe.evaluate.kid_subsets, real_features=refs.get(fid_data) if fid_data else None,
                  also_against={k: v for k, v in refs.items() if k != fid_data}, cond=cond, reward=reward,
                  notes=notes)
    with base_only(model):
        base = evaluate_model(model, None, cfg, features, store, bar, "evaluate-base", **common)
    tuned = evaluate_model(model, None, cfg, features, store, bar, "evaluate-tuned", **common)
    for stage, metrics in (("evaluate-base", base), ("evaluate-tuned", tuned)):
        metrics["judges"] = judge_means(store, judges or {}, bar, stage)
    return {"base": base, "tuned": tuned}
