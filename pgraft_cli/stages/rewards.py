"""Rewards: named scorers of generated images, picked on the command line as ``NAME[:ARGS]``.

A reward maps images in [0, 1], float (N, C, H, W) with C = 1 (grey) or 3 (RGB), and optionally one
prompt per image, to N float64 scores on the CPU; larger is better. Registered rewards:

- ``classifier:PATH:CLASS``: ``log p(CLASS | x)`` under a pgraft safetensors classifier
  (``classifier:digits:3`` uses the bundled digits classifier). Always <= 0.
- ``jpeg-compressibility`` / ``jpeg-incompressibility``: DDPO's rewards, minus / plus the size in
  kB (1000 bytes) of the image saved as JPEG at quality 95 by PIL.
- ``clip[:PATH]``: cosine similarity of CLIP's image and prompt embeddings, in [-1, 1], from a local
  transformers CLIP folder (or ``$PGRAFT_CLIP_PATH``).
- ``vqascore[:PATH]``: VQAScore, the probability that a vision-language model answers "Yes" to
  ``Does this figure show "{prompt}"? Please answer yes or no.``, in [0, 1]; from a local
  transformers folder (or ``$PGRAFT_VQASCORE_PATH``), else from the ``t2v_metrics`` package.
- ``pickscore:PATH``: PickScore, ``exp(logit_scale)`` times CLIP's cosine, from a local PickScore_v1 folder.
- ``aesthetic:PATH``: LAION's aesthetic predictor, a linear/MLP head (``aesthetic-head.safetensors``)
  on a local CLIP ViT-L/14 folder's normalised image embeddings.
- ``W1*SPEC1+W2*SPEC2...``: the weighted sum of those rewards (``parse_weighted``).
- ``python:MODULE:FUNCTION`` or ``python:path/to/file.py:FUNCTION``: a user's
  ``fn(images, prompts) -> (N,)`` scores.

Rewards that read prompts (``clip``, ``vqascore``) see images as 8-bit RGB PIL images, exactly as if
they had been saved to PNG and re-opened, so scores of a run's tensors and of its PNGs agree.
Nothing is downloaded: models come from local folders the user names (the one exception: ``vqascore``
without a folder hands over to t2v_metrics, which loads, and may download, its own weights).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import PgraftError
from ..io.host import ieee_float32
from ..io.runstore import sha256_file

VQA_QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'
T2V_DEFAULT_MODEL = "clip-flant5-xxl"  # t2v_metrics' recommended VQAScore model
CLIP_ENV = "PGRAFT_CLIP_PATH"
VQASCORE_ENV = "PGRAFT_VQASCORE_PATH"
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L")


class RewardError(PgraftError):
    """A reward spec that cannot be built or a reward that cannot score its inputs."""


@dataclass
class Reward:
    """A named scorer: images in [0, 1] (N, C, H, W) [+ N prompts] -> (N,) float64 on the CPU.

    ``fn`` scores one batch of at most ``batch_size`` images; ``spec`` is the string the user
    passed (kept for provenance and stage keys); ``needs_prompts`` says whether ``fn`` reads them;
    ``identity`` is what the scores depend on beyond the spec (the sha256 of a classifier, of a
    reward's source file, of a model folder's files), so a changed file gives a new stage key.
    """

    name: str
    fn: Callable[[Tensor, Optional[list[str]]], Tensor]
    batch_size: int = 64
    spec: str = ""
    needs_prompts: bool = False
    identity: str = ""

    def __post_init__(self) -> None:
        self.spec = self.spec or self.name
        self.identity = self.identity or self.spec

    def __call__(self, images: Tensor, prompts: Optional[list[str]] = None) -> Tensor:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise RewardError(f"reward {self.spec}: expected images of shape (N, 1 or 3, H, W), got {shape}")
        if not images.is_floating_point():
            raise RewardError(f"reward {self.spec}: expected float images in [0, 1], got {images.dtype}")
        n = len(images)
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if len(prompts) != n:
                raise RewardError(f"reward {self.spec}: got {len(prompts)} prompts for {n} images; pass one per image")
        elif self.needs_prompts:
            raise RewardError(f"reward {self.spec} scores images against prompts; sample with prompts "
                              f"(a text-to-image model) or pick a reward that needs none")
        out = []
        with torch.inference_mode(), ieee_float32():  # no TF32: the same scores on every device
            for start in range(0, n, self.batch_size):
                chunk = images[start:start + self.batch_size]
                chunk_prompts = None if prompts is None else prompts[start:start + self.batch_size]
                out.append(_as_scores(self.fn(chunk, chunk_prompts), len(chunk), self.spec))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _as_scores(value: Any, n: int, spec: str) -> Tensor:
    """A reward function's output as float64 (n,) on the CPU, or a RewardError saying what is wrong."""
    try:
        if isinstance(value, Tensor):
            scores = value.detach().to("cpu", torch.float64)
        else:
            scores = torch.from_numpy(np.asarray(value, dtype=np.float64).copy())
    except (TypeError, ValueError) as exc:
        raise RewardError(f"reward {spec} returned {type(value).__name__}, not numbers ({exc}); "
                          f"return a tensor, array or list of shape ({n},)") from None
    if tuple(scores.shape) != (n,):
        raise RewardError(f"reward {spec} returned shape {tuple(scores.shape)} for {n} images; "
                          f"return one score per image, shape ({n},)")
    bad = (~torch.isfinite(scores)).nonzero().flatten()
    if len(bad):
        raise RewardError(f"reward {spec} returned {len(bad)} NaN or infinite scores in a batch of {n} "
                          f"(first {float(scores[bad[0]])} at row {int(bad[0])}); fix the reward so every image "
                          f"gets a finite number")
    return scores


