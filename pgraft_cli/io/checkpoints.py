"""Checkpoints: load any supported model, write self-describing safetensors, record provenance.

MODEL may be

- a bundled alias (``digits``);
- a diffusers pipeline folder (``model_index.json``) or model folder (``config.json`` + weights);
- a ``.safetensors`` file written by pgraft: its header metadata carries the model class and
  config, the scheduler config and provenance, so it needs nothing beside it;
- a released single-file checkpoint (the original SD 1.x/2.x, SDXL or Flux.1 key layout) plus ``--config``,
  a diffusers pipeline folder with its configs (io/single_file.py names the layout from the keys);
- any other ``.safetensors`` plus ``--config DIR_OR_JSON``;
- a pickle checkpoint (``.ckpt``/``.pt``/``.bin``/``.pth``) plus ``--config``, only with
  ``--allow-pickle`` (unpickling runs arbitrary code);
- a Hugging Face hub id (``org/name``), loaded with diffusers' ``from_pretrained``.

Flow vs diffusion comes from the scheduler config (``FlowMatch*`` schedulers are flows), and
``kind`` overrides it. Every failure a user can cause is a :class:`ModelLoadError` with one line
that names the problem and the fix.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import re
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .. import __version__
from ..core.samplers import NoiseSchedule
from ..errors import ModelLoadError, PgraftError, UnsafeFileError
from ..models.corrector import MLPFlow, NoiseCorrector
from ..models.families import SUPPORTED_CLASSES, family_for, unsupported
from ..models.families.flux import DEFAULT_DISTILLED_GUIDANCE
from ..models.loaded import LoadedModel
from ..models.lora import LORA_ADAPTER, add_lora, lora_state, set_lora_state
from ..models.nets import ClassifierConfig, DigitsClassifier
from .recipes import FinetuneConfig
from .runstore import atomic_path, content_key, sha256_file, state_digest
from .single_file import LAYOUTS, Layout, detect_layout, looks_original

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CLASSIFIER_PATH = ASSETS / "digits-classifier.safetensors"
JUDGE_PATH = ASSETS / "digits-judge.safetensors"  # another net, another split
ALIASES = {"digits": ASSETS / "digits-flow.safetensors"}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
FORMAT_VERSION = "1"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_COMMIT = re.compile(r"^hub:(?P<repo>[^@]+)@(?P<commit>[0-9a-f]{40})$")  # a git commit, not a files hash


# ----------------------------------------------------------------------------------------------
# Schedules from scheduler configs


# Scheduler classes whose networks take sigma-preconditioned inputs (EDM: Playground v2.5, CosXL; variance
# exploding; consistency models): read as DDPM betas they would sample garbage.
SIGMA_SCHEDULERS = ("EDM", "ScoreSdeVe", "KarrasVe", "CMStochastic")
# Latent consistency (LCM) and trajectory consistency (TCD) distillation: a few steps by their own rule.
CONSISTENCY_SCHEDULERS = ("LCM", "TCD")


def named_family(scheduler_config: dict[str, Any]) -> str:
    """The family a scheduler config names: ``flow`` for diffusers' ``FlowMatch*`` schedulers, else ``diffusion``."""
    return "flow" if "FlowMatch" in str(scheduler_config.get("_class_name", "")) else "diffusion"


def schedule_from_config(scheduler_config: dict[str, Any], kind: str = "auto",
                         image_seq_len: Optional[int] = None) -> NoiseSchedule:
    """The noise schedule a diffusers scheduler config describes (``kind`` overrides the family).

    A flow scheduler with ``use_dynamic_shifting`` (Flux) shifts by the sample's token count
    ``image_seq_len`` (:func:`dynamic_shift`).
    """
    name = scheduler_config.get("_class_name", "")
    T = int(scheduler_config.get("num_train_timesteps", 1000))
    sigma_based = any(part in name for part in SIGMA_SCHEDULERS) or scheduler_config.get("timestep_type") == "continuous"
    if sigma_based or scheduler_config.get("sigma_data") is not None:
        raise ModelLoadError(f"{name or 'the scheduler'} preconditions its network by sigma (EDM / VE / consistency: "
                             f"inputs scaled and timesteps as log sigma), which pgraft does not sample; pgraft runs "
                             f"DDPM-beta diffusion and flow-matching models")
    if any(part in name for part in CONSISTENCY_SCHEDULERS):
        raise ModelLoadError(f"{name} samples a consistency-distilled model by its own multistep rule, which pgraft "
                             f"does not run; pass the model it was distilled from (with its scheduler)")
    detected = named_family(scheduler_config)
    family = detected if kind == "auto" else kind
    if family == "flow":
        shift = float(scheduler_config.get("shift", 1.0)) if detected == "flow" else 1.0
        for key in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                    "stochastic_sampling"):
            if detected == "flow" and scheduler_config.get(key):
                raise ModelLoadError(f"flow schedulers with {key} are not supported; pgraft samples the plain shifted grid")
        if detected == "flow" and scheduler_config.get("use_dynamic_shifting"):
            shift = dynamic_shift(scheduler_config, image_seq_len or 256)
        return NoiseSchedule.flow(T, shift)
    if scheduler_config.get("trained_betas") is not None:
        raise ModelLoadError("schedulers with trained_betas are not supported; use a beta_schedule")
    if scheduler_config.get("rescale_betas_zero_snr"):
        raise ModelLoadError("schedulers with rescale_betas_zero_snr are not supported; use a model trained "
                             "with the standard beta schedule")
    prediction = scheduler_config.get("prediction_type", "epsilon") if detected == "diffusion" else "epsilon"
    try:
        return NoiseSchedule.diffusion(
            prediction_type=prediction,
            num_train_timesteps=T,
            beta_schedule=scheduler_config.get("beta_schedule", "linear"),
            beta_start=float(scheduler_config.get("beta_start", 1e-4)),
            beta_end=float(scheduler_config.get("beta_end", 0.02)),
        )
    except ValueError as exc:
        raise ModelLoadError(f"scheduler config not supported: {exc}") from None


