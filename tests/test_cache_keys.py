"""A cached run never changes a result (stage keys are content-addressed).

The property, for every verb: change one recipe key (or ``--data``) in an existing run directory,
and the numbers, the images and the written checkpoint equal those of a fresh run with the same
settings. Keys are enumerated from the dataclass fields of every section the verb reads, so a key
added later is covered automatically; a key is skipped only when it is listed in ``NOT_READ`` with
the reason the verb provably does not read it. Everything runs in-process with tiny settings (a
tiny 1 x 16 x 16 flow UNet, a few images, two solver steps, two training steps).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import types
import typing
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file
import typer.testing
from conftest import click_command
from typer.testing import CliRunner

from pgraft_cli.cli import app
from pgraft_cli.errors import RecipeError
from pgraft_cli.io.recipes import Recipe, load_recipe

runner = CliRunner()

TINY_SAMPLE = ["sample.num=4", "sample.steps=2", "sample.batch_size=4", "sample.lane=4"]
TINY_EVAL = ["evaluate.num=4", "evaluate.kid_subsets=2"]
# verb -> (verb, recipe, base --set overrides, the recipe sections it reads); the model comes last
VERBS: dict[str, tuple[str, str, list[str], tuple[str, ...]]] = {
    "sample": ("sample", "default", TINY_SAMPLE, ("model", "sample")),
    "evaluate": ("evaluate", "default", TINY_SAMPLE + TINY_EVAL, ("model", "sample", "evaluate")),
    "correct": ("correct", "inverse-noise",
                TINY_SAMPLE + TINY_EVAL + [
                    "correct.base_steps=2", "correct.num_images=4", "correct.invert_shard_size=2",
                    "correct.inversion_iterations=2", "correct.max_reconstruction_rms=1.0",
                    "correct.corrector_channels=[4, 8]", "correct.corrector_train_steps=2",
                    "correct.corrector_batch_size=4", "correct.corrector_warmup=1", "correct.corrector_ema=0.5",
                    "correct.corrector_checkpoint_every=1", "correct.corrector_sample_steps=2"],
                ("model", "sample", "correct", "evaluate")),
    "finetune": ("finetune", "pgraft",
                 TINY_SAMPLE + TINY_EVAL + [
                     "finetune.rounds=1", "finetune.steps=2", "finetune.batch_size=2", "finetune.learning_rate=1e-2",
                     "finetune.checkpoint_every=1"],
                 ("model", "sample", "score", "filter", "finetune", "evaluate")),
}

# Keys of a section a verb reads that it provably never uses, with the reason.
NOT_READ = {
    "evaluate": {
        "sample.num": "evaluate draws evaluate.num images",
        "sample.seed": "evaluate draws with evaluate.seed",
        "sample.capture_at": "evaluate never captures intermediate states",
    },
    "correct": {
        "sample.num": "correct samples evaluate.num images",
        "sample.seed": "correct samples with evaluate.seed",
        "sample.steps": "both samplers run at correct.base_steps, the steps the corrector is fitted for",
        "evaluate.steps": "both samplers run at correct.base_steps, the steps the corrector is fitted for",
        "sample.capture_at": "correct never captures intermediate states",
        "sample.guidance_scale": "correct refuses conditioned models, and unconditional ones are never guided",
    },
}

# Changed values a type cannot suggest (strings with a meaning), or that the tiny runs need.
CHOSEN_VALUES = {
    "score.reward": "classifier:digits:5",
    "evaluate.inception_weights": "no-such-inception.pt",  # refused in both runs: the outcome is the error
    "evaluate.features": "classifier",  # Inception needs weights the test does not have
    "model.dtype": "bfloat16",  # CPUs run bf16 convolutions
    "correct.corrector": "gaussian-diag",  # a full covariance needs more images than dimensions
    "sample.num": 8,  # top-k of m = 4 needs whole groups
    "filter.m": 2,  # sample.num = 4 is whole groups of 2
    "sample.lane": 2,  # an integer or "auto"; 2 divides the shard of 4
    "finetune.lora_rank": 2,  # an integer or "auto"
    "finetune.lora_above": 1,  # "auto" then trains a LoRA adapter
    "model.autocast": "bf16",  # "auto" is no autocast on the CPU, like "no"
}

# Changes tried besides the one per key: fewer images as well as more (old shards must not be reused).
MORE_CHANGES = {"correct": ["correct.num_images=3"]}

# What is not a result: wall time and where things were written.
VOLATILE = {"seconds", "stage_seconds", "seconds_per_image", "images_per_second", "generated_now", "run_dir", "out", "report",
            "out_bytes", "created", "inception_weights"}


# ----------------------------------------------------------------------------------------------
# Changed values, from the field's type


def _candidates(value: Any, tp: Any, where: str) -> list[Any]:
    origin = typing.get_origin(tp)
    if where in CHOSEN_VALUES:
        return [CHOSEN_VALUES[where]]
    if origin is Literal:
        choices = list(typing.get_args(tp))
        i = choices.index(value)
        return choices[i + 1:] + choices[:i]
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return {int: [1, 2, 3], float: [0.5, 0.25, 0.75]}[inner]
        return [None, *_candidates(value, inner, where)]
    if origin is list:
        return [[v * 2 for v in value], [*value, value[-1]]]
    if tp is bool:
        return [not value]
    if tp is int:
        return [value + 1, value * 2, value // 2, value - 1]
    if tp is float:
        return [value * 2, value / 2, value + 0.25, 0.5] if value else [0.5, 0.25]
    raise AssertionError(f"{where}: no rule for type {tp}; add one here or to CHOSEN_VALUES")


def _toml(value: Any) -> str:
    return "none" if value is None else json.dumps(value)


def changed_setting(recipe: str, base: list[str], section: str, key: str) -> str:
    """``section.key=value`` with the first changed value that the recipe validation accepts."""
    current = load_recipe(recipe, base)
    cls = type(getattr(current, section))
    value = getattr(getattr(current, section), key)
    tp = typing.get_type_hints(cls)[key]
    for candidate in _candidates(value, tp, f"{section}.{key}"):
        if candidate == value:
            continue
        setting = f"{section}.{key}={_toml(candidate)}"
        try:
            load_recipe(recipe, [*base, setting])
        except RecipeError:
            continue
        return setting
    raise AssertionError(f"no valid changed value for {section}.{key} = {value!r}")


def read_keys(verb: str) -> list[tuple[str, str]]:
    """Every (section, key) of the sections ``verb`` reads, less the NOT_READ ones."""
    sections = VERBS[verb][3]
    hints = typing.get_type_hints(Recipe)
    keys = [(s, f.name) for s in sections for f in dataclasses.fields(hints[s])]
    return [(s, k) for s, k in keys if f"{s}.{k}" not in NOT_READ.get(verb, {})]


# ----------------------------------------------------------------------------------------------
# Running a verb and what it produced


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def outcome(model: Path, verb: str, run_dir: Path, settings: list[str], data: Path) -> dict[str, Any]:
    """The numbers a verb prints, the images it wrote and the checkpoint it saved; or its error."""
    command, recipe, _, _ = VERBS[verb]
    args = [a for s in settings for a in ("--set", s)] + (["--data", str(data)] if verb != "sample" else [])
    result = runner.invoke(app, [command, str(model), "--recipe", recipe, "--run-dir", str(run_dir), "--json", *args])
    if result.exit_code != 0:
        return {"exit_code": result.exit_code, "error": type(result.exception).__name__}
    found: dict[str, Any] = {"numbers": _strip(json.loads(result.stdout.strip().splitlines()[-1]))}
    images = sorted((run_dir / "images").glob("*.png"))
    if images:
        found["images"] = [p.read_bytes() for p in images]
    for name in ("corrected.safetensors", "tuned.safetensors"):
        path = run_dir / name
        if path.is_file():
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            found["weights"] = {k: v.numpy().tobytes() for k, v in load_file(str(path)).items()}
            found["metadata"] = {k: _strip(json.loads(v)) if k == "pgraft.metrics" else v
                                 for k, v in meta.items() if k != "pgraft.provenance"}
    return found


def check_cached_equals_fresh(model: Path, verb: str, tmp_path: Path, data: Path,
                              changes: list[tuple[str, list[str], Path]]) -> tuple[list[str], int]:
    """Run the base settings once, then each change in a copy of that run dir and in a fresh one.

    Returns the changes whose cached run differs from the fresh one, and how many fresh runs
    finished with numbers (rather than the same refusal in both).
    """
    _, _, base, _ = VERBS[verb]
    base_dir = tmp_path / "base"
    first = outcome(model, verb, base_dir, base, data)
    assert "numbers" in first, f"the base {verb} run failed: {first}"
    wrong, finished = [], 0
    for i, (label, settings, changed_data) in enumerate(changes):
        cached_dir = tmp_path / f"cached-{i}"
        shutil.copytree(base_dir, cached_dir)
        cached = outcome(model, verb, cached_dir, settings, changed_data)
        fresh = outcome(model, verb, tmp_path / f"fresh-{i}", settings, changed_data)
        finished += "numbers" in fresh
        if cached != fresh:
            diff = sorted(k for k in set(cached) | set(fresh) if cached.get(k) != fresh.get(k))
            wrong.append(f"{label}: cached run differs from a fresh one in {diff}")
        shutil.rmtree(cached_dir, ignore_errors=True)
        shutil.rmtree(tmp_path / f"fresh-{i}", ignore_errors=True)
    return wrong, finished


@pytest.fixture
def data_files(tmp_path: Path) -> tuple[Path, Path]:
    """A few digits as ``--data``, and the same digits mirrored: other data in every image."""
    from pgraft_cli.io.data import load_digits

    images = load_digits()[0][:32]
    paths = (tmp_path / "digits.npz", tmp_path / "mirrored.npz")
    np.savez(paths[0], images=images.numpy())
    np.savez(paths[1], images=images.flip(-1).numpy())
    return paths


@pytest.fixture(scope="module")
def tiny_flow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pgraft file of a tiny flow UNet on 1 x 16 x 16 images (digits-shaped, many times cheaper)."""
    from conftest import ONE_BLOCK_UNET, build_tiny_unet

    from pgraft_cli.io.checkpoints import default_scheduler_config, save_pgraft_safetensors

    unet = build_tiny_unet(channels=1, sample_size=16, **ONE_BLOCK_UNET)  # one block: the runs' seconds
    path = tmp_path_factory.mktemp("tiny-flow") / "tiny-flow.safetensors"
    return save_pgraft_safetensors(path, unet, "UNet2DModel", dict(unet.config), default_scheduler_config("flow"),
                                   {"created_by": "test_cache_keys"})