# ----------------------------------------------------------------------------------------------
# Registry

Builder = Callable[[Optional[str], str, str], Reward]  # (args, device, spec) -> Reward


@dataclass(frozen=True)
class RewardEntry:
    builder: Builder
    usage: str
    help: str


REWARDS: dict[str, RewardEntry] = {}


def register_reward(name: str, usage: str, help: str) -> Callable[[Builder], Builder]:
    """Register ``builder(args, device, spec) -> Reward`` under ``name``."""

    def decorate(builder: Builder) -> Builder:
        REWARDS[name] = RewardEntry(builder, usage, help)
        return builder

    return decorate


def available_rewards() -> list[str]:
    return sorted(REWARDS)


_TERM = re.compile(r"(?:^|\+)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*")


def parse_weighted(spec: str) -> Optional[list[tuple[float, str]]]:
    """``"0.7*pickscore:P+0.3*aesthetic:A"`` -> ``[(0.7, "pickscore:P"), (0.3, "aesthetic:A")]``; None
    for a spec that is not a weighted sum (no leading ``W*``). A term starts at the beginning or at a
    ``+`` followed by ``NUMBER*``, so paths may hold ``+`` and ``*`` elsewhere."""
    spec = (spec or "").strip()
    starts = list(_TERM.finditer(spec))
    if not starts or starts[0].start() != 0:
        return None
    ends = [m.start() for m in starts[1:]] + [len(spec)]
    terms = [(float(m.group(1)), spec[m.end():end].strip()) for m, end in zip(starts, ends)]
    for weight, term in terms:
        if not term:
            raise RewardError(f"reward {spec!r}: the weight {weight:g} names no reward; write W*NAME[:ARGS]+W*NAME[:ARGS], "
                              f"e.g. 0.7*pickscore:P+0.3*aesthetic:A")
    return terms


def weighted_reward(terms: list[tuple[float, Reward]], spec: str) -> Reward:
    """``r(x) = sum_i w_i r_i(x)``: one reward of several, each scoring the same images (and prompts)."""

    def fn(images: Tensor, prompts: Optional[list[str]]) -> Tensor:
        return sum(w * r(images, prompts if r.needs_prompts else None) for w, r in terms)

    return Reward("weighted", fn, batch_size=min(r.batch_size for _, r in terms), spec=spec,
                  needs_prompts=any(r.needs_prompts for _, r in terms),
                  identity="+".join(f"{w!r}*{r.identity}" for w, r in terms))