def dynamic_shift(scheduler_config: dict[str, Any], image_seq_len: int) -> float:
    """The static shift ``s`` equal to a dynamically shifted flow scheduler's time shift.

    diffusers interpolates ``mu`` linearly in the token count between ``(base_image_seq_len,
    base_shift)`` and ``(max_image_seq_len, max_shift)``; its time shift ``e^mu / (e^mu + 1/t - 1)``
    (exponential) or ``mu / (mu + 1/t - 1)`` (linear) is ``s t / (1 + (s - 1) t)`` with ``s = e^mu`` or ``mu``.
    """
    lo, hi = int(scheduler_config.get("base_image_seq_len", 256)), int(scheduler_config.get("max_image_seq_len", 4096))
    base, top = float(scheduler_config.get("base_shift", 0.5)), float(scheduler_config.get("max_shift", 1.15))
    m = (top - base) / (hi - lo)
    mu = image_seq_len * m + (base - m * lo)
    return mu if scheduler_config.get("time_shift_type", "exponential") == "linear" else math.exp(mu)


def default_scheduler_config(kind: str) -> dict[str, Any]:
    if kind == "flow":
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
            "beta_start": 1e-4, "beta_end": 0.02, "prediction_type": "epsilon"}


# ----------------------------------------------------------------------------------------------
# Identity


def identity_of(path: Path, hidden: bool = False) -> str:
    """sha256 of a file, or of a folder's (relative path, file sha256) list, leaving out the files in hidden
    folders unless ``hidden`` (``.git``; ``.cache/huggingface``, the bookkeeping `hf download --local-dir`
    writes, with the time of each download in it: the same weights downloaded again were another model)."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()
                    and (hidden or not any(part.startswith(".") for part in q.relative_to(path).parts[:-1]))):
        h.update(f"{p.relative_to(path)}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


# Fields of a LoadedModel that do not enter its stage key: the network and pipeline are the files
# ``identity`` hashes (LoRA weights added in memory are keyed apart), the rest only describe it.
_NOT_KEYED = ("network", "pipeline", "source", "source_kind", "provenance", "metadata", "default_data",
              "default_eval_data", "config_dir")


def model_key(model: LoadedModel) -> dict[str, Any]:
    """What a stage that runs ``model`` depends on, for its stage key.

    The files' identity, then every other field of the loaded model (configs, schedule, cutoff,
    guidance ...; a field added later is keyed automatically), with a composed model's corrector
    and tuned network as digests of their weights, its LoRA adapter's weights, and the dtype and
    device type the network runs in.
    """
    import dataclasses


    key = {f.name: content_key(getattr(model, f.name)) for f in dataclasses.fields(model) if f.name not in _NOT_KEYED}
    if model.lora:
        key["lora"] = state_digest({k: v for k, v in model.network.state_dict().items() if "lora_" in k})
    key["dtype"], key["device_type"] = str(model.dtype), model.device.type
    return key


# ----------------------------------------------------------------------------------------------
# Networks


# diffusers' remapping of its legacy class name by norm_type (the hub's DiT and PixArt-alpha folders use it)
LEGACY_CLASSES = {"Transformer2DModel": {"ada_norm_zero": "DiTTransformer2DModel",
                                         "ada_norm_single": "PixArtTransformer2DModel"}}


def network_class_name(model_config: dict[str, Any]) -> str:
    """A network config's class, with diffusers' remapping of ``Transformer2DModel`` by ``norm_type`` applied."""
    name = model_config.get("_class_name", "")
    return LEGACY_CLASSES.get(name, {}).get(model_config.get("norm_type", ""), name)


def _network_class(name: str) -> type:
    if name not in SUPPORTED_CLASSES:
        raise unsupported(name)
    import diffusers

    return getattr(diffusers, name)


def build_network(model_class: str, model_config: dict[str, Any]) -> nn.Module:
    cls = _network_class(model_class)
    config = {k: v for k, v in model_config.items() if not k.startswith("_")}
    try:
        return cls.from_config(config)
    except Exception as exc:  # diffusers raises many types for a bad config
        raise ModelLoadError(f"model config for {model_class} is invalid ({exc}); pass a matching --config") from None


def load_state(network: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights strictly; a mismatch is one line naming the first bad keys."""
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. '{missing[0]}')")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. '{unexpected[0]}')")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of the wrong shape (e.g. '{k}': file {tuple(state[k].shape)}, "
                         f"config {tuple(own[k].shape)})")
        raise ModelLoadError(
            f"weights in {source} do not match the model config: {'; '.join(parts)}; "
            f"pass the --config the weights were saved with"
        )
    network.load_state_dict(state, strict=True)


def _null_class(metadata: dict[str, str], conditioning: str, num_classes: Optional[int], source: str) -> Optional[int]:
    """The "no class" label of a class model trained with label dropout (``pgraft.null_class``).

    It must be the last class embedding (as DiT's class 1000), so the real classes stay 0..K-1.
    """
    value = metadata.get("pgraft.null_class")
    if value is None or conditioning != "class":
        return None
    if not value.isdigit() or int(value) != (num_classes or 0) - 1:
        raise ModelLoadError(f"{source}: pgraft.null_class = {value!r} must be the last class index "
                             f"({(num_classes or 0) - 1}); re-save the model with that null class")
    return int(value)


def _assemble(network: nn.Module, model_class: str, model_config: dict[str, Any],
              scheduler_config: dict[str, Any], kind: str, source: str, source_kind: str,
              identity: str, pipeline: Any = None, metadata: Optional[dict[str, str]] = None) -> LoadedModel:
    network.eval().requires_grad_(False)
    if model_config.get("time_cond_proj_dim"):
        raise ModelLoadError(f"{source}'s network takes the guidance scale as an input (time_cond_proj_dim: a "
                             f"latent-consistency-distilled UNet, sampled without classifier-free guidance), which "
                             f"pgraft does not feed; pass the model it was distilled from")
    family = family_for(model_class, model_config)
    conditioning, num_classes, null_class = family.conditioning(model_config)
    metadata = metadata or {}
    if null_class is None:
        null_class = _null_class(metadata, conditioning, num_classes, source)
    if pipeline is not None:
        family.check_pipeline(pipeline, model_config, source)
        vae_config = getattr(getattr(pipeline, "vae", None), "config", None)
        if vae_config is not None and (getattr(vae_config, "latents_mean", None) is not None
                                       or getattr(vae_config, "latents_std", None) is not None):
            raise ModelLoadError(f"{source}'s VAE normalises latents per channel (latents_mean / latents_std, as "
                                 f"Playground v2.5's), which pgraft's decode does not apply; pgraft runs VAEs with a "
                                 f"scaling (and shift) factor")
    shape = family.sample_shape(model_config, getattr(pipeline, "vae", None))
    provenance = meta_json(metadata, "pgraft.provenance", source, {})
    if conditioning == "text" and pipeline is None:
        raise ModelLoadError(
            f"{source} is a text-conditioned {model_class} without its text encoders; pass the "
            f"diffusers pipeline folder (with model_index.json), or give the weights --config PIPELINE_FOLDER"
        )
    return LoadedModel(
        network=network,
        schedule=schedule_from_config(scheduler_config, kind, family.image_seq_len(model_config, shape)),
        model_class=model_class,
        model_config=dict(model_config),
        scheduler_config=dict(scheduler_config),
        conditioning=conditioning,  # type: ignore[arg-type]
        sample_shape=shape,
        source=source,
        source_kind=source_kind,
        identity=identity,
        num_classes=null_class if null_class is not None else num_classes,
        null_class=null_class,
        pipeline=pipeline,
        provenance=provenance,
        metadata=metadata,
        default_data=metadata.get("pgraft.data") or None,
        default_eval_data=metadata.get("pgraft.eval_data") or None,
    )


