"""The evaluate stage: FID and KID against data, NFE, measured FLOPs and time per image.

FID and KID are torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance``, fed one
shard of features at a time (``FidKid``): memory does not grow with the number of samples.
Features come from clean-fid's Inception network when its weights are available (a local
``--inception-weights`` TorchScript file, or clean-fid's own download where the network allows),
and otherwise from a named extractor: the bundled digits classifier for 1x16x16 grey models.
FLOPs are **measured** with ``torch.utils.flop_counter`` on the actual modules, never estimated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.metrics import KID_SUBSETS, FidKid, measure_flops
from ..core.samplers import above_cutoff
from ..errors import PgraftError
from ..io.checkpoints import ASSETS

CLASSIFIER_PATH = ASSETS / "digits-classifier.safetensors"
JUDGE_PATH = ASSETS / "digits-judge.safetensors"  # another net, another split


# ----------------------------------------------------------------------------------------------
# Distances: torchmetrics' FID and KID, fed one batch of features at a time

# Printed under every metric table (terminal and report.html).
COST_NOTE = ("NFE counts a guided step once; FLOPs count both halves of classifier-free guidance, plus the "
             "text encoders and the VAE decoder per image (flops_parts in the JSON)")


# ----------------------------------------------------------------------------------------------
# FLOPs


# ----------------------------------------------------------------------------------------------
# Features


class Features(nn.Module):
    """A named feature extractor: images in [0, 1] (N, C, H, W) -> (N, D) float64 features (CPU).

    An ``nn.Module`` with ``num_features``, so torchmetrics' FID/KID take it as ``feature=`` too.
    """

    def __init__(self, name: str, fn: Callable[[Tensor], Tensor], batch: int = 256,
                 probe_shape: tuple[int, int, int] = (1, 16, 16)):
        super().__init__()
        self.name, self.fn, self.batch = name, fn, batch
        with torch.no_grad():  # D from one probe image (Inception resizes any size to 299 x 299)
            self.num_features = int(fn(torch.zeros(1, *probe_shape)).shape[-1])

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([self.fn(chunk).double().cpu() for chunk in images.split(self.batch)])


def classifier_features(path: Path | str = CLASSIFIER_PATH) -> Features:
    from ..io.checkpoints import load_classifier

    model = load_classifier(path)
    return Features(f"classifier:{Path(path).name}", lambda x: model.features(x * 2 - 1))


RESIZE = "torch-bicubic-aa"  # the resize rule, part of every Inception feature name


def inception_input(x: Tensor) -> Tensor:
    """Images in [0, 1] -> Inception's input: 3 channels, bicubic 299 x 299, in [0, 255].

    The clamp comes after the resize: bicubic interpolation overshoots past 0 and 255 at edges.
    This is torch's antialiased bicubic resize of float images, not clean-fid's PIL resize of
    uint8 images, so the numbers are close to but not comparable with published clean-fid FIDs;
    the feature name says so (``RESIZE``).
    """
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return F.interpolate(x * 255.0, size=(299, 299), mode="bicubic", align_corners=False, antialias=True).clamp(0, 255)


def inception_features(weights: Optional[str], device: str = "cpu") -> Features:
    """clean-fid's Inception-v3 pool features (2048-d) from a local TorchScript file or clean-fid."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise PgraftError(f"--inception-weights {weights}: no such file; pass clean-fid's inception-2015-12-05.pt")
        net = torch.jit.load(str(path), map_location=device).eval()
        return Features(f"inception:{path.name}+{RESIZE}", lambda x: net(inception_input(x.to(device)), return_features=True),
                        batch=64)
    try:
        from cleanfid.features import build_feature_extractor
    except ImportError:
        raise PgraftError(
            "Inception features need clean-fid's weights: pass --inception-weights PATH "
            "(inception-2015-12-05.pt), pip install clean-fid where the network allows, or use --features classifier"
        ) from None
    try:
        model = build_feature_extractor("clean", device=torch.device(device), use_dataparallel=False)
    except Exception as exc:
        raise PgraftError(f"clean-fid could not load its Inception weights ({str(exc)[:120]}); pass "
                          f"--inception-weights PATH or use --features classifier") from None
    return Features(f"inception:clean-fid+{RESIZE}", lambda x: model(inception_input(x.to(device))), batch=64)


