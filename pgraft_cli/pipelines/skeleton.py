"""The skeleton every verb runs: recipe, process state, model, device, run directory, stages, report, gates.

A verb is ``start`` (recipe, accelerate's process state, the model loaded and placed on its device),
then ``with verb.run_dir(path)`` (the run store, ``recipe.toml`` written by the main process, progress
bars) around its stages, then ``verb.conclude`` (report.html and the ``--fail-if`` gates). Each verb's
module in this package only fills in its stages and what it returns.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import PgraftError
from ..io.recipes import Recipe, dump_recipe, load_recipe, toml_value
from ..io.runstore import MANIFEST, RECIPE, Dist, RunStore, atomic_write_text
from ..models.loaded import LoadedModel


def resolve_recipe(recipe: str, sets: Optional[list[str]], **flags: Any) -> Recipe:
    """Recipe file, then ``--set`` overrides, then explicit flags (``section__key=value``; None: not given)."""
    overrides = list(sets or [])
    for name, value in flags.items():
        if value is None:
            continue
        section, key = name.split("__")
        overrides.append(f"{section}.{key}={toml_value(value)}")  # TOML: true/false, strings escaped as TOML
    return load_recipe(recipe, overrides)


def load(model: str, config: Optional[str], kind: Optional[str], allow_pickle: bool, recipe: Recipe,
         base: Optional[str] = None) -> LoadedModel:
    """MODEL as ``--config``, ``--kind`` (else the recipe's model.kind), ``--allow-pickle`` and ``--base`` say."""
    from ..io.checkpoints import load_model
    from ..io.host import gc_paused
    from ..models.families import import_network_code

    if kind is not None and kind not in ("flow", "diffusion", "auto"):
        raise PgraftError(f"--kind {kind!r} is invalid: use flow or diffusion")
    with gc_paused():  # diffusers' imports alone, before any weights are read (io.host: what may be frozen)
        import_network_code()
    return load_model(model, config=config, kind=kind or recipe.model.kind, allow_pickle=allow_pickle, base=base)


def check_out_spares_inputs(out: Optional[Path], inputs: dict[str, Optional[str]], folder: bool = False) -> None:
    """Refuse an ``--out`` that would overwrite what the command reads (``inputs``: ``{"MODEL": path, ...}``;
    specs that are not local paths, such as hub ids and aliases, are skipped): the same file (a link to it
    too), or for a ``folder`` output that replaces ``out`` as a whole, a folder holding an input or the
    folder the command runs in."""
    import os

    from ..errors import OutputPathError

    if out is None:
        return
    target = Path(out).expanduser().absolute()
    if folder:
        here = Path.cwd().resolve()
        if target.resolve() == here or target.resolve() in here.parents:
            raise OutputPathError(f"--out {out} is the folder this command runs in (or one above it), which the "
                                  f"export would replace; pass a new folder, e.g. --out {here / 'export'}")
    for name, value in inputs.items():
        given = Path(value).expanduser() if value else None
        if given is None or not given.exists():
            continue
        same = target.exists() and os.path.samefile(given, target)
        inside = folder and target.resolve() in given.resolve().parents
        if same or inside:
            raise OutputPathError(f"--out {out} would overwrite {name} {value}, which this command reads; "
                                  f"pass another --out path")


def recorded_bases(spec: Optional[str], what: str = "MODEL") -> dict[str, Optional[str]]:
    """The local files a composed ``spec`` rests on, for :func:`check_out_spares_inputs`: the base (and config
    folder) it records, that base's own where it is composed too (a corrector of a fine-tune), and so on.
    Nothing for a spec that is not a local pgraft file; unreadable records end the chain (loading says why)."""
    from ..io.checkpoints import read_safetensors_metadata

    found: dict[str, Optional[str]] = {}
    current, label = spec, what
    for _ in range(4):  # a corrector of a fine-tune is the deepest chain pgraft writes
        path = Path(current).expanduser() if current else None
        if path is None or path.suffix.lower() != ".safetensors" or not path.is_file():
            break
        try:
            info = json.loads(read_safetensors_metadata(path).get("pgraft.base") or "null")
        except (PgraftError, ValueError):
            break
        if not isinstance(info, dict) or not isinstance(info.get("source"), str):
            break
        label = f"the base of {label}"
        found[label] = info["source"]
        found[f"the config of {label}"] = info.get("config") if isinstance(info.get("config"), str) else None
        current = info["source"]
    return found


def process_state(recipe: Recipe, override: Optional[str]) -> Any:
    """accelerate's process state; CPU-only machines get the gloo backend (cpu=True)."""
    import torch
    from accelerate import PartialState

    want = override or recipe.model.device
    return PartialState(cpu=want == "cpu" or not torch.cuda.is_available())


def pick_device(recipe: Recipe, override: Optional[str], state: Any) -> str:
    import torch

    want = override or recipe.model.device
    if want == "auto":
        return str(state.device)
    if want == "cuda" and not torch.cuda.is_available():
        raise PgraftError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    if want == "cuda" and state.num_processes > 1:
        return str(state.device)
    return want


# Recipe keys that change what a run reports, not what it computes: left out of its default run directory's
# name, so turning one does not start the work again (and adding one does not move earlier runs' folders).
REPORT_ONLY = {"evaluate": ("copy_test",)}


def computed_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """A recipe's ``to_dict()`` without its ``REPORT_ONLY`` keys."""
    return {section: ({k: v for k, v in values.items() if k not in REPORT_ONLY.get(section, ())}
                      if isinstance(values, dict) else values) for section, values in recipe.items()}


def default_run_dir(verb: str, payload: dict[str, Any]) -> Path:
    """``pgraft-runs/<verb>-<hash of what the verb's results depend on>``: the same command resumes it."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path("pgraft-runs") / f"{verb}-{digest}"


def prompt_list(prompt: Optional[list[str]], prompts: Optional[Path]) -> list[str]:
    """``--prompt`` values, then the lines of the ``--prompts`` file."""
    out = list(prompt or [])
    if prompts is not None:
        if not prompts.is_file():
            raise PgraftError(f"--prompts {prompts}: no such file; pass a text file with one prompt per line")
        from ..io.data import read_utf8

        out += [line.strip() for line in read_utf8(prompts, "--prompts").splitlines() if line.strip()]
    return out


def real_data(loaded: LoadedModel, data: Optional[str], rows: bool = False,
              captions: Optional[str] = None) -> tuple[Any, str]:
    """The ``--data`` images (or the model's own data set), never all at once: streamed in batches
    (``iter_data``), or as ``rows`` read by range on demand (``data_rows``, with ``captions``)."""
    from ..io.data import data_rows, iter_data
    from ..io.refstats import is_stats_file

    spec = data or loaded.default_data
    if not spec:
        raise PgraftError(f"{loaded.source} names no data set of its own; pass --data (an image folder, .npz or alias)")
    if is_stats_file(spec):  # feature statistics (pgraft stats): a reference for FID, no images
        if rows:
            raise PgraftError(f"--data {spec} holds feature statistics, not images; this command reads the images: "
                              f"pass the image folder or file")
        return None, spec
    return (data_rows(spec, loaded.image_shape, captions) if rows else iter_data(spec, loaded.image_shape)), spec


def references(loaded: LoadedModel, data: Optional[str], eval_data: Optional[str], real: Any, data_id: str,
               feats: Any, kid_subsets: int, run_root: Optional[Path] = None) -> tuple[str, dict[str, Any]]:
    """FID references by name, the one ``fid``/``kid`` (and gates) use first: ``--eval-data``, else
    the model's ``default_eval_data`` when ``--data`` is not given, else the data itself. Each is a
    stats file or cached statistics where they exist (``cached_reference``); else ``real`` (``real_data``'s
    batches, already open) is read for the data's."""
    from ..stages.evaluate import cached_reference

    spec = eval_data or (None if data else loaded.default_eval_data)
    refs = {}
    if spec and spec != data_id:
        try:
            refs[spec] = cached_reference(feats, spec, loaded.image_shape, kid_subsets, run_root)
        except PgraftError as exc:  # the same checks as --data, named after the option the user gave
            raise PgraftError(str(exc).replace("--data", "--eval-data", 1)) from None
    refs[data_id] = cached_reference(feats, data_id, loaded.image_shape, kid_subsets, run_root, images=real)
    return next(iter(refs)), refs


def reward_from(spec: Optional[str], device: str = "cpu", batch_size: Optional[int] = None) -> Any:
    from ..stages.rewards import parse_reward

    if not spec:
        raise PgraftError("no reward given; pass --reward NAME[:ARGS] (e.g. --reward classifier:digits:3) or set score.reward")
    reward = parse_reward(spec, device=device)
    if batch_size is not None:
        reward.batch_size = batch_size
    return reward


def open_run(run_dir: Path, verb: str = "score") -> RunStore:
    """An existing run directory (of ``pgraft sample``), for the verbs that continue one, in one process: under
    ``accelerate launch`` every process would open it as the main one (the second: "in use")."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise PgraftError(f"pgraft {verb} runs in one process (it reads a finished sample stage); run it without "
                          f"accelerate launch / torchrun (pgraft finetune splits its own scoring across processes)")
    if not (run_dir / MANIFEST).is_file():
        raise PgraftError(f"{run_dir} is not a pgraft run directory (no {MANIFEST}); pass the --run-dir of a `pgraft sample` run")
    return RunStore(run_dir)


def sampler_guidance(model: LoadedModel, sample: Any) -> Optional[float]:
    """The guidance the network is run with: the classifier-free scale (``sample.guidance_scale``) of a guided
    model, a guidance-distilled network's guidance input (Flux dev: ``sample.distilled_guidance``), or None
    where it reads neither (unconditioned, unguided, Flux schnell)."""
    if model.guided:
        return sample.guidance_scale
    return sample.distilled_guidance if model.distilled else None


def corrector_steps(model: LoadedModel, steps: Optional[int], verb: str, guidance_scale: Optional[float] = None) -> int:
    """The base steps a corrected model runs at: it is fitted for one count, so another is refused; so
    is another guidance than a conditioned base was inverted with (the file records it; ``guidance_scale``
    is :func:`sampler_guidance`'s, the distilled guidance for a guidance-distilled network)."""
    assert model.corrector is not None
    fitted = model.corrector.guidance_scale
    if fitted is not None and guidance_scale is not None and guidance_scale != fitted:
        flag = ("--guidance-scale {:g} (sample.guidance_scale)" if model.adapter.classifier_free
                else "--set sample.distilled_guidance={:g}").format(fitted)
        what = "guidance scale" if model.adapter.classifier_free else "distilled guidance"
        raise PgraftError(f"{model.source} was fitted to the base sampler at {what} {fitted:g}, not "
                          f"{guidance_scale:g}; pass {flag} or {verb} the base model")
    if steps is not None and steps != model.corrector.base_steps:
        raise PgraftError(f"{model.source} was fitted for {model.corrector.base_steps} base steps, not {steps}; "
                          f"pass --steps {model.corrector.base_steps} or {verb} the base model")
    return model.corrector.base_steps


def tuned_steps(model: LoadedModel) -> Optional[int]:
    """The steps a fine-tuned file's own base/tuned evaluation ran at (its recipe's ``evaluate.steps``, else
    ``sample.steps``); None for other models or files without the record."""
    recipe = model.provenance.get("recipe") if model.finetuned else None
    if not isinstance(recipe, dict):
        return None
    steps = (recipe.get("evaluate") or {}).get("steps") or (recipe.get("sample") or {}).get("steps")
    return int(steps) if isinstance(steps, int) and steps > 0 else None


def precision_note(model: LoadedModel) -> Optional[str]:
    """One line where a corrected model samples in another precision than its corrector was fitted to
    (the inversion's base sampler). The run keeps the precision asked for: on the digits flow a mismatch
    moved FID by under 0.02 (docs/methods.md section 3), so it is said, not refused. A file that predates
    the record (no dtype, no autocast) was fitted in an unknown precision: no note."""
    corrector = model.corrector
    if corrector is None or (corrector.dtype is None and corrector.autocast is None):
        return None
    if corrector.fitted_precision(model.dtype) == model.precision:
        return None
    fix = [f"model.autocast={'bf16' if corrector.autocast else 'no'}"]
    if corrector.dtype is not None and corrector.dtype != str(model.dtype):
        fix.append(f"model.dtype={corrector.dtype.removeprefix('torch.')}")
    return (f"{model.source} was fitted to its base sampling in {corrector.fitted_precision(model.dtype)}; this run "
            f"samples in {model.precision}, as asked (on the digits flow such a mismatch moved FID by under "
            f"0.02: docs/methods.md); to match the fit pass " + " ".join(f"--set {f}" for f in fix))


def kind_note(model: LoadedModel, kind: Optional[str]) -> Optional[str]:
    """One line where ``--kind`` (or the recipe's model.kind) reads the model as another family than its scheduler
    config names (``FlowMatch*``: a flow): a flow sampled as diffusion, or the reverse, gives noise-like images."""
    from ..io.checkpoints import named_family

    name = str(model.scheduler_config.get("_class_name", ""))
    if kind not in ("flow", "diffusion") or not name:
        return None
    named = named_family(model.scheduler_config)
    if named == kind:
        return None
    return (f"{model.source}'s scheduler is {name} (a {named} model), read as {kind} as asked; a network trained "
            f"as a {named} model samples noise this way: drop --kind unless its scheduler config is wrong")


def clipping_note(scheduler_config: dict[str, Any]) -> Optional[str]:
    """One line where a diffusion scheduler config clips the predicted clean sample at every step
    (``clip_sample``, as google/ddpm-* ship it, or dynamic ``thresholding``): diffusers' pipeline does, pgraft's
    sampler does not (an inversion must undo each step), so the images differ from the shipped pipeline's."""
    import inspect

    import diffusers

    cls = getattr(diffusers, str(scheduler_config.get("_class_name", "")), None)  # a key left out: the class default
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()} if cls else {}
    keys = [k for k in ("clip_sample", "thresholding") if scheduler_config.get(k, defaults.get(k) is True)]
    if not keys:
        return None
    return (f"the scheduler config sets {' and '.join(keys)} (the clean estimate clipped at every step); pgraft's "
            f"sampler does not clip, so its images differ from the shipped pipeline's")


TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --log-with NAME: the package it needs


def check_tracker(log_with: Optional[str]) -> None:
    """``--log-with`` names a tracker accelerate supports whose package is installed (before any work)."""
    import importlib.util

    if log_with is None:
        return
    if log_with not in TRACKERS:
        raise PgraftError(f"--log-with {log_with!r} is not a tracker pgraft logs to; use tensorboard or wandb")
    if importlib.util.find_spec(TRACKERS[log_with]) is None:
        raise PgraftError(f"--log-with {log_with} needs the {TRACKERS[log_with]} package: pip install {TRACKERS[log_with]}")


@contextlib.contextmanager
def trackers(log_with: Optional[str], run_root: Path, config: dict[str, Any]) -> Iterator[Any]:
    """accelerate's trackers for ``--log-with`` (None: off), writing into the run directory beside
    report.html (tensorboard: ``RUN_DIR/pgraft/events.out.tfevents.*``; wandb: ``RUN_DIR/wandb``);
    yields ``log(values, step)`` (None when off). ``config``: the recipe, flattened to ``section.key``."""
    if log_with is None:
        yield None
        return
    from accelerate import Accelerator

    flat = {f"{section}.{k}": v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
            for section, keys in config.items() if isinstance(keys, dict) for k, v in keys.items()}
    accelerator = Accelerator(log_with=log_with, project_dir=str(run_root))
    accelerator.init_trackers("pgraft", config=flat, init_kwargs={"wandb": {"dir": str(run_root)}})
    try:
        yield accelerator.log
    finally:
        accelerator.end_training()


@dataclass
class Options:
    """What every verb takes (None: the recipe's value); each verb's dataclass adds its own."""

    recipe: str = "default"
    sets: Optional[list[str]] = None
    quiet: bool = False

    @classmethod
    def of(cls, given: dict[str, Any]) -> Any:
        """The options from a command's parameters, its shared ones in ``given["shared"]`` (``set_`` is
        ``sets``; ``--json`` implies quiet)."""
        given = {("sets" if k == "set_" else k): v for k, v in {**given, **given.get("shared", {})}.items()}
        given["quiet"] = given.get("quiet", False) or given.get("as_json", False)
        return cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given})


