"""The command line's options, declared once: each verb names the groups it takes (:func:`takes`);
how a verb's outcome is shown (:func:`show`) and how an error ends a command (:func:`exit_code`).

Output paths are checked here, in Typer callbacks, so a path pgraft cannot write is refused before
any work starts.
"""

from __future__ import annotations

import functools
import inspect
import json
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from . import __version__
from .errors import OutputPathError, PgraftError
from .io.host import check_writable

# -- output paths: refused before any work -------------------------------------------------------


def _folder_path(flag: str) -> Callable[[Optional[Path]], Optional[Path]]:
    """A typer callback for an option naming a folder pgraft writes into."""

    def check(value: Optional[Path]) -> Optional[Path]:
        if value is not None:
            if value.exists() and not value.is_dir():
                raise OutputPathError(f"{flag} {value} is a file, but a folder is expected; pass a folder path")
            check_writable(value, flag)
        return value

    return check


def png_folder(value: Optional[Path]) -> Optional[Path]:
    """``pgraft sample --out``: a writable folder that holds no images pgraft did not write."""
    from .stages.sample import check_png_folder

    if _folder_path("--out")(value) is not None:
        check_png_folder(value)
    return value


def safetensors_path(value: Optional[Path]) -> Optional[Path]:
    """``--out`` of a verb that writes one .safetensors file."""
    if value is not None:
        if value.is_dir():
            raise OutputPathError(f"--out {value} is a folder, but a .safetensors file is expected; "
                                  f"pass a file path such as {value / 'model.safetensors'}")
        if value.suffix.lower() != ".safetensors":
            raise OutputPathError(f"--out {value} does not end in .safetensors, the one format pgraft writes; "
                                  f"pass e.g. {value.with_suffix('.safetensors')}")
        check_writable(value, "--out", is_file=True)
    return value


# -- options of more than one verb ---------------------------------------------------------------
RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="Recipe name (see recipes/) or path to a .toml file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", metavar="SECTION.KEY=VALUE",
                                             help="Override one recipe key; repeatable. Example: --set sample.steps=16")]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", callback=_folder_path("--run-dir"), help="Run directory (default: ./pgraft-runs/<verb>-<config hash>); re-running resumes it.")]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", help="Model config (config.json or diffusers folder) for weights that do not describe themselves; for a single-file SD/SDXL/Flux checkpoint, the diffusers pipeline folder with its configs.")]