def pick_features(choice: str, image_shape: tuple[int, int, int], inception_weights: Optional[str],
                  device: str = "cpu", reward_identity: str = "") -> Features:
    """``auto``: Inception if weights are at hand, else the digits classifier for 1x16x16 images,
    or the judge when the reward being optimised is that classifier (an FID in the reward's own
    features shares its blind spots, so a tuned model could game both).

    ``judge``: the bundled judge (a pixel MLP trained on digits-judge), features not shared with the reward.
    """
    from ..io.runstore import sha256_file

    digits_like = tuple(image_shape) == (1, 16, 16)
    if choice == "auto" and digits_like and not inception_weights and reward_identity:
        if reward_identity.startswith(f"classifier:sha256={sha256_file(CLASSIFIER_PATH)}:"):
            choice = "judge"
    if choice in ("classifier", "judge") or (choice == "auto" and digits_like and not inception_weights):
        if not digits_like:
            raise PgraftError(f"the bundled {'judge' if choice == 'judge' else 'classifier'}'s features are for "
                              f"1x16x16 grey images, not {'x'.join(map(str, image_shape))}; use --features inception")
        return classifier_features(JUDGE_PATH if choice == "judge" else CLASSIFIER_PATH)
    return inception_features(inception_weights, device)


# ----------------------------------------------------------------------------------------------
# The metrics of a set of samples


def reference(features: Features, real: Tensor | np.ndarray | Iterable[Tensor],
              kid_subsets: int = KID_SUBSETS) -> FidKid:
    """The reference side of FID/KID from images (a tensor or an iterable of batches, streamed) or
    from an (N, D) feature matrix; reusable for several models (``FidKid.reset_generated``)."""
    from ..io.data import READ_BATCH

    metric = FidKid(features.num_features, kid_subsets)
    if isinstance(real, (Tensor, np.ndarray)):  # in iter_data's batches: the same sums by every route
        for chunk in torch.as_tensor(real).split(READ_BATCH):
            metric.update(chunk if chunk.ndim == 2 else features(chunk), real=True)
        return metric
    for batch in real:
        metric.update(features(batch), real=True)
    return metric


def flops_per_image(model: Any, steps: int, guidance_scale: float = 1.0) -> dict[str, Any]:
    """NFE and measured FLOPs per image of ``model``'s sampler, in parts that sum to the total.

    ``flops_parts`` (per image): ``denoiser`` (the base call at each step below the cutoff, the tuned
    call above it), ``corrector`` (a corrected model's noise corrector), ``text_encoders`` (each
    image's prompt encoded once, and the negative prompt too under guidance) and ``vae_decoder``
    (latent models). ``flops_calls`` holds the per-call counts. Guided models are measured with
    the sampler's classifier-free guidance: a step with ``guidance_scale > 1`` runs the network on
    the conditional and the unconditional half, so its FLOPs count both halves while NFE counts the
    step once. A fine-tune's tuned segment with ``tuned_guidance = "none"`` runs (and is counted)
    once per step.
    """
    x = torch.zeros((1, *model.sample_shape), device=model.device, dtype=model.dtype)
    t = torch.tensor(0.5, dtype=torch.float64)
    prompts, labels = ([""] if model.conditioning == "text" else None), ([0] if model.conditioning == "class" else None)
    cond = model.encode(prompts, labels, guidance_scale=guidance_scale)
    # A fine-tuned model runs its tuned network (or LoRA adapter) above the cutoff and the base
    # below: count each grid time with the network that really runs there.
    times = model.schedule.grid(steps)[:-1]
    cutoff = model.cutoff
    above = int(above_cutoff(times, cutoff).sum()) if model.finetuned else 0
    calls = {"base_call": measure_flops(lambda: model.predict(x, torch.tensor(min(cutoff, 0.5), dtype=torch.float64), cond))}
    denoiser, nfe = (steps - above) * calls["base_call"], steps
    if above:
        calls["tuned_call"] = measure_flops(lambda: model.predict(x, torch.tensor(1.0, dtype=torch.float64), cond))
        calls["tuned_steps"] = above
        denoiser += above * calls["tuned_call"]
    parts = {"denoiser": denoiser}
    corrector = getattr(model, "corrector", None)
    if corrector is not None:
        flow = corrector.network is not None  # a flow corrector integrates its own network; a Gaussian is one map
        calls["corrector_call"] = measure_flops(lambda: corrector.velocity(x, t)) if flow else corrector.map_flops()
        calls["corrector_steps"] = corrector.steps if flow else 1
        parts["corrector"] = calls["corrector_steps"] * calls["corrector_call"]
        nfe += corrector.steps if flow else 0
    if model.conditioning == "text":
        parts["text_encoders"] = measure_flops(lambda: model.encode(prompts, labels, guidance_scale=guidance_scale))
    if model.latent:
        parts["vae_decoder"] = measure_flops(lambda: model.decode(x))
    return {"nfe": nfe, "flops_per_image": sum(parts.values()), "denoiser_flops_per_image": denoiser,
            "flops_parts": parts, "flops_calls": calls}


