"""finetune --judge and --stop-if: the pure parsers, gates naming judges, and the rounds end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pgraft_cli.cli import app
from pgraft_cli.errors import PgraftError, StoppedError
from pgraft_cli.report.gates import (check_gates, check_stop, gate_metrics, gate_names, judge_names, parse_gates,
                                     parse_stop)

runner = CliRunner()


def _round(r: int, reward: float, **values: float) -> dict:
    judges = {k[6:]: v for k, v in values.items() if k.startswith("judge_")}
    return {"round": r, "sampled": {"reward_mean": reward}, "judges": judges,
            **{k: v for k, v in values.items() if not k.startswith("judge_")}}


def test_stop_rules_parse_and_fire_against_round_one():
    rule = parse_stop("judge.aes dropped by more than 0.5")
    assert (rule.name, rule.direction, rule.amount, rule.relative) == ("judge.aes", "dropped", 0.5, False)
    history = [_round(1, 0.0, judge_aes=2.0, fid=10.0), _round(2, 1.0, judge_aes=1.6, fid=10.9)]
    assert check_stop([rule], history) is None  # dropped by 0.4
    history.append(_round(3, 2.0, judge_aes=1.4, fid=11.5))
    reason = check_stop([rule], history)
    assert reason.startswith("judge.aes dropped by 0.6 ") and "from 2 in round 1 to 1.4 in round 3" in reason
    # a percentage of round 1's value, and rose; aliases; case and spacing
    fid = parse_stop("  FID Rose  by more than 10 %".replace("FID", "fid"))
    assert fid.relative and fid.direction == "rose" and check_stop([fid], history[:2]) is None  # +9%
    assert "15%" in check_stop([fid], history)  # +15% of 10
    assert parse_stop("diversity dropped by more than 1").name == "pairwise_distance"
    assert check_stop([parse_stop("reward dropped by more than 0")], history) is None  # the reward rose
    # an unmeasured value (None) or a single round never stops
    assert check_stop([parse_stop("recall dropped by more than 0")], history) is None
    assert check_stop([rule], history[:1]) is None


@pytest.mark.parametrize("text", ["judge.aes fell by 2", "fid rose by more than", "fid rose by more than x",
                                  "fid rose by more than -1", "fid rose by more than nan", "flops rose by more than 1",
                                  "judge. dropped by more than 1", ""])
def test_malformed_stop_rules_are_one_error_naming_the_syntax(text):
    with pytest.raises(PgraftError) as info:
        parse_stop(text)
    assert repr(text) in str(info.value) and info.value.exit_code == 2


def test_stop_rules_refuse_what_the_run_does_not_measure():
    with pytest.raises(PgraftError, match="measures no 'fid' every round; it has: judge.a, reward"):
        parse_stop("fid rose by more than 1", {"reward", "judge.a"})
    with pytest.raises(PgraftError, match="measures no 'judge.b'"):
        parse_stop("judge.b dropped by more than 1", {"reward", "judge.a"})


def test_judge_names_default_to_the_rewards_name_numbered_and_named_ones_are_kept():
    got = judge_names(["pickscore:/m/p", "pickscore:/m/q", "mine=classifier:judge:3", "0.5*a:x+0.5*b:y",
                       "python:/tmp/x=1.py:f"])
    assert got == [("pickscore", "pickscore:/m/p"), ("pickscore_2", "pickscore:/m/q"), ("mine", "classifier:judge:3"),
                   ("weighted", "0.5*a:x+0.5*b:y"), ("python", "python:/tmp/x=1.py:f")]
    with pytest.raises(PgraftError, match="already called 'a'"):
        judge_names(["a=jpeg-compressibility", "a=classifier:judge:3"])
    with pytest.raises(PgraftError, match="names no reward"):
        judge_names(["a="])


def test_gates_name_judges_of_the_tuned_and_the_base_model():
    names = gate_names("finetune", judges=["aes"])
    gates = parse_gates(["judge.aes<0.5", "base.judge.aes>=3"], names)
    metrics = gate_metrics({"reward_mean": 1.0, "judges": {"aes": 0.4}}, {"judges": {"aes": 2.0}})
    assert metrics["judge.aes"] == 0.4 and metrics["base.judge.aes"] == 2.0
    assert [r.failed for r in check_gates(gates, metrics)] == [True, False]
    with pytest.raises(PgraftError, match="measures no 'judge.other'"):
        parse_gates(["judge.other<1"], names)
    with pytest.raises(PgraftError, match="measures no 'judge.aes'"):
        parse_gates(["judge.aes<1"], gate_names("evaluate"))


# Round r's 16 images score -(r - 1) whatever the batching: the judge drops by 1 a round, so a stop
# rule of "more than 1.5" fires at round 3 and "more than 0.5" at round 2.
COUNTER = """
import torch
seen = [0]
def counter(images, prompts):
    index = seen[0] + torch.arange(len(images))
    seen[0] += len(images)
    return -(index // 16).double()
"""
TINY = ["--set", "sample.num=16", "--set", "sample.steps=2", "--set", "sample.batch_size=16", "--set", "finetune.steps=2",
        "--set", "finetune.batch_size=4", "--set", "finetune.rounds=3", "--set", "evaluate.num=16",
        "--set", "evaluate.kid_subsets=2", "--set", "evaluate.steps=2"]


@pytest.mark.slow
def test_judges_are_measured_every_round_and_stop_if_keeps_the_last_model_that_passed(tmp_path):
    (tmp_path / "counter.py").write_text(COUNTER)
    run, out = tmp_path / "run", tmp_path / "tuned.safetensors"
    args = ["finetune", "digits", "--reward", "classifier:digits:3", "--cutoff", "0", "--run-dir", str(run),
            "--out", str(out), "--judge", f"counter=python:{tmp_path / 'counter.py'}:counter",
            "--judge", "classifier:judge:3", "--fail-if", "judge.classifier<-1000", *TINY]
    result = runner.invoke(app, [*args, "--json", "--stop-if", "judge.counter dropped by more than 1.5"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout.strip().splitlines()[-1])
    rounds = s["rounds"]
    assert [r["judges"]["counter"] for r in rounds] == [0.0, -1.0, -2.0]
    assert all(r["fid"] is not None and r["pairwise_distance"] > 0 and math.isfinite(r["judges"]["classifier"])
               for r in rounds)
    assert s["stopped"]["round"] == 3 and s["stopped"]["rounds_kept"] == 1
    # no round drew the evaluations' noises (round 2 drew evaluate.seed 1's before: the tuned model was
    # evaluated from noises it had been trained on)
    seeds = {stage: {int(v) for p in sorted((run / stage).glob("shard-*.safetensors"))
                     for v in load_file(str(p))["noise_seed"]}
             for stage in ("sample", "sample-r2", "sample-r3", "evaluate-base", "evaluate-tuned")}
    assert all(seeds.values())
    assert seeds["evaluate-base"] == seeds["evaluate-tuned"]
    assert all(not (seeds[r] & seeds["evaluate-base"]) for r in ("sample", "sample-r2", "sample-r3"))
    assert s["stopped"]["reason"].startswith("judge.counter dropped by 2 ")
    assert "kept" not in rounds[2] and not (run / "finetune-r3").exists() and not (run / "filter-r3").exists()
    # the checkpoint holds round 1's fine-tune, not round 2's
    written = load_file(str(out))
    round1, round2 = (load_file(str(run / stage / "weights.safetensors")) for stage in ("finetune", "finetune-r2"))
    assert all(torch.equal(written[k], round1[k]) for k in round1)
    assert any(not torch.equal(written[k], round2[k]) for k in round2)
    assert set(s["tuned"]["judges"]) == {"counter", "classifier"} and s["gates"][0]["failed"] is False
    page = (run / "report.html").read_text()
    assert 'id="stopped"' in page and "judge.counter" in page and "after 1 round of fine-tuning" in page

    # the same rounds, cached: a tighter rule fires at round 2, where no fine-tuned model passed
    proc = runner.invoke(app, [*args, "--stop-if", "judge.counter dropped by more than 0.5"])
    assert isinstance(proc.exception, StoppedError) and proc.exception.exit_code == 1
    assert "stopped at round 2: judge.counter dropped by 1 " in str(proc.exception)


def test_stop_if_and_judge_gates_are_checked_before_any_work(tmp_path):
    base = ["finetune", "digits", "--run-dir", str(tmp_path / "run"), "--judge", "j=classifier:judge:3"]
    for extra, message in ((["--stop-if", "judge.k dropped by more than 1"], "measures no 'judge.k'"),
                           (["--stop-if", "judge.j dropped by 1"], "is not a stop rule"),
                           (["--fail-if", "judge.k<1"], "measures no 'judge.k'"),
                           (["--reward", "classifier:digits:3", "--judge", "classifier:digits:3"],
                            "is the training reward classifier:digits:3"),
                           (["--reward", "0.5*jpeg-compressibility+0.5*classifier:digits:3", "--judge",
                             "c=classifier:digits:3"], "(or a term of it)")):
        result = runner.invoke(app, [*base, *extra])
        assert isinstance(result.exception, PgraftError) and message in str(result.exception)
    assert not (tmp_path / "run").exists()


def test_final_stop_compares_the_tuned_model_with_the_base_on_the_evaluation_seeds():
    from pgraft_cli.report.gates import check_final_stop

    rule = parse_stop("reward dropped by more than 0.5")
    base, tuned = {"reward_mean": 2.0, "judges": {}}, {"reward_mean": 1.0, "judges": {}}
    assert "from 2 in the base model to 1 in the tuned model" in check_final_stop([rule], base, tuned)
    assert check_final_stop([rule], base, {"reward_mean": 1.6}) is None


@pytest.mark.slow
def test_stop_if_checks_the_final_model_even_with_one_round(tmp_path):
    """One round: the rounds measure only the base; evaluate-base scores -1, evaluate-tuned -2 by the
    counter judge (16 images each after round 1's), so the final check fires and nothing is written."""
    (tmp_path / "counter.py").write_text(COUNTER)
    out = tmp_path / "tuned.safetensors"
    args = ["finetune", "digits", "--reward", "classifier:digits:3", "--cutoff", "0", "--run-dir", str(tmp_path / "r"),
            "--out", str(out), "--judge", f"counter=python:{tmp_path / 'counter.py'}:counter", *TINY,
            "--set", "finetune.rounds=1", "--stop-if", "judge.counter dropped by more than 0.5"]
    proc = runner.invoke(app, args)
    assert isinstance(proc.exception, StoppedError) and proc.exception.exit_code == 1, proc.output
    assert "final model failed --stop-if: judge.counter dropped by 1 " in str(proc.exception) and not out.exists()


@pytest.mark.slow
def test_stop_if_diversity_checks_the_final_model_of_an_unconditional_model(tmp_path):
    """evaluate-base and evaluate-tuned measured no pairwise distance for an unconditional (or class) model,
    so a diversity rule passed the final model unchecked; both directions at 0 must fire one way."""
    args = ["finetune", "digits", "--reward", "classifier:digits:3", "--cutoff", "0", "--run-dir", str(tmp_path / "r"),
            "--out", str(tmp_path / "tuned.safetensors"), *TINY, "--set", "finetune.rounds=1",
            "--stop-if", "diversity dropped by more than 0", "--stop-if", "diversity rose by more than 0"]
    proc = runner.invoke(app, args)
    assert isinstance(proc.exception, StoppedError), proc.output
    assert "final model failed --stop-if: pairwise_distance " in str(proc.exception)
    assert not (tmp_path / "tuned.safetensors").exists()

