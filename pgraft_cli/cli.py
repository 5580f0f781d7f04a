"""The ``pgraft`` command line: parses options, loads the recipe and the model, calls a stage.

This module holds no method logic: each verb resolves its recipe (``--recipe`` + ``--set`` +
explicit flags), opens the run store and calls the stage function from its own module.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import __version__
from .errors import OutputPathError, PgraftError
from .io.recipes import Recipe, dump_recipe, load_recipe

app = typer.Typer(
    name="pgraft",
    help=(
        "Model surgery for diffusion and flow checkpoints: GRAFT / P-GRAFT fine-tuning and inverse "
        "noise correction (arXiv 2510.02692), as resumable runs that end in a checkpoint and a report.\n\n"
        "Try it on the bundled model:  pgraft sample digits --num 16 --out samples/"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

# -- output paths: refused before any work -------------------------------------------------------


def _check_writable(path: Path, flag: str, is_file: bool = False) -> None:
    """Refuse a path whose nearest existing folder (itself, for a folder) is a file or cannot be written to."""
    import tempfile

    ancestor = next((p for p in (*([] if is_file else [path]), *path.parents) if p.exists()), Path("."))
    if not ancestor.is_dir():
        raise OutputPathError(f"{flag} {path} lies under {ancestor}, which is a file, not a folder; pass another path")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        raise OutputPathError(f"{flag} {path} cannot be written ({(exc.strerror or str(exc)).lower()} in {ancestor}); "
                              f"pass a path in a folder you can write to") from None


def _folder_path(flag: str) -> Any:
    """A typer callback for an option naming a folder pgraft writes into."""

    def check(value: Optional[Path]) -> Optional[Path]:
        if value is not None:
            if value.exists() and not value.is_dir():
                raise OutputPathError(f"{flag} {value} is a file, but a folder is expected; pass a folder path")
            _check_writable(value, flag)
        return value

    return check


def _png_folder(value: Optional[Path]) -> Optional[Path]:
    """``pgraft sample --out``: a writable folder that holds no images pgraft did not write."""
    from .stages.sample import check_png_folder

    if _folder_path("--out")(value) is not None:
        check_png_folder(value)
    return value


def _safetensors_path(value: Optional[Path]) -> Optional[Path]:
    """``--out`` of a verb that writes one .safetensors file."""
    if value is not None:
        if value.is_dir():
            raise OutputPathError(f"--out {value} is a folder, but a .safetensors file is expected; "
                                  f"pass a file path such as {value / 'model.safetensors'}")
        if value.suffix.lower() != ".safetensors":
            raise OutputPathError(f"--out {value} does not end in .safetensors, the one format pgraft writes; "
                                  f"pass e.g. {value.with_suffix('.safetensors')}")
        _check_writable(value, "--out", is_file=True)
    return value


# -- options shared by the verbs -----------------------------------------------------------------
RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="Recipe name (see recipes/) or path to a .toml file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", metavar="SECTION.KEY=VALUE",
                                                     help="Override one recipe key; repeatable. Example: --set sample.steps=16")]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", callback=_folder_path("--run-dir"), help="Run directory (default: ./pgraft-runs/<verb>-<config hash>); re-running resumes it.")]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", help="Model config (config.json or diffusers folder) for weights that do not describe themselves.")]
KindOpt = Annotated[Optional[str], typer.Option("--kind", help="Override the detected family: flow or diffusion.")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow loading pickle checkpoints (.ckpt/.pt/.bin), which can run code. Only for files you trust.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Hide progress bars and notes.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else there.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or mps (default: the recipe's model.device).")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="Real data: image folder, .npz/.safetensors (tensor 'images'), or alias (digits, digits-train, digits-judge, digits-test). Default: the model's own data set (digits-train for the bundled model).")]
EvalDataOpt = Annotated[Optional[str], typer.Option("--eval-data", help="Held-out data FID/KID are measured against (the numbers gates see); FID against --data is shown beside it. Default: the model's eval data (digits-test for the bundled model) when --data is not given.")]
FeaturesOpt = Annotated[Optional[str], typer.Option("--features", help="FID features: auto, inception, classifier (the bundled digits classifier) or judge (the bundled judge: another architecture trained on another split).")]
InceptionOpt = Annotated[Optional[str], typer.Option("--inception-weights", help="Local clean-fid Inception TorchScript file (inception-2015-12-05.pt).")]
FailIfOpt = Annotated[Optional[list[str]], typer.Option("--fail-if", metavar="'METRIC OP NUMBER'",
                                                        help="CI gate, repeatable: exit 1 when it holds, after writing every output. "
                                                             "Example: --fail-if \"fid>12\" --fail-if \"reward<0.5\" (OP: > >= < <= == !=; "
                                                             "metrics of the result; base.fid etc. for the base model).")]


def _gates_verdict(results: list[Any], quiet: bool) -> None:
    """One stderr line per failed gate and exit 1; a single note when all held."""
    from rich.text import Text

    from .report.gates import failed as failed_gates
    from .report.ui import err, note

    failed = failed_gates(results)
    for r in failed:
        err.print(Text(r.line, style="bold red"), soft_wrap=True)
    if failed:
        raise typer.Exit(1)
    if results:
        note("gates held: " + ", ".join(r.gate.text for r in results), quiet=quiet)


def _resolve_recipe(recipe: str, sets: Optional[list[str]], **flags: Any) -> Recipe:
    """Recipe file, then ``--set`` overrides, then explicit flags (``section__key=value``)."""
    overrides = list(sets or [])
    for name, value in flags.items():
        if value is None:
            continue
        section, key = name.split("__")
        overrides.append(f"{section}.{key}={json.dumps(value) if isinstance(value, str) else value}")
    return load_recipe(recipe, overrides)


def _load(model: str, config: Optional[str], kind: Optional[str], allow_pickle: bool, recipe: Recipe,
          base: Optional[str] = None):
    from .io.checkpoints import load_model

    if kind is not None and kind not in ("flow", "diffusion", "auto"):
        raise PgraftError(f"--kind {kind!r} is invalid: use flow or diffusion")
    return load_model(model, config=config, kind=kind or recipe.model.kind, allow_pickle=allow_pickle, base=base)


def _device(recipe: Recipe, override: Optional[str], state: Any) -> str:
    import torch

    want = override or recipe.model.device
    if want == "auto":
        return str(state.device)
    if want == "cuda" and not torch.cuda.is_available():
        raise PgraftError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    if want == "cuda" and state.num_processes > 1:
        return str(state.device)
    return want


def _state(recipe: Recipe, override: Optional[str]) -> Any:
    """accelerate's process state; CPU-only machines get the gloo backend (cpu=True)."""
    import torch
    from accelerate import PartialState

    want = override or recipe.model.device
    return PartialState(cpu=want == "cpu" or not torch.cuda.is_available())


