"""GRAFT / P-GRAFT end to end: the finetune verb, the stage verbs, caching across rewards, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from pgraft_cli.io.checkpoints import load_model
from pgraft_cli.cli import app
from pgraft_cli.errors import PgraftError

from conftest import cli_in_process

runner = CliRunner()
# The pgraft recipe shrunk to seconds: 32 trajectories (8 groups of 4), 4 Euler steps, 4 training steps.
SMALL = ["--set", "sample.num=32", "--set", "sample.steps=4", "--set", "sample.batch_size=16",
         "--set", "finetune.steps=4", "--set", "finetune.batch_size=8", "--set", "finetune.rounds=2",
         "--set", "finetune.learning_rate=1e-3", "--set", "evaluate.num=32", "--set", "evaluate.kid_subsets=2"]


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _finished(run) -> dict:
    manifest = json.loads((run / "manifest.json").read_text())
    return {name: entry.get("finished") for name, entry in manifest["stages"].items()}


@pytest.mark.slow
def test_finetune_end_to_end_caches_stages_and_composes_on_load(tmp_path):
    run, out = tmp_path / "run", tmp_path / "tuned.safetensors"
    args = ["finetune", "digits", "--reward", "classifier:digits:3", "--cutoff", "0.5", "--run-dir", str(run),
            "--out", str(out), "--json", *SMALL]
    summary = _json(runner.invoke(app, args))
    assert summary["cutoff"] == 0.5 and summary["reward"] == "classifier:digits:3"
    for key in ("base", "tuned"):
        m = summary[key]
        assert m["num"] == 32 and m["fid"] is not None and m["reward_mean"] <= 0 and m["nfe"] == 4
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["kept"] == 8 for r in summary["rounds"])  # top 1 of every 4
    # every round's stages are in the run store
    stages = _finished(run)
    for name in ("sample", "score", "filter", "finetune", "sample-r2", "score-r2", "filter-r2", "finetune-r2",
                 "evaluate-base", "evaluate-tuned"):
        assert stages.get(name), name
    # P-GRAFT samples carry the state at the cutoff and its time
    from pgraft_cli.io.runstore import RunStore

    shard = next(RunStore(run, is_main=False).stage("sample").shards())
    assert shard["captured"].shape == shard["samples"].shape and float(shard["captured_t"][0]) == 0.5
    from pgraft_cli.stages.sample import initial_noise

    first = int(shard["index"][0])  # each trajectory's seed regenerates its initial noise
    g = torch.Generator().manual_seed(int(shard["noise_seed"][0]))
    assert torch.equal(torch.randn((1, 16, 16), generator=g), initial_noise(0, [first], (1, 16, 16))[0])

    # the checkpoint describes itself: cutoff, base identity, recipe, rewards
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["pgraft.kind"] == "finetune"
    assert json.loads(meta["pgraft.finetune"])["cutoff"] == 0.5
    assert json.loads(meta["pgraft.base"])["identity"] == load_model("digits").identity
    assert json.loads(meta["pgraft.metrics"])["tuned"]["reward_mean"] == summary["tuned"]["reward_mean"]
    assert json.loads(meta["pgraft.provenance"])["recipe"]["finetune"]["cutoff"] == 0.5

    # re-running resumes: nothing is redone
    again = _json(runner.invoke(app, args))
    assert _finished(run) == stages and again["tuned"] == summary["tuned"]

    # evaluate on the file composes tuned (t > c) + base and reproduces the run's own numbers
    ev = _json(runner.invoke(app, ["evaluate", str(out), "--num", "32", "--steps", "4", "--seed", "1", "--reward",
                                   "classifier:digits:3", "--run-dir", str(tmp_path / "ev"), "--json",
                                   "--set", "evaluate.kid_subsets=2", "--features", "judge"]))
    assert ev["finetuned"] is True and ev["cutoff"] == 0.5
    # finetune measured FID in the judge's features: the reward is the bundled classifier
    assert summary["tuned"]["features"] == ev["features"] and "judge" in ev["features"]
    assert ev["reward_mean"] == pytest.approx(summary["tuned"]["reward_mean"], abs=1e-9)
    # the same samples against the same held-out reference; torchmetrics' FID takes eigenvalues of a
    # nearly singular product (32 samples < 64 feature dimensions), which differ at ~1e-9 relative
    assert ev["fid_data"] == summary["fid_data"] == "digits-test"
    assert ev["fid"] == pytest.approx(summary["tuned"]["fid"], rel=1e-7)
    # without --steps: the steps the file was tuned and evaluated at (4, said in a note), not the recipe's 32
    from conftest import cli_run

    plain = cli_run("evaluate", out, "--num", "32", "--seed", "1", "--reward", "classifier:digits:3", "--run-dir",
                    tmp_path / "ev2", "--json", "--set", "evaluate.kid_subsets=2", "--features", "judge")
    assert plain.returncode == 0, plain.stderr
    shown = json.loads(plain.stdout.strip().splitlines()[-1])
    assert shown["nfe"] == 4 and shown["reward_mean"] == pytest.approx(ev["reward_mean"], abs=1e-9)
    assert any("tuned and evaluated at 4 steps" in n for n in shown["notes"])

    # a different reward re-runs scoring onwards, never sampling
    args2 = [a if a != "classifier:digits:3" else "classifier:digits:7" for a in args]
    _json(runner.invoke(app, args2))
    after = _finished(run)
    assert after["sample"] == stages["sample"]
    assert after["score"] != stages["score"] and after["finetune"] != stages["finetune"]


@pytest.mark.slow
def test_stage_verbs_sample_score_filter_on_a_run_directory(tmp_path):
    run = tmp_path / "run"
    s = _json(runner.invoke(app, ["sample", "digits", "--num", "32", "--steps", "4", "--batch-size", "16",
                                  "--capture-at", "0.5", "--run-dir", str(run), "--json"]))
    assert s["num"] == 32
    # filtering before scoring says what to run
    early = runner.invoke(app, ["filter", str(run)])
    assert isinstance(early.exception, PgraftError) and "pgraft score" in str(early.exception)
    sc = _json(runner.invoke(app, ["score", str(run), "--reward", "jpeg-compressibility", "--json"]))
    assert sc["num"] == 32 and sc["reward_mean"] < 0  # -kB
    f = _json(runner.invoke(app, ["filter", str(run), "--rule", "best_of_n", "--m", "4", "--json"]))
    assert f["kept"] == 8 and f["num"] == 32 and f["expected_kept_fraction"] == 0.25
    assert f["reward_after"]["mean"] >= f["reward_before"]["mean"]
    assert sum(f["histogram_before"]) == 32 and sum(f["histogram_after"]) == 8
    t = _json(runner.invoke(app, ["filter", str(run), "--rule", "threshold", "--quantile", "0.5", "--json"]))
    # kept: every reward at or above the median (JPEG sizes tie, so possibly more than half)
    from pgraft_cli.stages.score import load_rewards
    from pgraft_cli.core.selection import threshold_value

    rewards = load_rewards(run, "score")[1]
    expected = int((rewards >= threshold_value(rewards, value=None, quantile=0.5)).sum())
    assert 16 <= expected < 32 and t["kept"] == expected
    kept = json.loads((run / "filter" / "summary.json").read_text())
    assert kept["kept"] == expected and len(kept["reshaped_reward"]) == expected
    # --dedup (a bool flag, refused as `True` before) and a sample stage named otherwise (a finetune run's
    # evaluate-tuned): its score and filter stages were given its own name, and the store cleared it
    d = _json(runner.invoke(app, ["filter", str(run), "--rule", "best_of_n", "--m", "4", "--dedup", "--json"]))
    assert d["kept"] <= 8 and d["params"] == {"n": 4}
    shutil.copytree(run / "sample", run / "evaluate-x")  # registered as a finished stage, as evaluate-tuned is
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["evaluate-x"] = manifest["stages"]["sample"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    other = _json(runner.invoke(app, ["score", str(run), "--stage", "evaluate-x", "--reward", "jpeg-compressibility",
                                      "--json"]))
    assert other["stage"] == "score-evaluate-x" and other["reward_mean"] == sc["reward_mean"]
    fx = _json(runner.invoke(app, ["filter", str(run), "--stage", "evaluate-x", "--rule", "best_of_n", "--m", "4",
                                   "--json"]))
    assert fx["kept"] == 8 and (run / "evaluate-x" / "shard-00000.safetensors").is_file()
    assert (run / "filter-evaluate-x" / "kept.safetensors").is_file()


def test_bad_reward_and_bad_run_directory_are_one_line_errors(tmp_path, monkeypatch):
    cases = [
        ["finetune", "digits", "--reward", "clasifier:digits:3"],
        ["finetune", "digits", "--reward", "classifier:digits:12"],
        ["score", str(tmp_path), "--reward", "jpeg-compressibility"],
        ["finetune", "digits", "--cutoff", "1.5"],
    ]
    # The first in a fresh process (the console script as a user runs it), the others through the
    # same entry in this one (a new interpreter's start-up and imports are most of each run).
    proc = subprocess.run([sys.executable, "-m", "pgraft_cli", *cases[0]], capture_output=True, text=True, cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    results = [(proc.stderr, proc.returncode)] + [(err, code) for (_, err), code in
                                                  (cli_in_process(*args) for args in cases[1:])]
    for args, (stderr, code) in zip(cases, results):
        assert code == 2, (args, stderr)
        assert stderr.startswith("error:") and len(stderr.strip().splitlines()) == 1, stderr
        assert "Traceback" not in stderr
    assert "did you mean 'classifier'" in results[0][0]


@pytest.mark.slow
def test_text_model_lora_finetune_with_a_python_reward(tiny_sd_dir, tmp_path):
    """The DDPM (epsilon) + text + LoRA path: prompts flow through sampling, scoring and training."""
    (tmp_path / "my_reward.py").write_text(
        "import torch\n"
        "def brightness(images, prompts):\n"
        "    assert prompts is not None and len(prompts) == len(images)\n"
        "    return images.mean(dim=(1, 2, 3)) + torch.tensor([len(p) for p in prompts]) * 0.0\n")
    out = tmp_path / "lora.safetensors"
    summary = _json(runner.invoke(app, [
        "finetune", str(tiny_sd_dir), "--reward", f"python:{tmp_path / 'my_reward.py'}:brightness", "--cutoff", "0.3",
        "--lora-rank", "2", "--prompt", "a red cube", "--prompt", "a blue ball", "--run-dir", str(tmp_path / "run"),
        "--out", str(out), "--json", "--set", "sample.num=8", "--set", "sample.steps=3", "--set", "sample.lane=4",
        "--set", "sample.batch_size=8", "--set", "sample.guidance_scale=1.0", "--set", "finetune.steps=2",
        "--set", "finetune.batch_size=2", "--set", "finetune.rounds=1", "--set", "evaluate.num=4",
        "--set", "filter.m=4"]))
    assert summary["rounds"][0]["kept"] == 2  # 2 prompts x top 1 of 4
    with safe_open(str(out), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert json.loads(meta["pgraft.finetune"])["lora"]["rank"] == 2
    assert keys and all("lora_" in k for k in keys)  # the adapter only, not the base weights
    loaded = load_model(str(out))
    assert loaded.lora and loaded.cutoff == 0.3 and loaded.model_class == "UNet2DConditionModel"
    trained = {k: v for k, v in loaded.network.state_dict().items() if "lora_B" in k}
    assert trained and any(float(v.abs().max()) > 0 for v in trained.values())  # the adapter was trained and loaded


@pytest.mark.slow
def test_finetune_under_accelerate_with_two_processes_equals_one_process(tmp_path):
    """DDP on the CPU (gloo): sampling and scoring split by shard, training averages gradients; two
    rounds (the second samples from the first's fine-tune) give what one process gives."""
    from conftest import forked_launch, torch_threads  # test_sample runs `accelerate launch` itself

    args = ["finetune", "digits", "--cutoff", "0.5", "--json", "--device", "cpu", *SMALL, "--set", "finetune.rounds=2"]
    with torch_threads(1):  # as each launched process (the same summation order); first: the forks reuse its imports
        one = _json(runner.invoke(app, [*args, "--run-dir", str(tmp_path / "one"), "--out", str(tmp_path / "one.safetensors")]))
    proc = forked_launch([*args, "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "t.safetensors")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["kept"] for r in summary["rounds"]] == [8, 8]
    for stage in ("sample", "sample-r2"):  # 32 samples in shards of 16: one per process, in both rounds
        writers = []
        for k in range(2):
            with safe_open(str(tmp_path / "run" / stage / f"shard-{k:05d}.safetensors"), "pt") as f:
                writers.append(f.metadata()["pgraft.process"])
        assert writers == ["0/2", "1/2"]
    for two_round, one_round in zip(summary["rounds"], one["rounds"]):
        assert two_round["kept"] == one_round["kept"]
        assert two_round["finetune"]["final_loss"] == pytest.approx(one_round["finetune"]["final_loss"], rel=1e-5)
        assert two_round["sampled"]["reward_mean"] == pytest.approx(one_round["sampled"]["reward_mean"], rel=1e-5)
        assert two_round["kept_reward_mean"] == pytest.approx(one_round["kept_reward_mean"], rel=1e-5)
    assert summary["tuned"]["fid"] == pytest.approx(one["tuned"]["fid"], rel=1e-4)
    # the gradient's float sums run in another order, which Adam (lr 1e-3) turns into small moves of the
    # weights whose gradients are near zero (up to about two steps where such a gradient's sign flips): at most
    # 1.4e-5 measured on an AVX512 CPU and 6.2e-5 on an AVX2 one (one element; mean 1.2e-8), against 7.8e-3
    # when each process drew a batch of its own. The bound is a measured one: 4x the largest seen, 31x below that.
    two_net, one_net = load_model(str(tmp_path / "t.safetensors")).tuned, load_model(str(tmp_path / "one.safetensors")).tuned
    for (name, a), (_, b) in zip(two_net.state_dict().items(), one_net.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=2.5e-4, msg=name)


def test_finetune_streams_its_fid_reference_and_never_loads_the_whole_data_set(tmp_path, streamed_digits_file):
    """`--data` only feeds the FID reference: read in batches of at most 256 images, `load_data` never."""
    path, read_sizes = streamed_digits_file
    summary = _json(runner.invoke(app, ["finetune", "digits", "--reward", "classifier:digits:3", "--cutoff", "0.5",
                                        "--data", str(path), "--run-dir", str(tmp_path / "run"), "--json", *SMALL,
                                        "--set", "finetune.rounds=1"]))
    assert summary["fid_data"] == str(path) and summary["tuned"]["fid"] is not None
    assert sorted(read_sizes) == [44, 256]  # 300 images in read batches of 256


def test_tuned_guidance_override_needs_a_fine_tuned_file():
    bad = runner.invoke(app, ["evaluate", "digits", "--tuned-guidance", "reapply", "--num", "4"])
    assert isinstance(bad.exception, PgraftError) and "--tuned-guidance" in str(bad.exception)
    assert "is not one: drop --tuned-guidance" in str(bad.exception)
    bad = runner.invoke(app, ["evaluate", "digits", "--tuned-guidance", "sometimes", "--num", "4"])
    assert isinstance(bad.exception, PgraftError) and "none or reapply" in str(bad.exception)
    assert "'sometimes' is unknown" in str(bad.exception)  # (a misspelling was answered "...; x is one")


def test_a_training_batch_that_does_not_split_across_the_processes_is_refused_before_sampling(tmp_path):
    """finetune.batch_size must be a multiple of the processes; this was checked once round 1's sampling,
    scoring and filtering had run. It is one error before any stage now."""
    from conftest import forked_launch

    args = ["finetune", "digits", "--cutoff", "0.5", "--device", "cpu", *SMALL, "--set", "finetune.batch_size=3",
            "--run-dir", str(tmp_path / "run")]
    proc = forked_launch(args)
    assert proc.returncode == 2 and "multiple of 2" in proc.stderr
    assert not (tmp_path / "run" / "sample").exists()
