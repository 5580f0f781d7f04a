"""Train pgraft's bundled demo models on scikit-learn's digits (seeded, CPU, a few minutes).

    python -m pgraft_cli.demo.train            # writes pgraft_cli/assets/*.safetensors

- ``digits-flow.safetensors``: a rectified-flow diffusers ``UNet2DModel`` (about 1.2M parameters,
  16x16 grey), trained on ``digits-train`` (see ``pgraft_cli.io.data.digits_split``) with the
  flow-matching loss ``|v(x_t, t) - (e - x_0)|^2`` for a deliberately modest number of steps so that
  correction and fine-tuning have room to help. Its default data is ``digits-train`` (what
  ``pgraft correct digits`` inverts), its default evaluation data the held-out ``digits-test``.
- ``digits-classifier.safetensors``: a small CNN classifier trained on ``digits-train``, the reward
  ``classifier:digits:K`` and the feature extractor for Fréchet distance on this data.
- ``digits-judge.safetensors``: a pixel MLP (another architecture) trained on ``digits-judge`` (data
  neither the flow nor the reward saw), ``classifier:judge:K`` and ``--features judge``: it measures
  what the reward optimises without being the reward.

Every setting is recorded in the files' provenance metadata.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.losses import flow_matching_loss
from ..core.samplers import NoiseSchedule
from ..io.checkpoints import ASSETS, save_classifier, save_pgraft_safetensors
from ..io.data import load_digits
from ..models.nets import ClassifierConfig, DigitsClassifier
from ..report.ui import progress
from ..stages.train_loop import LoopConfig, Training, train

FLOW_CONFIG = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 32,
}
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}


@dataclass
class FlowTraining:
    seed: int = 0
    steps: int = 600
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup: int = 50
    data: str = "digits-train"
    eval_data: str = "digits-test"


@dataclass
class ClassifierTraining:
    seed: int = 0
    epochs: int = 60
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    max_shift: int = 1
    data: str = "digits-train"
    arch: str = "cnn"
    feature_dim: int = 64


JUDGE = ClassifierTraining(seed=1, epochs=150, batch_size=64, learning_rate=1e-3, weight_decay=0.05,
                           data="digits-judge", arch="mlp", feature_dim=32)
DATA_NOTE = ("scikit-learn digits, bilinear 8->16, scaled to [-1, 1]; "
             "split rule pgraft_cli.io.data.digits_split (per label, sha256 order, 60/20/20 % train/judge/test)")


def fit_flow(model: torch.nn.Module, data: torch.Tensor, settings: FlowTraining, g: torch.Generator,
             log: bool = True) -> torch.Tensor:
    """``settings.steps`` AdamW steps of the flow-matching loss (``core.losses.flow_matching_loss``) on
    ``data`` in [-1, 1], through the shared training loop (linear warm-up, gradient norm clipped to 1, no
    EMA, no checkpoints); returns the last loss. Each step draws its batch, noise and times from ``g``.
    Also the "train the base further" control."""
    model.train().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    schedule, last, start = NoiseSchedule.flow(), [torch.zeros(())], time.time()

    def step_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(data), (settings.batch_size,), generator=g)
        z = data[idx]
        e = torch.randn(z.shape, generator=g)
        loss = flow_matching_loss(model, schedule, z, e, torch.rand(z.shape[0], generator=g))
        loss.backward()
        last[0] = loss.detach()
        return last[0]

    def report(done: int, loss: float, lr: float) -> None:
        if log and ((done - 1) % 50 == 0 or done == settings.steps):
            print(f"flow step {done - 1:5d} loss {loss:.4f} ({time.time() - start:.0f}s)", flush=True)

    loop = LoopConfig(settings.steps, settings.learning_rate, settings.warmup, max_grad_norm=1.0)
    with progress(False) as bar:
        train(Training(list(model.named_parameters())), opt, step_loss, loop, bar, "flow", dict, save=False,
              on_step=report)
    return last[0]


def train_flow(settings: FlowTraining, out: Path) -> None:
    from diffusers import UNet2DModel

    torch.manual_seed(settings.seed)
    g = torch.Generator().manual_seed(settings.seed)
    images, _ = load_digits(split=settings.data.partition("-")[2])
    data = images * 2 - 1
    model = UNet2DModel(**FLOW_CONFIG)
    start = time.time()
    loss = fit_flow(model, data, settings, g)
    provenance = {"created_by": "pgraft_cli.demo.train", "training": asdict(settings), "data_note": DATA_NOTE,
                  "train_images": len(data), "final_loss": round(loss.item(), 5),
                  "train_seconds": round(time.time() - start, 1)}
    save_pgraft_safetensors(out, model, "UNet2DModel", FLOW_CONFIG, SCHEDULER_CONFIG, provenance,
                            extra={"pgraft.kind": "model", "pgraft.data": settings.data,
                                   "pgraft.eval_data": settings.eval_data})
    print(f"wrote {out}")


def _shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def accuracy(model: DigitsClassifier, split: str) -> float:
    """Top-1 accuracy of ``model`` on one digits split."""
    images, labels = load_digits(split=split)
    with torch.no_grad():
        return (model(images * 2 - 1).argmax(1) == labels).float().mean().item()


def train_classifier(settings: ClassifierTraining, out: Path) -> None:
    """Cross-entropy on ``settings.data`` with random shifts; accuracy on every split it did not see."""
    torch.manual_seed(settings.seed)
    g = torch.Generator().manual_seed(settings.seed)
    images, labels = load_digits(split=settings.data.partition("-")[2])
    x = images * 2 - 1
    model = DigitsClassifier(ClassifierConfig(arch=settings.arch, feature_dim=settings.feature_dim))
    opt = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(order), settings.batch_size):
            b = order[i : i + settings.batch_size]
            loss = F.cross_entropy(model(_shift(x[b], settings.max_shift, g)), labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    held_out = {f"digits-{s}": round(accuracy(model, s), 4) for s in ("train", "judge", "test")
                if f"digits-{s}" != settings.data}
    print(f"{out.name}: held-out accuracy {held_out}")
    provenance = {"created_by": "pgraft_cli.demo.train", "training": asdict(settings), "data_note": DATA_NOTE,
                  "train_images": len(x), "heldout_accuracy": held_out["digits-test"], "accuracy": held_out}
    save_classifier(out, model, provenance)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument("--flow-steps", type=int, default=FlowTraining.steps)
    parser.add_argument("--only", choices=["flow", "classifier", "judge"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "classifier"):
        train_classifier(ClassifierTraining(), args.out / "digits-classifier.safetensors")
    if args.only in (None, "judge"):
        train_classifier(JUDGE, args.out / "digits-judge.safetensors")
    if args.only in (None, "flow"):
        train_flow(FlowTraining(steps=args.flow_steps), args.out / "digits-flow.safetensors")


if __name__ == "__main__":
    main()