def _default_run_dir(verb: str, payload: dict[str, Any]) -> Path:
    import hashlib

    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path("pgraft-runs") / f"{verb}-{digest}"


# ================================================================================================
# inspect


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="Model: bundled alias (digits), diffusers folder, .safetensors file or hub id.")],
    config: ConfigOpt = None,
    kind: KindOpt = None,
    allow_pickle: PickleOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Describe a model: family and prediction type, conditioning, shapes, size, scheduler, provenance.

    Examples:

      pgraft inspect digits

      pgraft inspect ./stable-diffusion-2-base --json

      pgraft inspect weights.safetensors --config ./my-unet/config.json
    """
    from .io.checkpoints import describe

    info = describe(_load(model, config, kind, allow_pickle, load_recipe("default")))
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return
    from rich.table import Table

    from .report.ui import out

    table = Table(title=f"pgraft inspect {model}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("source", f"{info['source']} ({info['source_kind']})"),
        ("network", info["model_class"]),
        ("family", f"{info['family']} (prediction: {info['prediction_type']})"),
        ("conditioning", info["conditioning"] + (f" ({info['num_classes']} classes)" if info["num_classes"] else "")),
        ("sample shape", " x ".join(map(str, info["sample_shape"])) + (" latent" if info["latent"] else "")),
        ("image shape", " x ".join(map(str, info["image_shape"]))),
        ("parameters", f"{info['parameters']:,}"),
        ("dtype", info["dtype"]),
        ("scheduler", f"{info['scheduler']} (T={info['num_train_timesteps']}"
                      + (f", shift={info['shift']}" if info["shift"] not in (None, 1.0) else "") + ")"),
        ("identity", f"sha256:{info['identity'][:16]}…" if len(info["identity"]) == 64 else info["identity"]),
        ("default data", info["default_data"] or "-"),
        ("default eval data", info["default_eval_data"] or "-"),
    ]
    comp = info.get("composition")
    if comp and comp["kind"] == "finetune":
        lora = comp["lora"]
        rows.append(("fine-tune", f"cutoff {comp['cutoff']} (tuned for t in (c, 1], base for [0, c]); "
                                  + (f"LoRA rank {lora['rank']}" if lora else "full weights")
                                  + f"; tuned segment guidance: {comp['tuned_guidance']}"
                                  + f"; reward {comp['reward']}: {comp['reward_mean']}"))
    elif comp:
        rows.append(("corrector", f"{comp['corrector']} ({comp['corrector_steps']} steps) -> base at "
                                  f"{comp['base_steps']} Euler steps"))
    if comp:
        rows.append(("base identity", f"sha256:{(comp['base_identity'] or '')[:16]}…"))
    for k, v in rows:
        table.add_row(k, str(v))
    prov = info["provenance"]
    if prov:
        table.add_row("provenance", json.dumps(prov, sort_keys=True)[:400])
    else:
        table.add_row("provenance", "none recorded")
    out.print(table)


# ================================================================================================
# sample


@app.command()
def sample(
    model: Annotated[str, typer.Argument(help="Model to sample from (alias, folder, .safetensors or hub id).")],
    num: Annotated[Optional[int], typer.Option("--num", "-n", help="Number of images.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed; image i depends only on (seed, i).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Solver steps (flow: Euler, diffusion: DDIM).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Images per shard (a multiple of sample.lane); never changes the images.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", callback=_png_folder, help="Folder for the PNGs (00000.png ...) and sampler.json; default RUN_DIR/images.")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Prompt for text models; repeatable (image i takes prompt i mod P).")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="File with one prompt per line.")] = None,
    class_label: Annotated[Optional[int], typer.Option("--class", help="Class label for class-conditional models (default: i mod classes).")] = None,
    capture_at: Annotated[Optional[float], typer.Option("--capture-at", help="Also store each trajectory's state at this noise level (P-GRAFT's cutoff).")] = None,
    guidance_scale: Annotated[Optional[float], typer.Option("--guidance-scale", help="Classifier-free guidance for text models and class models with a null class.")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model of a corrected checkpoint, if not where it was.")] = None,
    recipe: RecipeOpt = "default",
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    kind: KindOpt = None,
    allow_pickle: PickleOpt = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Draw images from MODEL into a resumable run and write them as PNGs.

    Image i starts from noise seeded by (seed, i) and always goes through the network in the same
    lane of sample.lane images, so the same seed gives the same bytes whatever --batch-size or --num
    (64 images are the prefix of 3000) and however many processes share the work.

    Examples:

      pgraft sample digits --num 64 --seed 0 --steps 16 --out samples/

      pgraft sample ./sd2-base --prompt "a red cube on a blue sphere" --num 8 --out out/

      accelerate launch --num_processes 2 -m pgraft_cli sample digits --num 3000 --out big/
    """
    from .io.runstore import RunStore
    from .stages.sample import Conditions, export_pngs, run_sample
    from .report.ui import note, progress

    rec = _resolve_recipe(recipe, set_, sample__num=num, sample__seed=seed, sample__steps=steps,
                          sample__batch_size=batch_size, sample__capture_at=capture_at,
                          sample__guidance_scale=guidance_scale)
    cond = Conditions(prompts=_prompts(prompt, prompts) or None, class_label=class_label)
    state = _state(rec, device)
    loaded = _load(model, config, kind, allow_pickle, rec, base)
    dev = _device(rec, device, state)
    import torch

    loaded.to(dev, getattr(torch, rec.model.dtype))
    if loaded.corrector is not None:  # one corrector per base step count
        loaded.corrector.to(dev)
        if steps is not None and steps != loaded.corrector.base_steps:
            raise PgraftError(f"{model} was fitted for {loaded.corrector.base_steps} base steps, not {steps}; "
                              f"pass --steps {loaded.corrector.base_steps} or sample the base model")
        rec.sample.steps = loaded.corrector.base_steps
    from .stages.sample import check_conditions, stage_config

    check_conditions(loaded, cond)
    run_dir = run_dir or _default_run_dir("sample", {"model": loaded.identity, **stage_config(loaded, rec.sample, cond)})
    show = not (quiet or as_json) and state.is_main_process
    with RunStore(run_dir, is_main=state.is_main_process) as store:
        if state.is_main_process:
            from .io.runstore import atomic_write_text

            atomic_write_text(store.root / "recipe.toml", dump_recipe(rec))
        note(f"run directory: {store.root}", quiet=not show)
        with progress(show) as bar:
            result = run_sample(loaded, rec.sample, cond, store, bar, state.process_index,
                                state.num_processes, barrier=state.wait_for_everyone if state.num_processes > 1 else None)
        if not state.is_main_process:
            return
        target = out or store.root / "images"
        written = export_pngs(store.root, target, {**result.settings, "prompts": cond.prompts, "model": loaded.source,
                                                   "model_identity": loaded.identity, "pgraft_version": __version__})
    summary = {
        "run_dir": str(store.root), "out": str(target), "num": written, "generated_now": result.generated,
        "seconds": round(result.seconds, 3), "images_per_second": round(result.images_per_second, 2),
        "steps": rec.sample.steps, "seed": rec.sample.seed, "lane": rec.sample.lane,
        "processes": state.num_processes, "device": dev,
    }
    if as_json:
        print(json.dumps(summary, sort_keys=True))
    elif not quiet:
        from .report.ui import out as console

        resumed = "" if result.generated == written else f" ({written - result.generated} already done)"
        console.print(f"[green]wrote[/green] {written} images to {target}{resumed} in {result.seconds:.1f}s")