# ----------------------------------------------------------------------------------------------
# Reading files


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise ModelLoadError(
            f"{path} is not a readable safetensors file (truncated or corrupt: {_short(exc)}); "
            f"re-download or re-export it"
        ) from None


def meta_json(metadata: dict[str, str], key: str, path: Any, default: Any = None, kind: type = dict,
              fix: str = "write the file again with pgraft") -> Any:
    """The JSON value of a pgraft metadata entry (``default`` when absent; absent without one is damage),
    or a one-line ModelLoadError (ending in ``fix``) when it is missing, not JSON, or not a ``kind``."""
    if key not in metadata:
        if default is None:
            raise ModelLoadError(f"{path} has damaged pgraft metadata (no '{key}'); {fix}")
        return default
    try:
        value = json.loads(metadata[key])
    except (TypeError, ValueError):
        value = ...
    if value is None and default is not None:
        return default
    if not isinstance(value, kind):
        raise ModelLoadError(f"{path} has damaged pgraft metadata ('{key}' is not a JSON {kind.__name__}); {fix}")
    return value


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load_file

    metadata = read_safetensors_metadata(path)
    try:
        return load_file(str(path)), metadata
    except Exception as exc:
        raise ModelLoadError(
            f"{path} is not a readable safetensors file (truncated or corrupt: {_short(exc)}); "
            f"re-download or re-export it"
        ) from None


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence diffusers/transformers progress bars, notes and deprecation warnings while loading.

    They are addressed to library authors, and would break the CLI's one-``error:``-line contract.
    """
    import diffusers.utils.logging as dlog
    from huggingface_hub.utils import logging as hub_log

    try:
        import transformers.utils.logging as tlog
    except ImportError:  # transformers is only needed for text pipelines
        tlog = None
    libs = [lib for lib in (dlog, tlog) if lib is not None]
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libs]
    hub_verbosity = hub_log.get_verbosity()  # "Could not reach the Hub ..., using the cached commit"
    hub_log.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            for lib in libs:
                lib.set_verbosity_error()
                lib.disable_progress_bar()
            yield
    finally:
        hub_log.set_verbosity(hub_verbosity)
        for lib, (verbosity, bars) in zip(libs, saved):
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def load_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """diffusers' from_pretrained / from_single_file argument for ``dtype``: ``dtype`` from diffusers 0.40, where
    ``torch_dtype`` is deprecated (to be removed in 1.0); ``torch_dtype`` before, which knows no ``dtype``."""
    from importlib.metadata import version

    major, minor = (int(part) for part in re.findall(r"\d+", version("diffusers"))[:2])
    return {"dtype" if (major, minor) >= (0, 40) else "torch_dtype": dtype}


def _short(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, cut at a word (with "...") when longer than ``limit``."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:(") + " ..."


def _hub_failure(exc: BaseException) -> tuple[str, bool]:
    """Why a hub snapshot could not be had, in words, and whether the hub may simply be out of reach.

    diffusers says "not (fully) cached locally" in a paragraph whatever the hub answered; the hub's own error (a
    gated repository, a missing one, a missing revision) is the exception itself or the cause it chains.
    """
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    causes, seen = [], exc
    while seen is not None and len(causes) < 8:
        causes.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(c, GatedRepoError) for c in causes):  # (a subclass of the next)
        return "the repository is gated: accept its licence on its hub page and log in (hf auth login)", False
    if any(isinstance(c, RepositoryNotFoundError) for c in causes):
        return "no such repository on the hub, or a private one: check the id, or log in (hf auth login)", False
    if any(isinstance(c, RevisionNotFoundError) for c in causes):
        return "the hub has no such revision of the repository", False
    if re.search(r"not (fully )?cached locally", str(exc)):  # (diffusers 0.42's words; 0.35's)
        return "it is not in the local Hugging Face cache, and the hub could not be reached", True
    return _short(exc), True


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not a readable JSON config ({_short(exc)}); fix or replace it") from None


def _scheduler_config_near(directory: Path) -> Optional[dict[str, Any]]:
    for candidate in (directory / "scheduler_config.json", directory / "scheduler" / "scheduler_config.json",
                      directory.parent / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            return _read_json(candidate)
    return None


def _require_scheduler(found: Optional[dict[str, Any]], kind: str, where: Path) -> dict[str, Any]:
    if found is not None:
        return found
    if kind == "auto":
        raise ModelLoadError(
            f"no scheduler config found at {where}, so flow vs diffusion is unknown; pass "
            f"--kind flow or --kind diffusion (or a --config folder with scheduler_config.json)"
        )
    return default_scheduler_config(kind)


# ----------------------------------------------------------------------------------------------
# Loading


def load_model(model: str, config: Optional[str] = None, kind: str = "auto",
               allow_pickle: bool = False, base: Optional[str] = None) -> LoadedModel:
    """Load MODEL (see the module docstring) on the CPU in float32.

    A corrector file written by ``pgraft correct`` loads as its base model with the corrector
    attached; the base comes from the file's stored source or ``base``, and must match its hash.
    """
    if model in ALIASES:
        path = ALIASES[model]
        if not path.is_file():
            raise ModelLoadError(f"the bundled model '{model}' is missing from {path}; reinstall pgraft")
        return _load_pgraft_file(path, model, kind, metadata=read_safetensors_metadata(path))
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _load_pipeline(str(path), path, kind, allow_pickle, "pipeline-folder")
        if (path / "config.json").is_file():
            return _load_model_folder(path, kind, allow_pickle)
        raise ModelLoadError(
            f"{path} is a folder without model_index.json or config.json; pass a diffusers "
            f"pipeline or model folder, or a .safetensors file"
        )
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            metadata = read_safetensors_metadata(path)
            if metadata.get("pgraft.kind") == "corrector":
                return load_corrected(path, metadata, base, kind, allow_pickle, config)
            if metadata.get("pgraft.kind") == "finetune":
                return load_finetuned(path, base, kind, allow_pickle, config)
            if "pgraft.model_class" in metadata and config is None:
                return _load_pgraft_file(path, str(path), kind, metadata)
            if "pgraft.model_class" not in metadata:
                keys = _safetensors_keys(path)
                layout = detect_layout(keys)
                if layout is not None:
                    return _load_single_file(path, layout, config, kind)
                if config is None or looks_original(keys):
                    raise ModelLoadError(
                        f"{path} is neither a pgraft file nor a single-file checkpoint pgraft reads ("
                        f"{', '.join(sorted({lay.name for lay in LAYOUTS}))} original key layouts); for a diffusers "
                        f"network's bare weights pass --config with its config.json or diffusers folder")
            return _load_bare_weights(path, config, kind, allow_pickle, metadata)
        if suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise UnsafeFileError(
                    f"{path} is a pickle checkpoint, which can run arbitrary code when loaded; "
                    f"convert it to .safetensors, or pass --allow-pickle if you trust its source"
                )
            return _load_bare_weights(path, config, kind, allow_pickle, {})
        raise ModelLoadError(
            f"{path}: unknown checkpoint type '{suffix}'; pass a .safetensors file or a diffusers folder"
        )
    if _HUB_ID.match(model) and not model.startswith((".", "/", "~")) and not _looks_local(path):
        return _load_hub(model, kind, allow_pickle)
    raise ModelLoadError(
        f"{model}: no such file or directory; pass a path, a hub id (org/name) or a bundled alias "
        f"({', '.join(ALIASES)})"
    )


def load_base_for(path: Path, info: dict[str, Any], base: Optional[str], kind: str,
                  allow_pickle: bool, config: Optional[str] = None) -> LoadedModel:
    """The base model a corrector or fine-tune file was made from: its stored source, or ``--base``
    (a single-file base with its stored config folder, or ``config``).

    Its sha256 must match the identity stored in the file, so the file is never composed with
    another model by accident. A hub base stored as ``hub:ORG/NAME@COMMIT`` is loaded at that commit.
    """
    pinned = _HUB_COMMIT.match(info["identity"])
    if pinned:
        return _hub_base_at(path, pinned["repo"], pinned["commit"], base, kind, allow_pickle)
    source = base or info["source"]
    local = Path(source).expanduser()
    if local.is_file() and local.suffix.lower() == ".safetensors":
        # A corrector may be made of a fine-tune (its base), nothing else of a composed file: a base that is a
        # corrector, or a fine-tune's base that is one (overwritten: --out over the base), would recurse.
        composed = read_safetensors_metadata(local).get("pgraft.kind")
        own = read_safetensors_metadata(path).get("pgraft.kind")
        if composed == "corrector" or (composed == "finetune" and own == "finetune"):
            raise PgraftError(f"the base model of {path} is '{source}', which is itself a {composed} file, not a base "
                              f"model (was it overwritten?); pass the original base model with --base")
    try:
        model = load_model(source, config or info.get("config"), kind=kind, allow_pickle=allow_pickle)
    except PgraftError as exc:
        raise PgraftError(f"the base model of {path} could not be loaded from '{source}' ({exc}); pass it with --base") from None
    # files made before a pipeline folder's files joined the identity of weights given --config FOLDER
    older = "+" not in info["identity"] and model.identity.startswith(info["identity"] + "+")
    # files made before a folder's hidden folders (hf download's .cache) left its identity
    older = older or (model.identity != info["identity"] and local.is_dir()
                      and identity_of(local, hidden=True) == info["identity"])
    if model.identity != info["identity"] and not older:
        raise PgraftError(
            f"--base {source} is not the model {path.name} was made from (sha256 {model.identity[:12]} != "
            f"{info['identity'][:12]}); pass the original base model with --base"
        )
    return model


def _looks_local(path: Path) -> bool:
    """A missing ``dir/name`` that is a typo'd local path rather than a hub id."""
    return path.suffix.lower() in PICKLE_SUFFIXES | {".safetensors", ".json"} or path.parent.is_dir()


