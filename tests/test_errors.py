"""The bad-input matrix: every failure a user can cause ends in one ``error:`` line and a non-zero exit.

Each case runs the console entry ``pgraft_cli.cli.main`` in this process (an exception that escapes
it fails the test with its traceback) and checks that the files already on disk are untouched. Two
cases run ``python -m pgraft_cli`` in a subprocess, with and without the global ``--debug``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_in_process


REWARDS = '''
import torch

def boom(images, prompts):
    raise ValueError("brightness needs RGB images\\nsecond line of the message")

def nan(images, prompts):
    return torch.full((len(images),), float("nan"))

def inf(images, prompts):
    out = images.mean(dim=(1, 2, 3))
    out[1] = float("inf")
    return out

def short(images, prompts):
    return torch.zeros(len(images) - 1)
'''


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A regular file, an empty folder, a folder of the user's own PNGs, a reward file and a sample run."""
    d = tmp_path_factory.mktemp("errors")
    (d / "afile.txt").write_text("keep me")
    (d / "folder").mkdir()
    (d / "mine").mkdir()
    (d / "mine" / "00000.png").write_bytes(b"the user's own image")
    (d / "rewards.py").write_text(REWARDS)
    (d / "old.safetensors").write_bytes(b"an earlier result")
    code, _, err = pgraft("sample", "digits", "--num", "4", "--steps", "2", "--run-dir", str(d / "run"), "-q")
    assert code == 0, err
    return d


def pgraft(*args: str) -> tuple[int, str, str]:
    """Run the console entry with ``args``; (exit code, stdout, stderr)."""
    (out, err), code = cli_in_process(*args)
    return code, out, err