def evaluate_model(model: Any, real: Optional[Tensor | Iterable[Tensor]], sample_cfg: Any,
                   features: Optional[Features], store: Any, bar: Any, stage_name: str = "sample",
                   kid_subsets: int = KID_SUBSETS, real_features: Optional[FidKid | Tensor | np.ndarray] = None,
                   cond: Any = None, reward: Any = None, also_against: Optional[dict[str, FidKid]] = None,
                   **dist: Any) -> dict[str, Any]:
    """Sample ``sample_cfg.num`` images into ``store`` (resumable) and measure them, shard by shard.

    The reference is ``real`` (images: a tensor or an iterable of batches) or ``real_features`` (a
    ``reference`` built once, or an (N, D) feature matrix). Returns ``fid``, ``kid`` (None without
    a reference), ``warnings``, ``features``, ``num``, ``nfe``, ``flops_per_image``,
    ``denoiser_flops_per_image``, ``flops_parts``, ``flops_calls``, ``seconds_per_image`` and
    ``steps``, plus ``reward``, ``reward_mean`` and ``reward_std`` when a reward is given, and
    ``also_against`` ({name: {fid, kid, warnings}}) for further named references (e.g. held-out
    and training data), fed the same features.
    """
    from .sample import Conditions, iter_images, run_sample

    cond = cond if cond is not None else Conditions()
    run_sample(model, sample_cfg, cond, store, bar, stage_name=stage_name, **dist)
    metric = None
    if features is not None and (real is not None or real_features is not None):
        given = real_features if real_features is not None else real
        metric = given if isinstance(given, FidKid) else reference(features, given, kid_subsets)
        for m in [metric, *(also_against or {}).values()]:  # each reference serves several models
            m.reset_generated()
    num, rewards = 0, []
    for index, images in iter_images(store.root, stage_name):
        num += len(images)
        if metric is not None:
            f = features(images)
            for m in [metric, *(also_against or {}).values()]:
                m.update(f, real=False)
        if reward is not None:
            rewards.append(reward(images, cond.for_indices(model, index.tolist())[0]))
    guidance = sample_cfg.guidance_scale if model.guided else 1.0
    out: dict[str, Any] = {
        "num": num, "steps": sample_cfg.steps, **flops_per_image(model, sample_cfg.steps, guidance),
        "seconds_per_image": store.stage(stage_name).seconds() / max(1, num),
        "features": features.name if features is not None else None, "fid": None, "kid": None, "warnings": [],
    }
    if metric is not None:
        out.update(metric.compute())
        out["also_against"] = {name: m.compute() for name, m in (also_against or {}).items()}
    if reward is not None:
        from .score import reward_stats

        stats = reward_stats(torch.cat(rewards))
        out.update({"reward": reward.spec, "reward_mean": stats["reward_mean"], "reward_std": stats["reward_std"]})
    return out