@dataclass
class LoadOptions:
    """How a model file is read: ``--config``, ``--kind``, ``--allow-pickle``."""

    config: Optional[str] = None
    kind: Optional[str] = None
    allow_pickle: bool = False


@dataclass
class ModelOptions(Options, LoadOptions):
    """What every verb that loads a model into a run directory takes."""

    run_dir: Optional[Path] = None
    device: Optional[str] = None
    fail_if: Optional[list[str]] = None


@dataclass
class FeatureOptions:
    """FID features (``--features``) and a local Inception file."""

    features: Optional[str] = None
    inception_weights: Optional[str] = None


@dataclass
class DataOptions(FeatureOptions):
    """Real data (``--data``), the held-out data FID is measured against (``--eval-data``), the features."""

    data: Optional[str] = None
    eval_data: Optional[str] = None


@dataclass
class PromptOptions:
    """Prompts of text models: ``--prompt`` values and a ``--prompts`` file."""

    prompt: Optional[list[str]] = None
    prompts: Optional[Path] = None


@dataclass
class DrawOptions:
    """How a verb draws its images (None: the recipe's): ``--num``, ``--seed``, ``--steps``, and the
    ``--base`` of a corrected or fine-tuned checkpoint."""

    num: Optional[int] = None
    seed: Optional[int] = None
    steps: Optional[int] = None
    base: Optional[str] = None


