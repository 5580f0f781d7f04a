"""Recipes: bundled files validate and round-trip, and every mistake is one clear RecipeError."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import cli_run

from pgraft_cli.errors import RecipeError
from pgraft_cli.io.recipes import (SECTIONS, Recipe, available_recipes, dump_recipe, find_recipe, load_recipe,
                                parse_override, recipe_dirs, recipe_from_dict, tomllib)

REPO = Path(__file__).resolve().parent.parent
BUNDLED = sorted((REPO / "recipes").glob("*.toml"))


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return cli_run(*args, cwd=cwd)


def error_of(*overrides: str, recipe: str = "default") -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, list(overrides))
    return str(info.value)


def write(tmp_path: Path, text: str | bytes, name: str = "r.toml") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


# ------------------------------------------------------------------------------------------------
# bundled recipes


def test_bundled_recipes_are_found():
    assert {p.stem for p in BUNDLED} == {"default", "graft", "pgraft", "inverse-noise"}
    assert set(available_recipes()) >= {p.stem for p in BUNDLED}
    assert REPO / "recipes" in recipe_dirs()


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.stem)
def test_bundled_recipe_validates_by_name_and_path(path):
    by_name = load_recipe(path.stem)
    by_path = load_recipe(str(path))
    assert by_name == by_path
    assert by_name.name == path.stem
    assert by_name.description
    # the file is the whole truth: every key it sets is what the Recipe holds
    raw = tomllib.loads(path.read_text())
    for section in SECTIONS:
        for key, value in raw.get(section, {}).items():
            assert getattr(getattr(by_name, section), key) == value, f"{section}.{key}"


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.stem)
def test_dump_recipe_round_trips(path):
    recipe = load_recipe(path.stem)
    text = dump_recipe(recipe)
    again = recipe_from_dict(tomllib.loads(text))
    assert again == recipe
    assert dump_recipe(again) == text


def test_dump_recipe_round_trips_awkward_values():
    recipe = load_recipe("pgraft", ["filter.threshold=0.25", "score.reward=classifier:digits:3",
                                    "finetune.learning_rate=1e-5", "sample.guidance_scale=inf", "sample.capture_at=0.5"])
    recipe.description = 'line one\nline two\t"quoted" back\\slash é \x7f \x01'
    text = dump_recipe(recipe)
    again = recipe_from_dict(tomllib.loads(text))
    assert again == recipe
    assert again.filter.threshold == 0.25 and again.filter.quantile is None
    assert again.sample.capture_at == 0.5
    assert "# quantile = (unset)" in text


def test_default_values_match_the_dataclasses():
    # the default recipe spells out the dataclass defaults; if they drift, one of them is wrong
    assert load_recipe("default") == recipe_from_dict({"name": "default",
                                                      "description": load_recipe("default").description})
    assert Recipe().sample.lane == "auto"


# ------------------------------------------------------------------------------------------------
# mistakes


def test_unknown_key_names_it_suggests_and_lists_allowed():
    msg = error_of("sample.stpes=4")
    assert "'sample.stpes'" in msg
    assert "did you mean 'sample.steps'" in msg
    for key in ("num", "seed", "steps", "batch_size", "lane", "guidance_scale", "capture_at"):
        assert key in msg.split("allowed keys")[1]


def test_unknown_key_in_a_recipe_file(tmp_path):
    path = write(tmp_path, "[filter]\nrul = 'top_k'\n")
    msg = error_of(recipe=path)
    assert "'filter.rul'" in msg and "did you mean 'filter.rule'" in msg


def test_unknown_section_in_file_suggests_the_closest(tmp_path):
    path = write(tmp_path, "[sampel]\nsteps = 4\n")
    msg = error_of(recipe=path)
    assert "[sampel]" in msg
    assert "did you mean '[sample]'" in msg
    assert all(s in msg for s in SECTIONS)


def test_unknown_section_in_set_suggests_the_closest():
    msg = error_of("sampel.steps=4")
    assert "sampel" in msg and "did you mean 'sample'" in msg


def test_unknown_top_level_key(tmp_path):
    msg = error_of(recipe=write(tmp_path, 'nmae = "x"\n'))
    assert "'nmae'" in msg and "did you mean 'name'" in msg
    msg = error_of(recipe=write(tmp_path, 'steps = 4\n'))
    assert "'steps'" in msg and "[sample]" in msg


@pytest.mark.parametrize("override, expect", [
    ('sample.steps="many"', ["sample.steps", "'many'", "integer"]),
    ("sample.steps=many", ["sample.steps", "'many'", "integer"]),
    ("sample.steps=4.5", ["sample.steps", "integer"]),
    ("sample.steps=true", ["sample.steps", "integer"]),
    ("sample.guidance_scale=high", ["sample.guidance_scale", "number"]),
    ("filter.dedup=1", ["filter.dedup", "true or false"]),
    ("filter.dedup=yes", ["filter.dedup", "true or false"]),
    ("run.stages=sample", ["run.stages", "list"]),
    ('run.stages=["sample", "scroe"]', ["run.stages[1]", "'scroe'", "did you mean 'score'"]),
    ("sample.capture_at=half", ["sample.capture_at", "number", "unset"]),
])
def test_wrong_types(override, expect):
    msg = error_of(override)
    for part in expect:
        assert part in msg, (part, msg)


def test_literal_out_of_its_set_suggests():
    msg = error_of("model.kind=flwo")
    assert "model.kind" in msg and "'flwo'" in msg
    assert "'auto', 'flow', 'diffusion'" in msg
    assert "did you mean 'flow'" in msg
    msg = error_of("model.dtype=float8")
    assert "model.dtype" in msg and "'bfloat16'" in msg


@pytest.mark.parametrize("sets, size, lane", [
    (["sample.lane=16", "sample.batch_size=20"], 20, 16),
    (["sample.lane=16", "sample.batch_size=8"], 8, 16),
    (["sample.lane=32", "sample.batch_size=48"], 48, 32),
])
def test_batch_size_must_be_a_multiple_of_lane(sets, size, lane):
    msg = error_of(*sets)
    assert f"sample.batch_size ({size}) must be a multiple of sample.lane ({lane})" in msg


def test_batch_size_hint_is_valid():
    msg = error_of("sample.lane=16", "sample.batch_size=40")
    assert "--batch-size 32 or 48" in msg
    load_recipe("default", ["sample.batch_size=32"])
    load_recipe("default", ["sample.batch_size=48"])


@pytest.mark.parametrize("override, key", [
    ("finetune.cutoff=1.5", "finetune.cutoff"),
    ("finetune.cutoff=1.0", "finetune.cutoff"),
    ("finetune.cutoff=-0.1", "finetune.cutoff"),
    ("finetune.cutoff=nan", "finetune.cutoff"),
    ("sample.capture_at=1.0", "sample.capture_at"),
    ("sample.num=0", "sample.num"),
    ("sample.steps=-3", "sample.steps"),
    ("sample.lane=0", "sample.lane"),
    ("filter.k=0", "filter.k"),
    ("filter.quantile=1.5", "filter.quantile"),
    ("finetune.rounds=0", "finetune.rounds"),
    ("finetune.learning_rate=0", "finetune.learning_rate"),
    ("finetune.lora_rank=-1", "finetune.lora_rank"),
    ("score.batch_size=0", "score.batch_size"),
    ("correct.base_steps=0", "correct.base_steps"),
    ("correct.inversion_tol=0", "correct.inversion_tol"),
    ("correct.inversion_tol_last=0", "correct.inversion_tol_last"),
    ("correct.inversion_tol_last=0.02", "correct.inversion_tol_last"),  # the gate: that step's error at the data
    ("correct.inversion_memory=-1", "correct.inversion_memory"),
    ("evaluate.num=0", "evaluate.num"),
])
def test_values_out_of_range(override, key):
    msg = error_of(override)
    assert msg.startswith(key), msg
    assert "must be" in msg


def test_cutoff_in_range_is_accepted():
    assert load_recipe("pgraft", ["finetune.cutoff=0.75"]).finetune.cutoff == 0.75
    assert load_recipe("default", ["finetune.cutoff=0"]).finetune.cutoff == 0.0


@pytest.mark.parametrize("text", ["sample.steps", "sample.steps 4", "steps=4", "=4", ""])
def test_malformed_set(text):
    with pytest.raises(RecipeError) as info:
        parse_override(text)
    assert "malformed" in str(info.value) and "section.key=value" in str(info.value)
    assert "malformed" in error_of(text)


def test_set_on_a_section_that_is_not_a_table(tmp_path):
    msg = error_of("sample.steps=4", recipe=write(tmp_path, "sample = 3\n"))
    assert "[sample] must be a table" in msg


def test_unknown_recipe_name_suggests_the_closest():
    msg = error_of(recipe="pgraf")
    assert "no recipe 'pgraf'" in msg and "did you mean 'pgraft'" in msg
    for name in ("default", "graft", "pgraft", "inverse-noise"):
        assert name in msg
    assert "did you mean 'default'" in error_of(recipe="defualt")


def test_missing_recipe_path_does_not_fall_back_to_a_bundled_one(tmp_path):
    # 'default.toml' exists bundled, but the user named a file in a folder: that file must exist
    with pytest.raises(RecipeError) as info:
        find_recipe(str(tmp_path / "default.toml"))
    assert str(tmp_path / "default.toml") in str(info.value)
    assert find_recipe("default.toml").name == "default.toml"  # a bare name still picks the bundled one


@pytest.mark.parametrize("content", [
    "[sample\nsteps = 4\n",
    "[sample]\nsteps = \n",
    "[sample]\nsteps = 4\nsteps = 5\n",
    b"[sample]\nseed = 1\n# \xff\xfe not utf-8\n",
])
def test_recipe_path_with_invalid_toml(tmp_path, content):
    path = write(tmp_path, content, "broken.toml")
    msg = error_of(recipe=path)
    assert path in msg and "not valid TOML" in msg


def test_recipe_from_a_path_takes_its_stem_as_name(tmp_path):
    path = write(tmp_path, 'description = "mine"\n[sample]\nsteps = 3\n', "my-recipe.toml")
    recipe = load_recipe(path)
    assert recipe.name == "my-recipe" and recipe.description == "mine" and recipe.sample.steps == 3
    assert recipe.sample.num == Recipe().sample.num  # everything else defaults


# ------------------------------------------------------------------------------------------------
# --set values


@pytest.mark.parametrize("text, expect", [
    ("sample.steps=4", 4),
    ("sample.steps = 4", 4),
    ("sample.num=1_000", 1000),
    ("sample.guidance_scale=7.5", 7.5),
    ("finetune.learning_rate=1e-5", 1e-5),
    ("filter.dedup=true", True),
    ("filter.dedup=false", False),
    ('run.stages=["sample", "score"]', ["sample", "score"]),
    ("run.stages=[]", []),
    ("model.kind=flow", "flow"),
    ('model.kind="flow"', "flow"),
    ("score.reward=classifier:digits:3", "classifier:digits:3"),
    ("score.reward=./my rewards/r.py:score", "./my rewards/r.py:score"),
])
def test_set_parses_values(text, expect):
    section, key, value = parse_override(text)
    assert (section, key) == tuple(text.split("=")[0].strip().split("."))
    recipe = load_recipe("default", [text])
    got = getattr(getattr(recipe, section), key)
    assert got == expect and type(got) is type(expect)


def test_set_int_is_accepted_for_a_float():
    recipe = load_recipe("default", ["sample.guidance_scale=7"])
    assert recipe.sample.guidance_scale == 7.0 and isinstance(recipe.sample.guidance_scale, float)


@pytest.mark.parametrize("raw", ["inf", "1.5", "true", "2024-01-01", "42"])
def test_string_keys_take_the_text_as_written(raw):
    # TOML would read these as numbers, booleans or dates; a string key keeps what the user typed
    assert load_recipe("default", [f"score.reward={raw}"]).score.reward == raw


@pytest.mark.parametrize("word", ["none", "None", "null"])
def test_optional_keys_accept_none(word):
    recipe = load_recipe("pgraft", [f"sample.capture_at={word}", "filter.threshold=0.5"])
    assert recipe.sample.capture_at is None
    recipe = load_recipe("pgraft", ["filter.threshold=0.5", f"filter.threshold={word}"])
    assert recipe.filter.threshold is None


def test_required_keys_refuse_none():
    msg = error_of("sample.steps=none")
    assert "sample.steps" in msg and "integer" in msg


def test_set_overrides_the_recipe_file_and_the_last_set_wins():
    recipe = load_recipe("graft", ["sample.num=32", "sample.num=48", "filter.k=2"])
    assert recipe.sample.num == 48 and recipe.filter.k == 2 and recipe.filter.m == 4
    assert recipe.run.stages == ["sample", "score", "filter", "finetune"]


# ------------------------------------------------------------------------------------------------
# through the CLI


def test_cli_bad_set_is_one_error_line_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    result = cli("sample", "digits", "--set", "sample.stpes=4", "--run-dir", str(run_dir), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "sample.stpes" in lines[0] and "sample.steps" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not run_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no default run dir either


@pytest.mark.parametrize("args, needle", [
    (["--set", "model.kind=flwo"], "did you mean 'flow'"),
    (["--recipe", "pgraf"], "did you mean 'pgraft'"),
    (["--batch-size", "20", "--set", "sample.lane=16"], "multiple of sample.lane"),
])
def test_cli_recipe_errors(tmp_path, args, needle):
    result = cli("sample", "digits", *args, "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, result.stderr
    assert needle in result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_writes_the_resolved_recipe(tmp_path):
    run_dir = tmp_path / "run"
    result = cli("sample", "digits", "--num", "16", "--steps", "2", "--batch-size", "16",
                 "--set", "model.dtype=float32", "--run-dir", str(run_dir), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = (run_dir / "recipe.toml").read_text()
    recipe = recipe_from_dict(tomllib.loads(written))
    assert (recipe.sample.num, recipe.sample.steps, recipe.sample.batch_size) == (16, 2, 16)
    assert recipe.name == "default"
    # everything not overridden is the default recipe's value
    expected = load_recipe("default", ["sample.num=16", "sample.steps=2", "sample.batch_size=16"])
    assert recipe == expected
    assert written == dump_recipe(expected)


def test_recipes_ls_show_and_cp_list_print_and_copy_the_bundled_recipes(tmp_path):
    listed = json.loads(cli("recipes", "ls", "--json", cwd=tmp_path).stdout)
    assert listed == {p.stem: load_recipe(p.stem).description for p in BUNDLED} and all(listed.values())
    shown = cli("recipes", "show", "pgraft", cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout == (REPO / "recipes" / "pgraft.toml").read_text()
    copied = cli("recipes", "cp", "pgraft", "mine.toml", cwd=tmp_path)
    assert copied.returncode == 0 and (tmp_path / "mine.toml").read_bytes() == (REPO / "recipes" / "pgraft.toml").read_bytes()
    assert load_recipe(str(tmp_path / "mine.toml")) == load_recipe("pgraft")
    again = cli("recipes", "cp", "pgraft", "mine.toml", cwd=tmp_path)  # never overwrites an edited copy
    assert again.returncode == 2 and again.stderr.count("error:") == 1 and "mine.toml exists" in again.stderr
    (tmp_path / "into").mkdir()
    assert cli("recipes", "cp", "graft", "into", cwd=tmp_path).returncode == 0 and (tmp_path / "into" / "graft.toml").is_file()


def test_run_refuses_a_stage_list_it_has_no_pipeline_for_in_one_line(tmp_path):
    result = cli("run", "digits", "--set", 'run.stages=["sample", "score"]', cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("error:") == 1
    assert "lists stages ['sample', 'score']" in result.stderr and not (tmp_path / "pgraft-runs").exists()


def test_run_with_the_default_recipe_is_the_sample_pipeline(tmp_path):
    sets = ["--set", "sample.num=4", "--set", "sample.steps=2"]
    ran = json.loads(cli("run", "digits", *sets, "--json", cwd=tmp_path).stdout)
    sampled = json.loads(cli("sample", "digits", *sets, "--json", cwd=tmp_path).stdout)
    assert ran["run_dir"] == sampled["run_dir"] and ran["generated_now"] == 4 and sampled["generated_now"] == 0
    assert sorted(p.name for p in Path(tmp_path, ran["out"]).glob("*.png")) == [f"{i:05d}.png" for i in range(4)]


def test_flags_reach_the_recipe_as_their_own_values():
    """A command's flags become overrides: a bool flag (`pgraft filter --dedup`) was written `True`, not TOML,
    and refused; a string outside the BMP was written as a JSON surrogate pair, not the path given."""
    from pgraft_cli.pipelines.skeleton import resolve_recipe

    weights = '/tmp/\U0001F600 dir/inc "v3" \\ ünï.pt'
    for dedup in (True, False):
        rec = resolve_recipe("graft", None, filter__dedup=dedup, evaluate__inception_weights=weights,
                             finetune__cutoff=0.25, filter__k=3)
        assert rec.filter.dedup is dedup and rec.evaluate.inception_weights == weights
        assert rec.finetune.cutoff == 0.25 and rec.filter.k == 3
