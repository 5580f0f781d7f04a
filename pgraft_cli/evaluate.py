"""The evaluate stage: FID and KID against data, NFE, measured FLOPs and time per image.

The maths are small pure functions (``frechet_distance``, ``kernel_distance``) pinned by tests.
Features come from clean-fid's Inception network when its weights are available (a local
``--inception-weights`` TorchScript file, or clean-fid's own download where the network allows),
and otherwise from a named extractor: the bundled digits classifier for 1x16x16 grey models.
FLOPs are **measured** with ``torch.utils.flop_counter`` on the actual modules, never estimated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import PgraftError
from .samplers import above_cutoff

CLASSIFIER_PATH = Path(__file__).resolve().parent / "assets" / "digits-classifier.safetensors"


# ----------------------------------------------------------------------------------------------
# Distances


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of a (N, D) feature array, in float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``, the Fréchet distance of two Gaussians."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: regularise, as the reference code does
        eps = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def kernel_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = 10, subset_size: int = 1000,
                    seed: int = 0) -> float:
    """KID: the unbiased MMD^2 with kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over subsets."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    d = f1.shape[1]
    m = min(subset_size, len(f1), len(f2))
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        total += ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    return float(total / subsets)


# ----------------------------------------------------------------------------------------------
# FLOPs


