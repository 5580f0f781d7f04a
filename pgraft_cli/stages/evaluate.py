"""The evaluate stage: FID and KID against data, NFE, measured FLOPs and time per image.

FID and KID are torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance``, fed one
shard of features at a time (``FidKid``): memory does not grow with the number of samples.
Features come from clean-fid's Inception network when its weights are available (a local
``--inception-weights`` TorchScript file, or clean-fid's own download where the network allows),
and otherwise from a named extractor: the bundled digits classifier for 1x16x16 grey models.
FLOPs are **measured** with ``torch.utils.flop_counter`` on the actual modules, never estimated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.metrics import (COPY_SAME_IMAGE, KID_SUBSETS, FidKid, best_of_n, cell_copy_stat, copy_cells, copy_stats, kmeans,
                            mean_pairwise_distance, measure_flops, nearest_distances, rms_spread)
from ..core.samplers import above_cutoff
from ..core.selection import condition_groups
from ..errors import PgraftError
from ..io.checkpoints import CLASSIFIER_PATH, JUDGE_PATH  # noqa: F401  (re-exported: the features' nets)
from ..io.host import ieee_float32
from ..io.recipes import check_feature_choice
from ..models.traced import tf32_off


# ----------------------------------------------------------------------------------------------
# Distances: torchmetrics' FID and KID, fed one batch of features at a time

# Printed under every metric table (terminal and report.html).
COST_NOTE = ("NFE counts a guided step once; FLOPs count both halves of classifier-free guidance, and the text "
             "encoders and VAE decoder per image, where the model has them (flops_parts in the JSON)")


# ----------------------------------------------------------------------------------------------
# FLOPs


# ----------------------------------------------------------------------------------------------
# Features


class Features(nn.Module):
    """A named feature extractor: images in [0, 1] (N, C, H, W) -> (N, D) float64 features (CPU).

    An ``nn.Module`` with ``num_features``, so torchmetrics' FID/KID take it as ``feature=`` too.
    ``identity`` (default: ``name``) is what the features depend on (weights' hash, resize rule):
    the key of cached reference statistics.
    """

    def __init__(self, name: str, fn: Callable[[Tensor], Tensor], batch: int = 256,
                 probe_shape: tuple[int, int, int] = (1, 16, 16), identity: str = ""):
        super().__init__()
        self.name, self.fn, self.batch, self.identity = name, fn, batch, identity or name
        with torch.no_grad():  # D from one probe image (Inception resizes any size to 299 x 299)
            self.num_features = int(fn(torch.zeros(1, *probe_shape)).shape[-1])

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad(), ieee_float32():  # no TF32: the same features on every device
            return torch.cat([self.fn(chunk).double().cpu() for chunk in images.split(self.batch)])


def classifier_features(path: Path | str = CLASSIFIER_PATH) -> Features:
    from ..io.checkpoints import load_classifier

    from ..io.runstore import sha256_file

    model = load_classifier(path)
    return Features(f"classifier:{Path(path).name}", lambda x: model.features(x * 2 - 1),
                    identity=f"classifier:sha256={sha256_file(path)}")


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
        tf32_off(net)  # a traced network's convolutions carry cuDNN's TF32 flag of when it was traced
        from ..io.runstore import sha256_file

        return Features(f"inception:{path.name}+{RESIZE}", lambda x: net(inception_input(x.to(device)), return_features=True),
                        batch=64, identity=f"inception:sha256={sha256_file(path)}+{RESIZE}")
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
    for cell in getattr(model, "__closure__", None) or ():  # clean-fid returns a function around its network
        if isinstance(cell.cell_contents, nn.Module):
            tf32_off(cell.cell_contents)
    return Features(f"inception:clean-fid+{RESIZE}", lambda x: model(inception_input(x.to(device))), batch=64)


PRETRAINED = {"clip": "a transformers CLIP folder (CLIPModel or CLIPVisionModel)", "dinov2": "a transformers Dinov2Model folder"}
def pretrained_features(name: str, folder: str, device: str = "cpu",
                        probe_shape: tuple[int, int, int] = (3, 224, 224)) -> Features:
    """Image embeddings from a local transformers folder: CLIP's projected image embedding (a
    ``CLIPModel``) or pooled output (a ``CLIPVisionModel``), DINOv2's pooled CLS token (a ``Dinov2Model``).

    Images go in as 8-bit RGB PIL images through the folder's own image processor (its resize,
    crop and normalisation): that rule is part of the features' name, with the folder's sha256.
    """
    from .rewards import _folder_digest, _load_pretrained, _load_weights, _require, _to_rgb_pil

    path = Path(folder).expanduser()
    spec = f"{name}:{folder}"
    if not path.is_dir():
        raise PgraftError(f"--features {spec}: no such folder; pass {PRETRAINED[name]} saved with save_pretrained")
    transformers = _require("transformers", "'pgraft[text]' (or: pip install transformers)")
    model = _load_weights(transformers.AutoModel, path, spec, what="--features").to(device)
    processor = _load_pretrained(transformers.AutoImageProcessor, path, spec, what="--features")
    kind = type(model).__name__
    if not (kind.startswith("CLIP") if name == "clip" else kind.startswith("Dinov2")):
        raise PgraftError(f"--features {spec}: the folder holds a {kind}; pass {PRETRAINED[name]}")

    def fn(images: Tensor) -> Tensor:
        pixels = processor(images=_to_rgb_pil(images), return_tensors="pt")["pixel_values"].to(device)
        out = model.get_image_features(pixel_values=pixels) if hasattr(model, "get_image_features") else model(pixel_values=pixels)
        return out if isinstance(out, Tensor) else out.pooler_output

    size = getattr(processor, "crop_size", None) or getattr(processor, "size", None)
    rule = f"{type(processor).__name__}{dict(size) if size else ''}"
    return Features(f"{name}:{_folder_digest(path)}+{rule}", fn, batch=64, probe_shape=probe_shape)


def pick_features(choice: str, image_shape: tuple[int, int, int], inception_weights: Optional[str],
                  device: str = "cpu", reward_identity: str = "") -> Optional[Features]:
    """``auto``: Inception if weights are at hand, else the digits classifier for 1x16x16 images,
    or the judge when the reward being optimised is that classifier (an FID in the reward's own
    features shares its blind spots, so a tuned model could game both); None (FID skipped, see
    ``fid_skipped``) for other images when no Inception weights are at hand.

    ``judge``: the bundled judge (a pixel MLP trained on digits-judge), features not shared with the reward.
    ``none``: no features (None). ``clip:PATH`` / ``dinov2:PATH``: ``pretrained_features``.
    """
    from ..io.runstore import sha256_file

    check_feature_choice(choice)
    name, _, folder = choice.partition(":")
    if choice == "none":
        return None
    if name in PRETRAINED:
        return pretrained_features(name, folder, device, probe_shape=tuple(image_shape))
    digits_like = tuple(image_shape) == (1, 16, 16)
    if choice == "auto" and digits_like and not inception_weights and reward_identity:
        if f"classifier:sha256={sha256_file(CLASSIFIER_PATH)}:" in reward_identity:  # alone or a weighted term
            choice = "judge"
    if choice in ("classifier", "judge") or (choice == "auto" and digits_like and not inception_weights):
        if not digits_like:
            raise PgraftError(f"the bundled {'judge' if choice == 'judge' else 'classifier'}'s features are for "
                              f"1x16x16 grey images, not {'x'.join(map(str, image_shape))}; use --features inception")
        return classifier_features(JUDGE_PATH if choice == "judge" else CLASSIFIER_PATH)
    try:
        return inception_features(inception_weights, device)
    except PgraftError:
        if choice == "auto":
            return None
        raise


JUDGE_FEATURES = "classifier:digits-judge"  # the bundled judge's features' name (classifier_features)


def tuned_reward_identity(model: Any) -> str:
    """The identity of the reward a fine-tuned file was tuned on (``pgraft finetune`` records it beside its
    metrics), or "" (not a fine-tuned file, or one written before it was recorded)."""
    import json

    if not getattr(model, "finetuned", False):
        return ""
    try:
        metrics = json.loads((getattr(model, "metadata", None) or {}).get("pgraft.metrics", "null")) or {}
    except ValueError:
        return ""
    return str(metrics.get("reward_identity") or "")


def fid_skipped(choice: str, has_data: bool) -> str:
    """The one note a run without FID prints, saying why and what would measure it."""
    if not has_data:
        why = "no reference data (pass --data: images, an alias, or a pgraft stats .npz)"
    elif choice == "none":
        why = "--features none"
    else:
        why = "no feature extractor at hand (pass --inception-weights PATH, or --features clip:PATH or dinov2:PATH)"
    return f"FID skipped: {why}"


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


def cached_reference(features: Features, spec: str, image_shape: tuple[int, int, int],
                     kid_subsets: int = KID_SUBSETS, run_root: Optional[Path] = None,
                     images: Optional[Iterable[Tensor]] = None) -> FidKid:
    """The reference of ``spec`` in ``features``: a pgraft stats file as it is (its extractor and
    shape must match), else cached statistics (``io.refstats.cache_dirs``: the run directory, then
    the user cache) keyed by extractor, shape, the data's hash and resize rule, else computed from the images
    (``images``, batches already open, else read streamed) and written to both caches. Cached and
    computed references give the same FID bit for bit."""
    from ..io.data import iter_data, resize_rule
    from ..io.refstats import STATS_VERSION, cache_dirs, data_identity, is_stats_file, load_stats, stats_key

    if is_stats_file(spec):
        state, meta = load_stats(spec)
        if meta.get("features") != features.identity or tuple(meta.get("image_shape", ())) != tuple(image_shape):
            raise PgraftError(f"--data {spec} holds statistics of {meta.get('features')} features of "
                              f"{meta.get('image_shape')} images, but this run measures {features.identity} of "
                              f"{list(image_shape)}; pass matching --features (auto takes the judge's where the reward is the bundled "
                              f"classifier), or write new ones with pgraft stats")
        metric = FidKid.from_reference_state(state, kid_subsets)
        version = meta.get("version")  # files before version 3 did not record it
        if version is None:
            metric.reference_notes.append(
                f"{spec} was written by an earlier pgraft, before features were computed in full float32 on every "
                f"device: if it was written on a GPU its features are TF32 ones; write it again with pgraft stats")
        elif version != STATS_VERSION or isinstance(version, bool):
            metric.reference_notes.append(
                f"{spec} holds statistics of version {version!r}, not this pgraft's {STATS_VERSION}: they may have been "
                f"computed another way; write them again with pgraft stats")
        return metric
    meta = {"features": features.identity, "image_shape": list(image_shape), "data": data_identity(spec),
            "resize": resize_rule(spec), "version": STATS_VERSION}
    name = f"{stats_key(meta['features'], tuple(image_shape), meta['data'], meta['resize'])}.npz"
    dirs = cache_dirs(run_root)
    for folder in dirs:
        if (folder / name).is_file():
            state, _ = load_stats(folder / name)
            for other in dirs[:dirs.index(folder)]:  # a user-cache hit is kept in the run directory too
                _save_quietly(other / name, state, meta)
            return FidKid.from_reference_state(state, kid_subsets)
    metric = reference(features, images if images is not None else iter_data(spec, image_shape), kid_subsets)
    state = metric.reference_state()
    for folder in dirs:
        _save_quietly(folder / name, state, meta)
    return metric


def _save_quietly(path: Path, state: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """A cache write that may fail (read-only home, full disk): the run goes on without that copy."""
    from ..io.refstats import save_stats

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_stats(path, state, meta)
    except OSError:
        pass


def sample_metrics(features: Features, images: Tensor, groups: Tensor, ref: Optional[FidKid] = None) -> dict[str, Any]:
    """One set of samples in ``features``: ``fid``, ``kid``, ``precision``, ``recall`` against ``ref``
    (its generated side reset first; None without one) and ``pairwise_distance`` within ``groups``."""
    f = features(images)
    out: dict[str, Any] = {"fid": None, "kid": None, "precision": None, "recall": None,
                           "pairwise_distance": mean_pairwise_distance(f.float(), groups)}
    if ref is not None:
        ref.reset_generated()
        ref.update(f, real=False)
        out.update({k: v for k, v in ref.compute().items() if k in out})
    return out


COPY_KEYS = ("copying", "copy_z", "copy_auc", "copy_near", "copy_near_z", "copy_ct", "copy_cell_p")  # ``copying``'s


@dataclass(frozen=True)
class CopyReference:
    """What the data-copying test compares samples with, computed once a run: the training images'
    feature rows (``name``: their data set; the tensor KID keeps, not a copy), each held-out image's
    distance to its nearest one and those rows (held-out images that are training images too left out),
    the k-means cells of the training rows for the cell-wise statistic, and a warning where some were left out."""

    name: str
    train: Tensor
    heldout: Tensor
    centres: Tensor
    heldout_rows: Tensor
    warning: Optional[str] = None


@ieee_float32()  # the nearest-neighbour search and k-means multiply float32 rows
def copy_reference(heldout: FidKid, train: FidKid, name: str, num_samples: int) -> tuple[Optional[CopyReference], Optional[str]]:
    """The ``CopyReference`` of FID's references: ``heldout``'s rows (unseen images) against ``train``'s (the
    images the model was fitted on, the data set ``name``; ``num_samples`` per sampler sizes the cells); else
    None and the note saying why. A held-out row within ``COPY_SAME_IMAGE`` of the training rows' spread of a
    training row is that image (features of one image computed in other batches or under TF32 differ by far
    less): left out of the reference with a warning, and the test skipped when they are half of the held-out
    rows or more."""
    held, rows = heldout.rows(real=True), train.rows(real=True)
    if held is None or rows is None:
        which = "the held-out images" if held is None else name
        return None, (f"copy test skipped: the reference statistics of {which} hold no feature rows (pass the images, "
                      f"or statistics written by pgraft stats, which keeps the rows)")
    same = COPY_SAME_IMAGE * rms_spread(rows)
    d = nearest_distances(held, rows)
    inside = int((d <= same).sum())
    if 2 * inside >= len(d) or len(d) - inside < 2:
        return None, (f"copy test skipped: {inside} of the {len(d)} held-out images are {name} images too, so they are "
                      f"not held out; pass --eval-data with images outside the training data")
    warning = None if not inside else (
        f"{inside} of the {len(d)} held-out images are also in {name}: the copy test leaves them out of its "
        f"reference; pass --eval-data with images outside the training data")
    kept = d > same
    centres = kmeans(rows, copy_cells(int(kept.sum()), num_samples))
    return CopyReference(name, rows, d[kept], centres, held[kept], warning), None


@ieee_float32()  # the nearest-neighbour search multiplies float32 rows
def copying(samples: Tensor, ref: CopyReference) -> dict[str, Any]:
    """The data-copying test (``core.metrics.copy_stats``) of ``samples``' feature rows against ``ref``:
    ``COPY_KEYS`` and ``warnings``, the global test and the cell-wise one (``core.metrics.cell_copy_stat``)."""
    cells = cell_copy_stat(samples, ref.train, ref.heldout_rows, ref.centres)
    result = {**copy_stats(nearest_distances(samples, ref.train), ref.heldout), "train": ref.name,
              "num_train": len(ref.train), "cells": cells}
    return {"copying": result, "copy_z": result["z"], "copy_auc": result["auc"], "copy_near": result["near"],
            "copy_near_z": result["near_z"], "copy_ct": cells["c_t"], "copy_cell_p": cells["p_min"],
            "warnings": [ref.warning] if ref.warning else []}


def predict_key(model: Any, x: Tensor, cond: Any) -> tuple:
    """What ``model.predict(x, t, cond)`` reads, the weights' values aside (``measure_flops``' key,
    with t): the networks, the settings, the model's class and its family adapter (their code)."""
    return (type(model), model.adapter, model.network, model.tuned, model.lora, model.cutoff, model.tuned_guidance,
            model.null_class, model.conditioning, model.model_class, model.model_config, model.schedule,
            model.autocast, x, cond)


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
    seen = predict_key(model, x, cond)

    def predict_flops(at: float) -> int:
        time = torch.tensor(at, dtype=torch.float64)
        model.network_at(time)  # the adapter's state at that time (predict sets it too) is part of the key
        return measure_flops(lambda: model.predict(x, time, cond), key=("predict", at, seen))

    # the base's call only where a step runs it: a full fine-tune at cutoff 0 leaves its base parked on the CPU
    calls = {"base_call": predict_flops(min(cutoff, 0.5))} if steps > above else {}
    denoiser, nfe = (steps - above) * calls.get("base_call", 0), steps
    if above:
        calls["tuned_call"] = predict_flops(1.0)
        calls["tuned_steps"] = above
        denoiser += above * calls["tuned_call"]
    parts = {"denoiser": denoiser}
    corrector = getattr(model, "corrector", None)
    if corrector is not None:
        flow = corrector.network is not None  # a flow corrector integrates its own network; a Gaussian is one map
        calls["corrector_call"] = (measure_flops(lambda: corrector.velocity(x, t), key=("velocity", corrector, x, t))
                                   if flow else corrector.map_flops())
        calls["corrector_calls"] = corrector.calls if flow else 1  # network calls (Heun: 2 a step)
        parts["corrector"] = calls["corrector_calls"] * calls["corrector_call"]
        if flow and corrector.mean is not None:  # its Gaussian source's colouring, once per image
            parts["corrector"] += corrector.map_flops()
        if corrector.conditioning == "text":  # its input: the prompt's pooled embedding, the text encoders run again
            parts["corrector_condition"] = measure_flops(lambda: corrector.condition_of(prompts, None, model.pooled_text))
        nfe += corrector.calls if flow else 0
    if model.conditioning == "text":
        parts["text_encoders"] = measure_flops(lambda: model.encode(prompts, labels, guidance_scale=guidance_scale))
    if model.latent:
        parts["vae_decoder"] = measure_flops(lambda: model.decode(x))
    return {"nfe": nfe, "flops_per_image": sum(parts.values()), "denoiser_flops_per_image": denoiser,
            "flops_parts": parts, "flops_calls": calls}