def nudged_backend(graph: Any, example_inputs: Any) -> Any:
    """A dynamo backend that runs the captured graph eagerly and scales its floating outputs by
    ``1 + 2**-10``: a compiled run whose bytes differ from eager's, as inductor's do in their last bits,
    without inductor's C++ compiling."""
    import torch

    def run(*args: Any) -> Any:
        return torch.utils._pytree.tree_map(
            lambda t: t * (1 + 2**-10) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, graph(*args))
    return run


@pytest.fixture
def fast_runs(monkeypatch: pytest.MonkeyPatch):
    """Seconds that do not change a number: no report.html (it only renders the run directory's
    artifacts), no fsync (durability) and the click command built once. (The imported libraries' objects
    are out of garbage collections already: conftest freezes them.) And ``sample.compile = true`` (a key of
    every verb) compiles with :func:`nudged_backend`, not inductor: its outputs differ from eager's, so a
    compiled run served from an eager run's cache would differ from the fresh one, as with inductor, but no
    C++ is compiled (a fresh CI machine's empty inductor cache made the sample verb's runs alone take 15-24 s).
    Inductor's own bytes, keyed apart from eager's, are ``test_sample``'s compile test."""
    import functools
    import os

    import torch

    from pgraft_cli.report import html as report

    monkeypatch.setattr(report, "render_report", lambda run_dir, run=None: Path(run_dir) / "report.html")
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    monkeypatch.setattr(typer.testing, "_get_command", click_command)  # built once, as in one process
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=nudged_backend))


