"""finetune --log-with: accelerate's trackers in the run directory, and one error line without the package."""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from pgraft_cli.cli import app
from pgraft_cli.errors import PgraftError
from pgraft_cli.pipelines.skeleton import check_tracker

runner = CliRunner()
TINY = ["--set", "sample.num=16", "--set", "sample.steps=2", "--set", "sample.batch_size=16", "--set", "finetune.steps=3",
        "--set", "finetune.batch_size=4", "--set", "finetune.rounds=2", "--set", "evaluate.num=16",
        "--set", "evaluate.kid_subsets=2", "--set", "evaluate.steps=2"]


def test_a_missing_tracker_package_is_one_error_line_before_any_work(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(PgraftError, match=r"^--log-with tensorboard needs the tensorboard package: pip install tensorboard$"):
        check_tracker("tensorboard")
    result = runner.invoke(app, ["finetune", "digits", "--log-with", "tensorboard", "--run-dir", str(tmp_path / "run")])
    assert isinstance(result.exception, PgraftError) and "pip install tensorboard" in str(result.exception)
    assert not (tmp_path / "run").exists()
    with pytest.raises(PgraftError, match="use tensorboard or wandb"):
        check_tracker("mlflow")
    check_tracker(None)  # off by default: nothing to check


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="pip install tensorboard")
def test_tensorboard_gets_every_step_and_every_round_in_the_run_directory(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    result = runner.invoke(app, ["finetune", "digits", "--reward", "classifier:digits:3", "--cutoff", "0", "--run-dir",
                                 str(run), "--judge", "j=classifier:judge:3", "--log-with", "tensorboard", "--quiet", *TINY])
    assert result.exit_code == 0, result.output
    folder = run / "pgraft"  # beside report.html; the recipe goes in as hparams (a sub-folder)
    assert list(folder.glob("events.out.tfevents.*")) and (run / "report.html").is_file()
    events = EventAccumulator(str(folder))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]  # 3 steps x 2 rounds
    assert [e.step for e in events.Scalars("round/judge.j")] == [0, 3]  # round r: after (r - 1) x 3 steps
    assert {"round/reward", "round/fid", "round/pairwise_distance", "eval/tuned/reward_mean",
            "eval/base/judge.j"} <= set(scalars)
    import json

    summary = json.loads((run / "finetune" / "summary.json").read_text())
    logged = [e.value for e in events.Scalars("round/reward")]
    assert logged == pytest.approx([r["sampled"]["reward_mean"] for r in summary["rounds"]], rel=1e-6)
