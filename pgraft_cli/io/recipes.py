"""Recipes: TOML files with one section per stage, validated into typed configs.

A recipe is a readable file a user copies and edits (``recipes/*.toml``); the CLI picks one with
``--recipe NAME_OR_PATH`` and overrides keys with ``--set section.key=value``. Validation is strict:
an unknown section or key, a value of the wrong type, or one outside its allowed set is a
:class:`RecipeError` naming the key, the allowed values and, for a typo, the closest key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from ..errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a dependency there)
    import tomli as tomllib

Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["float32", "float16", "bfloat16"]
Stage = Literal["sample", "score", "filter", "finetune", "invert", "train_corrector", "evaluate"]


@dataclass
class ModelConfig:
    """How to interpret MODEL when its files leave something open."""

    kind: Literal["auto", "flow", "diffusion"] = "auto"
    device: Device = "auto"
    dtype: DType = "float32"
    # sampling under bf16 autocast (float32 weights): "auto" = on CUDA only; fine-tuning has its own key
    autocast: Literal["auto", "no", "bf16"] = "auto"


@dataclass
class SampleConfig:
    """Sampling: seeds, solver grid and how work is cut into lanes and shards.

    Image ``i`` is computed from noise seeded by ``(seed, i)`` inside lane ``i // lane``: the network
    always sees whole lanes of ``lane`` images, so an image does not depend on ``num``, on
    ``batch_size`` (images per shard: the unit of work that is committed and resumed) or on the
    number of processes. ``lane = "auto"`` (the default) picks ``min(16, num)`` on a GPU and ``min(64, num)``
    on the CPU (a small run does no padded work), a divisor of ``batch_size`` when there are several shards, and on a GPU at most
    what fits its free memory; the lane used is written to the run's settings. A fixed ``lane = N``
    keeps an image's bytes independent of ``num`` too; raise it for throughput on a GPU.

    ``memory_format``: the layout of the base network's convolution weights while it runs forward only
    (sampling, inversion, evaluation; training stays contiguous). ``"auto"`` picks ``"channels_last"``
    on the CPU for the families measured faster there (``stages.sample.CHANNELS_LAST_FAMILIES``: a pixel
    UNet2DModel, measured from 1.2 M to 114 M parameters and 16 to 256 px), else ``"contiguous"``; the
    format used is in the run's settings and keys (its convolutions round differently, so it changes an
    image's last bits: ``"contiguous"`` gives the bytes of before).
    """

    num: int = 64
    seed: int = 0
    steps: int = 32
    batch_size: int = 64
    lane: int | Literal["auto"] = "auto"
    guidance_scale: float = 5.0
    # the guidance input of guidance-distilled networks (Flux dev), which take no classifier-free guidance
    distilled_guidance: float = 3.5
    capture_at: Optional[float] = None
    # torch.compile the network for the stage: other last bits; on a 2-core CPU slower than the default (traced
    # forward, shards side by side), compile included: 8.1 against 4.5 s for 1024 digits (bench/RESULTS.md)
    compile: bool = False
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"

    def validate(self) -> None:
        _positive(self, "sample", "num", "steps", "batch_size", *(() if self.lane == "auto" else ("lane",)))
        if self.lane != "auto" and self.batch_size % self.lane:
            lo = max(self.lane, self.batch_size - self.batch_size % self.lane)
            raise RecipeError(
                f"sample.batch_size ({self.batch_size}) must be a multiple of sample.lane "
                f"({self.lane}); use --batch-size {lo} or {lo + self.lane}"
            )
        if self.capture_at is not None and not 0.0 <= self.capture_at < 1.0:
            raise RecipeError(f"sample.capture_at must be in [0, 1), got {self.capture_at}")


@dataclass
class ScoreConfig:
    """Scoring samples with a reward: ``NAME[:ARGS]`` from the reward registry (``rewards.py``)."""

    reward: str = ""
    batch_size: int = 64

    def validate(self) -> None:
        _positive(self, "score", "batch_size")


@dataclass
class FilterConfig:
    """Selection rule over scored samples (docs/methods.md section 1; the maths is in ``selection.py``).

    ``top_k``: keep the ``k`` best of each group of ``m`` (the ``m`` samples of one prompt or class,
    or ``m`` consecutive samples of an unconditional model). ``best_of_n``: ``k = 1`` of ``m``.
    ``threshold``: keep rewards ``>= threshold``, or ``>=`` their ``quantile``. ``dedup`` keeps one
    of near-identical kept samples (RMS distance below ``dedup_tol`` in model space).
    """

    rule: Literal["top_k", "best_of_n", "threshold"] = "top_k"
    k: int = 1
    m: int = 4
    threshold: Optional[float] = None
    quantile: Optional[float] = None
    dedup: bool = False
    dedup_tol: float = 0.05

    def validate(self) -> None:
        _positive(self, "filter", "k", "m")
        if self.quantile is not None and not 0.0 < self.quantile < 1.0:
            raise RecipeError(f"filter.quantile must be in (0, 1), got {self.quantile}")
        if self.rule == "top_k" and self.k > self.m:
            raise RecipeError(f"filter.k ({self.k}) must be <= filter.m ({self.m}) for rule top_k")
        if self.rule == "threshold" and (self.threshold is None) == (self.quantile is None):
            raise RecipeError("filter rule threshold needs exactly one of filter.threshold (a reward value) "
                              "or filter.quantile (in (0, 1)); set one, e.g. --set filter.quantile=0.75")
        if self.dedup_tol < 0:
            raise RecipeError(f"filter.dedup_tol must be >= 0, got {self.dedup_tol}")


@dataclass
class FinetuneConfig:
    """Fine-tuning on kept samples (docs/methods.md sections 1-2).

    ``cutoff`` c: the tuned model runs t in (c, 1], the base model [0, c]; c = 0 is GRAFT. With
    ``target = "intermediate"`` (P-GRAFT) it trains on the kept states at c with the forward kernel
    from c; ``"renoise"`` re-noises the kept final samples and trains only at t > c.
    ``lora_rank`` 0 fine-tunes all weights; > 0 trains a LoRA adapter (needs peft) that is switched
    off at c; ``"auto"`` (the default) is 0 up to ``lora_above`` network parameters (200 M: the
    bundled and small models) and rank 16 above (SD 1.x/2.x's 865 M UNet, SDXL's 2.6 B).
    ``gradient_checkpointing`` recomputes activations in the backward pass (diffusers'
    ``enable_gradient_checkpointing``): less memory, about a third more compute.
    ``ema`` 0 disables the EMA of the weights; ``grad_accum`` micro-batches per step.
    ``tuned_guidance``: kept samples are drawn with classifier-free guidance and the tuned network
    learns them on its conditional branch, so ``"none"`` samples the tuned segment unguided (one
    network call per step; the base below c keeps ``sample.guidance_scale``) and ``"reapply"``
    guides it again (docs/guidance.md). Unguided models are unaffected.
    """

    cutoff: float = 0.0
    rounds: int = 1
    steps: int = 200
    batch_size: int = 32
    grad_accum: int = 1
    learning_rate: float = 1e-4
    warmup: int = 0
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    ema: float = 0.0
    lora_rank: int | Literal["auto"] = "auto"
    lora_alpha: float = 0.0
    target: Literal["intermediate", "renoise"] = "intermediate"
    tuned_guidance: Literal["none", "reapply"] = "none"
    checkpoint_every: int = 50
    seed: int = 0
    gradient_checkpointing: bool = False
    lora_above: int = 200_000_000

    def validate(self) -> None:
        if not 0.0 <= self.cutoff < 1.0:
            raise RecipeError(f"finetune.cutoff must be in [0, 1), got {self.cutoff}")
        _positive(self, "finetune", "rounds", "steps", "batch_size", "grad_accum", "checkpoint_every")
        if not self.learning_rate > 0.0:
            raise RecipeError(f"finetune.learning_rate must be > 0, got {self.learning_rate}")
        if self.lora_rank != "auto" and self.lora_rank < 0:
            raise RecipeError(f"finetune.lora_rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}")
        if not 0.0 <= self.ema < 1.0:
            raise RecipeError(f"finetune.ema must be in [0, 1) (0: no EMA), got {self.ema}")
        if self.warmup < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise RecipeError("finetune.warmup, finetune.weight_decay and finetune.max_grad_norm must be >= 0")


@dataclass
class CorrectConfig:
    """Inverse noise correction: inversion of the base sampler and the corrector it trains."""

    base_steps: int = 8
    num_images: int = 0
    inversion_iterations: int = 24
    inversion_tol: float = 5e-3
    inversion_tol_last: Optional[float] = None  # the sampler's last step (into the data); None: inversion_tol
    inversion_memory: int = 3  # Anderson acceleration's memory (0: plain fixed-point iteration)
    max_reconstruction_rms: float = 0.02
    max_dropped_fraction: float = 0.01
    invert_shard_size: int = 256
    data_noise: float = 0.0
    seed: int = 0
    corrector: Literal["flow", "mlp", "gaussian", "gaussian-diag"] = "flow"
    corrector_channels: list[int] = field(default_factory=lambda: [16, 32, 32])
    corrector_layers: int = 1
    corrector_attention: bool = False
    corrector_width: int = 256
    corrector_blocks: int = 2
    corrector_train_steps: int = 400
    corrector_batch_size: int = 128
    corrector_learning_rate: float = 3e-3
    corrector_warmup: int = 50
    corrector_ema: float = 0.999
    corrector_checkpoint_every: int = 100
    corrector_sample_steps: int = 4
    corrector_sampler: Literal["euler", "heun"] = "heun"
    corrector_lr_decay: Literal["constant", "cosine", "linear"] = "cosine"
    corrector_source: Literal["normal", "gaussian"] = "normal"
    corrector_mixed_precision: Literal["auto", "no", "bf16"] = "no"  # the training forward under bf16 autocast
    # (auto: where the device multiplies bf16 natively)

    def validate(self) -> None:
        _positive(self, "correct", "base_steps", "inversion_iterations", "invert_shard_size",
                  "corrector_layers", "corrector_width", "corrector_blocks", "corrector_train_steps", "corrector_batch_size", "corrector_warmup",
                  "corrector_checkpoint_every", "corrector_sample_steps")
        if not self.corrector_channels or min(self.corrector_channels) < 1:
            raise RecipeError("correct.corrector_channels must be a non-empty list of positive widths, e.g. [16, 32, 32]")
        if not 0.0 <= self.corrector_ema < 1.0:
            raise RecipeError(f"correct.corrector_ema must be in [0, 1), got {self.corrector_ema}")
        if not 0.0 <= self.max_dropped_fraction < 1.0:
            raise RecipeError(f"correct.max_dropped_fraction must be in [0, 1) (0: every image must invert), "
                              f"got {self.max_dropped_fraction}")
        if not self.max_reconstruction_rms > 0.0:
            raise RecipeError(f"correct.max_reconstruction_rms must be > 0, got {self.max_reconstruction_rms}")
        if self.inversion_memory < 0:
            raise RecipeError(f"correct.inversion_memory must be >= 0 (0: plain fixed-point iteration), "
                              f"got {self.inversion_memory}")
        if not self.inversion_tol > 0.0:
            raise RecipeError(f"correct.inversion_tol must be > 0, got {self.inversion_tol}")
        # the last step's residual is the round trip's error at the data: at the gate, images would drop
        last = self.inversion_tol_last
        if last is not None and not 0.0 < last < self.max_reconstruction_rms:
            raise RecipeError(f"correct.inversion_tol_last must be > 0 and below correct.max_reconstruction_rms "
                              f"({self.max_reconstruction_rms}): that step's residual is the round trip's error at "
                              f"the data; got {last}")


@dataclass
class EvaluateConfig:
    """Evaluation of samples against data: FID/KID features, sample count, sampler steps."""

    num: int = 2000
    seed: int = 1
    steps: Optional[int] = None
    features: str = "auto"  # one of FEATURE_CHOICES
    inception_weights: str = ""
    kid_subsets: int = 100  # clean-fid's default
    copy_test: bool = True  # ``pgraft correct``: the data-copying test where held-out images allow it

    def validate(self) -> None:
        _positive(self, "evaluate", "num", "kid_subsets")
        check_feature_choice(self.features, "evaluate.features")


FEATURE_CHOICES = ("auto", "none", "inception", "classifier", "judge", "clip:PATH", "dinov2:PATH")


def check_feature_choice(choice: str, where: str = "--features") -> None:
    """A feature extractor's name: one of ``FEATURE_CHOICES`` (``clip:`` / ``dinov2:`` with a folder)."""
    name, _, path = choice.partition(":")
    if (name in ("clip", "dinov2") and path) or (not path and choice in FEATURE_CHOICES[:5]):
        return
    raise RecipeError(f"{where} {choice!r} is not a feature extractor; pass one of {', '.join(FEATURE_CHOICES)}")


