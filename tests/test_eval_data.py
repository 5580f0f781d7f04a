"""Held-out evaluation: the bundled models' splits, the judge, and FID against --eval-data beside --data."""

from __future__ import annotations

import json

import pytest
from conftest import cli_run
import torch
from typer.testing import CliRunner

from pgraft_cli.io.checkpoints import load_model
from pgraft_cli.cli import app
from pgraft_cli.io.data import load_digits
from pgraft_cli.stages.evaluate import CLASSIFIER_PATH, JUDGE_PATH, classifier_features, pick_features
from pgraft_cli.core.metrics import distances
from pgraft_cli.io.checkpoints import load_classifier
from pgraft_cli.stages.rewards import parse_reward
from pgraft_cli.stages.sample import load_images

runner = CliRunner()


def _provenance(path) -> dict:
    from pgraft_cli.io.checkpoints import read_safetensors_metadata

    return json.loads(read_safetensors_metadata(path)["pgraft.provenance"])


def test_bundled_flow_is_trained_on_the_train_split_and_names_held_out_eval_data():
    model = load_model("digits")
    assert model.default_data == "digits-train" and model.default_eval_data == "digits-test"
    assert model.provenance["training"]["data"] == "digits-train"
    assert model.provenance["train_images"] == len(load_digits(split="train")[0]) == 1078


def test_judge_is_another_architecture_trained_on_another_split_and_is_accurate_on_held_out_data():
    judge, reward_net = load_classifier(JUDGE_PATH), load_classifier(CLASSIFIER_PATH)
    assert judge.config.arch == "mlp" and reward_net.config.arch == "cnn"
    assert not any(isinstance(m, torch.nn.Conv2d) for m in judge.modules())
    assert _provenance(JUDGE_PATH)["training"]["data"] == "digits-judge"
    assert _provenance(CLASSIFIER_PATH)["training"]["data"] == "digits-train"
    images, labels = load_digits(split="test")  # neither network saw these
    with torch.no_grad():
        for net in (judge, reward_net):
            assert (net(images * 2 - 1).argmax(1) == labels).float().mean() > 0.95


def test_judge_reward_and_features():
    images, labels = load_digits(split="test")
    threes = images[labels == 3][:8]
    judge = load_classifier(JUDGE_PATH)
    expected = torch.log_softmax(judge(threes * 2 - 1).double(), -1)[:, 3]
    assert torch.allclose(parse_reward("classifier:judge:3")(threes), expected)
    feats = pick_features("judge", (1, 16, 16), None)
    assert feats.num_features == judge.config.feature_dim == 32 and "judge" in feats.name
    assert torch.allclose(feats(threes), judge.features(threes * 2 - 1).double())


@pytest.mark.slow
def test_evaluate_reports_fid_against_held_out_data_and_beside_it_the_training_data(tmp_path):
    args = ["evaluate", "digits", "--num", "80", "--steps", "2", "--json", "--set", "evaluate.kid_subsets=2"]
    r = runner.invoke(app, [*args, "--run-dir", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["data"] == "digits-train" and m["fid_data"] == "digits-test"
    assert list(m["also_against"]) == ["digits-train"]
    feats = classifier_features()
    gen = feats(load_images(tmp_path / "a", "sample"))
    test, train = load_digits(split="test")[0], load_digits(split="train")[0]
    assert m["fid"] == pytest.approx(distances(gen, feats(test), kid_subsets=2)["fid"], rel=1e-6)
    assert m["also_against"]["digits-train"]["fid"] == pytest.approx(distances(gen, feats(train))["fid"], rel=1e-6)
    assert m["fid"] != m["also_against"]["digits-train"]["fid"]

    # an explicit --data is the only reference unless --eval-data is given too
    r = runner.invoke(app, [*args, "--data", "digits", "--run-dir", str(tmp_path / "a")])
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["fid_data"] == "digits" and m["also_against"] == {}
    r = runner.invoke(app, [*args, "--data", "digits-train", "--eval-data", "digits-judge", "--features", "judge",
                            "--run-dir", str(tmp_path / "a")])
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["fid_data"] == "digits-judge" and list(m["also_against"]) == ["digits-train"]
    assert "judge" in m["features"]
    proc = cli_run(*args, "--eval-data", "nowhere/", "--run-dir", tmp_path / "a")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --eval-data nowhere/: no such file") and len(proc.stderr.splitlines()) == 1


@pytest.mark.slow
def test_correct_reports_held_out_fid_for_base_and_corrected(tmp_path):
    args = ["correct", "digits", "--json", "--run-dir", str(tmp_path / "run"), "--set", "correct.base_steps=4",
            "--set", "correct.num_images=16", "--set", "correct.inversion_iterations=8", "--set",
            "correct.max_reconstruction_rms=0.05", "--set", "correct.corrector_train_steps=5", "--set",
            "correct.corrector_batch_size=16", "--set", "correct.corrector_sample_steps=2", "--set", "evaluate.num=16",
            "--set", "evaluate.kid_subsets=2"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["data"] == "digits-train" and s["fid_data"] == "digits-test"
    for key in ("base", "corrected"):
        assert set(s[key]["also_against"]) == {"digits-train"}
        assert s[key]["fid"] > 0 and s[key]["also_against"]["digits-train"]["fid"] > 0