def snapshot(folder: Path) -> dict[str, object]:
    """Every file's hash; of a run manifest, its finished stages (a failed stage may add a pending entry)."""
    files: dict[str, object] = {}
    for p in sorted(folder.rglob("*")):
        if p.name == "manifest.json":
            stages = json.loads(p.read_text())["stages"]
            files[str(p.relative_to(folder))] = {k: v for k, v in stages.items() if v.get("finished")}
        elif p.is_file() and p.name != ".lock":
            files[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def one_error_line(stderr: str) -> str:
    """The single ``error:`` line of stderr (notes like 'run directory: ...' may precede it)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr and lines[-1] == errors[0], stderr
    return errors[0]


SAMPLE = ["sample", "digits", "--num", "4", "--steps", "2", "-q"]
CASES = {
    # output paths
    "out-folder-is-a-file": (SAMPLE + ["--out", "{d}/afile.txt"], "is a file, but a folder is expected"),
    "out-folder-under-a-file": (SAMPLE + ["--out", "{d}/afile.txt/sub/out"], "lies under {d}/afile.txt, which is a file"),
    "out-folder-unwritable": (SAMPLE + ["--out", "/proc/pgraft-out"], "/proc/pgraft-out cannot be written"),
    "out-folder-holds-user-pngs": (SAMPLE + ["--out", "{d}/mine"], "holds 00000.png, which pgraft did not write"),
    "run-dir-is-a-file": (SAMPLE + ["--run-dir", "{d}/afile.txt"], "--run-dir {d}/afile.txt is a file"),
    "run-dir-under-a-file": (["evaluate", "digits", "--run-dir", "{d}/afile.txt/run"], "which is a file, not a folder"),
    "run-dir-unwritable": (SAMPLE + ["--run-dir", "/proc/pgraft-run"], "/proc/pgraft-run cannot be written"),
    "correct-out-is-a-folder": (["correct", "digits", "--out", "{d}/folder"], "is a folder, but a .safetensors file"),
    "correct-out-wrong-extension": (["correct", "digits", "--out", "{d}/corrected.bin"], "does not end in .safetensors"),
    "finetune-out-wrong-extension": (["finetune", "digits", "--out", "{d}/tuned.ckpt"], "does not end in .safetensors"),
    "finetune-out-under-a-file": (["finetune", "digits", "--out", "{d}/afile.txt/t.safetensors"], "which is a file"),
    "correct-out-is-the-model": (["correct", "{d}/old.safetensors", "--out", "{d}/old.safetensors"],
                                 "would overwrite MODEL {d}/old.safetensors, which this command reads"),
    "finetune-out-is-the-data": (["finetune", "digits", "--data", "{d}/old.safetensors", "--out", "{d}/old.safetensors"],
                                 "would overwrite --data {d}/old.safetensors"),
    "export-out-is-the-checkpoint": (["export", "{d}/mine", "--out", "{d}/mine", "--force"],
                                     "would overwrite CHECKPOINT {d}/mine"),
    "export-out-holds-the-checkpoint": (["export", "{d}/mine/00000.png", "--out", "{d}/mine", "--force"],
                                        "would overwrite CHECKPOINT {d}/mine/00000.png"),
    "score-run-dir-is-a-file": (["score", "{d}/afile.txt", "--reward", "jpeg-compressibility"], "not a pgraft run directory"),
    # the user's own reward function
    "reward-raises": (["score", "{d}/run", "--reward", "python:{d}/rewards.py:boom"],
                      "boom() raised ValueError: brightness needs RGB images;"),
    "reward-nan": (["score", "{d}/run", "--reward", "python:{d}/rewards.py:nan"], "rewards.py:nan returned 4 NaN or infinite"),
    "reward-inf": (["score", "{d}/run", "--reward", "python:{d}/rewards.py:inf"], "rewards.py:inf returned 1 NaN or infinite"),
    "reward-wrong-length": (["score", "{d}/run", "--reward", "python:{d}/rewards.py:short"], "returned shape (3,) for 4 images"),
    "reward-no-such-function": (["score", "{d}/run", "--reward", "python:{d}/rewards.py:gone"], "has no function 'gone'"),
    "reward-no-such-file": (["score", "{d}/run", "--reward", "python:{d}/nope.py:f"], "no such file"),
    # metrics on degenerate input
    "metric-on-one-sample": (["evaluate", "digits", "--num", "1", "--steps", "2", "-q"], "at least 2"),
    # recipes, gates, models, options
    "unknown-recipe-section": (SAMPLE + ["--set", "nosuch.key=1"], "unknown section 'nosuch'"),
    "unknown-recipe-key": (SAMPLE + ["--set", "sample.nokey=1"], "unknown key 'sample.nokey'"),
    "set-without-value": (SAMPLE + ["--set", "sample.steps"], "is malformed"),
    "set-wrong-type": (SAMPLE + ["--set", "sample.seed=abc"], "expected an integer"),
    "unknown-recipe": (SAMPLE + ["--recipe", "{d}/nope.toml"], "nope"),
    "malformed-fail-if": (["evaluate", "digits", "--fail-if", "fid>>12"], "is not a gate"),
    "fail-if-unknown-metric": (["evaluate", "digits", "--fail-if", "nosuch>1"], "unknown metric 'nosuch'"),
    "copy-gate-with-the-copy-test-off": (["correct", "digits", "--set", "evaluate.copy_test=false", "--fail-if",
                                          "copy_cell_p<0.01"], "gates on the copy test, which evaluate.copy_test = false"),
    "missing-model-file": (["sample", "{d}/missing.safetensors", "-q"], "no such file or directory"),
    "bad-kind": (SAMPLE + ["--kind", "banana"], "--kind 'banana' is invalid"),
    "missing-prompt-file": (SAMPLE + ["--prompts", "{d}/nope.txt"], "--prompts {d}/nope.txt: no such file"),
    "cutoff-above-range": (["finetune", "digits", "--cutoff", "1.5"], "cutoff must be in [0, 1)"),
    "cutoff-below-range": (["finetune", "digits", "--cutoff", "-0.1"], "cutoff must be in [0, 1)"),
    "unknown-option": (SAMPLE + ["--nosuchoption"], "No such option: --nosuchoption; see '"),
    "option-of-wrong-type": (["sample", "digits", "--num", "abc"], "Invalid value for '--num'"),
    "missing-argument": (["correct"], "Missing argument 'model'; see '"),  # not "'model'.; see"
    "unknown-command": (["nosuchverb"], "No such command 'nosuchverb'; see '"),
    "status-of-a-file": (["status", "{d}/afile.txt"], "not a pgraft run directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistake_ends_in_one_error_line(case, workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default run directories land here, not in the workspace
    args, expected = CASES[case]
    d = str(workspace)
    before = snapshot(workspace)
    code, _, err = pgraft(*(a.replace("{d}", d) for a in args))
    assert code != 0
    assert expected.replace("{d}", d) in one_error_line(err)
    assert snapshot(workspace) == before  # nothing already written is lost or changed


def test_export_refuses_to_replace_the_folder_it_runs_in(tmp_path, monkeypatch):
    """`pgraft export digits --out . --force` emptied the working folder (and lost the export too)."""
    here = tmp_path / "work"
    (here / "sub").mkdir(parents=True)
    (here / "precious.txt").write_text("keep me")
    monkeypatch.chdir(here / "sub")
    for out in (".", "..", str(here)):
        code, _, err = pgraft("export", "digits", "--out", out, "--force")
        assert code != 0 and "the folder this command runs in" in one_error_line(err)
    assert (here / "precious.txt").read_text() == "keep me" and sorted(p.name for p in here.iterdir()) == ["precious.txt", "sub"]
    code, _, err = pgraft("export", "digits", "--out", "exported", "--force")  # a new folder below: fine
    assert code == 0, err
    assert (here / "sub" / "exported").is_dir() and not list((here / "sub").glob(".*pgraft-export"))


def test_existing_out_file_is_untouched_when_a_run_fails(workspace, tmp_path, monkeypatch):
    """A finetune that fails inside the reward leaves an earlier --out file byte for byte."""
    monkeypatch.chdir(tmp_path)
    out = workspace / "old.safetensors"
    code, _, err = pgraft("finetune", "digits", "--reward", f"python:{workspace}/rewards.py:boom", "--out", str(out),
                          "--set", "sample.num=8", "--set", "sample.steps=2", "-q")
    assert code == 2 and "boom() raised ValueError" in one_error_line(err)
    assert out.read_bytes() == b"an earlier result"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgraft_cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_reward_exception_through_the_console_entry_and_debug_traceback(workspace, tmp_path):
    reward = f"python:{workspace}/rewards.py:boom"
    plain = _cli("score", str(workspace / "run"), "--reward", reward, "-q", cwd=tmp_path)
    assert plain.returncode == 2
    line = one_error_line(plain.stderr)
    assert f"reward {reward}: your function boom() raised ValueError: brightness needs RGB images" in line
    assert "second line" not in plain.stderr  # only the first line of the user's message
    debug = _cli("--debug", "score", str(workspace / "run"), "--reward", reward, "-q", cwd=tmp_path)
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr
    assert 'rewards.py", line 5, in boom' in debug.stderr  # the user's own frame
    assert debug.stderr.strip().splitlines()[-1] == line  # the same error line, last


def test_ctrl_c_ends_in_one_line_and_exit_code_130(monkeypatch):
    """An interruption inside a verb: the resume hint, exit code 130, no traceback."""
    from pgraft_cli.pipelines import tools

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(tools, "recipes_ls", interrupted)
    (out, err), code = cli_in_process("recipes", "ls")
    assert code == 130 and out == ""
    assert err.strip().splitlines()[-1] == ("error: interrupted; run the same command again to resume from the last "
                                            "finished shard")
    assert "Traceback" not in err