KindOpt = Annotated[Optional[str], typer.Option("--kind", help="Override the detected family: flow or diffusion.")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow loading pickle checkpoints (.ckpt/.pt/.bin), which can run code. Only for files you trust.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors and failed gates (no progress, notes or results; --json still prints the results).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else there.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or mps (default: the recipe's model.device).")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="Real data: image folder, .npz/.safetensors (tensor 'images'), or alias (digits, digits-train, digits-judge, digits-test). Default: the model's own data set (digits-train for the bundled model).")]
EvalDataOpt = Annotated[Optional[str], typer.Option("--eval-data", help="Held-out data FID/KID are measured against (the numbers gates see); FID against --data is shown beside it. Default: the model's eval data (digits-test for the bundled model) when --data is not given.")]
FeaturesOpt = Annotated[Optional[str], typer.Option("--features", help="FID features: auto, none (skip FID), inception, classifier (the bundled digits classifier), judge (the bundled judge: another architecture trained on another split), clip:PATH or dinov2:PATH (a local transformers folder).")]
InceptionOpt = Annotated[Optional[str], typer.Option("--inception-weights", help="Local clean-fid Inception TorchScript file (inception-2015-12-05.pt).")]
FailIfOpt = Annotated[Optional[list[str]], typer.Option("--fail-if", metavar="'METRIC OP NUMBER'",
                                                help="CI gate, repeatable: exit 1 when it holds, after writing every output. "
                                                     "Example: --fail-if \"fid>12\" --fail-if \"reward<-6\" (OP: > >= < <= == !=; "
                                                     "metrics of the result; base.fid etc. for the base model).")]
RewardOpt = Annotated[Optional[str], typer.Option("--reward", help="Reward NAME[:ARGS]: classifier:digits:3, classifier:PATH:CLASS, jpeg-compressibility, jpeg-incompressibility, clip:PATH, pickscore:PATH, aesthetic:PATH, vqascore[:PATH], python:module:function; or a weighted sum \"0.7*pickscore:P+0.3*aesthetic:A\".")]
PromptOpt = Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Prompt for text models; repeatable (image i takes prompt i mod P).")]
PromptsOpt = Annotated[Optional[Path], typer.Option("--prompts", help="File with one prompt per line (text models).")]
ClassOpt = Annotated[Optional[int], typer.Option("--class", help="Class label for class-conditional models (default: i mod classes).")]
JudgeOpt = Annotated[Optional[list[str]], typer.Option("--judge", metavar="[NAME=]REWARD", help="A reward measured on every round's samples and on base/tuned, never optimised (repeatable); gates and --stop-if call it judge.NAME.")]
StopIfOpt = Annotated[Optional[list[str]], typer.Option("--stop-if", help='End the rounds early, e.g. "judge.NAME dropped by more than 0.5" or "fid rose by more than 10%" (against round 1; the final model against the base on the evaluation seeds); the checkpoint is the last model that passed.')]
LogWithOpt = Annotated[Optional[str], typer.Option("--log-with", help="Log training and per-round metrics to tensorboard or wandb (accelerate's trackers) in the run directory; off by default.")]
BaseOpt = Annotated[Optional[str], typer.Option("--base", help="Base model of a corrected or fine-tuned checkpoint, if not where it was.")]
StageOpt = Annotated[str, typer.Option("--stage", help="Sample stage to read (sample-r2 ... for later rounds, evaluate-tuned ...); written to score-<stage>, filter-<stage> (score, score-r2 for sample, sample-r2).")]
ModelArg = Annotated[str, typer.Argument(help="Model: bundled alias (digits), diffusers folder, .safetensors file or hub id.")]
RunArg = Annotated[Path, typer.Argument(help="A run directory.")]


# -- groups of options a verb takes with one word -------------------------------------------------
def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def recipe(default: str = "default") -> tuple[inspect.Parameter, ...]:
    """``--recipe`` (with the verb's default recipe) and ``--set``."""
    return _param("recipe", RecipeOpt, default), _param("set_", SetOpt, None)


LOAD = (_param("config", ConfigOpt, None), _param("kind", KindOpt, None), _param("allow_pickle", PickleOpt, False))
DEVICE = (_param("device", DeviceOpt, None),)
RUN = (_param("run_dir", RunDirOpt, None), *LOAD, *DEVICE)
JSON = (_param("as_json", JsonOpt, False),)
OUTPUT = (_param("quiet", QuietOpt, False), *JSON)
GATES = (_param("fail_if", FailIfOpt, None),)
FEATURES = (_param("features", FeaturesOpt, None), _param("inception_weights", InceptionOpt, None))
DATA = (_param("data", DataOpt, None), _param("eval_data", EvalDataOpt, None))
PROMPTS = (_param("prompt", PromptOpt, None), _param("prompts", PromptsOpt, None))


def takes(*groups: tuple[inspect.Parameter, ...]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the ``groups`` of shared options to a verb (after its own); it receives them in ``**shared``.

    Typer reads a command's options from its signature, so the verb's signature is extended: each
    shared option is declared (name, help, default) once, in this module, whichever verbs take it.
    """

    def wrap(verb: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(verb, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]

        @functools.wraps(verb)
        def command(**kwargs: Any) -> Any:
            return verb(**kwargs)

        command.__signature__ = sig.replace(parameters=own + [p for g in groups for p in g])  # type: ignore[attr-defined]
        return command

    return wrap


# -- the root's options, a verb's output, the error line that ends a command ----------------------
def _print_version(value: bool) -> None:
    if value:
        print(f"pgraft {__version__}")
        raise typer.Exit()


VersionOpt = Annotated[Optional[bool], typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Print the full traceback above an error line (e.g. of an exception inside your own reward function).")]


def show(outcome: Any, shared: dict[str, Any]) -> None:
    """A verb's outcome as one JSON object (``--json``) or its terminal view, then its gates (exit 1 if one
    failed); nothing on the other processes of a multi-process run, whose outcome is None."""
    from .report.ui import gate_lines, out

    if outcome is None:
        return
    as_json, quiet = shared.get("as_json", False), shared.get("quiet", False)
    if as_json:
        print(json.dumps(outcome.summary, sort_keys=True, default=float, indent=outcome.indent))
    elif not quiet:
        for part in outcome.view:
            out.print(part)
    if gate_lines(outcome.gates, quiet=quiet or as_json):
        raise typer.Exit(1)


# what ends a command with an error line: a usage error, an interruption, a user mistake, a refused file operation
ENDED_BY = (typer.TyperException, typer.Abort, KeyboardInterrupt, PgraftError, OSError)


def exit_code(exc: BaseException, debug: bool) -> int:
    """The exit code of a command ended by ``exc``, after its one ``error:`` line (``debug``: the traceback above it).

    A :class:`PgraftError` exits with its code (2), a usage error with click's (2), a refused file
    operation with 1, an interruption with 130 (its line is the caller's).
    """
    from .report.ui import error_line, os_error_line

    if isinstance(exc, (typer.Abort, KeyboardInterrupt)):
        return 130
    if isinstance(exc, typer.TyperException):  # click's usage errors: an unknown option, a value of the wrong type ...
        if type(exc).__name__ != "NoArgsIsHelpError":  # (that one: typer has printed the help already)
            ctx = getattr(exc, "ctx", None)
            message = " ".join(exc.format_message().split())
            if ctx:  # click ends some messages with a full stop: not before the "; see" that follows
                message = f"{message.removesuffix('.')}; see '{ctx.command_path} --help'"
            error_line(message)
        return exc.exit_code
    if debug:  # the traceback of the exception (with its cause) above the error line
        traceback.print_exc()
    if isinstance(exc, PgraftError):  # a user mistake
        error_line(str(exc))
        return exc.exit_code
    assert isinstance(exc, OSError)  # the file system refused: a path, a permission ...
    error_line(os_error_line(exc))
    return 1