# ================================================================================================
# run / status


@app.command()
def run(
    model: Annotated[str, typer.Argument(help="Model the recipe works on.")],
    recipe: RecipeOpt = "default",
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    kind: KindOpt = None,
    allow_pickle: PickleOpt = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run every stage a recipe lists under \\[run] stages, resuming what is already done.

    Examples:

      pgraft run digits --recipe default --set sample.num=256

      pgraft run digits --recipe my-recipe.toml --run-dir runs/exp1
    """
    rec = _resolve_recipe(recipe, set_)
    if rec.run.stages == ["invert", "train_corrector", "evaluate"]:
        correct(model, recipe=recipe, set_=set_, run_dir=run_dir, config=config, kind=kind, allow_pickle=allow_pickle,
                device=device, quiet=quiet, as_json=as_json, data=None, out=None, steps=None, features=None,
                inception_weights=None)
        return
    if rec.run.stages == ["sample", "score", "filter", "finetune"]:
        finetune(model, recipe=recipe, set_=set_, run_dir=run_dir, config=config, kind=kind, allow_pickle=allow_pickle,
                 device=device, quiet=quiet, as_json=as_json, reward=None, cutoff=None, out=None, rounds=None,
                 lora_rank=None, data=None, prompt=None, prompts=None)
        return
    if rec.run.stages != ["sample"]:
        raise PgraftError(
            f"recipe '{rec.name}' lists stages {rec.run.stages}; pgraft runs [\"sample\"], "
            f"[\"sample\", \"score\", \"filter\", \"finetune\"] or [\"invert\", \"train_corrector\", \"evaluate\"]"
        )
    for stage in rec.run.stages:
        if stage == "sample":
            sample(model, recipe=recipe, set_=set_, run_dir=run_dir, config=config, kind=kind,
                   allow_pickle=allow_pickle, device=device, quiet=quiet, as_json=as_json,
                   num=None, seed=None, steps=None, batch_size=None, out=None, prompt=None, prompts=None,
                   class_label=None, capture_at=None, guidance_scale=None, base=None)


@app.command()
def status(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    as_json: JsonOpt = False,
) -> None:
    """Show each stage of a run directory as done, partial (with shard counts), pending or stale.

    Example:

      pgraft status pgraft-runs/sample-1a2b3c4d5e6f
    """
    from .io.runstore import MANIFEST, RunStore

    if not (run_dir / MANIFEST).is_file():
        raise PgraftError(f"{run_dir} is not a pgraft run directory (no {MANIFEST}); pass the --run-dir of a run")
    stages = RunStore(run_dir, is_main=False).status()
    if as_json:
        print(json.dumps({"run_dir": str(run_dir), "stages": [s.__dict__ for s in stages]}, sort_keys=True))
        return
    from rich.table import Table

    from .report.ui import out

    colours = {"done": "green", "partial": "yellow", "pending": "dim", "stale": "red"}
    table = Table(title=f"run {run_dir}", title_justify="left")
    for col in ("stage", "state", "shards", "key"):
        table.add_column(col)
    for s in stages:
        shards = f"{s.shards_done}/{s.shards_total}" if s.shards_total is not None else str(s.shards_done)
        table.add_row(s.name, f"[{colours.get(s.state, 'white')}]{s.state}[/]", shards, (s.key or "")[:12])
    out.print(table)


# ================================================================================================
# GRAFT / P-GRAFT: score, filter, finetune

RewardOpt = Annotated[Optional[str], typer.Option("--reward", help="Reward NAME[:ARGS]: classifier:digits:3, classifier:PATH:CLASS, jpeg-compressibility, jpeg-incompressibility, clip:PATH, vqascore[:PATH], python:module:function.")]


def _open_run(run_dir: Path) -> Any:
    from .io.runstore import MANIFEST, RunStore

    if not (run_dir / MANIFEST).is_file():
        raise PgraftError(f"{run_dir} is not a pgraft run directory (no {MANIFEST}); pass the --run-dir of a `pgraft sample` run")
    return RunStore(run_dir)


def _reward(spec: str, device: str = "cpu", batch_size: Optional[int] = None) -> Any:
    from .stages.rewards import parse_reward

    if not spec:
        raise PgraftError("no reward given; pass --reward NAME[:ARGS] (e.g. --reward classifier:digits:3) or set score.reward")
    reward = parse_reward(spec, device=device)
    if batch_size is not None:
        reward.batch_size = batch_size
    return reward


@app.command()
def score(
    run_dir: Annotated[Path, typer.Argument(help="Run directory whose samples to score.")],
    reward: RewardOpt = None,
    stage: Annotated[str, typer.Option("--stage", help="Sample stage to score (sample-r2 ... for later rounds).")] = "sample",
    recipe: RecipeOpt = "default",
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Score a run's samples with a reward; a new reward re-scores without re-sampling.

    Examples:

      pgraft sample digits --num 256 --capture-at 0.5 --run-dir runs/d3

      pgraft score runs/d3 --reward classifier:digits:3

      pgraft score runs/d3 --reward python:my_rewards:brightness
    """
    from .stages.score import reward_stats, run_score
    from .report.ui import progress

    rec = _resolve_recipe(recipe, set_, score__reward=reward)
    rew = _reward(rec.score.reward, batch_size=rec.score.batch_size)
    score_stage = stage.replace("sample", "score", 1)
    with _open_run(run_dir) as store, progress(not (quiet or as_json)) as bar:
        rewards = run_score(store, rew, bar, stage, score_stage)
    summary = {"run_dir": str(run_dir), "reward": rew.spec, "stage": score_stage, **reward_stats(rewards)}
    if as_json:
        print(json.dumps(summary, sort_keys=True))
    elif not quiet:
        from .report.ui import out as console

        console.print(f"[green]scored[/green] {summary['num']} samples with {rew.spec}: mean "
                      f"{summary['reward_mean']:.4f}, std {summary['reward_std']:.4f}")


@app.command(name="filter")
def filter_(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with scored samples.")],
    rule: Annotated[Optional[str], typer.Option("--rule", help="top_k (k of m per prompt), best_of_n (1 of m), threshold.")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="Keep k per group (top_k).")] = None,
    m: Annotated[Optional[int], typer.Option("--m", help="Group size: samples per prompt / class (top_k, best_of_n).")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Keep rewards >= this value (threshold).")] = None,
    quantile: Annotated[Optional[float], typer.Option("--quantile", help="Keep rewards >= this quantile (threshold).")] = None,
    dedup: Annotated[Optional[bool], typer.Option("--dedup/--no-dedup", help="Keep one of near-identical kept samples.")] = None,
    stage: Annotated[str, typer.Option("--stage", help="Sample stage whose scores to filter (sample-r2 ... for later rounds).")] = "sample",
    recipe: RecipeOpt = "default",
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Keep scored samples by a rejection rule and show the tilt it applies (GRAFT, arXiv 2510.02692).

    Prints how many were kept, the reward distribution before and after (a histogram) and the
    reshaped reward rhat = log P(accept | F(r)) of the rule.

    Examples:

      pgraft filter runs/d3 --rule top_k --k 1 --m 4

      pgraft filter runs/d3 --rule threshold --quantile 0.75 --dedup
    """
    from .stages.filter import run_filter

    rec = _resolve_recipe(recipe, set_, filter__rule=rule, filter__k=k, filter__m=m, filter__threshold=threshold,
                          filter__quantile=quantile, filter__dedup=dedup)
    names = {s: stage.replace("sample", s, 1) for s in ("score", "filter")}
    with _open_run(run_dir) as store:
        summary = run_filter(store, rec.filter, stage, names["score"], names["filter"])
    if as_json:
        print(json.dumps({"run_dir": str(run_dir), **{k_: v for k_, v in summary.items()
                                                       if k_ not in ("kept_indices", "cdf", "reshaped_reward")}},
                         sort_keys=True))
    elif not quiet:
        from .report.ui import filter_report, out as console

        console.print(filter_report(summary))


@app.command()
def finetune(
    model: Annotated[str, typer.Argument(help="Model to fine-tune (alias, folder, .safetensors or hub id).")],
    reward: RewardOpt = None,
    cutoff: Annotated[Optional[float], typer.Option("--cutoff", help="P-GRAFT cutoff c in [0, 1): the tuned model runs t in (c, 1], the base [0, c]; 0 is GRAFT.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", callback=_safetensors_path, help="Output .safetensors (default RUN_DIR/tuned.safetensors).")] = None,
    rounds: Annotated[Optional[int], typer.Option("--rounds", help="Rounds of sample -> score -> filter -> fine-tune.")] = None,
    lora_rank: Annotated[Optional[int], typer.Option("--lora-rank", help="LoRA rank (0: full fine-tuning).")] = None,
    data: DataOpt = None,
    eval_data: EvalDataOpt = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Prompt for text models; repeatable.")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="File with one prompt per line (sample.num = m x prompts).")] = None,
    recipe: RecipeOpt = "pgraft",
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    kind: KindOpt = None,
    allow_pickle: PickleOpt = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    fail_if: FailIfOpt = None,
) -> None:
    """GRAFT / P-GRAFT: rounds of sample -> score -> filter -> fine-tune, then evaluate base vs tuned.

    Every stage is cached in the run directory: re-running resumes, and a changed reward re-runs
    scoring onwards, never sampling. Writes one self-describing .safetensors (full weights or the
    LoRA adapter, the cutoff, the base model's identity, the recipe and the measured rewards) that
    `pgraft sample` and `pgraft evaluate` compose with the base automatically.

    Examples:

      pgraft finetune digits --reward classifier:digits:3 --cutoff 0.5 --out tuned.safetensors

      pgraft finetune digits --reward classifier:digits:3 --cutoff 0 --recipe graft --lora-rank 8

      pgraft finetune ./sd2 --reward vqascore:./llava --prompts train.txt --cutoff 0.25 --set sample.num=4000
    """
    import torch

    from .stages.evaluate import pick_features
    from .io.checkpoints import base_info_of, save_finetuned
    from .stages.finetune import evaluate_pair, run_rounds
    from .io.runstore import RunStore, atomic_write_text
    from .stages.sample import Conditions, check_conditions
    from .report.ui import note, progress

    from .report.gates import check_gates, gate_metrics, gate_names, parse_gates
    from .report.html import render_report

    tic = time.perf_counter()
    gates = parse_gates(fail_if, gate_names("finetune"))
    rec = _resolve_recipe(recipe, set_, score__reward=reward, finetune__cutoff=cutoff, finetune__rounds=rounds,
                          finetune__lora_rank=lora_rank)
    cond = Conditions(prompts=_prompts(prompt, prompts) or None)
    state = _state(rec, device)
    loaded = _load(model, config, kind, allow_pickle, rec)
    if loaded.corrector is not None or loaded.finetuned:
        raise PgraftError(f"{model} is a corrected or fine-tuned file; pass its base model to fine-tune")
    check_conditions(loaded, cond)
    dev = _device(rec, device, state)
    loaded.to(dev, getattr(torch, rec.model.dtype))
    rew = _reward(rec.score.reward, dev, rec.score.batch_size)
    base_info = base_info_of(loaded)
    real, data_id = (None, None)
    if data or loaded.default_data:
        real, data_id = _real_data(loaded, data)  # streamed: only the FID reference reads it
    # The default run directory depends only on what sampling depends on, so that a new reward,
    # rule or training setting re-runs scoring onwards in the same run, never sampling.
    run_dir = run_dir or _default_run_dir("finetune", {"model": loaded.identity, "sample": rec.to_dict()["sample"],
                                                       "cutoff": rec.finetune.cutoff, "prompts": cond.prompts})
    show = not (quiet or as_json) and state.is_main_process
    feats = pick_features(rec.evaluate.features, loaded.image_shape, rec.evaluate.inception_weights or None, dev,
                          reward_identity=rew.identity) \
        if real is not None else None
    with RunStore(run_dir, is_main=state.is_main_process) as store:
        if state.is_main_process:
            atomic_write_text(store.root / "recipe.toml", dump_recipe(rec))
        note(f"run directory: {store.root}", quiet=not show)
        with progress(show) as bar:
            fid_of, fid_data, refs = None, None, {}
            if feats is not None:
                fid_data, refs = _references(loaded, data, eval_data, real, data_id, feats, rec.evaluate.kid_subsets)

                def fid_of(images: Any) -> float:  # each round's samples against the same reference
                    ref = refs[fid_data]
                    ref.reset_generated()
                    ref.update(feats(images), real=False)
                    return ref.compute()["fid"]
            history = run_rounds(loaded, rec, rew, cond, store, bar, state.process_index, state.num_processes,
                                 state.wait_for_everyone if state.num_processes > 1 else None, fid_of=fid_of)
            if not state.is_main_process:
                return
            metrics = evaluate_pair(loaded, rec, rew, cond, feats, store, bar, refs, fid_data)
        metrics["rounds"] = [{k: v for k, v in h.items() if k not in ("filter", "loss_curve")} for h in history]
        metrics["reward"], metrics["data"], metrics["fid_data"] = rew.spec, data_id, fid_data
        target = out or store.root / "tuned.safetensors"
        save_finetuned(target, loaded, base_info, rec.finetune, metrics, rec.to_dict())
        store.write_json("finetune/summary.json", {**metrics, "out": str(target), "cutoff": rec.finetune.cutoff,
                                                   "history": history})
    seconds = time.perf_counter() - tic
    summary = {"run_dir": str(store.root), "out": str(target), "out_bytes": target.stat().st_size,
               "seconds": round(seconds, 2), "cutoff": rec.finetune.cutoff, **metrics}
    summary["report"] = str(render_report(store.root, run={"verb": "finetune", "device": dev, "seconds": round(seconds, 2),
                                                           "out": str(target)}))
    results = check_gates(gates, gate_metrics(metrics["tuned"], metrics["base"]))
    if results:
        summary["gates"] = [r.to_dict() for r in results]
    if as_json:
        print(json.dumps(summary, sort_keys=True, default=float))
        return _gates_verdict(results, quiet=True)
    if quiet:
        return _gates_verdict(results, quiet=True)
    from .report.ui import finetune_report, fmt_bytes, out as console

    console.print(finetune_report(summary))
    console.print(f"[green]wrote[/green] {target} ({fmt_bytes(target.stat().st_size)}); run {store.root}; {seconds:.0f}s")
    console.print(f"report: {summary['report']}")
    _gates_verdict(results, quiet=False)


def _prompts(prompt: Optional[list[str]], prompts: Optional[Path]) -> list[str]:
    out = list(prompt or [])
    if prompts is not None:
        if not prompts.is_file():
            raise PgraftError(f"--prompts {prompts}: no such file; pass a text file with one prompt per line")
        out += [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
    return out




def _real_data(loaded: Any, data: Optional[str], rows: bool = False) -> tuple[Any, str]:
    """The ``--data`` images (or the model's own data set), never all at once: streamed in batches
    (``iter_data``), or as ``rows`` read by range on demand (``data_rows``)."""
    from .io.data import data_rows, iter_data

    spec = data or loaded.default_data
    if not spec:
        raise PgraftError(f"{loaded.source} names no data set of its own; pass --data (an image folder, .npz or alias)")
    return (data_rows if rows else iter_data)(spec, loaded.image_shape), spec


def _references(loaded: Any, data: Optional[str], eval_data: Optional[str], real: Any, data_id: str,
                feats: Any, kid_subsets: int) -> tuple[str, dict[str, Any]]:
    """FID references by name, the one ``fid``/``kid`` (and gates) use first: ``--eval-data``, else
    the model's ``default_eval_data`` when ``--data`` is not given, else the data itself."""
    from .io.data import iter_data
    from .stages.evaluate import reference

    spec = eval_data or (None if data else loaded.default_eval_data)
    refs = {}
    if spec and spec != data_id:
        try:
            batches = iter_data(spec, loaded.image_shape)
        except PgraftError as exc:  # the same checks as --data, named after the option the user gave
            raise PgraftError(str(exc).replace("--data", "--eval-data", 1)) from None
        refs[spec] = reference(feats, batches, kid_subsets)
    refs[data_id] = reference(feats, real, kid_subsets)
    return next(iter(refs)), refs


def _metrics_table(title: str, rows: list[tuple[str, dict[str, Any]]]) -> Any:
    from rich.console import Group
    from rich.table import Table

    from .stages.evaluate import COST_NOTE
    from .report.ui import warning_lines

    table = Table(title=title, title_justify="left", caption=COST_NOTE, caption_justify="left")
    also = list(rows[0][1].get("also_against") or {})  # FID against further data, e.g. the training data
    for col in ("sampler", "FID", *(f"FID vs {name}" for name in also), "KID", "NFE", "GFLOPs/img", "ms/img", "num"):
        table.add_column(col, justify="left" if col == "sampler" else "right")
    best = min((r["fid"] for _, r in rows if r.get("fid") is not None), default=None)
    for name, r in rows:
        fid = "-" if r.get("fid") is None else f"{r['fid']:.3f}"
        if r.get("fid") is not None and r["fid"] == best and len(rows) > 1:
            fid = f"[green]{fid}[/green]"
        table.add_row(name, fid, *(f"{r['also_against'][a]['fid']:.3f}" for a in also),
                      "-" if r.get("kid") is None else f"{r['kid']:.4f}", str(r["nfe"]),
                      f"{r['flops_per_image'] / 1e9:.3f}", f"{1000 * r['seconds_per_image']:.2f}", str(r["num"]))
    return Group(table, *warning_lines(rows))


@app.command()
def correct(
    model: Annotated[str, typer.Argument(help="Pretrained flow model to correct.")],
    data: DataOpt = None,
    eval_data: EvalDataOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", callback=_safetensors_path, help="Output .safetensors (default RUN_DIR/corrected.safetensors).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Base sampler steps the corrector is fitted for (correct.base_steps).")] = None,
    features: FeaturesOpt = None,
    inception_weights: InceptionOpt = None,
    recipe: RecipeOpt = "inverse-noise",
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    kind: KindOpt = None,
    allow_pickle: PickleOpt = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    fail_if: FailIfOpt = None,
) -> None:
    """Inverse noise correction: invert real data through the flow, train a noise corrector, evaluate.

    Stages (each resumable in the run directory): invert -> train_corrector -> evaluate (base
    sampler vs corrector -> base at the same base steps: FID, KID, NFE, measured FLOPs, time).
    Writes one self-describing .safetensors that `pgraft sample` and `pgraft evaluate` compose
    with its base model automatically.

    Examples:

      pgraft correct digits --recipe inverse-noise

      pgraft correct model.safetensors --data ./images --out corrected.safetensors --steps 4

      pgraft correct digits --set correct.corrector=gaussian --set evaluate.num=500
    """
    import torch

    from .stages.correct import check_correctable, run_invert, run_train_corrector
    from .io.checkpoints import save_corrected
    from .stages.evaluate import evaluate_model, pick_features
    from .io.recipes import SampleConfig
    from .io.runstore import RunStore, atomic_write_text
    from .report.ui import note, progress

    from .report.gates import check_gates, gate_metrics, gate_names, parse_gates
    from .report.html import render_report

    tic = time.perf_counter()
    gates = parse_gates(fail_if, gate_names("correct"))
    rec = _resolve_recipe(recipe, set_, correct__base_steps=steps, evaluate__features=features,
                          evaluate__inception_weights=inception_weights)
    state = _state(rec, device)
    loaded = _load(model, config, kind, allow_pickle, rec)
    if loaded.corrector is not None:
        raise PgraftError(f"{model} is already a corrected model; pass its base model to correct it again")
    check_correctable(loaded)
    dev = _device(rec, device, state)
    loaded.to(dev, getattr(torch, rec.model.dtype))
    rows, data_id = _real_data(loaded, data, rows=True)  # the inversion reads the rows of its undone shards
    run_dir = run_dir or _default_run_dir("correct", {"model": loaded.identity, "data": data_id, "recipe": rec.to_dict()})
    show = not (quiet or as_json) and state.is_main_process
    feats = pick_features(rec.evaluate.features, loaded.image_shape, rec.evaluate.inception_weights or None, dev)
    with RunStore(run_dir, is_main=state.is_main_process) as store:
        atomic_write_text(store.root / "recipe.toml", dump_recipe(rec))
        note(f"run directory: {store.root}", quiet=not show)
        with progress(show) as bar:
            noises, inv = run_invert(loaded, rows.head(rec.correct.num_images), rec.correct, rec.sample.lane,
                                     store, bar)
            corrector, info = run_train_corrector(noises, loaded.sample_shape, rec.correct, loaded.identity,
                                                  store, bar, device=dev)
            eval_cfg = SampleConfig(num=rec.evaluate.num, seed=rec.evaluate.seed, steps=rec.correct.base_steps,
                                    batch_size=rec.sample.batch_size, lane=rec.sample.lane)
            real, _ = _real_data(loaded, data)  # streamed into the reference features
            fid_data, refs = _references(loaded, data, eval_data, real, data_id, feats, rec.evaluate.kid_subsets)
            also = {k: v for k, v in refs.items() if k != fid_data}
            base_metrics = evaluate_model(loaded, None, eval_cfg, feats, store, bar, "evaluate-base",
                                          rec.evaluate.kid_subsets, real_features=refs[fid_data], also_against=also)
            loaded.corrector = corrector.to(dev)
            corr_metrics = evaluate_model(loaded, None, eval_cfg, feats, store, bar, "evaluate-corrected",
                                          rec.evaluate.kid_subsets, real_features=refs[fid_data], also_against=also)
            loaded.corrector = None
        metrics = {"base": base_metrics, "corrected": corr_metrics, "inversion": inv,
                   "corrector": {k: v for k, v in info.items() if k != "loss_curve"}, "data": data_id,
                   "fid_data": fid_data}
        target = out or store.root / "corrected.safetensors"
        save_corrected(target, corrector, loaded, metrics, rec.to_dict(),
                       {"run_dir": str(store.root), "device": dev})
        store.write_json("correct/summary.json", {**metrics, "out": str(target), "loss_curve": info.get("loss_curve")})
    seconds = time.perf_counter() - tic
    summary = {"run_dir": str(store.root), "out": str(target), "out_bytes": target.stat().st_size,
               "seconds": round(seconds, 2), **metrics}
    summary["report"] = str(render_report(store.root, run={"verb": "correct", "device": dev, "seconds": round(seconds, 2),
                                                           "out": str(target)}))
    results = check_gates(gates, gate_metrics(corr_metrics, base_metrics, inv))
    if results:
        summary["gates"] = [r.to_dict() for r in results]
    if as_json:
        print(json.dumps(summary, sort_keys=True, default=float))
        return _gates_verdict(results, quiet=True)
    if quiet:
        return _gates_verdict(results, quiet=True)
    from .report.ui import fmt_bytes, out as console

    console.print(_metrics_table(
        f"inverse noise correction of {loaded.source} ({rec.correct.base_steps} base steps, "
        f"features {base_metrics['features']}, FID against {fid_data})",
        [(f"base ({rec.correct.base_steps} steps)", base_metrics),
         (f"corrected ({corrector.kind}, {corrector.steps} + {rec.correct.base_steps} steps)", corr_metrics)]))
    console.print(f"inversion: {inv['num']} images, {inv['converged']} converged (every step's residual < "
                  f"{rec.correct.inversion_tol:g}), {inv['dropped']} dropped (round-trip RMS > "
                  f"{inv['max_reconstruction_rms']:g} per image); network calls per image mean "
                  f"{inv['iterations_mean']:.1f}, max {inv['iterations_max']} (cap {inv['iterations_cap']})")
    console.print(f"  reconstruction RMS mean {inv['reconstruction_rms_mean']:.4f} "
                  f"(max {inv['reconstruction_rms_max']:.4f}); inverted noise mean {inv['noise_mean']:+.3f}, "
                  f"std {inv['noise_std']:.3f} (N(0, I): 0, 1)")
    console.print(f"corrector: {info['kind']}, {info['parameters']:,} parameters"
                  + (f", final loss {info['final_loss']:.4f}" if info.get("final_loss") else ""))
    console.print(f"[green]wrote[/green] {target} ({fmt_bytes(target.stat().st_size)}); run {store.root}; "
                  f"{seconds:.0f}s")
    console.print(f"report: {summary['report']}")
    _gates_verdict(results, quiet=False)


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="Model, corrected or tuned checkpoint to evaluate.")],
    data: DataOpt = None,
    eval_data: EvalDataOpt = None,
    num: Annotated[Optional[int], typer.Option("--num", "-n", help="Number of samples (evaluate.num).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Base sampler steps (default: the corrector's, else sample.steps).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed (evaluate.seed).")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model of a corrected or fine-tuned checkpoint, if not where it was.")] = None,
    tuned_guidance: Annotated[Optional[str], typer.Option("--tuned-guidance", help="A fine-tune's tuned segment: none (unguided) or reapply (guided again); default: the file's choice.")] = None,
    reward: RewardOpt = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Prompt for text models; repeatable.")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="File with one prompt per line (text models).")] = None,
    features: FeaturesOpt = None,
    inception_weights: InceptionOpt = None,
    recipe: RecipeOpt = "default",
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    kind: KindOpt = None,
    allow_pickle: PickleOpt = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    fail_if: FailIfOpt = None,
) -> None:
    """FID and KID against data, NFE, measured FLOPs and time per image.

    A corrected checkpoint is sampled as corrector -> base. Features: clean-fid's Inception where
    its weights are at hand (--inception-weights PATH), else the bundled digits classifier for
    digits-shaped models; the output says which were used.

    Examples:

      pgraft evaluate digits --num 2000 --json

      pgraft evaluate corrected.safetensors --data digits --num 2000

      pgraft evaluate ./sd2 --data ./coco-val --inception-weights inception-2015-12-05.pt --prompts p.txt
    """
    import torch

    from .io.checkpoints import load_model
    from .stages.evaluate import evaluate_model, pick_features
    from .io.recipes import SampleConfig
    from .io.runstore import RunStore, atomic_write_text
    from .report.gates import check_gates, gate_metrics, gate_names, parse_gates
    from .report.html import render_report
    from .report.ui import note, progress

    tic = time.perf_counter()
    gates = parse_gates(fail_if, gate_names("evaluate", reward=bool(reward)))
    rec = _resolve_recipe(recipe, set_, evaluate__num=num, evaluate__seed=seed, evaluate__steps=steps,
                          evaluate__features=features, evaluate__inception_weights=inception_weights)
    state = _state(rec, device)
    if kind is not None and kind not in ("flow", "diffusion", "auto"):
        raise PgraftError(f"--kind {kind!r} is invalid: use flow or diffusion")
    loaded = load_model(model, config=config, kind=kind or rec.model.kind, allow_pickle=allow_pickle, base=base)
    if tuned_guidance is not None:
        if tuned_guidance not in ("none", "reapply") or not loaded.finetuned:
            raise PgraftError(f"--tuned-guidance {tuned_guidance}: pass none or reapply, for a fine-tuned file "
                              f"(pgraft finetune's output); {model} is {'one' if loaded.finetuned else 'not one'}")
        loaded.tuned_guidance = tuned_guidance
    from .stages.sample import Conditions, check_conditions

    cond = Conditions(prompts=_prompts(prompt, prompts) or None)
    check_conditions(loaded, cond)
    rew = _reward(reward, _device(rec, device, state)) if reward else None
    dev = _device(rec, device, state)
    loaded.to(dev, getattr(torch, rec.model.dtype))
    if loaded.corrector is not None:
        loaded.corrector.to(dev)
        if rec.evaluate.steps is not None and rec.evaluate.steps != loaded.corrector.base_steps:
            raise PgraftError(f"{model} was fitted for {loaded.corrector.base_steps} base steps, not {rec.evaluate.steps}; "
                              f"pass --steps {loaded.corrector.base_steps} or evaluate the base model")
    eval_steps = rec.evaluate.steps or (loaded.corrector.base_steps if loaded.corrector is not None else rec.sample.steps)
    real, data_id = _real_data(loaded, data)  # read batch by batch
    feats = pick_features(rec.evaluate.features, loaded.image_shape, rec.evaluate.inception_weights or None, dev)
    eval_cfg = SampleConfig(num=rec.evaluate.num, seed=rec.evaluate.seed, steps=eval_steps,
                            batch_size=rec.sample.batch_size, lane=rec.sample.lane)
    eval_cfg.guidance_scale = rec.sample.guidance_scale
    run_dir = run_dir or _default_run_dir("evaluate", {"model": loaded.identity, "data": data_id, "recipe": rec.to_dict(),
                                                       "steps": eval_steps, "prompts": cond.prompts})
    show = not (quiet or as_json) and state.is_main_process
    with RunStore(run_dir, is_main=state.is_main_process) as store:
        if state.is_main_process:
            atomic_write_text(store.root / "recipe.toml", dump_recipe(rec))
        note(f"run directory: {store.root}", quiet=not show)
        with progress(show) as bar:
            fid_data, refs = _references(loaded, data, eval_data, real, data_id, feats, rec.evaluate.kid_subsets)
            metrics = evaluate_model(loaded, None, eval_cfg, feats, store, bar, "sample", rec.evaluate.kid_subsets,
                                     real_features=refs[fid_data], also_against={k: v for k, v in refs.items() if k != fid_data},
                                     cond=cond, reward=rew, process_index=state.process_index, num_processes=state.num_processes,
                                     barrier=state.wait_for_everyone if state.num_processes > 1 else None)
        if not state.is_main_process:
            return
        metrics = {**metrics, "model": loaded.source, "data": data_id, "fid_data": fid_data, "run_dir": str(store.root),
                   "corrected": loaded.corrector is not None, "finetuned": loaded.finetuned,
                   "cutoff": loaded.cutoff, "dtype": str(loaded.dtype).removeprefix("torch.")}
        store.write_json("evaluate.json", metrics)
    seconds = time.perf_counter() - tic
    report = render_report(store.root, run={"verb": "evaluate", "device": dev, "seconds": round(seconds, 2)})
    results = check_gates(gates, gate_metrics(metrics))
    if as_json:
        print(json.dumps({**metrics, "report": str(report), "seconds": round(seconds, 2),
                          **({"gates": [r.to_dict() for r in results]} if results else {})}, sort_keys=True, default=float))
    elif not quiet:
        from .report.ui import out as console

        console.print(_metrics_table(f"evaluate {model} against {fid_data} (features {metrics['features']})",
                                     [(f"{_label(metrics)} ({eval_steps} steps)", metrics)]))
        if rew is not None:
            console.print(f"reward {rew.spec}: mean {metrics['reward_mean']:.4f}, std {metrics['reward_std']:.4f}")
        console.print(f"run {store.root}; {seconds:.0f}s; report: {report}")
    _gates_verdict(results, quiet=quiet or as_json)


def _label(metrics: dict[str, Any]) -> str:
    if metrics["corrected"]:
        return "corrected"
    return f"fine-tuned (cutoff {metrics['cutoff']})" if metrics["finetuned"] else "base"


# ================================================================================================


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (of correct, finetune, evaluate or sample).")],
    open_: Annotated[bool, typer.Option("--open", help="Open the report in the default web browser.")] = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Re-render RUN_DIR/report.html: one self-contained page with the metrics, sample grids, plots and provenance.

    correct, finetune and evaluate write it at the end of every run; this renders it again (after
    an upgrade, or for a run that was interrupted before its end).

    Examples:

      pgraft report pgraft-runs/correct-1a2b3c4d5e6f --open
    """
    from .report.html import render_report

    path = render_report(run_dir)
    if as_json:
        print(json.dumps({"run_dir": str(run_dir), "report": str(path)}, sort_keys=True))
    elif not quiet:
        from .report.ui import out as console

        console.print(f"[green]wrote[/green] {path}")
    if open_:
        import webbrowser

        if not webbrowser.open(path.resolve().as_uri()):
            raise PgraftError(f"no web browser could be started; open {path} yourself")


# ================================================================================================


def _version_callback(value: bool) -> None:
    if value:
        print(f"pgraft {__version__}")
        raise typer.Exit()


_debug = False  # set by the global --debug flag; main() then prints the traceback above the error line


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version_callback, is_eager=True,
                                                    help="Print the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Print the full traceback above an error line "
                                                         "(e.g. of an exception inside your own reward function).")] = False,
) -> None:
    global _debug
    _debug = debug


def tune_allocator() -> bool:
    """Keep glibc from handing every mid-sized tensor fresh pages from the kernel.

    glibc serves allocations above its mmap threshold (128 KiB at start, adjusted upwards only
    when a larger mmap'd block is freed) with ``mmap`` and returns them with ``munmap``, so each
    network call of a small lane pays page faults for its activations: measured 20 % slower
    sampling of the digits model in a fresh process (bench/RESULTS.md). A fixed 32 MiB threshold
    (glibc's own maximum) keeps such blocks on the heap for reuse. Returns whether it applied.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 64 << 20))
    except (OSError, AttributeError):
        return False


def main() -> None:
    """Console-script entry: user mistakes become one ``error:`` line and a non-zero exit, never a traceback.

    A :class:`PgraftError` exits with its code (2), a usage error with click's (2), a refused file
    operation with 1; ``--debug`` adds the traceback above the line.
    """
    from .report.ui import error_line

    tune_allocator()
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors: an unknown option, a value of the wrong type ...
        if type(exc).__name__ != "NoArgsIsHelpError":  # (that one: typer has printed the help already)
            ctx = getattr(exc, "ctx", None)
            error_line(" ".join(exc.format_message().split()) + (f"; see '{ctx.command_path} --help'" if ctx else ""))
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except PgraftError as exc:
        _show_traceback()
        error_line(str(exc))
        sys.exit(exc.exit_code)
    except OSError as exc:  # the file system refused: a path, a permission, a full disk
        _show_traceback()
        error_line(_os_error_line(exc))
        sys.exit(1)
    if code == 130:  # typer turns Ctrl-C into exit code 130
        error_line("interrupted; run the same command again to resume from the last finished shard")
    sys.exit(code if isinstance(code, int) else 0)


def _show_traceback() -> None:
    """Under --debug, the traceback of the exception being handled (with its cause) on stderr."""
    if _debug:
        import traceback

        traceback.print_exc()


def _os_error_line(exc: OSError) -> str:
    """``PATH: reason`` of a refused file operation, with what to check."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    reason = (exc.strerror or str(exc)).lower()
    return f"{paths or 'a file operation'}: {reason}; check the path and its permissions (pgraft --debug shows where)"