def measure_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as counted by ``torch.utils.flop_counter`` (a multiply-add is 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------
# Features


@dataclass
class Features:
    """A named feature extractor: images in [0, 1] (N, C, H, W) -> (N, D) float64 features."""

    name: str
    fn: Callable[[Tensor], Tensor]
    batch: int = 256

    def __call__(self, images: Tensor) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for chunk in images.split(self.batch):
                out.append(self.fn(chunk).double().cpu())
        return torch.cat(out).numpy()


def classifier_features(path: Path | str = CLASSIFIER_PATH) -> Features:
    from .nets import load_classifier

    model = load_classifier(path)
    return Features(f"classifier:{Path(path).name}", lambda x: model.features(x * 2 - 1))


def inception_features(weights: Optional[str], device: str = "cpu") -> Features:
    """clean-fid's Inception-v3 pool features (2048-d) from a local TorchScript file or clean-fid."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise PgraftError(f"--inception-weights {weights}: no such file; pass clean-fid's inception-2015-12-05.pt")
        net = torch.jit.load(str(path), map_location=device).eval()

        def fn(x: Tensor) -> Tensor:
            x = x.to(device)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            x = F.interpolate(x * 255.0, size=(299, 299), mode="bicubic", align_corners=False, antialias=True)
            return net(x.clamp(0, 255), return_features=True)

        return Features(f"inception:{path.name}", fn, batch=64)
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

    def fn(x: Tensor) -> Tensor:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return model(F.interpolate(x * 255.0, size=(299, 299), mode="bicubic", antialias=True).to(device))

    return Features("inception:clean-fid", fn, batch=64)


def pick_features(choice: str, image_shape: tuple[int, int, int], inception_weights: Optional[str],
                  device: str = "cpu") -> Features:
    """``auto``: Inception if weights are at hand, else the digits classifier for 1x16x16 images."""
    digits_like = tuple(image_shape) == (1, 16, 16)
    if choice == "classifier" or (choice == "auto" and digits_like and not inception_weights):
        if not digits_like:
            raise PgraftError(f"the bundled classifier's features are for 1x16x16 grey images, not "
                              f"{'x'.join(map(str, image_shape))}; use --features inception")
        return classifier_features()
    return inception_features(inception_weights, device)


# ----------------------------------------------------------------------------------------------
# The metrics of a set of samples


def distances(gen: np.ndarray, real: np.ndarray, kid_subsets: int = 10) -> dict[str, float]:
    mu1, s1 = feature_stats(gen)
    mu2, s2 = feature_stats(real)
    return {"fid": frechet_distance(mu1, s1, mu2, s2),
            "kid": kernel_distance(gen, real, subsets=kid_subsets, subset_size=min(1000, len(gen), len(real)))}


def flops_per_image(model: Any, steps: int, guidance_scale: float = 1.0) -> tuple[int, int, dict[str, int]]:
    """(NFE, FLOPs) per image of ``model``'s sampler: base steps x base call (+ corrector), measured.

    Text models are measured with the sampler's classifier-free guidance: with ``guidance_scale > 1``
    each step runs the network on the conditional and the unconditional half, and so is counted.
    """
    x = torch.zeros((1, *model.sample_shape), device=model.device, dtype=model.dtype)
    t = torch.tensor(0.5, dtype=torch.float64)
    cond = model.encode([""] if model.conditioning == "text" else None,
                        [0] if model.conditioning == "class" else None, guidance_scale=guidance_scale)
    # A fine-tuned model runs its tuned network (or LoRA adapter) above the cutoff and the base
    # below: count each grid time with the network that really runs there.
    times = model.schedule.grid(steps)[:-1]
    cutoff = model.cutoff
    above = int(above_cutoff(times, cutoff).sum()) if model.finetuned else 0
    base = measure_flops(lambda: model.predict(x, torch.tensor(min(cutoff, 0.5), dtype=torch.float64), cond))
    nfe, total = steps, (steps - above) * base
    parts = {"base_call": base}
    if above:
        parts["tuned_call"] = measure_flops(lambda: model.predict(x, torch.tensor(1.0, dtype=torch.float64), cond))
        parts["tuned_steps"] = above
        total += above * parts["tuned_call"]
    corrector = getattr(model, "corrector", None)
    if corrector is not None and corrector.network is not None:
        call = measure_flops(lambda: corrector.velocity(x, t))
        parts["corrector_call"] = call
        nfe += corrector.steps
        total += corrector.steps * call
    elif corrector is not None:
        parts["corrector_call"] = measure_flops(lambda: corrector(x))
        total += parts["corrector_call"]
    return nfe, total, parts


def evaluate_model(model: Any, real: Optional[Tensor], sample_cfg: Any, features: Optional[Features], store: Any,
                   bar: Any, stage_name: str = "sample", kid_subsets: int = 10,
                   real_features: Optional[np.ndarray] = None, cond: Any = None, reward: Any = None,
                   **dist: Any) -> dict[str, Any]:
    """Sample ``sample_cfg.num`` images into ``store`` (resumable) and measure them.

    Returns the keys ``fid``, ``kid``, ``features``, ``num``, ``nfe``, ``flops_per_image``,
    ``seconds_per_image`` and ``steps`` (``fid``/``kid`` are None without reference data), plus
    ``reward_mean`` and ``reward_std`` when a reward is given.
    """
    from .sample import Conditions, load_images, run_sample, shard_seconds

    cond = cond if cond is not None else Conditions()
    run_sample(model, sample_cfg, cond, store, bar, stage_name=stage_name, **dist)
    images = load_images(store.root, stage_name)
    guidance = sample_cfg.guidance_scale if model.conditioning == "text" else 1.0
    nfe, flops, parts = flops_per_image(model, sample_cfg.steps, guidance)
    out: dict[str, Any] = {
        "num": int(len(images)), "steps": sample_cfg.steps, "nfe": nfe, "flops_per_image": flops,
        "flops_parts": parts, "seconds_per_image": shard_seconds(store.root, stage_name) / max(1, len(images)),
        "features": features.name if features is not None else None, "fid": None, "kid": None,
    }
    if features is not None and (real is not None or real_features is not None):
        ref = real_features if real_features is not None else features(real)
        out.update(distances(features(images), ref, kid_subsets=kid_subsets))
    if reward is not None:
        prompts, _ = cond.for_indices(model, list(range(len(images))))
        from .score import reward_stats

        stats = reward_stats(reward(images, prompts))
        out.update({"reward": reward.spec, "reward_mean": stats["reward_mean"], "reward_std": stats["reward_std"]})
    return out