def _load_pgraft_file(path: Path, source: str, kind: str, metadata: dict[str, str]) -> LoadedModel:
    state, metadata = read_safetensors(path)
    model_class = metadata["pgraft.model_class"]  # load_model dispatched here on it
    fix = "re-export it, or pass --config with the model's config.json"
    model_config = meta_json(metadata, "pgraft.model_config", path, fix=fix)
    scheduler_config = (meta_json(metadata, "pgraft.scheduler_config", path, {}, fix=fix)
                        or _require_scheduler(None, kind, path))
    network = build_network(model_class, model_config)
    load_state(network, state, str(path))
    return _assemble(network, model_class, model_config, scheduler_config, kind, source,
                     "pgraft-safetensors", sha256_file(path), metadata=metadata)


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # read_safetensors_metadata has checked it opens
        return list(f.keys())


def _load_single_file(path: Path, layout: Layout, config: Optional[str], kind: str) -> LoadedModel:
    """A released single-file checkpoint through diffusers' ``from_single_file``, offline, with the local
    pipeline folder ``config`` (configs, tokenizers, and the weights the file lacks). Its identity is the file's
    sha256 and the folder's, so the same file with another config is another model."""
    import diffusers

    folder = Path(config).expanduser().absolute() if config else None
    if folder is None or not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"{path} is a {layout.name} single-file checkpoint, which needs "
            f"{'--config' if folder is None else f'--config {config} to be'} a diffusers pipeline folder laid out as "
            f"{layout.config_repo} (hf download {layout.config_repo} --exclude {layout.skip} --local-dir DIR); "
            f"pass --config DIR")
    kw: dict[str, Any] = dict(config=str(folder), local_files_only=True, **load_dtype(torch.float32))
    try:
        with _quiet_loading():
            if layout.network:  # the denoiser alone: put it into the folder's pipeline
                net = getattr(diffusers, layout.network).from_single_file(str(path), subfolder="transformer", **kw)
                kw.pop("config")
                pipe = getattr(diffusers, layout.pipeline).from_pretrained(str(folder), transformer=net, **kw)
            else:
                pipe = getattr(diffusers, layout.pipeline).from_single_file(str(path), **kw)
    except Exception as exc:
        raise ModelLoadError(f"could not load {path} as a {layout.name} single file with --config {config} "
                             f"({_short(exc)}); pass the config folder of the model it was released as") from None
    for part in pipe.components.values():  # diffusers 0.42 builds an SD3 file's T5 in training mode (dropout on)
        if isinstance(part, nn.Module):
            part.eval()
    model = _from_pipeline(pipe, str(path), f"single-file {layout.name}", kind,
                           f"{sha256_file(path)}+{identity_of(folder)}")
    model.config_dir = str(folder)
    return model