# ----------------------------------------------------------------------------------------------
# The property


def test_every_read_key_has_a_changed_value():
    """The enumeration itself: each key a verb reads gets a valid changed value (fast, no runs)."""
    for verb, (_, recipe, base, _) in VERBS.items():
        for section, key in read_keys(verb):
            assert changed_setting(recipe, base, section, key).startswith(f"{section}.{key}=")
        for listed in NOT_READ.get(verb, {}):
            section, key = listed.split(".")
            assert key in {f.name for f in dataclasses.fields(typing.get_type_hints(Recipe)[section])}, listed


@pytest.mark.slow
@pytest.mark.parametrize("verb", list(VERBS))
def test_a_changed_key_in_an_existing_run_dir_gives_the_fresh_result(verb, tmp_path, tiny_flow, data_files, fast_runs):
    _, recipe, base, _ = VERBS[verb]
    data, other = data_files
    changes = []
    for section, key in read_keys(verb):
        setting = changed_setting(recipe, base, section, key)
        changes.append((setting, [*base, setting], data))
    changes += [(setting, [*base, setting], data) for setting in MORE_CHANGES.get(verb, [])]
    if verb != "sample":
        changes.append(("--data (mirrored images)", base, other))
    wrong, finished = check_cached_equals_fresh(tiny_flow, verb, tmp_path, data, changes)
    assert not wrong, "\n".join(wrong)
    assert finished >= 0.8 * len(changes), f"only {finished} of {len(changes)} changed {verb} runs finished"