def parse_reward(spec: str, device: str | torch.device = "cpu") -> Reward:
    """Build the reward a ``NAME[:ARGS]`` spec (or a weighted sum of them, ``parse_weighted``) names."""
    spec = (spec or "").strip()
    terms = parse_weighted(spec)
    if terms is not None:
        return weighted_reward([(w, parse_reward(term, device)) for w, term in terms], spec)
    name, _, args = spec.partition(":")
    if name not in REWARDS:
        close = difflib.get_close_matches(name, REWARDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RewardError(f"unknown reward {name!r}; {hint}registered: {', '.join(available_rewards())}"
                          if name else f"no reward given; pick one of: {', '.join(available_rewards())}")
    return REWARDS[name].builder(args or None, str(device), spec)


def _require(module: str, install: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RewardError(f"this reward needs the {module} package: pip install {install}") from None


def _to_pil(images: Tensor) -> list[Any]:
    """Images in [0, 1] (N, C, H, W) as 8-bit PIL images (mode L for grey, RGB for colour)."""
    from .sample import to_uint8  # the same quantisation as the PNGs pgraft writes

    Image = _require("PIL.Image", "pillow")
    arr = to_uint8(images.detach().float().cpu()).numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def _to_rgb_pil(images: Tensor) -> list[Any]:
    return [im.convert("RGB") for im in _to_pil(images)]


# ----------------------------------------------------------------------------------------------
# classifier:PATH:CLASS


@register_reward("classifier", "classifier:PATH:CLASS",
                 "log-probability of CLASS under a pgraft classifier (PATH 'digits' = the bundled one, "
                 "'judge' = the bundled judge)")
def classifier_reward(args: Optional[str], device: str, spec: str) -> Reward:
    """``r(x) = log softmax(head(body(2 x - 1)))[CLASS]``: the classifier reads images in [-1, 1].

    Input rule: an RGB image fed to a grey classifier is converted to luma (0.299 R + 0.587 G +
    0.114 B, as PIL's "L"); a grey image fed to an RGB classifier is repeated over 3 channels; images
    of another size are resized to the classifier's ``image_size`` (bilinear, antialiased,
    ``align_corners=False``).
    """
    from ..io.checkpoints import CLASSIFIER_PATH, JUDGE_PATH

    usage = "pass classifier:PATH:CLASS, e.g. classifier:digits:3"
    if not args or ":" not in args:
        raise RewardError(f"reward {spec!r} needs a classifier and a class; {usage}")
    path_text, class_text = args.rsplit(":", 1)
    path = {"digits": CLASSIFIER_PATH, "judge": JUDGE_PATH}.get(path_text) or Path(path_text).expanduser()
    if not path.is_file():
        raise RewardError(f"reward {spec}: no classifier file {path_text!r}; pass a pgraft classifier "
                          f".safetensors, 'digits' for the bundled one or 'judge' for the bundled judge ({usage})")
    from ..io.checkpoints import load_classifier

    try:
        model = load_classifier(path)
    except PgraftError as exc:
        raise RewardError(f"reward {spec}: {exc}") from None
    config = model.config
    try:
        target = int(class_text)
    except ValueError:
        raise RewardError(f"reward {spec}: CLASS {class_text!r} is not an integer; "
                          f"pick one of 0..{config.num_classes - 1}") from None
    if not 0 <= target < config.num_classes:
        raise RewardError(f"reward {spec}: CLASS {target} is out of range; this classifier has classes "
                          f"0..{config.num_classes - 1}")
    model = model.to(device)
    luma = torch.tensor(LUMA, device=device).view(1, 3, 1, 1)

    def fn(images: Tensor, prompts: Optional[list[str]]) -> Tensor:
        x = images.to(device, torch.float32)
        if x.shape[1] == 3 and config.in_channels == 1:
            x = (x * luma).sum(1, keepdim=True)
        elif x.shape[1] == 1 and config.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (config.image_size, config.image_size):
            x = F.interpolate(x, size=(config.image_size, config.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return torch.log_softmax(model(x * 2 - 1).double(), dim=-1)[:, target]

    return Reward("classifier", fn, batch_size=256, spec=spec,
                  identity=f"classifier:sha256={sha256_file(path)}:{target}")


# ----------------------------------------------------------------------------------------------
# JPEG (in)compressibility, DDPO's definition


def jpeg_size_kb(images: Tensor) -> Tensor:
    """Size in kB (1000 bytes) of each image quantised to 8 bits and saved by PIL as JPEG, quality 95."""
    sizes = []
    for image in _to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float64)


def _no_args(name: str, args: Optional[str], spec: str) -> None:
    if args:
        raise RewardError(f"reward {spec}: {name} takes no arguments; pass just {name}")


@register_reward("jpeg-compressibility", "jpeg-compressibility", "minus the JPEG size in kB (DDPO)")
def jpeg_compressibility_reward(args: Optional[str], device: str, spec: str) -> Reward:
    _no_args("jpeg-compressibility", args, spec)
    _require("PIL.Image", "pillow")
    return Reward("jpeg-compressibility", lambda x, p: -jpeg_size_kb(x), spec=spec)


@register_reward("jpeg-incompressibility", "jpeg-incompressibility", "the JPEG size in kB (DDPO)")
def jpeg_incompressibility_reward(args: Optional[str], device: str, spec: str) -> Reward:
    _no_args("jpeg-incompressibility", args, spec)
    _require("PIL.Image", "pillow")
    return Reward("jpeg-incompressibility", lambda x, p: jpeg_size_kb(x), spec=spec)


# ----------------------------------------------------------------------------------------------
# Local transformers models


def _local_folder(args: Optional[str], env: str, spec: str, example: str) -> Optional[Path]:
    text = args or os.environ.get(env, "")
    if not text:
        return None
    path = Path(text).expanduser()
    if not path.is_dir():
        source = f"${env}" if not args else "the path"
        raise RewardError(f"reward {spec}: {source} {text!r} is not a folder; pass {example}")
    return path


def _head_folder(args: Optional[str], env: str, spec: str, name: str, head: str, kind: str) -> Path:
    """A reward's local folder that must hold ``head`` beside the ``kind`` weights (aesthetic, imagereward)."""
    example = f"{name}:/path/to/folder (a {kind} folder with {head} in it)"
    path = _local_folder(args, env, spec, example)
    if path is None:
        raise RewardError(f"reward {name} needs a local model: pass {example} or set ${env}")
    if not (path / head).is_file():
        raise RewardError(f"reward {spec}: no {head} in {path}; pass {example}")
    return path


def _folder_digest(path: Path) -> str:
    """``sha256=`` of a model folder's files (weights, configs, tokenizer): the same files anywhere, the
    same digest; new weights at the same path, a new one. Reads the folder once (about 1 s per GB)."""
    from ..io.checkpoints import identity_of

    return f"sha256={identity_of(path)}"


def _load_pretrained(cls: Any, path: Path, spec: str, what: str = "reward", **kwargs: Any) -> Any:
    """A processor, tokenizer or config ``cls.from_pretrained`` from the local folder ``path``."""
    from ..io.checkpoints import _quiet_loading, _short

    try:
        with _quiet_loading():
            return cls.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise RewardError(f"{what} {spec}: cannot load {cls.__name__} from {path} ({_short(exc)}); "
                          f"pass a folder saved with save_pretrained") from None


def _load_weights(cls: Any, path: Path, spec: str, what: str = "reward", dtype: Any = None,
                  used: tuple[str, ...] = ("",)) -> Any:
    """A model ``cls.from_pretrained`` from ``path`` whose weights fill it: transformers initialises missing
    weights at random (a folder converted under other key names would score with noise), so a missing or
    mismatched weight under the modules the reward calls (``used``: key prefixes; all by default) is refused.
    In ``dtype`` (float32 by default, whatever the folder was saved in)."""
    import torch

    from ..io.checkpoints import _quiet_loading, _short

    try:
        with _quiet_loading():
            model, info = cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise RewardError(f"{what} {spec}: cannot load {cls.__name__} from {path} ({_short(exc)}); "
                          f"pass a folder saved with save_pretrained") from None
    missing = [k for k in sorted(info.get("missing_keys") or []) + [str(m[0]) if isinstance(m, tuple) else str(m)
                                                                   for m in info.get("mismatched_keys") or []]
               if k.startswith(used)]
    if missing:
        raise RewardError(f"{what} {spec}: {path}'s weights leave {len(missing)} of {type(model).__name__}'s "
                          f"unset (e.g. {', '.join(missing[:3])}), which would score with random values; pass a "
                          f"folder saved with that model's save_pretrained")
    return model.to(dtype or torch.float32).eval()


@register_reward("clip", "clip[:PATH]", "CLIP image-prompt cosine similarity, from a local CLIP folder")
def clip_reward(args: Optional[str], device: str, spec: str) -> Reward:
    """``r(x, prompt) = cos(E_image(x), E_text(prompt))`` with CLIP's projected embeddings, in [-1, 1].

    Prompts longer than the tokenizer's ``model_max_length`` (77 for CLIP) are truncated.
    """
    example = "clip:/path/to/clip (a downloaded openai/clip-vit-base-patch32 folder, say)"
    path = _local_folder(args, CLIP_ENV, spec, example)
    if path is None:
        raise RewardError(f"reward clip needs a local CLIP model: pass {example} or set ${CLIP_ENV}")
    fn, _ = _clip_cosine(path, device, spec)
    return Reward("clip", fn, batch_size=64, spec=spec, needs_prompts=True, identity=f"clip:{_folder_digest(path)}")


def _clip_cosine(path: Path, device: str, spec: str) -> tuple[Callable[[Tensor, Optional[list[str]]], Tensor], Any]:
    """``fn(images, prompts) = cos(E_image, E_text)`` of the CLIPModel + CLIPProcessor in ``path``, and the model."""
    transformers = _require("transformers", "'pgraft[text]' (or: pip install transformers)")
    model = _load_weights(transformers.CLIPModel, path, spec).to(device)
    processor = _load_pretrained(transformers.CLIPProcessor, path, spec)

    def fn(images: Tensor, prompts: Optional[list[str]]) -> Tensor:
        inputs = processor(text=prompts, images=_to_rgb_pil(images), return_tensors="pt", padding=True,
                           truncation=True, max_length=processor.tokenizer.model_max_length)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        out = model(**inputs)
        image = F.normalize(out.image_embeds.double(), dim=-1)
        text = F.normalize(out.text_embeds.double(), dim=-1)
        return (image * text).sum(-1)

    return fn, model


@register_reward("pickscore", "pickscore:PATH", "PickScore: CLIP's scaled image-prompt similarity, from a local folder")
def pickscore_reward(args: Optional[str], device: str, spec: str) -> Reward:
    """PickScore (Kirstain et al. 2023): ``r(x, prompt) = exp(logit_scale) cos(E_image(x), E_text(prompt))``
    with the fine-tuned CLIP-H of ``yuvalkirstain/PickScore_v1`` (a transformers ``CLIPModel`` folder;
    its processor is ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s: save both into PATH)."""
    return _clip_family("pickscore", args, device, spec, "PickScore_v1 saved with its CLIPProcessor", scaled=True)


@register_reward("hpsv2", "hpsv2:PATH", "HPSv2: a human-preference fine-tune of CLIP ViT-H/14, from a local folder")
def hpsv2_reward(args: Optional[str], device: str, spec: str) -> Reward:
    """HPSv2 (Wu et al. 2023): ``r(x, prompt) = cos(E_image(x), E_text(prompt))`` of the HPS v2 / v2.1
    fine-tune of open_clip's ViT-H/14, as the hpsv2 package scores (the diagonal of its normalised
    image-text product: about 0.2..0.35; its benchmark tables print 100 x this). PATH: a transformers
    ``CLIPModel`` folder converted from the open_clip checkpoint, with
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s ``CLIPProcessor`` (README: Rewards)."""
    return _clip_family("hpsv2", args, device, spec, "HPS v2.1 converted to a CLIPModel folder with its CLIPProcessor")


def _clip_family(name: str, args: Optional[str], device: str, spec: str, what: str, scaled: bool = False) -> Reward:
    """A CLIP-cosine reward from the folder ``args`` (or ``$PGRAFT_<NAME>_PATH``), times ``exp(logit_scale)``
    when ``scaled``."""
    env, example = f"PGRAFT_{name.upper()}_PATH", f"{name}:/path/to/{name} ({what})"
    path = _local_folder(args, env, spec, example)
    if path is None:
        raise RewardError(f"reward {name} needs a local model: pass {example} or set ${env}")
    cosine, model = _clip_cosine(path, device, spec)
    scale = float(model.logit_scale.exp()) if scaled else 1.0
    return Reward(name, lambda x, p: scale * cosine(x, p), batch_size=64, spec=spec, needs_prompts=True,
                  identity=f"{name}:{_folder_digest(path)}")


AESTHETIC_HEAD = "aesthetic-head.safetensors"


@register_reward("aesthetic", "aesthetic:PATH",
                 "LAION aesthetic score: a linear/MLP head on CLIP ViT-L/14 image embeddings, from a local folder")
def aesthetic_reward(args: Optional[str], device: str, spec: str) -> Reward:
    """LAION's aesthetic predictor: ``r(x) = head(E_image(x) / ||E_image(x)||)`` (about 1..10).

    PATH holds a transformers CLIP folder (``CLIPModel`` or ``CLIPVisionModelWithProjection`` of
    ViT-L/14, with its image processor) and ``aesthetic-head.safetensors``: the head's Linear layers
    as ``layers.{i}.weight`` / ``.bias`` (the improved-aesthetic-predictor MLP's own keys: Linear
    768-1024-128-64-16-1 with dropout between, no activations), or one ``weight`` / ``bias`` (the
    linear head). Convert the original ``.pth`` once with ``safetensors.torch.save_file(torch.load(..))``.
    """
    path = _head_folder(args, "PGRAFT_AESTHETIC_PATH", spec, "aesthetic", AESTHETIC_HEAD, "CLIP ViT-L/14")
    from safetensors.torch import load_file

    weights = load_file(str(path / AESTHETIC_HEAD), device=device)
    layers = _linear_layers(weights, spec, AESTHETIC_HEAD)
    transformers = _require("transformers", "'pgraft[text]' (or: pip install transformers)")
    config = _load_pretrained(transformers.AutoConfig, path, spec)
    vision_only = getattr(config, "model_type", "") == "clip_vision_model"  # AutoModel would drop its projection
    model = _load_weights(transformers.CLIPVisionModelWithProjection if vision_only else transformers.AutoModel,
                          path, spec).to(device)
    embedding = getattr(config, "projection_dim", None)
    if embedding is not None and layers[0][0].shape[1] != embedding:
        raise RewardError(f"reward {spec}: the head takes {layers[0][0].shape[1]} inputs but {path}'s CLIP embeds "
                          f"images in {embedding}; pass the head made for that CLIP (LAION's: ViT-L/14, 768)")
    processor = _load_pretrained(transformers.AutoImageProcessor, path, spec)

    def fn(images: Tensor, prompts: Optional[list[str]]) -> Tensor:
        pixels = processor(images=_to_rgb_pil(images), return_tensors="pt")["pixel_values"].to(device)
        if hasattr(model, "get_image_features"):  # a CLIPModel: the projected embedding (pooler_output here)
            out = model.get_image_features(pixel_values=pixels)
            out = out if isinstance(out, Tensor) else out.pooler_output
        else:  # a CLIPVisionModelWithProjection
            out = model(pixel_values=pixels).image_embeds
        return _head(F.normalize(out.double(), dim=-1), layers)

    return Reward("aesthetic", fn, batch_size=64, spec=spec, identity=f"aesthetic:{_folder_digest(path)}")


def _linear_layers(weights: dict[str, Tensor], spec: str, file: str) -> list[tuple[Tensor, Tensor]]:
    """A head's Linear layers in order: ``weight``/``bias``, or ``layers.{i}.weight``/``.bias`` by index i."""
    if set(weights) == {"weight", "bias"}:
        return [(weights["weight"], weights["bias"])]
    found = sorted({int(m.group(1)) for k in weights if (m := re.fullmatch(r"layers\.(\d+)\.weight", k))})
    if not found or any(f"layers.{i}.bias" not in weights for i in found):
        raise RewardError(f"reward {spec}: {file} holds {sorted(weights)[:6]}; expected weight/bias or "
                          f"layers.N.weight/layers.N.bias (the head's Linear layers)")
    layers = [(weights[f"layers.{i}.weight"], weights[f"layers.{i}.bias"]) for i in found]
    if layers[-1][0].shape[0] != 1:
        raise RewardError(f"reward {spec}: the head's last layer has {layers[-1][0].shape[0]} outputs, not 1")
    return layers


def _head(x: Tensor, layers: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``x W_1^T + b_1 ... W_L^T + b_L`` in float64 (the heads have no activations), first column: (N,)."""
    for w, b in layers:
        x = x @ w.double().T + b.double()
    return x[:, 0]


IMAGEREWARD_HEAD = "imagereward-head.safetensors"
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's own normalisation
IMAGEREWARD_MAX_TOKENS = 35  # its prompts are padded or truncated to 35 tokens


@register_reward("imagereward", "imagereward:PATH",
                 "ImageReward: an MLP on BLIP's image-grounded text encoding, from a local folder")
def imagereward_reward(args: Optional[str], device: str, spec: str) -> Reward:
    """ImageReward (Xu et al. 2023): ``r(x, prompt) = (head(h(prompt | x)) - 0.16717) / 1.03334``, where
    ``h`` is BLIP's text encoder's [CLS] state with cross-attention to the image's ViT states and
    ``head`` the MLP (Linear 768-1024-128-64-16-1, no activations).

    PATH holds a transformers ``BlipForImageTextRetrieval`` folder (the ImageReward checkpoint's
    ``blip.*`` weights converted, ViT-L/16 at 224 px, with a ``BlipProcessor``) and
    ``imagereward-head.safetensors``: the checkpoint's ``mlp.layers.{i}.weight``/``.bias`` saved as
    ``layers.{i}.weight``/``.bias`` (README: Rewards). Prompts are padded/truncated to 35 tokens.
    """
    path = _head_folder(args, "PGRAFT_IMAGEREWARD_PATH", spec, "imagereward", IMAGEREWARD_HEAD, "BlipForImageTextRetrieval")
    from safetensors.torch import load_file

    layers = _linear_layers(load_file(str(path / IMAGEREWARD_HEAD), device=device), spec, IMAGEREWARD_HEAD)
    transformers = _require("transformers", "'pgraft[text]' (or: pip install transformers)")
    # ImageReward's BLIP has no ITM head nor contrastive projections: only these two are converted, and called
    model = _load_weights(transformers.BlipForImageTextRetrieval, path, spec,
                          used=("vision_model.", "text_encoder.")).to(device)
    processor = _load_pretrained(transformers.BlipProcessor, path, spec)

    def fn(images: Tensor, prompts: Optional[list[str]]) -> Tensor:
        pixels = processor.image_processor(images=_to_rgb_pil(images), return_tensors="pt")["pixel_values"]
        text = processor.tokenizer(prompts, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_TOKENS,
                                   return_tensors="pt")
        states = model.vision_model(pixel_values=pixels.to(device)).last_hidden_state
        h = model.text_encoder(input_ids=text.input_ids.to(device), attention_mask=text.attention_mask.to(device),
                               encoder_hidden_states=states,
                               encoder_attention_mask=torch.ones(states.shape[:-1], dtype=torch.long, device=device))
        return (_head(h.last_hidden_state[:, 0].double(), layers) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD

    return Reward("imagereward", fn, batch_size=64, spec=spec, needs_prompts=True,
                  identity=f"imagereward:{_folder_digest(path)}")


@register_reward("vqascore", "vqascore[:PATH]",
                 "P(answer 'Yes' | image, 'Does this figure show \"{prompt}\"?') from a local VLM or t2v_metrics")
def vqascore_reward(args: Optional[str], device: str, spec: str) -> Reward:
    """VQAScore: ``r(x, prompt) = P(Yes | x, question(prompt))`` from a vision-language model.

    With a local transformers folder (``AutoProcessor`` + ``AutoModelForImageTextToText``, e.g. a
    LLaVA or BLIP-2 checkpoint): the question is wrapped in the processor's chat template with a
    generation prompt when it has one (one BOS: a template that writes it is tokenised without the
    tokenizer's special tokens), else written BLIP-2 style as ``Question: {q} Answer:`` (the processor inserts
    the image tokens). The score is the softmax probability, at the position after the question (for an
    encoder-decoder language model such as BLIP-2 Flan-T5, the decoder's first position), of the tokens
    that spell "Yes" and " Yes" on their own (summed over the distinct single-token spellings: BPE
    tokenizers give two tokens, SentencePiece and word-level ones one).
    Batches are right-padded and read at each row's last real token, so batching does not change a
    score. On CUDA the model runs in bfloat16, elsewhere in float32.

    Without a folder: ``t2v_metrics.VQAScore`` (its ``clip-flant5-xxl`` model, or ``vqascore:NAME``
    for another of its models), which loads its own weights.
    """
    example = "vqascore:/path/to/vlm (a saved LLaVA or BLIP-2 folder)"
    if args and not Path(args).expanduser().is_dir() and _is_t2v_model(args):
        return _t2v_vqascore(args, device, spec)
    path = _local_folder(args, VQASCORE_ENV, spec, example)
    if path is None:
        return _t2v_vqascore(T2V_DEFAULT_MODEL, device, spec)
    transformers = _require("transformers", "'pgraft[text]' (or: pip install transformers)")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    processor = _load_pretrained(transformers.AutoProcessor, path, spec)
    model = _load_weights(transformers.AutoModelForImageTextToText, path, spec, dtype=dtype).to(device)
    tokenizer = processor.tokenizer
    yes_ids = _yes_token_ids(tokenizer)
    if not yes_ids:
        raise RewardError(f"reward {spec}: the tokenizer in {path} has no single token for 'Yes'; "
                          f"VQAScore needs a model that can answer Yes in one token")
    yes = torch.tensor(yes_ids, device=device)
    config = getattr(model.config, "text_config", None) or model.config
    # BLIP-2 Flan-T5 and other encoder-decoder VLMs: the answer's first token is the decoder's first output
    start_token = None
    if getattr(config, "is_encoder_decoder", False):
        start_token = getattr(config, "decoder_start_token_id", None)
        start_token = getattr(config, "pad_token_id", None) if start_token is None else start_token  # (T5's is pad)
        if start_token is None:
            raise RewardError(f"reward {spec}: {path}'s encoder-decoder language model names no decoder start token "
                              f"(decoder_start_token_id); add it to its config.json")
    templated = bool(getattr(processor, "chat_template", None))

    def chat(prompt: str) -> str:
        q = VQA_QUESTION.format(prompt=prompt)
        if templated:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            return processor.apply_chat_template(messages, add_generation_prompt=True)
        return f"Question: {q} Answer:"

    # A template that writes {{ bos_token }} itself (Gemma 3, Llama 3.2 Vision): the text is tokenised without the
    # tokenizer's own special tokens, so the question starts with one BOS, as in the model's training (a processor
    # that puts the BOS text back where a prompt lacks it, as Mllama's does, finds it there).
    own_bos = bool(templated and tokenizer.bos_token and chat("").startswith(tokenizer.bos_token))
    special = {"add_special_tokens": False} if own_bos else {}
    takes = _forward_inputs(model)
    # How the processor takes a batch's images: a flat list (LLaVA, BLIP-2), or one list per text where it reads a
    # flat list as one text's images (Mllama, Gemma 3, SmolVLM), which it refuses with a ValueError on the count.
    nested = False

    def encode(pil: list, texts: list[str]) -> Any:
        nonlocal nested
        kwargs = dict(text=texts, return_tensors="pt", padding=True, **special)
        if nested:
            return processor(images=[[im] for im in pil], **kwargs)
        try:
            return processor(images=pil, **kwargs)
        except ValueError as flat_error:
            if len(pil) < 2:
                raise
            try:
                out = processor(images=[[im] for im in pil], **kwargs)
            except Exception as nested_error:  # both messages: which call was the right one is not known
                raise ValueError(f"{flat_error} (and with one image list per text: {nested_error})") from nested_error
            nested = True
            return out

    def fn(images: Tensor, prompts: Optional[list[str]]) -> Tensor:
        tokenizer.padding_side = "right"  # left padding would shift positions, and so the scores
        inputs = encode(_to_rgb_pil(images), [chat(p) for p in prompts])
        inputs = {k: v for k, v in inputs.items() if takes is None or k in takes}
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        rows = torch.arange(len(prompts), device=device)
        if start_token is not None:
            inputs["decoder_input_ids"] = torch.full((len(prompts), 1), start_token, dtype=torch.long, device=device)
            last = torch.zeros(len(prompts), dtype=torch.long, device=device)
        else:
            mask = inputs["attention_mask"]
            last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)  # each row's last real token
        probs = torch.softmax(model(**inputs).logits[rows, last].double(), dim=-1)
        return probs[:, yes].sum(-1)

    return Reward("vqascore", fn, batch_size=16, spec=spec, needs_prompts=True,  # one-bos: keyed apart from before
                  identity=f"vqascore:{dtype}{':one-bos' if own_bos else ''}:{_folder_digest(path)}")


def _forward_inputs(model: Any) -> Optional[set[str]]:
    """The inputs ``model.forward`` names, or None where it takes any keyword (a processor may also return, e.g.,
    ``token_type_ids``, which LLaVA's forward refused before transformers 5)."""
    parameters = inspect.signature(model.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


def _yes_token_ids(tokenizer: Any) -> list[int]:
    """Distinct ids of "Yes" and " Yes" where each is a single known token."""
    ids: list[int] = []
    for text in ("Yes", " Yes"):
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1 and encoded[0] != tokenizer.unk_token_id and encoded[0] not in ids:
            ids.append(int(encoded[0]))
    return ids


def _is_t2v_model(name: str) -> bool:
    try:
        t2v_metrics = importlib.import_module("t2v_metrics")
        return name in t2v_metrics.list_all_vqascore_models()
    except Exception:  # not installed, or broken: the name is then read as a folder
        return False


def _t2v_vqascore(model_name: str, device: str, spec: str) -> Reward:
    try:
        t2v_metrics = importlib.import_module("t2v_metrics")
    except ImportError:
        raise RewardError(
            "reward vqascore needs a model: pass vqascore:/path/to/vlm (a local LLaVA or BLIP-2 folder "
            f"saved by transformers), set ${VQASCORE_ENV}, or pip install t2v-metrics to use its "
            f"{T2V_DEFAULT_MODEL} model") from None
    scorer = t2v_metrics.VQAScore(model=model_name, device=device)

    def fn(images: Tensor, prompts: Optional[list[str]]) -> Tensor:
        import tempfile

        # t2v_metrics reads image files; PNG keeps the 8-bit images exactly
        with tempfile.TemporaryDirectory(prefix="pgraft-vqascore-") as tmp:
            dataset = []
            for i, (image, prompt) in enumerate(zip(_to_rgb_pil(images), prompts)):
                image.save(Path(tmp) / f"{i}.png")
                dataset.append({"images": [str(Path(tmp) / f"{i}.png")], "texts": [prompt]})
            return scorer.batch_forward(dataset=dataset, batch_size=len(dataset))[:, 0, 0]

    return Reward("vqascore", fn, batch_size=16, spec=spec, needs_prompts=True,
                  identity=f"vqascore:t2v_metrics:{model_name}")


# ----------------------------------------------------------------------------------------------
# python:MODULE:FUNCTION


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an exception, at most 200 characters of message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


@register_reward("python", "python:MODULE:FUNCTION or python:FILE.py:FUNCTION",
                 "your own fn(images, prompts) -> (N,) scores")
def python_reward(args: Optional[str], device: str, spec: str) -> Reward:
    """A user's ``fn(images: Tensor, prompts: list[str] | None) -> (N,)`` (tensor, array or list).

    ``images`` are the float (N, C, H, W) images in [0, 1] on the CPU; ``prompts`` is None for
    unconditional models. The function runs under ``torch.inference_mode``.
    """
    usage = "pass python:MODULE:FUNCTION or python:path/to/file.py:FUNCTION"
    if not args or ":" not in args:
        raise RewardError(f"reward {spec!r} names no function; {usage}")
    target, func_name = args.rsplit(":", 1)
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    try:
        if is_file:
            path = Path(target).expanduser()
            if not path.is_file():
                raise RewardError(f"reward {spec}: no such file {target!r}; {usage}")
            module_name = f"pgraft_user_reward_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(module_name, None)
                raise
        else:
            module = importlib.import_module(target)
    except RewardError:
        raise
    except Exception as exc:  # the user's module failed to import: say where, keep it one line
        raise RewardError(f"reward {spec}: importing {target!r} failed ({first_line(exc)}); "
                          f"fix the module or the path (pgraft --debug shows the traceback)") from exc
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise RewardError(f"reward {spec}: {target!r} has no function {func_name!r}; {usage}")

    def call(images: Tensor, prompts: Optional[list[str]]) -> Any:
        try:
            return fn(images.cpu(), prompts)
        except Exception as exc:  # the user's own code: one line naming it; --debug shows the traceback
            raise RewardError(f"reward {spec}: your function {func_name}() raised {first_line(exc)}; fix it "
                              f"(pgraft --debug ... shows the traceback)") from exc

    source = path if is_file else getattr(module, "__file__", None)
    identity = f"python:sha256={sha256_file(source)}:{func_name}" if source else spec
    return Reward("python", call, spec=spec, identity=identity)