def image_groups(model: Any, cond: Any, index: Tensor, best_of: Optional[int]) -> Tensor:
    """Each image's group (``index``: the images' sample indices, in any order): its condition
    (prompt, or class by ``Conditions.for_indices``) and, within it in index order, runs of ``best_of``."""
    prompts, labels = cond.for_indices(model, index.tolist())
    ids: dict[str, int] = {}
    key = ([ids.setdefault(p, len(ids)) for p in prompts] if prompts is not None
           else labels if labels is not None else [0] * len(index))
    order = index.argsort()
    groups = torch.empty(len(index), dtype=torch.long)
    groups[order] = condition_groups(torch.tensor(key, dtype=torch.long)[order], best_of)
    return groups


def best_of_measured(num_prompts: int, num: int, best_of: Optional[int]) -> bool:
    """Whether an evaluation of ``num`` images reports best-of-n: ``--best-of`` (groups of N, checked by
    :func:`check_best_of_groups`), or prompts that each get the same number of images (image i: prompt i mod P)."""
    return bool(best_of) or (num_prompts > 0 and num % num_prompts == 0)


def check_best_of_groups(model: Any, cond: Any, num: int, best_of: Optional[int]) -> None:
    """``--best-of N`` must make groups of exactly N images (``image_groups``): a class model's image i has
    class i mod C, so ``num`` must be a multiple of N x C; the best of unequal groups is not best-of-N."""
    if best_of is None or num < 1:
        return
    sizes = torch.bincount(image_groups(model, cond, torch.arange(num), best_of))
    sizes = sizes[sizes > 0]
    if bool((sizes != best_of).any()):
        per = (len(cond.prompts or [""]) if model.conditioning == "text" else
               (model.num_classes or 1) if model.conditioning == "class" and cond.class_label is None else 1)
        raise PgraftError(f"--best-of {best_of} with {num} images makes groups of {int(sizes.min())} to "
                          f"{int(sizes.max())} (image i has condition i mod {per}); pass --num as a multiple of "
                          f"{best_of * per}")