def _load_bare_weights(path: Path, config: Optional[str], kind: str, allow_pickle: bool,
                       metadata: dict[str, str]) -> LoadedModel:
    if config is None:
        raise ModelLoadError(
            f"{path} does not describe its model; pass --config with the model's config.json or "
            f"its diffusers folder"
        )
    if path.suffix.lower() == ".safetensors":
        state, metadata = read_safetensors(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)  # opted in: --allow-pickle
        except Exception as exc:
            raise ModelLoadError(f"{path} could not be unpickled ({_short(exc)}); re-export it") from None
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise ModelLoadError(f"{path} does not hold a state dict; re-export it with torch.save(model.state_dict())")
    cfg_path = Path(config).expanduser()
    if not cfg_path.exists():
        raise ModelLoadError(f"--config {config}: no such file or directory; pass a config.json or a diffusers folder")
    if cfg_path.is_dir() and (cfg_path / "model_index.json").is_file():
        # A pipeline folder: take its text encoders/VAE/scheduler and swap in these weights.
        loaded = _load_pipeline(str(cfg_path), cfg_path, kind, allow_pickle, "safetensors+config")
        load_state(loaded.network, state, str(path))
        # the pipeline's other parts (VAE, text encoders, scheduler) are the folder's: both in the identity
        loaded.source, loaded.metadata = str(path), metadata
        loaded.identity, loaded.config_dir = f"{sha256_file(path)}+{loaded.identity}", str(cfg_path)  # the folder's
        loaded.provenance = meta_json(metadata, "pgraft.provenance", path, {})
        loaded.default_data = metadata.get("pgraft.data") or None
        loaded.default_eval_data = metadata.get("pgraft.eval_data") or None
        return loaded
    if cfg_path.is_dir():
        model_cfg_file = cfg_path / "config.json"
        if not model_cfg_file.is_file():
            raise ModelLoadError(f"--config {config}: folder has no config.json or model_index.json")
        scheduler = _scheduler_config_near(cfg_path)
    else:
        model_cfg_file, scheduler = cfg_path, _scheduler_config_near(cfg_path.parent)
    model_config = _read_json(model_cfg_file)
    model_class = network_class_name(model_config)
    if not model_class:
        raise ModelLoadError(f"{model_cfg_file} has no _class_name; pass a diffusers model config.json")
    network = build_network(model_class, model_config)
    load_state(network, state, str(path))
    model = _assemble(network, model_class, model_config, _require_scheduler(scheduler, kind, cfg_path),
                      kind, str(path), "safetensors+config", sha256_file(path), metadata=metadata)
    model.config_dir = str(cfg_path)  # what a composed file of it needs to load it again (its configs are keyed)
    return model


def _load_model_folder(path: Path, kind: str, allow_pickle: bool) -> LoadedModel:
    model_config = _read_json(path / "config.json")
    model_class = network_class_name(model_config)
    has_safe = any(path.glob("*.safetensors"))
    if not has_safe and not allow_pickle:
        raise UnsafeFileError(
            f"{path} holds only pickle weights (.bin), which can run arbitrary code when loaded; "
            f"convert them to safetensors, or pass --allow-pickle if you trust their source"
        )
    cls = _network_class(model_class)
    try:
        with _quiet_loading():
            network = cls.from_pretrained(str(path), use_safetensors=has_safe, **load_dtype(torch.float32))
    except Exception as exc:
        raise ModelLoadError(f"could not load the model in {path} ({_short(exc)}); check its weights match config.json") from None
    scheduler = _require_scheduler(_scheduler_config_near(path), kind, path)
    return _assemble(network, model_class, model_config, scheduler, kind, str(path), "model-folder",
                     identity_of(path))


def _load_pipeline(source: str, path: Path, kind: str, allow_pickle: bool, source_kind: str,
                   identity: Optional[str] = None) -> LoadedModel:
    from diffusers import DiffusionPipeline

    index = _read_json(path / "model_index.json")
    if "PgraftPipeline" in json.dumps(index.get("_class_name")):  # ["pipeline", "PgraftPipeline"]: its pipeline.py
        raise ModelLoadError(f"{path} is a pgraft export whose pipeline.py runs the composed sampler under diffusers; "
                             f"pass pgraft the checkpoint it was exported from")
    part = "unet" if "unet" in index else "transformer" if "transformer" in index else None
    if part is None:
        raise ModelLoadError(f"{path}/model_index.json names no unet or transformer; pgraft needs one of them")
    has_safe = any((path / part).glob("*.safetensors"))
    if not has_safe and not allow_pickle:
        raise UnsafeFileError(
            f"{path}/{part} holds only pickle weights (.bin), which can run arbitrary code when loaded; "
            f"convert them to safetensors, or pass --allow-pickle if you trust their source"
        )
    # Components saved as None (an SD3 pipeline without T5, say) must be passed as None again.
    absent = {k: None for k, v in index.items()
              if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is None}
    try:
        with _quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(source, use_safetensors=None if allow_pickle else True,
                                                     **load_dtype(torch.float32), **absent)
    except Exception as exc:
        raise ModelLoadError(f"could not load the pipeline in {path} ({_short(exc)}); check the folder is complete") from None
    return _from_pipeline(pipe, source, source_kind, kind, identity or identity_of(path))


