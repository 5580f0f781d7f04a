"""The ``pgraft`` command line: each verb parses its options, calls its pipeline and prints the result.

The pipelines (``pipelines/``) resolve the recipe (``--recipe`` + ``--set`` + explicit flags), load the
model, open the run directory, run the stages and write the report; they return plain data, which
this module prints as tables, or as one JSON object with ``--json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import __version__
from .errors import OutputPathError, PgraftError

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
ConfigOpt = Annotated[Optional[str], typer.Option("--config", help="Model config (config.json or diffusers folder) for weights that do not describe themselves; for a single-file SD/SDXL/Flux checkpoint, the diffusers pipeline folder with its configs.")]
KindOpt = Annotated[Optional[str], typer.Option("--kind", help="Override the detected family: flow or diffusion.")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow loading pickle checkpoints (.ckpt/.pt/.bin), which can run code. Only for files you trust.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Hide progress bars and notes.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else there.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or mps (default: the recipe's model.device).")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="Real data: image folder, .npz/.safetensors (tensor 'images'), or alias (digits, digits-train, digits-judge, digits-test). Default: the model's own data set (digits-train for the bundled model).")]
EvalDataOpt = Annotated[Optional[str], typer.Option("--eval-data", help="Held-out data FID/KID are measured against (the numbers gates see); FID against --data is shown beside it. Default: the model's eval data (digits-test for the bundled model) when --data is not given.")]
FeaturesOpt = Annotated[Optional[str], typer.Option("--features", help="FID features: auto, none (skip FID), inception, classifier (the bundled digits classifier), judge (the bundled judge: another architecture trained on another split), clip:PATH or dinov2:PATH (a local transformers folder).")]
InceptionOpt = Annotated[Optional[str], typer.Option("--inception-weights", help="Local clean-fid Inception TorchScript file (inception-2015-12-05.pt).")]
FailIfOpt = Annotated[Optional[list[str]], typer.Option("--fail-if", metavar="'METRIC OP NUMBER'",
                                                        help="CI gate, repeatable: exit 1 when it holds, after writing every output. "
                                                             "Example: --fail-if \"fid>12\" --fail-if \"reward<0.5\" (OP: > >= < <= == !=; "
                                                             "metrics of the result; base.fid etc. for the base model).")]


RewardOpt = Annotated[Optional[str], typer.Option("--reward", help="Reward NAME[:ARGS]: classifier:digits:3, classifier:PATH:CLASS, jpeg-compressibility, jpeg-incompressibility, clip:PATH, pickscore:PATH, aesthetic:PATH, vqascore[:PATH], python:module:function; or a weighted sum \"0.7*pickscore:P+0.3*aesthetic:A\".")]
PromptOpt = Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Prompt for text models; repeatable (image i takes prompt i mod P).")]
PromptsOpt = Annotated[Optional[Path], typer.Option("--prompts", help="File with one prompt per line (text models).")]
ClassOpt = Annotated[Optional[int], typer.Option("--class", help="Class label for class-conditional models (default: i mod classes).")]


def _options(cls: type, given: dict[str, Any]) -> Any:
    """A pipeline's options from a command's parameters (``set_`` is ``sets``; ``--json`` implies quiet)."""
    given = {("sets" if k == "set_" else k): v for k, v in given.items()}
    given["quiet"] = given.get("quiet", False) or given.get("as_json", False)
    return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given})


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
    from .io.recipes import load_recipe
    from .pipelines.skeleton import load

    info = describe(load(model, config, kind, allow_pickle, load_recipe("default")))
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return
    from .report.ui import inspect_table, out

    out.print(inspect_table(model, info))


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
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    class_label: ClassOpt = None,
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
    (64 images are the prefix of 3000) and however many processes share the work. The default lane
    "auto" is min(16, --num) (capped by GPU memory), so under 16 images fix it (--set sample.lane=16)
    to keep that promise; the lane used is in sampler.json.

    Examples:

      pgraft sample digits --num 64 --seed 0 --steps 16 --out samples/

      pgraft sample ./sd2-base --prompt "a red cube on a blue sphere" --num 8 --out out/

      accelerate launch --num_processes 2 -m pgraft_cli sample digits --num 3000 --out big/
    """
    from .pipelines.sample import SampleOptions, sample as sample_pipeline

    _show_sample(sample_pipeline(model, _options(SampleOptions, locals())), as_json, quiet)


def _show_sample(summary: Optional[dict[str, Any]], as_json: bool, quiet: bool) -> None:
    if summary is None:  # another process of a multi-process run
        return
    if as_json:
        print(json.dumps(summary, sort_keys=True))
    elif not quiet:
        from .report.ui import out as console

        done = summary["num"] - summary["generated_now"]
        console.print(f"[green]wrote[/green] {summary['num']} images to {summary['out']}"
                      f"{f' ({done} already done)' if done else ''} in {summary['seconds']:.1f}s")


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
    from .pipelines.run import run as run_pipeline

    verb, outcome = run_pipeline(model, recipe, set_, run_dir, config, kind, allow_pickle, device, quiet or as_json)
    {"sample": _show_sample, "finetune": _show_finetune, "correct": _show_correct}[verb](outcome, as_json, quiet)


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
    from .report.ui import out, status_table

    out.print(status_table(run_dir, stages))


