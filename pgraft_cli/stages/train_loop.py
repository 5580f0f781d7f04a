"""The training loop fine-tuning and the noise corrector share.

Each step: the learning rate's warm-up, the caller's ``step_loss`` (forward and backward, over its
micro-batches), gradient clipping, the optimizer step, the EMA with warm-up, the loss, the progress
bar, and every ``checkpoint_every`` steps the whole state in safetensors (weights, EMA, optimizer
moments, losses), from which :meth:`Training.resume` continues bit for bit. What a caller varies:
the parameters, the optimizer, ``step_loss`` (its batch, noise and times come from generators seeded
by the step), and which weights a checkpoint holds (a LoRA adapter, or the whole network).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..core.training import Decay, ema_decay, ema_update_, scheduled_lr
from ..io.runstore import load_training_state, save_training_state

FINAL_LOSS_STEPS = 50  # ``final_loss`` is the mean loss of the last steps
CURVE_POINTS = 200  # ``loss_curve`` keeps about this many of the losses
FUSED_ADAM_DEVICES = ("cpu", "cuda")  # torch >= 2.4's fused Adam/AdamW, tested there (GradScaler too); MPS, XPU: default


def adam_path(device: torch.device) -> str:
    """``fused`` where torch's one Adam/AdamW kernel for all the parameters is used (4x faster than the
    CPU's per-parameter default on the corrector, 2.7x on the digits network; other roundings), else
    ``default`` (torch's choice). Both training stages key by it: a cache of the other path is retrained."""
    return "fused" if device.type in FUSED_ADAM_DEVICES else "default"


@dataclass
class LoopConfig:
    """The keys of the loop itself; each method's recipe section maps onto them."""

    steps: int
    learning_rate: float
    warmup: int = 0
    ema: float = 0.0
    max_grad_norm: float = 0.0
    checkpoint_every: int = 100
    decay: Decay = "constant"  # the learning rate after the warm-up (core.training.scheduled_lr)


@dataclass
class Training:
    """The state of one training run: its parameters, step, losses and EMA weights, checkpointed at ``path``."""

    named: list[tuple[str, nn.Parameter]]
    path: Optional[Path] = None  # None: a run that keeps no checkpoint (``train(..., save=False)``)
    step: int = 0
    losses: list[float] = field(default_factory=list)
    ema: dict[str, Tensor] = field(default_factory=dict)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named]

    @classmethod
    def resume(cls, named: list[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer, path: Path,
               load_weights: Callable[[dict[str, Tensor]], None]) -> "Training":
        """A fresh run, or the one checkpointed at ``path`` (weights, EMA and optimizer state restored)."""
        run = cls(named, path, ema={n: p.detach().clone() for n, p in named})
        if path.exists():
            run.step, run.losses, weights, ema = load_training_state(path, run.params, opt)
            load_weights(weights)
            run.ema = {n: ema[n].to(p.device) for n, p in named}
        return run

    def save(self, opt: Any, weights: dict[str, Tensor]) -> None:
        assert self.path is not None, "a run without a checkpoint path is trained with save=False"
        save_training_state(self.path, weights, self.ema, self.params, opt, self.step, self.losses)

    def summary(self) -> dict[str, Any]:
        return loss_summary(self.losses)


def loss_summary(losses: list[float]) -> dict[str, Any]:
    """``final_loss`` (the mean of the last ``FINAL_LOSS_STEPS``) and ``loss_curve`` (subsampled)."""
    recent = losses[-FINAL_LOSS_STEPS:]
    return {"final_loss": sum(recent) / len(recent) if recent else None,
            "loss_curve": losses[:: max(1, len(losses) // CURVE_POINTS)]}


def _floats(values: list[Tensor | float]) -> list[float]:
    """The losses as Python floats, read from the device in one transfer (float64: exact)."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    read = iter(torch.stack([v.detach().double() for v in tensors]).tolist() if tensors else [])
    return [next(read) if isinstance(v, Tensor) else float(v) for v in values]


def train(run: Training, opt: Any, step_loss: Callable[[int], Tensor | float], cfg: LoopConfig, bar: Any, label: str,
          weights: Callable[[], dict[str, Tensor]], scaler: Optional[Any] = None, save: bool = True,
          on_step: Optional[Callable[[int, float, float], None]] = None) -> None:
    """Steps ``run.step .. cfg.steps - 1``; leaves the parameters at their EMA when ``cfg.ema > 0``.

    ``step_loss(step)`` runs the forward and backward passes (through ``scaler`` when given) and
    returns the step's loss, a 0-d tensor (read back only at checkpoints and at the end, not once a
    step; the batch's host-to-device copy still synchronises) or a float; ``weights()`` is what a checkpoint stores
    as the model's weights, and only a process with ``save`` writes checkpoints. ``on_step(steps done,
    loss, learning rate)`` follows every step (the trackers of ``--log-with``; it reads the loss back).
    """
    scaler = scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False)
    task = bar.add_task(label, total=cfg.steps, completed=run.step, unit="step")
    pending: list[Tensor | float] = []  # this stretch's losses, not yet read back

    def read_losses() -> None:
        run.losses.extend(round(v, 6) for v in _floats(pending))
        pending.clear()

    for step in range(run.step, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = scheduled_lr(cfg.learning_rate, step, cfg.warmup, cfg.steps, cfg.decay)
        loss = step_loss(step)
        scaler.unscale_(opt)
        if cfg.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if cfg.ema > 0:  # with warm-up: early weights do not dominate a short run
            ema_update_([run.ema[n] for n, _ in run.named], run.params, ema_decay(step, cfg.ema))
        pending.append(loss.detach() if isinstance(loss, Tensor) else loss)
        run.step = step + 1
        bar.advance(task, 1)
        if on_step is not None:
            on_step(run.step, float(loss), opt.param_groups[0]["lr"])
        if run.step % cfg.checkpoint_every == 0 and run.step < cfg.steps and save:
            read_losses()
            run.save(opt, weights())
    read_losses()
    if cfg.ema > 0:
        with torch.no_grad():
            for n, p in run.named:
                p.copy_(run.ema[n])