def _from_pipeline(pipe: Any, source: str, source_kind: str, kind: str, identity: str) -> LoadedModel:
    network = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    model_class = type(network).__name__
    _network_class(model_class)
    scheduler_config = dict(pipe.scheduler.config)
    scheduler_config["_class_name"] = type(pipe.scheduler).__name__
    model_config = dict(network.config)
    model_config["_class_name"] = model_class
    vae = getattr(pipe, "vae", None)
    channels = family_for(model_class, model_config).sample_shape(model_config, vae)[0]
    if vae is not None and channels != vae.config.latent_channels:
        raise ModelLoadError(
            f"{source}: the {model_class} takes {channels} latent channels but the VAE makes "
            f"{vae.config.latent_channels} (an inpainting or image-conditioned pipeline); pgraft loads text-to-image "
            f"pipelines only"
        )
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return _assemble(network, model_class, model_config, scheduler_config, kind, source, source_kind,
                     identity, pipeline=pipe if (hasattr(pipe, "vae") or hasattr(pipe, "text_encoder")) else None)


def _load_hub(repo_id: str, kind: str, allow_pickle: bool) -> LoadedModel:
    """A hub id: resolved to its snapshot in the local Hugging Face cache (downloaded if needed).

    The identity names the snapshot's commit, so an updated upstream model is a new identity.
    """
    try:
        folder = _hub_snapshot(repo_id, allow_pickle)
    except Exception as exc:
        why, unreachable = _hub_failure(exc)
        elsewhere = (f"; where the hub is unreachable, download it elsewhere (hf download {repo_id} --local-dir DIR) "
                     f"and pass DIR") if unreachable else ""
        raise ModelLoadError(f"could not load '{repo_id}' from the Hugging Face hub ({why}){elsewhere}") from None
    return _load_snapshot(repo_id, folder, kind, allow_pickle)