def evaluate_model(model: Any, real: Optional[Tensor | Iterable[Tensor]], sample_cfg: Any,
                   features: Optional[Features], store: Any, bar: Any, stage_name: str = "sample",
                   kid_subsets: int = KID_SUBSETS, real_features: Optional[FidKid | Tensor | np.ndarray] = None,
                   cond: Any = None, reward: Any = None, also_against: Optional[dict[str, FidKid]] = None,
                   best_of: Optional[int] = None, notes: Optional[list[str]] = None,
                   copy_reference: Optional[CopyReference] = None, **dist: Any) -> dict[str, Any]:
    """Sample ``sample_cfg.num`` images into ``store`` (resumable) and measure them, shard by shard.

    The reference is ``real`` (images: a tensor or an iterable of batches) or ``real_features`` (a
    ``reference`` built once, or an (N, D) feature matrix). Returns ``fid``, ``kid`` (None without
    a reference), ``warnings``, ``features``, ``num``, ``nfe``, ``flops_per_image``,
    ``denoiser_flops_per_image``, ``flops_parts``, ``flops_calls``, ``seconds_per_image`` and
    ``steps``, plus ``reward``, ``reward_mean`` and ``reward_std`` when a reward is given, and
    ``also_against`` ({name: {fid, kid, warnings}}) for further named references (e.g. held-out
    and training data), fed the same features.

    Samples are grouped by their condition (``image_groups``: prompt or class) in runs of ``best_of``
    (a text model's prompt is one group): ``reward_best_of_mean``/``_std`` is ``best_of_n`` of the rewards
    over those groups, and ``pairwise_distance`` the mean distance between a group's samples in the
    features (``mean_pairwise_distance``; with features, whatever the model: an unconditional model's
    samples are one group, as in the fine-tuning rounds, so ``--stop-if diversity`` compares like with like). ``notes`` (e.g. why FID was skipped) are passed through.

    With ``copy_reference`` (``copy_reference()``: the training images' features, the held-out ones'
    distances to them) and a reference, ``copying`` is the data-copying test of the samples (``copying``),
    ``copy_z`` / ``copy_auc`` / ``copy_near`` / ``copy_near_z`` its numbers for gates.
    """
    from .sample import Conditions, iter_images, run_sample

    cond = cond if cond is not None else Conditions()
    run_sample(model, sample_cfg, cond, store, bar, stage_name=stage_name, **dist)
    metric, measured = None, []
    if features is not None and (real is not None or real_features is not None):
        given = real_features if real_features is not None else real
        metric = given if isinstance(given, FidKid) else reference(features, given, kid_subsets)
        measured = [metric, *(also_against or {}).values()]  # every reference the samples are measured against
        for m in measured:  # each reference serves several models
            m.reset_generated()
    prompts = len(cond.prompts or []) if model.conditioning == "text" else 0
    grouped = bool(prompts or best_of)
    num, rewards, indices, rows = 0, [], [], []
    for index, images in iter_images(store.root, stage_name):
        num += len(images)
        indices.append(index)
        f = features(images) if features is not None else None
        for m in measured:
            m.update(f, real=False)
        if f is not None and metric is None:  # with a reference its KID keeps the same rows: no second copy
            rows.append(f.float())
        if reward is not None:
            rewards.append(reward(images, cond.for_indices(model, index.tolist())[0]))
    index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    kept = metric.rows(real=False) if metric is not None else (torch.cat(rows) if rows else None)
    groups = image_groups(model, cond, index, best_of) if grouped or kept is not None else None
    guidance = sample_cfg.guidance_scale if model.guided else 1.0
    out: dict[str, Any] = {
        "num": num, "steps": sample_cfg.steps, **flops_per_image(model, sample_cfg.steps, guidance),
        "seconds_per_image": store.stage(stage_name).seconds() / max(1, num),
        "features": features.name if features is not None else None, "fid": None, "kid": None, "precision": None,
        "recall": None, "pairwise_distance": None, "warnings": [],
        "notes": [*(notes or []), *(n for m in measured for n in m.reference_notes)],
    }
    if metric is not None:
        out.update(metric.compute())
        out["also_against"] = {name: m.compute() for name, m in (also_against or {}).items()}
        fake = metric.rows(real=False)
        if copy_reference is not None and fake is not None:
            test = copying(fake, copy_reference)
            out["warnings"] += test.pop("warnings")
            out.update(test)
    if kept is not None:
        out["pairwise_distance"] = mean_pairwise_distance(kept, groups)
    if reward is not None:
        from .score import reward_stats

        scores = torch.cat(rewards)
        stats = reward_stats(scores)
        out.update({"reward": reward.spec, "reward_mean": stats["reward_mean"], "reward_std": stats["reward_std"]})
        best = best_of_n(scores, groups) if grouped else None
        if best is not None and best["min_group_size"] == best["max_group_size"]:
            out.update({"best_of": best["min_group_size"], "reward_best_of_mean": best["mean"],
                        "reward_best_of_std": best["std"], "groups": best["groups"]})
        elif best is not None:  # (--best-of is checked up front: check_best_of_groups)
            out["warnings"].append(f"reward_best_of_mean not measured: the {num} images make groups of "
                                   f"{best['min_group_size']} to {best['max_group_size']} per prompt; pass --num as "
                                   f"a multiple of the {prompts} prompts, or --best-of")
    return out