@dataclass
class RunConfig:
    """Which stages ``pgraft run`` executes, in order."""

    stages: list[Stage] = field(default_factory=lambda: ["sample"])


@dataclass
class Recipe:
    """A whole recipe: its name, a description and one typed section per stage."""

    name: str = "default"
    description: str = ""
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    correct: CorrectConfig = field(default_factory=CorrectConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(section_obj: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(section_obj, name)
        if value < 1:
            raise RecipeError(f"{section}.{name} must be >= 1, got {value}")


SECTIONS = [f.name for f in dataclasses.fields(Recipe) if dataclasses.is_dataclass(f.default_factory)]  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Finding recipes


def recipe_dirs() -> list[Path]:
    """Where named recipes live: the wheel's bundled copy, then the source tree's ``recipes/``."""
    package = Path(__file__).resolve().parents[1]
    return [d for d in (package / "_recipes", package.parent / "recipes") if d.is_dir()]


def available_recipes() -> list[str]:
    names = {p.stem for d in recipe_dirs() for p in d.glob("*.toml")}
    return sorted(names)


def find_recipe(name_or_path: str) -> Path:
    """Resolve ``--recipe``: an existing path, else a bundled recipe name (with or without .toml)."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        return path
    if "/" in name_or_path or os.sep in name_or_path:
        raise RecipeError(f"recipe file {name_or_path} does not exist (or is not a .toml file); check the path")
    stem = path.name[: -len(".toml")] if path.name.endswith(".toml") else path.name
    for d in recipe_dirs():
        candidate = d / f"{stem}.toml"
        if candidate.is_file():
            return candidate
    names = available_recipes()
    hint = _closest(stem, names)
    raise RecipeError(
        f"no recipe '{name_or_path}': pass a .toml path or one of {', '.join(names) or '(none found)'}"
        + (f" (did you mean '{hint}'?)" if hint else "")
    )


# ----------------------------------------------------------------------------------------------
# Validation


def _closest(word: str, choices: list[str]) -> Optional[str]:
    matches = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None)) + " (or unset)"
    if origin is list:
        return "a list of " + _describe(typing.get_args(tp)[0])
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp``; ints are accepted for floats. Raises RecipeError."""
    origin = typing.get_origin(tp)
    bad = RecipeError(f"{where} = {value!r} is invalid: expected {_describe(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            hint = _closest(str(value), [str(a) for a in typing.get_args(tp)])
            raise RecipeError(
                f"{where} = {value!r} is invalid: expected {_describe(tp)}"
                + (f" (did you mean '{hint}'?)" if hint else "")
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except RecipeError:
                continue
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad  # pragma: no cover - every field type is handled above


def _build_section(cls: type, data: dict[str, Any], section: str) -> Any:
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            hint = _closest(key, names)
            raise RecipeError(
                f"unknown key '{section}.{key}'"
                + (f" (did you mean '{section}.{hint}'?)" if hint else "")
                + f"; allowed keys in [{section}]: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Validate a parsed TOML document into a :class:`Recipe`."""
    hints = _type_hints(Recipe)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("name", "description"):
            kwargs[key] = _coerce(value, str, key)
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise RecipeError(f"[{key}] must be a table of keys, got {value!r}")
            kwargs[key] = _build_section(hints[key], value, key)
        else:
            raise _unknown_top_level(key, value)
    return Recipe(**kwargs)


def _unknown_top_level(key: str, value: Any) -> RecipeError:
    """A table is taken for a misspelt section, anything else for a misspelt ``name``/``description``."""
    if not isinstance(value, dict):
        hint = _closest(key, ["name", "description"])
        return RecipeError(f"unknown top-level key '{key}'" + (f" (did you mean '{hint}'?)" if hint else "")
                           + "; allowed: name, description and the sections " + ", ".join(f"[{s}]" for s in SECTIONS))
    hint = _closest(key, SECTIONS)
    return RecipeError(
        f"unknown section '[{key}]'"
        + (f" (did you mean '[{hint}]'?)" if hint else "")
        + f"; allowed sections: {', '.join(SECTIONS)}"
    )


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse ``section.key=value``; the value is read as TOML, else taken as a plain string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise RecipeError(f"--set '{text}' is malformed: write section.key=value, e.g. sample.steps=16")
    lhs, raw = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def load_recipe(name_or_path: str = "default", overrides: Optional[list[str]] = None) -> Recipe:
    """Read a recipe, apply ``--set`` overrides and validate the result."""
    path = find_recipe(name_or_path)
    data = _read_toml(path)
    data.setdefault("name", path.stem)
    for text in overrides or []:
        _apply_override(data, text)
    return recipe_from_dict(data)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe {path} is not valid TOML ({exc}); fix the file") from None
    except OSError as exc:
        raise RecipeError(f"recipe {path} cannot be read ({exc.strerror}); check the path") from None


def _apply_override(data: dict[str, Any], text: str) -> None:
    """Set one ``--set`` override in the parsed document ``data`` (validated later with the rest)."""
    section, key, value = parse_override(text)
    if section not in SECTIONS:
        hint = _closest(section, SECTIONS)
        raise RecipeError(
            f"--set '{text}': unknown section '{section}'"
            + (f" (did you mean '{hint}'?)" if hint else "")
            + f"; allowed sections: {', '.join(SECTIONS)}"
        )
    table = data.setdefault(section, {})
    if not isinstance(table, dict):
        raise RecipeError(f"[{section}] must be a table of keys, got {table!r}")
    if _field_type(section, key) is str and not isinstance(value, str):
        value = text.split("=", 1)[1].strip()  # a string key takes the text as written (e.g. inf, 1.0)
    table[key] = value


def _field_type(section: str, key: str) -> Any:
    return _type_hints(_type_hints(Recipe)[section]).get(key)


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, resolved once per class (each ``--set`` asks again); read it, never change it."""
    return typing.get_type_hints(cls)


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as TOML (unset optional keys are written as comments)."""
    d = recipe.to_dict()
    lines = [f"name = {toml_value(d.pop('name'))}", f"description = {toml_value(d.pop('description'))}"]
    for section in SECTIONS:
        lines.append("")
        lines.append(f"[{section}]")
        for key, value in d[section].items():
            if value is None:
                lines.append(f"# {key} = (unset)")
            else:
                lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """``value`` (bool, number, string or list of them) written as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")  # pragma: no cover


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_char(c: str) -> str:
    """One character of a TOML basic string: quotes, backslashes and control characters escaped."""
    if c in _TOML_ESCAPES:
        return _TOML_ESCAPES[c]
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\u{ord(c):04x}"
    return c