def _hub_snapshot(repo_id: str, allow_pickle: bool, revision: Optional[str] = None) -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` (default: the latest), from the local cache when offline."""
    from diffusers import DiffusionPipeline

    with _quiet_loading():
        return Path(DiffusionPipeline.download(repo_id, revision=revision,
                                               use_safetensors=None if allow_pickle else True))


def _load_snapshot(repo_id: str, folder: Path, kind: str, allow_pickle: bool) -> LoadedModel:
    model = _load_pipeline(str(folder), folder, kind, allow_pickle, "hub", identity=hub_identity(repo_id, folder))
    model.source = repo_id
    return model


def _hub_base_at(path: Path, repo_id: str, commit: str, base: Optional[str], kind: str,
                 allow_pickle: bool) -> LoadedModel:
    """The hub model ``repo_id`` at the ``commit`` a file was made from, whatever the hub's latest is.

    ``base`` may be that commit's snapshot folder in a Hugging Face cache
    (``.../models--ORG--NAME/snapshots/COMMIT``); without it the commit is loaded from the cache or the hub.
    """
    snapshot = f".../models--{repo_id.replace('/', '--')}/snapshots/{commit}"
    if base is not None and base != repo_id:
        folder = Path(base).expanduser().absolute()
        if not (folder.is_dir() and "/".join(folder.parts[-3:]) == snapshot[4:]):
            raise PgraftError(
                f"--base {base} is not the model {path.name} was made from ({repo_id} at commit {commit}); "
                f"pass that commit's snapshot folder ({snapshot}) with --base, or no --base"
            )
        return _load_snapshot(repo_id, folder, kind, allow_pickle)
    try:
        folder = _hub_snapshot(repo_id, allow_pickle, revision=commit)
    except Exception as exc:
        why, _ = _hub_failure(exc)
        raise PgraftError(
            f"the base model of {path} is {repo_id} at commit {commit}, which could not be loaded ({why}); "
            f"download it (hf download {repo_id} --revision {commit}) or pass its snapshot folder ({snapshot}) "
            f"with --base"
        ) from None
    return _load_snapshot(repo_id, folder, kind, allow_pickle)


def hub_identity(repo_id: str, folder: Path) -> str:
    """``hub:ORG/NAME@COMMIT`` for a cache snapshot (``.../snapshots/COMMIT``), else with its files' hash."""
    revision = folder.name if folder.parent.name == "snapshots" else identity_of(folder)
    return f"hub:{repo_id}@{revision}"


# ----------------------------------------------------------------------------------------------
# Writing


def save_pgraft_safetensors(path: Path | str, network: nn.Module, model_class: str,
                            model_config: dict[str, Any], scheduler_config: Optional[dict[str, Any]],
                            provenance: dict[str, Any], extra: Optional[dict[str, str]] = None,
                            state: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write weights plus everything needed to rebuild them into one safetensors file, atomically."""
    from safetensors.torch import save_file

    prov = {"pgraft_version": __version__, "torch_version": torch.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **provenance}
    metadata = {
        "format": "pt",
        "pgraft.format_version": FORMAT_VERSION,
        "pgraft.model_class": model_class,
        "pgraft.model_config": json.dumps({k: v for k, v in model_config.items() if not k.startswith("_")}
                                          | {"_class_name": model_class}, sort_keys=True, default=list),
        "pgraft.provenance": json.dumps(prov, sort_keys=True, default=str),
        **(extra or {}),
    }
    if scheduler_config is not None:
        metadata["pgraft.scheduler_config"] = json.dumps(scheduler_config, sort_keys=True, default=list)
    tensors = state if state is not None else network.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


# ----------------------------------------------------------------------------------------------
# Description


def describe(model: LoadedModel) -> dict[str, Any]:
    """What ``pgraft inspect`` reports, as plain data."""
    return {
        "source": model.source,
        "source_kind": model.source_kind,
        "model_class": model.model_class,
        "architecture": model.adapter.name,
        "family": model.family,
        "prediction_type": model.schedule.prediction_type,
        "conditioning": model.conditioning,
        "num_classes": model.num_classes,
        "sample_shape": list(model.sample_shape),
        "image_shape": list(model.image_shape),
        "latent": model.latent,
        "parameters": model.parameter_count(),
        "dtype": str(model.dtype).replace("torch.", ""),
        "scheduler": model.scheduler_config.get("_class_name", "unknown"),
        "num_train_timesteps": model.schedule.num_train_timesteps,
        "shift": model.schedule.shift if model.family == "flow" else None,
        "identity": model.identity,
        "default_data": model.default_data,
        "default_eval_data": model.default_eval_data,
        "provenance": model.provenance,
        "composition": _composition(model),
    }


def _composition(model: LoadedModel) -> Optional[dict[str, Any]]:
    """For corrector / fine-tune files: what is composed with the base model, and how."""
    meta = model.metadata or {}
    if model.corrector is not None:
        return {"kind": "corrector", "corrector": model.corrector.kind, "corrector_steps": model.corrector.steps,
                "corrector_sampler": model.corrector.sampler, "base_steps": model.corrector.base_steps, "base_identity": model.base_identity,
                "fitted_precision": model.corrector.fitted_precision(model.dtype),
                "metrics": json.loads(meta.get("pgraft.metrics", "null"))}
    if "pgraft.finetune" in meta:
        tuning = json.loads(meta["pgraft.finetune"])
        metrics = json.loads(meta.get("pgraft.metrics", "null")) or {}
        return {"kind": "finetune", "cutoff": tuning["cutoff"], "lora": tuning.get("lora"),
                "target": tuning.get("target"), "tuned_guidance": model.tuned_guidance,
                "base_identity": model.base_identity,
                "reward": metrics.get("reward"),
                "reward_mean": {k: metrics[k].get("reward_mean") for k in ("base", "tuned") if k in metrics}}
    return None


# ----------------------------------------------------------------------------------------------
# Composed models: a corrector or a fine-tune stored beside the identity of its base model


def _composed_metadata(base: LoadedModel, base_info: dict[str, Any], metrics: dict[str, Any]) -> dict[str, str]:
    """What a composed file records of its base (and the base's default data), and its metrics."""
    extra = {"pgraft.base": json.dumps(base_info, sort_keys=True, default=list),
             "pgraft.metrics": json.dumps(metrics, sort_keys=True, default=float)}
    if base.default_data:
        extra["pgraft.data"] = base.default_data
    if base.default_eval_data:
        extra["pgraft.eval_data"] = base.default_eval_data
    return extra


TEXT_PROJECTION = "pgraft_text_projection"  # a text flow corrector's projection, beside its network's weights
GAUSSIAN_SOURCE = "pgraft_source"  # a flow corrector's Gaussian source (mean, chol), beside its network's weights


def save_corrected(path: Path | str, corrector: NoiseCorrector, base: LoadedModel, metrics: dict[str, Any],
                   recipe: dict[str, Any], extra_provenance: Optional[dict[str, Any]] = None) -> Path:
    """Write the corrector, the base model's identity and sampler, and the measured metrics."""
    base_info = {**base_info_of(base), "solver": "euler" if base.family == "flow" else "ddim",
                 "steps": corrector.base_steps}
    extra = {
        "pgraft.kind": "corrector",
        "pgraft.corrector_type": corrector.kind,
        "pgraft.corrector_steps": str(corrector.steps),
        "pgraft.corrector_sampler": corrector.sampler,
        **_composed_metadata(base, base_info, metrics),
    }
    if corrector.conditioning != "none":  # per class, or on the pooled text embedding (NoiseCorrector)
        extra["pgraft.corrector_conditioning"] = corrector.conditioning
    # "guidance": what guidance_scale is (files before it: a Flux base's recorded sample.guidance_scale, unread)
    guidance = "distilled" if base.distilled else "classifier-free" if base.guided else None
    extra["pgraft.corrector_inversion"] = json.dumps({"guidance_scale": corrector.guidance_scale, "guidance": guidance,
                                                      "autocast": corrector.autocast, "dtype": corrector.dtype})
    provenance = {"created_by": "pgraft correct", "recipe": recipe, **(extra_provenance or {})}
    if corrector.network is None:
        state = {"mean": corrector.mean, **({"std": corrector.std} if corrector.kind == "gaussian-diag"
                                            else {"chol": corrector.chol}),
                 **({"weight": corrector.weight} if corrector.weight is not None else {}),
                 **({"chol_of": corrector.chol_of} if corrector.chol_of is not None else {})}
        return save_pgraft_safetensors(path, None, "Gaussian", {"dim": int(corrector.mean.shape[-1])},  # type: ignore[arg-type]
                                       NoiseCorrector.schedule_config(), provenance, extra, state=state)
    projection = {} if corrector.projection is None else {
        f"{TEXT_PROJECTION}.{k}": v for k, v in corrector.projection.state_dict().items()}
    if corrector.mean is not None:  # a flow from the Gaussian source N(mean, L L^T)
        projection.update({f"{GAUSSIAN_SOURCE}.mean": corrector.mean, f"{GAUSSIAN_SOURCE}.chol": corrector.chol})
    return save_pgraft_safetensors(path, corrector.network, "MLPFlow" if corrector.kind == "mlp" else "UNet2DModel",
                                   corrector.model_config or {}, NoiseCorrector.schedule_config(), provenance, extra,
                                   state={**corrector.network.state_dict(), **projection})


def _check_base_info(info: dict[str, Any], path: Path) -> None:
    """A composed file's record of its base names where it came from and what it is."""
    if not isinstance(info.get("source"), str) or not isinstance(info.get("identity"), str):
        raise ModelLoadError(f"{path} has damaged pgraft metadata ('pgraft.base' lacks its source or identity); "
                             f"write the file again with pgraft")


def load_corrected(path: Path, metadata: dict[str, str], base: Optional[str], kind: str,
                   allow_pickle: bool, config: Optional[str] = None) -> LoadedModel:
    """Load a corrector file and its base model (stored source, or ``--base``); check the base's hash."""
    state, metadata = read_safetensors(path)
    info = meta_json(metadata, "pgraft.base", path)
    _check_base_info(info, path)
    base_model = load_base_for(path, info, base, kind, allow_pickle, config)
    corrector_type = metadata.get("pgraft.corrector_type", "flow")
    base_steps = int(info["steps"])
    conditioning = metadata.get("pgraft.corrector_conditioning", "none")
    if conditioning not in ("none", "class", "text"):
        raise ModelLoadError(f"{path} has a corrector conditioned on {conditioning!r}, a form this version no longer "
                             f"reads; run pgraft correct again")
    fitted = meta_json(metadata, "pgraft.corrector_inversion", path, {})
    given = {"conditioning": conditioning, **{k: fitted.get(k) for k in ("guidance_scale", "autocast", "dtype")}}
    if "guidance" not in fitted and not base_model.adapter.classifier_free:
        # written before the record said which guidance: a Flux base was inverted at its built-in distilled
        # guidance (dev) or none (schnell), whatever sample.guidance_scale it recorded
        given["guidance_scale"] = DEFAULT_DISTILLED_GUIDANCE if base_model.distilled else None
    if corrector_type in ("gaussian", "gaussian-diag"):
        corrector = NoiseCorrector(corrector_type, base_steps, 0, mean=state["mean"], chol=state.get("chol"),
                                   std=state.get("std"), weight=state.get("weight"), chol_of=state.get("chol_of"),
                                   **given)
    else:
        config = {k: v for k, v in meta_json(metadata, "pgraft.model_config", path).items() if not k.startswith("_")}
        network = MLPFlow(**config) if corrector_type == "mlp" else build_network("UNet2DModel", config)
        prefix = f"{TEXT_PROJECTION}."
        projection = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        source = {k.split(".")[-1]: state.pop(k) for k in list(state) if k.startswith(f"{GAUSSIAN_SOURCE}.")}
        load_state(network, state, str(path))
        network.eval().requires_grad_(False)
        linear = None
        if projection:  # a text corrector: pooled embedding -> the network's class embedding
            linear = torch.nn.Linear(*projection["weight"].shape[::-1])
            linear.load_state_dict(projection)
            linear.requires_grad_(False)
        corrector = NoiseCorrector(corrector_type, base_steps, int(metadata.get("pgraft.corrector_steps", "4")),
                                   metadata.get("pgraft.corrector_sampler", "euler"),
                                   network=network, model_config=config, projection=linear,
                                   mean=source.get("mean"), chol=source.get("chol"), **given)
    base_model.corrector = corrector
    base_model.source = str(path)
    base_model.source_kind = "pgraft-corrector"
    base_model.provenance = meta_json(metadata, "pgraft.provenance", path, {})
    base_model.metadata = metadata
    base_model.base_identity = base_model.identity
    base_model.identity = sha256_file(path)
    return base_model


def save_finetuned(path: Path | str, model: LoadedModel, base_info: dict[str, Any], cfg: FinetuneConfig,
                   metrics: dict[str, Any], recipe: dict[str, Any]) -> Path:
    """Full tuned weights or the LoRA adapter, with the cutoff, base identity, recipe and rewards."""
    tuning = {"cutoff": model.cutoff, "lora": None, "target": cfg.target, "tuned_guidance": model.tuned_guidance}
    if model.lora:
        tuning["lora"] = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha or cfg.lora_rank,
                          "target_modules": sorted(model.network.peft_config[LORA_ADAPTER].target_modules)}
        state = lora_state(model.network)
    else:
        assert model.tuned is not None
        state = model.tuned.state_dict()
    extra = {
        "pgraft.kind": "finetune",
        "pgraft.finetune": json.dumps(tuning, sort_keys=True),
        **_composed_metadata(model, base_info, metrics),
    }
    provenance = {"created_by": "pgraft finetune", "recipe": recipe}
    return save_pgraft_safetensors(path, model.network, model.model_class, model.model_config,
                                   model.scheduler_config, provenance, extra, state=state)


def base_info_of(model: LoadedModel) -> dict[str, Any]:
    """What a composed file records of its base: where to load it from (a local path made absolute, so the
    file loads from any folder), its identity, configs, and the config folder loading it needs."""
    return {"source": _absolute(model.source), "identity": model.identity, "model_class": model.model_class,
            "model_config": model.model_config, "scheduler_config": model.scheduler_config, **_config_dir(model)}


def _absolute(source: str) -> str:
    """A local path as an absolute one; anything else (a hub id, an alias such as ``digits``) as given."""
    local = Path(source).expanduser()
    return str(local.absolute()) if source not in ALIASES and local.exists() else source


def _config_dir(model: LoadedModel) -> dict[str, str]:
    """The config folder of a base loaded with one (a single-file checkpoint, or weights with --config FOLDER),
    which loading it again needs (nothing for other bases)."""
    return {"config": _absolute(model.config_dir)} if model.config_dir else {}


def load_finetuned(path: Path, base: Optional[str], kind: str, allow_pickle: bool,
                   config: Optional[str] = None) -> LoadedModel:
    """A fine-tune file composed with its base model (stored source, or ``base``; hash-checked)."""
    state, metadata = read_safetensors(path)
    tuning = meta_json(metadata, "pgraft.finetune", path)
    info = meta_json(metadata, "pgraft.base", path)
    _check_base_info(info, path)
    if not isinstance(tuning.get("cutoff"), (int, float)):
        raise ModelLoadError(f"{path} has damaged pgraft metadata (no cutoff in 'pgraft.finetune'); write the file "
                             f"again with pgraft")
    cutoff = float(tuning["cutoff"])
    model = load_base_for(path, info, base, kind, allow_pickle, config)
    model.cutoff = cutoff
    model.tuned_guidance = tuning.get("tuned_guidance", "reapply")  # files written before the key: reapply
    if tuning.get("lora"):
        lora = tuning["lora"]
        add_lora(model.network, lora["rank"], lora["alpha"], lora["target_modules"])
        set_lora_state(model.network, state, str(path))
        model.lora = True
    else:
        tuned = build_network(model.model_class, model.model_config)
        load_state(tuned, state, str(path))
        model.tuned = tuned.eval().requires_grad_(False)
    model.network.eval().requires_grad_(False)
    model.base_identity = model.identity
    model.identity = sha256_file(path)
    model.source, model.source_kind = str(path), "pgraft-finetune"
    model.provenance = meta_json(metadata, "pgraft.provenance", path, {})
    model.metadata = metadata
    return model


# ----------------------------------------------------------------------------------------------
# The bundled classifiers


def save_classifier(path: Path | str, model: DigitsClassifier, provenance: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    metadata = {
        "format": "pt",
        "pgraft.format_version": FORMAT_VERSION,
        "pgraft.kind": "classifier",
        "pgraft.classifier_config": json.dumps(asdict(model.config), sort_keys=True),
        "pgraft.provenance": json.dumps(provenance, sort_keys=True, default=str),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata)
    return path


def load_classifier(path: Path | str) -> DigitsClassifier:

    state, metadata = read_safetensors(Path(path))
    if metadata.get("pgraft.kind") != "classifier":
        raise ModelLoadError(f"{path} is not a pgraft classifier (no pgraft.kind=classifier in its metadata)")
    config = ClassifierConfig(**json.loads(metadata["pgraft.classifier_config"]))
    if config.arch not in ("cnn", "mlp"):
        raise ModelLoadError(f"{path}: classifier architecture {config.arch!r} is not one pgraft builds (cnn, mlp)")
    model = DigitsClassifier(config)
    load_state(model, state, str(path))
    return model.eval().requires_grad_(False)