@dataclass
class Outcome:
    """What a verb hands the command line: its ``--json`` object, its terminal view, its gate results."""

    summary: dict[str, Any]
    view: list[Any] = field(default_factory=list)  # rich renderables and markup lines, printed in order
    gates: list[Any] = field(default_factory=list)
    indent: Optional[int] = None  # of the JSON object (inspect's is indented)


@dataclass
class Verb:
    """One run of a verb: its recipe, processes, model and device, then its run store and progress bar."""

    name: str
    recipe: Recipe
    state: Any
    model: LoadedModel
    device: str
    quiet: bool
    started: float = field(default_factory=time.perf_counter)
    store: Optional[RunStore] = None
    bar: Any = None
    stage_seconds: dict[str, float] = field(default_factory=dict)  # where this run's time went

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    @property
    def dist(self) -> Dist:
        n = self.state.num_processes
        return Dist(self.state.process_index, n, self.state.wait_for_everyone if n > 1 else None)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @functools.cached_property
    def device_name(self) -> Optional[str]:
        """The hardware behind the verb's device (``host.describe_device``), read once for the summary and
        the provenance."""
        from ..io.host import describe_device

        return describe_device(self.device)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the wall seconds of the block to ``stage_seconds[name]`` (a cached stage counts its reading)."""
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] = round(self.stage_seconds.get(name, 0.0) + time.perf_counter() - tic, 2)

    @contextlib.contextmanager
    def run_dir(self, path: Path) -> Iterator[RunStore]:
        """The run store (locked by the main process, which also writes ``recipe.toml``), with progress bars."""
        from ..report.ui import note, progress

        show = not self.quiet and self.is_main
        with RunStore(path, is_main=self.is_main) as store:
            if self.is_main:
                atomic_write_text(store.root / RECIPE, dump_recipe(self.recipe))
            note(f"run directory: {store.root}", quiet=not show)
            self.store = store
            with progress(show) as bar:
                self.bar = bar
                yield store

    def conclude(self, summary: dict[str, Any], gates: list[Any], gate_values: dict[str, Any],
                 artifacts: dict[str, Any], out: Optional[Path] = None) -> list[Any]:
        """Record the verb's named artifacts and provenance, write report.html (its path into the
        summary), and check the gates on ``gate_values`` (recorded in the summary when any)."""
        from ..report.gates import check_gates
        from ..report.html import render_report

        assert self.store is not None
        checkpoint = {"checkpoint": str(out)} if out is not None else {}
        self.store.record_artifacts(self.name, {**artifacts, **checkpoint})
        self.store.record_provenance(self.name, device=self.device, device_name=self.device_name,
                                     seconds=round(self.seconds, 2), **({"out": str(out)} if out is not None else {}))
        summary["report"] = str(render_report(self.store.root))
        results = check_gates(gates, gate_values)
        if results:
            summary["gates"] = [r.to_dict() for r in results]
        return results


def autocast_dtype(setting: str, device_type: str, dtype: Any) -> Any:
    """The dtype sampling autocasts to: bf16 when asked, or by default ("auto") for float32 weights
    on CUDA (the GPU's bf16 tensor cores); None (no autocast) otherwise."""
    import torch

    wanted = setting == "bf16" or (setting == "auto" and device_type == "cuda")
    return torch.bfloat16 if wanted and dtype == torch.float32 else None


def place(loaded: LoadedModel, device: str, dtype: Any, autocast: str) -> None:
    """``loaded`` on ``device`` in ``dtype`` (None: its own), its sampling autocast from the recipe's setting
    (:func:`autocast_dtype`) and its corrector, if any, on the device too: how every verb places a model."""
    loaded.to(device, dtype)
    loaded.autocast = autocast_dtype(autocast, loaded.device.type, loaded.dtype)
    if loaded.corrector is not None:
        loaded.corrector.to(device)


def start(verb: str, recipe: Recipe, model: str, config: Optional[str], kind: Optional[str], allow_pickle: bool,
          device: Optional[str], quiet: bool, base: Optional[str] = None) -> Verb:
    """The process state, then MODEL loaded and placed on its device in the recipe's dtype."""
    import torch

    started = time.perf_counter()
    state = process_state(recipe, device)
    loaded = load(model, config, kind, allow_pickle, recipe, base)
    clipped = clipping_note(loaded.scheduler_config) if loaded.schedule.family == "diffusion" else None
    for said in (clipped, kind_note(loaded, kind or recipe.model.kind)):
        if said and state.is_main_process:
            from ..report.ui import note

            note(f"note: {said}", quiet)
    dev = pick_device(recipe, device, state)
    place(loaded, dev, getattr(torch, recipe.model.dtype), recipe.model.autocast)
    return Verb(verb, recipe, state, loaded, dev, quiet, started,
                stage_seconds={"load": round(time.perf_counter() - started, 2)})
