"""CI gates: each operator, aliases and base. names, malformed expressions, and `evaluate --fail-if` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_run
from typer.testing import CliRunner

from pgraft_cli.cli import app
from pgraft_cli.errors import PgraftError
from pgraft_cli.report.gates import check_gates, gate_metrics, gate_names, parse_gate, parse_gates, parse_stop

runner = CliRunner()


@pytest.mark.parametrize("op,threshold,fails", [
    (">", 11.9, True), (">", 12.0, False),
    (">=", 12.0, True), (">=", 12.1, False),
    ("<", 12.1, True), ("<", 12.0, False),
    ("<=", 12.0, True), ("<=", 11.9, False),
    ("==", 12.0, True), ("==", 12.5, False),
    ("!=", 12.5, True), ("!=", 12.0, False),
])
def test_each_operator_fails_exactly_when_its_comparison_holds(op, threshold, fails):
    gate = parse_gate(f"fid{op}{threshold}")
    assert (gate.name, gate.op, gate.value) == ("fid", op, threshold)
    [result] = check_gates([gate], {"fid": 12.0})
    assert result.failed is fails and result.value == 12.0
    assert result.line.startswith("gate failed: " if fails else "gate held: ")
    assert f"fid{op}{threshold}" in result.line and "fid = 12" in result.line


def test_spacing_aliases_base_prefix_and_scientific_numbers():
    gates = parse_gates(["  reward < 0.5 ", "base.fid>=1e1", "flops_per_image>2.5e9", "kid<-0.01"])
    assert [(g.name, g.op, g.value) for g in gates] == [
        ("reward_mean", "<", 0.5), ("base.fid", ">=", 10.0), ("flops_per_image", ">", 2.5e9), ("kid", "<", -0.01)]
    metrics = gate_metrics({"reward_mean": 0.7, "fid": 3.0, "flops_per_image": 2e9, "kid": 0.0, "extra": 1},
                           base={"fid": 10.0})
    assert "extra" not in metrics and metrics["base.fid"] == 10.0
    assert [r.failed for r in check_gates(gates, metrics)] == [False, True, False, False]


def test_a_metric_the_run_did_not_measure_fails_the_gate():
    [result] = check_gates([parse_gate("fid>12")], {"fid": None})
    assert result.failed and result.value is None and "not measured" in result.line
    [nan] = check_gates([parse_gate("fid<12")], {"fid": float("nan")})
    assert nan.failed


@pytest.mark.parametrize("text", ["fid", "fid>", ">12", "fid>>12", "fid=>12", "fid=12", "fid > twelve",
                                  "fid>12 and kid>1", "", "fid<nan", "fid ≥ 12"])
def test_malformed_gates_name_the_expression_and_the_syntax(text):
    with pytest.raises(PgraftError) as info:
        parse_gate(text)
    message = str(info.value)
    assert repr(text) in message and "NAME OP NUMBER" in message and info.value.exit_code == 2


def test_unknown_or_unavailable_metrics_list_what_there_is():
    with pytest.raises(PgraftError, match=r"unknown metric 'fdi'.*fid"):
        parse_gate("fdi>12")
    with pytest.raises(PgraftError, match=r"measures no 'reward_mean'.*only evaluate --reward.*it has: .*fid"):
        parse_gates(["reward<0.5"], gate_names("correct"))
    with pytest.raises(PgraftError, match="measures no 'base.fid'"):
        parse_gates(["base.fid>1"], gate_names("evaluate"))
    assert "reward_mean" not in gate_names("evaluate", reward=False)
    assert {"reward_mean", "base.reward_mean", "fid"} <= gate_names("finetune")
    assert {"reconstruction_rms_mean", "base.fid", "nfe"} <= gate_names("correct")
    with pytest.raises(PgraftError, match=r"has no metric 'kid'; it has: fid"):
        check_gates([parse_gate("kid>1")], {"fid": 1.0})


def test_a_malformed_gate_exits_2_with_one_error_line_before_any_work():
    bad = cli_run("evaluate", "digits", "--fail-if", "fid>>12")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: --fail-if 'fid>>12' is not a gate") and "NAME OP NUMBER" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_evaluate_gates_exit_0_when_all_hold_and_1_with_a_line_per_failure(tmp_path):
    run = tmp_path / "ev"
    args = ["evaluate", "digits", "--num", "32", "--steps", "4", "--reward", "classifier:digits:3", "--run-dir", str(run),
            "--set", "evaluate.kid_subsets=2", "--json"]
    ok = runner.invoke(app, [*args, "--fail-if", "fid>1e9", "--fail-if", "reward<-1e9", "--fail-if", "nfe!=4"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout)
    assert [g["failed"] for g in summary["gates"]] == [False, False, False]
    assert summary["gates"][1]["metric"] == "reward_mean" and summary["gates"][1]["value"] == summary["reward_mean"]
    assert Path(summary["report"]) == run / "report.html" and ok.stderr == ""

    # the same run again (sampling resumes as done): two of three gates fail
    failing = runner.invoke(app, [*args, "--fail-if", "fid<1e9", "--fail-if", "nfe>=4", "--fail-if", "kid>1e9"])
    assert failing.exit_code == 1, failing.output
    lines = failing.stderr.strip().splitlines()
    assert lines == [f"gate failed: fid<1e9 (fid = {summary['fid']:.6g})", "gate failed: nfe>=4 (nfe = 4)"]
    assert json.loads(failing.stdout)["fid"] == summary["fid"]  # stdout still holds the one JSON object
    assert (run / "evaluate.json").is_file() and (run / "report.html").is_file()

    # without --json the summary is printed, then the failures
    human = runner.invoke(app, [*args[:-1], "--quiet", "--fail-if", "num<100"])
    assert human.exit_code == 1 and human.stderr.strip() == "gate failed: num<100 (num = 32)"


@pytest.mark.parametrize("parse, text, message", [
    (parse_gate, "fid>>12", "--fail-if 'fid>>12' is not a gate: write NAME OP NUMBER"),
    (parse_gate, "fid>1e", "--fail-if 'fid>1e': '1e' is not a number; write NAME OP NUMBER"),
    (parse_stop, "fid fell by 3", "--stop-if 'fid fell by 3' is not a stop rule: write \"NAME dropped by"),
    (parse_stop, "fid rose by more than x", "--stop-if 'fid rose by more than x': 'x' is not a number; write \"NAME"),
])
def test_malformed_gates_and_stop_rules_name_the_expression_and_the_syntax(parse, text, message):
    with pytest.raises(PgraftError) as err:
        parse(text)
    assert str(err.value).startswith(message)
