"""The ``pgraft`` command line: each verb parses its options, calls its pipeline and prints the result.

The pipelines (``pipelines/``) resolve the recipe (``--recipe`` + ``--set`` + explicit flags), load the
model, open the run directory, run the stages and write the report; they return an ``Outcome``, which
``cli_options.show`` prints as tables, or as one JSON object with ``--json``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .cli_options import (DATA, DEVICE, FEATURES, GATES, JSON, LOAD, OUTPUT, PROMPTS, RUN, BaseOpt, ClassOpt, DebugOpt,
                          ENDED_BY, JudgeOpt, LogWithOpt, ModelArg, RewardOpt, RunArg, StageOpt, StopIfOpt, VersionOpt,
                          exit_code, png_folder, recipe, safetensors_path, show, takes)

app = typer.Typer(
    name="pgraft",
    help=(
        "Model surgery for diffusion and flow checkpoints: GRAFT / P-GRAFT fine-tuning and inverse "
        "noise correction (arXiv 2510.02692), as resumable runs that end in a checkpoint and a report.\n\n"
        "Try it on the bundled model:  pgraft sample digits --num 16 --out samples/"
    ),
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


# -- inspect, sample, run, status ------------------------------------------------------------------


@app.command()
@takes(LOAD, JSON)
def inspect(model: ModelArg, **shared: Any) -> None:
    """Describe a model: family and prediction type, conditioning, shapes, size, scheduler, provenance.

    Examples:

      pgraft inspect digits

      pgraft inspect ./stable-diffusion-2-base --json

      pgraft inspect weights.safetensors --config ./my-unet/config.json
    """
    from .pipelines.tools import inspect as inspect_pipeline
    show(inspect_pipeline(model, shared["config"], shared["kind"], shared["allow_pickle"]), shared)


@app.command()
@takes(PROMPTS, recipe(), RUN, OUTPUT)
def sample(
    model: Annotated[str, typer.Argument(help="Model to sample from (alias, folder, .safetensors or hub id).")],
    num: Annotated[Optional[int], typer.Option("--num", "-n", help="Number of images.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed; image i depends only on (seed, i).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Solver steps (flow: Euler, diffusion: DDIM).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Images per shard (a multiple of sample.lane); never changes the images.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", callback=png_folder, help="Folder for the PNGs (00000.png ...) and sampler.json; default RUN_DIR/images.")] = None,
    class_label: ClassOpt = None,
    capture_at: Annotated[Optional[float], typer.Option("--capture-at", help="Also store each trajectory's state at this noise level (P-GRAFT's cutoff).")] = None,
    guidance_scale: Annotated[Optional[float], typer.Option("--guidance-scale", help="Classifier-free guidance for text models and class models with a null class.")] = None,
    base: BaseOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the images of another sampling (model, seed, steps, prompts ...) in --out.")] = False,
    **shared: Any,
) -> None:
    """Draw images from MODEL into a resumable run and write them as PNGs.

    Image i starts from noise seeded by (seed, i) and always goes through the network in the same
    lane of sample.lane images, so the same seed gives the same bytes whatever --batch-size or --num
    (64 images are the prefix of 3000) and however many processes share the work. The default lane
    "auto" is min(16, --num) on a GPU (capped by its memory), min(64, --num) on the CPU, so for small runs fix it (--set sample.lane=16)
    to keep that promise; the lane used is in sampler.json.

    Examples:

      pgraft sample digits --num 64 --seed 0 --steps 16 --out samples/

      pgraft sample ./sd2-base --prompt "a red cube on a blue sphere" --num 8 --out out/

      accelerate launch --num_processes 2 -m pgraft_cli sample digits --num 3000 --out big/
    """
    from .pipelines.sample import SampleOptions, sample as sample_pipeline
    show(sample_pipeline(model, SampleOptions.of(locals())), shared)


@app.command()
@takes(recipe(), RUN, OUTPUT)
def run(model: Annotated[str, typer.Argument(help="Model the recipe works on.")], **shared: Any) -> None:
    """Run every stage a recipe lists under \\[run] stages, resuming what is already done.

    Examples:

      pgraft run digits --recipe default --set sample.num=256

      pgraft run digits --recipe my-recipe.toml --run-dir runs/exp1
    """
    from .pipelines.run import ModelOptions, run as run_pipeline
    show(run_pipeline(model, ModelOptions.of(locals())), shared)


@app.command()
@takes(JSON)
def status(run_dir: RunArg, **shared: Any) -> None:
    """Show each stage of a run directory as done, partial (with shard counts), pending or stale.

    Example:

      pgraft status pgraft-runs/sample-1a2b3c4d5e6f
    """
    from .pipelines.tools import status as status_pipeline
    show(status_pipeline(run_dir), shared)


# -- GRAFT / P-GRAFT: score, filter, finetune ------------------------------------------------------


@app.command()
@takes(recipe(), OUTPUT)
def score(
    run_dir: Annotated[Path, typer.Argument(help="Run directory whose samples to score.")],
    reward: RewardOpt = None,
    stage: StageOpt = "sample",
    **shared: Any,
) -> None:
    """Score a run's samples with a reward; a new reward re-scores without re-sampling.

    Examples:

      pgraft sample digits --num 256 --capture-at 0.5 --run-dir runs/d3

      pgraft score runs/d3 --reward classifier:digits:3

      pgraft score runs/d3 --reward python:my_rewards:brightness
    """
    from .pipelines.finetune import ScoreOptions, score as score_pipeline
    show(score_pipeline(run_dir, ScoreOptions.of(locals())), shared)


@app.command(name="filter")
@takes(recipe(), OUTPUT)
def filter_(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with scored samples.")],
    rule: Annotated[Optional[str], typer.Option("--rule", help="top_k (k of m per prompt), best_of_n (1 of m), threshold.")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="Keep k per group (top_k).")] = None,
    m: Annotated[Optional[int], typer.Option("--m", help="Group size: samples per prompt / class (top_k, best_of_n).")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Keep rewards >= this value (threshold).")] = None,
    quantile: Annotated[Optional[float], typer.Option("--quantile", help="Keep rewards >= this quantile (threshold).")] = None,
    dedup: Annotated[Optional[bool], typer.Option("--dedup/--no-dedup", help="Keep one of near-identical kept samples.")] = None,
    stage: StageOpt = "sample",
    **shared: Any,
) -> None:
    """Keep scored samples by a rejection rule and show the tilt it applies (GRAFT, arXiv 2510.02692).

    Prints how many were kept, the reward distribution before and after (a histogram) and the
    reshaped reward rhat = log P(accept | F(r)) of the rule.

    Examples:

      pgraft filter runs/d3 --rule top_k --k 1 --m 4

      pgraft filter runs/d3 --rule threshold --quantile 0.75 --dedup
    """
    from .pipelines.finetune import FilterOptions, filter_ as filter_pipeline
    show(filter_pipeline(run_dir, FilterOptions.of(locals())), shared)


@app.command()
@takes(DATA, PROMPTS, FEATURES, recipe("pgraft"), RUN, OUTPUT, GATES)
def finetune(
    model: Annotated[str, typer.Argument(help="Model to fine-tune (alias, folder, .safetensors or hub id).")],
    reward: RewardOpt = None,
    cutoff: Annotated[Optional[float], typer.Option("--cutoff", help="P-GRAFT cutoff c in [0, 1): the tuned model runs t in (c, 1], the base [0, c]; 0 is GRAFT.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", callback=safetensors_path, help="Output .safetensors (default RUN_DIR/tuned.safetensors).")] = None,
    rounds: Annotated[Optional[int], typer.Option("--rounds", help="Rounds of sample -> score -> filter -> fine-tune.")] = None,
    lora_rank: Annotated[Optional[int], typer.Option("--lora-rank", help="LoRA rank (0: full fine-tuning; default auto: LoRA above finetune.lora_above parameters).")] = None,
    class_label: ClassOpt = None,
    judge: JudgeOpt = None,
    stop_if: StopIfOpt = None,
    log_with: LogWithOpt = None,
    **shared: Any,
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
    show(finetune_pipeline(model, FinetuneOptions.of(locals())), shared)


# -- inverse noise correction, evaluation, report --------------------------------------------------


@app.command()
@takes(DATA, FEATURES, recipe("inverse-noise"), RUN, OUTPUT, GATES)
def correct(
    model: Annotated[str, typer.Argument(help="Pretrained flow model to correct.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", callback=safetensors_path, help="Output .safetensors (default RUN_DIR/corrected.safetensors).")] = None,
    captions: Annotated[Optional[str], typer.Option("--captions", help="Text models: one caption per line, in data order (default: captions.txt in the image folder).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Base sampler steps the corrector is fitted for (correct.base_steps).")] = None,
    **shared: Any,
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
    show(correct_pipeline(model, CorrectOptions.of(locals())), shared)


@app.command()
@takes(DATA, PROMPTS, FEATURES, recipe(), RUN, OUTPUT, GATES)
def evaluate(
    model: Annotated[str, typer.Argument(help="Model, corrected or tuned checkpoint to evaluate.")],
    num: Annotated[Optional[int], typer.Option("--num", "-n", help="Number of samples (evaluate.num).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Base sampler steps (default: a corrector's; a fine-tuned file's own evaluation's; else evaluate.steps or sample.steps).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed (evaluate.seed).")] = None,
    base: BaseOpt = None,
    tuned_guidance: Annotated[Optional[str], typer.Option("--tuned-guidance", help="A fine-tune's tuned segment: none (unguided) or reapply (guided again); default: the file's choice.")] = None,
    reward: RewardOpt = None,
    best_of: Annotated[Optional[int], typer.Option("--best-of", help="Samples per prompt; reports the mean over prompts of each prompt's best reward (the paper's protocol).")] = None,
    **shared: Any,
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
    show(evaluate_pipeline(model, EvaluateOptions.of(locals())), shared)


@app.command()
@takes(FEATURES, DEVICE, JSON)
def stats(
    data: Annotated[str, typer.Argument(help="Reference images: a folder, .npz or .safetensors file, or alias.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The stats file to write (.npz).")],
    shape: Annotated[Optional[str], typer.Option("--shape", help="Images' CxHxW (the model's); digits: 1x16x16.")] = None,
    **shared: Any,
) -> None:
    """Precompute DATA's FID reference statistics (mean, covariance, feature rows) once: pass the
    file as --data to evaluate, finetune or correct's FID, without the images.

    Examples:

      pgraft stats ./coco-val --features dinov2:./dinov2-base --shape 3x512x512 --out coco-dinov2.npz
    """
    from .pipelines.evaluate import StatsOptions, stats as stats_pipeline
    show(stats_pipeline(data, StatsOptions.of(locals())), shared)


@app.command()
@takes(LOAD, recipe(), JSON)
def export(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint: a plain model, or a file written by pgraft correct / finetune.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (refused if it is not empty, unless --force).")],
    format: Annotated[str, typer.Option("--format", "-f", help="diffusers (a pipeline folder), lora (the adapter) or single-file (fused weights, SD 1.x/2.x/XL, SD3/3.5, Flux.1).")] = "diffusers",
    lora_format: Annotated[str, typer.Option("--lora-format", help="With --format lora: diffusers (load_lora_weights) or kohya (ComfyUI, A1111).")] = "diffusers",
    keep_adapter: Annotated[bool, typer.Option("--keep-adapter", help="GRAFT LoRA at cutoff 0: write the base pipeline plus the adapter, not the fused network.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Weights' dtype: float32, float16 or bfloat16 (default: the recipe's model.dtype, float32, not the checkpoint's).")] = None,
    base: BaseOpt = None,
    **shared: Any,
) -> None:
    """Write CHECKPOINT as files other tools read without pgraft.

    Examples:

      pgraft export tuned.safetensors --out tuned-pipe/     (DiffusionPipeline.from_pretrained(..., trust_remote_code=True))

      pgraft export tuned.safetensors --out lora/ --format lora --lora-format kohya

      pgraft export tuned.safetensors --out sd/ --format single-file --dtype float16   (ComfyUI, A1111)
    """
    from .pipelines.export import ExportOptions, export as export_pipeline
    show(export_pipeline(checkpoint, out, ExportOptions.of(locals())), shared)


@app.command()
@takes(OUTPUT)
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (of correct, finetune, evaluate or sample).")],
    open_: Annotated[bool, typer.Option("--open", help="Open the report in the default web browser.")] = False,
    **shared: Any,
) -> None:
    """Re-render RUN_DIR/report.html: one self-contained page with the metrics, sample grids, plots and provenance.

    correct, finetune and evaluate write it at the end of every run; this renders it again (after
    an upgrade, or for a run that was interrupted before its end).

    Examples:

      pgraft report pgraft-runs/correct-1a2b3c4d5e6f --open
    """
    from .pipelines.tools import report as report_pipeline
    show(report_pipeline(run_dir, open_), shared)


# -- recipes ---------------------------------------------------------------------------------------

recipes_app = typer.Typer(help="The bundled recipes: list them, show one, copy one to edit.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("ls")
@takes(JSON)
def recipes_ls(**shared: Any) -> None:
    """List the bundled recipes with their descriptions.

    Example:

      pgraft recipes ls
    """
    from .pipelines.tools import recipes_ls as ls
    show(ls(), shared)


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="A recipe name (pgraft recipes ls) or a .toml path.")]) -> None:
    """Print a recipe file as it is.

    Example:

      pgraft recipes show pgraft
    """
    from .pipelines.tools import recipe_text
    sys.stdout.write(recipe_text(name))


@recipes_app.command("cp")
def recipes_cp(
    name: Annotated[str, typer.Argument(help="A recipe name (pgraft recipes ls).")],
    dest: Annotated[Path, typer.Argument(help="Where to write the copy: a .toml file, or a folder for NAME.toml.")],
) -> None:
    """Copy a bundled recipe to edit it; run it with --recipe DEST.

    Example:

      pgraft recipes cp pgraft my-pgraft.toml && pgraft finetune digits --recipe my-pgraft.toml
    """
    from .pipelines.tools import recipes_cp as cp
    print(cp(name, dest))


_debug = False  # set by the global --debug flag; main() then prints the traceback above the error line


@app.callback()
def _root(version: VersionOpt = None, debug: DebugOpt = False) -> None:
    global _debug
    _debug = debug


def main() -> None:
    """The command line (the ``pgraft`` executable enters through ``console``): user mistakes become one
    ``error:`` line and a non-zero exit, never a traceback (``cli_options.exit_code``); ``--debug`` adds the
    traceback above the line."""
    from .io.host import skip_final_collection, tune_allocator
    from .report.ui import error_line

    tune_allocator()
    try:
        code = app(standalone_mode=False)
    except ENDED_BY as exc:
        code = exit_code(exc, _debug)
    skip_final_collection()  # console: the process ends here, its last collection would rescan every import
    if code == 130:  # Ctrl-C (typer also turns it into exit code 130)
        error_line("interrupted; run the same command again to resume from the last finished shard")
    sys.exit(code if isinstance(code, int) else 0)


def console() -> None:
    """The ``pgraft`` executable (and ``python -m pgraft_cli``): ``main`` in a process that runs one command
    and exits, so the garbage collector may skip what lives until the exit (``io.host.one_command_process``).
    Tests call ``main`` in their own long-lived process, which must not freeze anything."""
    from .io.host import one_command_process

    one_command_process()
    main()