# ================================================================================================
# GRAFT / P-GRAFT: score, filter, finetune


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
    from .pipelines.finetune import score as score_pipeline

    summary = score_pipeline(run_dir, reward, stage, recipe, set_, quiet or as_json)
    if as_json:
        print(json.dumps(summary, sort_keys=True))
    elif not quiet:
        from .report.ui import out as console

        console.print(f"[green]scored[/green] {summary['num']} samples with {summary['reward']}: mean "
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
    from .pipelines.finetune import filter_ as filter_pipeline

    summary = filter_pipeline(run_dir, stage, recipe, set_, filter__rule=rule, filter__k=k, filter__m=m,
                              filter__threshold=threshold, filter__quantile=quantile, filter__dedup=dedup)
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
    lora_rank: Annotated[Optional[int], typer.Option("--lora-rank", help="LoRA rank (0: full fine-tuning; default auto: LoRA above finetune.lora_above parameters).")] = None,
    data: DataOpt = None,
    eval_data: EvalDataOpt = None,
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    class_label: ClassOpt = None,
    features: FeaturesOpt = None,
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
    from .pipelines.finetune import FinetuneOptions, finetune as finetune_pipeline

    _show_finetune(finetune_pipeline(model, _options(FinetuneOptions, locals())), as_json, quiet)


def _show(outcome: Optional[tuple[Any, ...]], as_json: bool, quiet: bool, render: Any) -> None:
    """A verb's summary as JSON or ``render(summary)``, then its gates (nothing on other processes)."""
    if outcome is None:  # another process of a multi-process run
        return
    summary, results = outcome[0], outcome[1]
    if as_json:
        print(json.dumps(summary, sort_keys=True, default=float))
    elif not quiet:
        render(summary)
    _gates_verdict(results, quiet=quiet or as_json)


def _render_finetune(summary: dict[str, Any]) -> None:
    from .report.ui import finetune_report, out as console

    console.print(finetune_report(summary))
    console.print(f"trained: {summary['tuning']}")
    _wrote(summary)


def _show_finetune(outcome: Optional[tuple[dict[str, Any], list[Any]]], as_json: bool, quiet: bool) -> None:
    _show(outcome, as_json, quiet, _render_finetune)


def _wrote(summary: dict[str, Any]) -> None:
    """The file a verb wrote, its run directory, time and report."""
    from .report.ui import fmt_bytes, out as console

    console.print(f"[green]wrote[/green] {summary['out']} ({fmt_bytes(summary['out_bytes'])}); run {summary['run_dir']}; "
                  f"{summary['seconds']:.0f}s")
    console.print(f"report: {summary['report']}")


# ================================================================================================
# inverse noise correction, evaluation


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
    from .pipelines.correct import CorrectOptions, correct as correct_pipeline

    _show_correct(correct_pipeline(model, _options(CorrectOptions, locals())), as_json, quiet)


def _show_correct(outcome: Optional[tuple[dict[str, Any], list[Any], dict[str, Any]]], as_json: bool,
                  quiet: bool) -> None:
    def render(summary: dict[str, Any]) -> None:
        from .report.ui import correct_report, out as console

        for part in correct_report(summary, outcome[2]):
            console.print(part)
        _wrote(summary)

    _show(outcome, as_json, quiet, render)


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
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    features: FeaturesOpt = None,
    inception_weights: InceptionOpt = None,
    best_of: Annotated[Optional[int], typer.Option("--best-of", help="Samples per prompt; reports the mean over prompts of each prompt's best reward (the paper's protocol).")] = None,
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

      pgraft evaluate ./sd2 --prompts p.txt --reward vqascore:./vlm --best-of 4   (reward only: no FID)
    """
    from .pipelines.evaluate import EvaluateOptions, evaluate as evaluate_pipeline

    outcome = evaluate_pipeline(model, _options(EvaluateOptions, locals()))
    _show(outcome, as_json, quiet, lambda summary: _render_evaluate(model, summary))


def _render_evaluate(model: str, summary: dict[str, Any]) -> None:
    from .report.ui import metrics_table, out as console

    label = "corrected" if summary["corrected"] else (
        f"fine-tuned (cutoff {summary['cutoff']})" if summary["finetuned"] else "base")
    against = f" against {summary['fid_data']}" if summary.get("fid_data") else ""
    console.print(metrics_table(f"evaluate {model}{against} (features {summary['features'] or 'none'})",
                                [(f"{label} ({summary['steps']} steps)", summary)]))
    if summary.get("reward"):
        best = (f"; best of {summary['best_of']} over {summary['groups']} groups: mean {summary['reward_best_of_mean']:.4f}, "
                f"std {summary['reward_best_of_std']:.4f}" if summary.get("best_of") else "")
        console.print(f"reward {summary['reward']}: mean {summary['reward_mean']:.4f}, std {summary['reward_std']:.4f}{best}")
    console.print(f"run {summary['run_dir']}; {summary['seconds']:.0f}s; report: {summary['report']}")


@app.command()
def stats(
    data: Annotated[str, typer.Argument(help="Reference images: a folder, .npz or .safetensors file, or alias.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The stats file to write (.npz).")],
    features: FeaturesOpt = "auto",
    shape: Annotated[Optional[str], typer.Option("--shape", help="Images' CxHxW (the model's); digits: 1x16x16.")] = None,
    inception_weights: InceptionOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Precompute DATA's FID reference statistics (mean, covariance, feature rows) once: pass the
    file as --data to evaluate, finetune or correct's FID, without the images.

    Examples:

      pgraft stats ./coco-val --features dinov2:./dinov2-base --shape 3x512x512 --out coco-dinov2.npz
    """
    from .pipelines.evaluate import stats as stats_pipeline

    summary = stats_pipeline(data, features or "auto", out, shape, inception_weights, device or "cpu")
    print(json.dumps(summary, sort_keys=True) if as_json else f"wrote {summary['out']}: {summary['num']} images, "
          f"{summary['dim']}-d {summary['features']} features")


# ================================================================================================
# export


@app.command()
def export(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint: a plain model, or a file written by pgraft correct / finetune.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (refused if it is not empty, unless --force).")],
    format: Annotated[str, typer.Option("--format", "-f", help="diffusers (a pipeline folder), lora (the adapter) or single-file (fused weights, SD 1.x/2.x).")] = "diffusers",
    lora_format: Annotated[str, typer.Option("--lora-format", help="With --format lora: diffusers (load_lora_weights) or kohya (ComfyUI, A1111).")] = "diffusers",
    keep_adapter: Annotated[bool, typer.Option("--keep-adapter", help="GRAFT LoRA at cutoff 0: write the base pipeline plus the adapter, not the fused network.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Weights' dtype: float32, float16 or bfloat16 (default: the checkpoint's).")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model of a corrected / fine-tuned checkpoint, if not where it was.")] = None,
    config: ConfigOpt = None,
    kind: KindOpt = None,
    allow_pickle: PickleOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write CHECKPOINT as files other tools read without pgraft.

    Examples:

      pgraft export tuned.safetensors --out tuned-pipe/     (DiffusionPipeline.from_pretrained(..., trust_remote_code=True))

      pgraft export tuned.safetensors --out lora/ --format lora --lora-format kohya

      pgraft export tuned.safetensors --out sd/ --format single-file --dtype float16   (ComfyUI, A1111)
    """
    from .pipelines.export import ExportOptions, export as export_pipeline

    summary = export_pipeline(checkpoint, out, _options(ExportOptions, locals()))
    if as_json:
        print(json.dumps(summary, sort_keys=True))
        return
    from .report.ui import out as console

    console.print(f"wrote {summary['format']} export of {checkpoint} to {out}: {', '.join(summary['files'])}")
    if summary.get("note"):
        console.print(f"note: {summary['note']}")


# ================================================================================================
# report


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
# recipes

recipes_app = typer.Typer(help="The bundled recipes: list them, show one, copy one to edit.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("ls")
def recipes_ls(as_json: JsonOpt = False) -> None:
    """List the bundled recipes with their descriptions.

    Example:

      pgraft recipes ls
    """
    from .io.recipes import available_recipes, load_recipe

    found = {name: load_recipe(name).description for name in available_recipes()}
    if as_json:
        print(json.dumps(found, sort_keys=True))
        return
    from rich.table import Table

    from .report.ui import out

    table = Table(title="recipes (pgraft recipes show NAME; pgraft recipes cp NAME my.toml)", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("description")
    for name, description in found.items():
        table.add_row(name, description)
    out.print(table)


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="A recipe name (pgraft recipes ls) or a .toml path.")]) -> None:
    """Print a recipe file as it is.

    Example:

      pgraft recipes show pgraft
    """
    from .io.recipes import find_recipe

    sys.stdout.write(find_recipe(name).read_text())


@recipes_app.command("cp")
def recipes_cp(
    name: Annotated[str, typer.Argument(help="A recipe name (pgraft recipes ls).")],
    dest: Annotated[Path, typer.Argument(help="Where to write the copy: a .toml file, or a folder for NAME.toml.")],
) -> None:
    """Copy a bundled recipe to edit it; run it with --recipe DEST.

    Example:

      pgraft recipes cp pgraft my-pgraft.toml && pgraft finetune digits --recipe my-pgraft.toml
    """
    from .io.recipes import find_recipe
    from .io.runstore import atomic_write_text

    source = find_recipe(name)
    target = dest / source.name if dest.is_dir() else dest
    if target.exists():
        raise OutputPathError(f"{target} exists; pass a new file name (pgraft never overwrites a recipe)")
    if target.suffix != ".toml":
        raise OutputPathError(f"{target} does not end in .toml; pass e.g. {target.with_suffix('.toml')}")
    _check_writable(target, "DEST", is_file=True)
    atomic_write_text(target, source.read_text())
    print(target)



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
