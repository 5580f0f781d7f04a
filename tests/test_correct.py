"""Inverse noise correction: inversion round trip, corrector training/resume, composition, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from pgraft_cli import correct as correct_mod
from pgraft_cli.checkpoints import load_model
from pgraft_cli.cli import app
from pgraft_cli.correct import NoiseCorrector, fit_gaussian, run_train_corrector
from pgraft_cli.data import load_digits
from pgraft_cli.models import Cond
from pgraft_cli.recipes import load_recipe
from pgraft_cli.runstore import RunStore
from pgraft_cli.samplers import NoiseSchedule, invert, sample
from pgraft_cli.ui import progress

runner = CliRunner()
# A shrunk inverse-noise recipe: few images, steps and training steps (the real defaults run minutes).
SMALL = ["--set", "correct.base_steps=4", "--set", "correct.num_images=128", "--set", "correct.inversion_iterations=8", "--set",
         "correct.corrector_train_steps=30", "--set", "correct.corrector_batch_size=32", "--set",
         "correct.corrector_checkpoint_every=10", "--set", "correct.corrector_sample_steps=2", "--set",
         "evaluate.num=64", "--set", "evaluate.kid_subsets=2", "--set", "correct.max_reconstruction_rms=0.05"]


def test_inversion_round_trip_on_bundled_model():
    """T(T^-1(x)) = x up to a stated bound: RMS < 0.02 and max < 0.1 (data in [-1, 1])."""
    model = load_model("digits")
    images, _ = load_digits()
    x0 = images[:16] * 2 - 1
    fn = lambda x, t: model.predict(x, t, Cond())  # noqa: E731
    grid = model.schedule.grid(8)
    with torch.inference_mode():
        z, used = invert(fn, model.schedule, x0, grid, iterations=12)
        back, _ = sample(fn, model.schedule, z, grid)
    err = back - x0
    assert float(err.pow(2).mean().sqrt()) < 0.02
    assert float(err.abs().max()) < 0.1
    assert used == 12
    # the inverted noise is noise-like: roughly zero mean and unit scale
    assert abs(float(z.mean())) < 0.2 and 0.7 < float(z.std()) < 1.4


def test_invert_is_exact_for_a_linear_flow():
    """v(x, t) = a x: backward Euler solves x = y - dt a x exactly, so the round trip is exact."""
    schedule = NoiseSchedule.flow()
    fn = lambda x, t: 0.3 * x  # noqa: E731
    y = torch.randn(3, 4, dtype=torch.float64)
    grid = schedule.grid(5)
    z, _ = invert(fn, schedule, y, grid, iterations=60, tol=1e-14)
    back, _ = sample(fn, schedule, z, grid)
    torch.testing.assert_close(back, y, atol=1e-10, rtol=0)
    # closed form: each Euler step multiplies by (1 + dt a) with dt = -0.2
    torch.testing.assert_close(z, y / (1 - 0.2 * 0.3) ** 5, atol=1e-10, rtol=0)


def test_fit_gaussian_recovers_mean_and_covariance():
    g = torch.Generator().manual_seed(0)
    true_l = torch.tensor([[1.0, 0.0], [0.8, 0.5]], dtype=torch.float64)
    x = (torch.randn(20000, 2, generator=g, dtype=torch.float64) @ true_l.T + torch.tensor([1.0, -2.0], dtype=torch.float64))
    mean, chol = fit_gaussian(x)
    torch.testing.assert_close(mean, torch.tensor([1.0, -2.0], dtype=torch.float64), atol=0.03, rtol=0)
    torch.testing.assert_close(chol @ chol.T, true_l @ true_l.T, atol=0.04, rtol=0)
    corrector = NoiseCorrector("gaussian", 4, mean=mean.float(), chol=chol.float())
    e = torch.zeros(2, 2)
    torch.testing.assert_close(corrector(e), mean.float().expand(2, 2))


def test_corrector_training_resumes_bit_exactly(tmp_path, monkeypatch):
    rec = load_recipe("inverse-noise", ["correct.corrector_train_steps=12", "correct.corrector_batch_size=8",
                                        "correct.corrector_checkpoint_every=5", "correct.corrector_channels=[8, 16]"])
    noises = torch.randn(40, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with RunStore(tmp_path / "a") as store, progress(False) as bar:
        straight, _ = run_train_corrector(noises, (1, 16, 16), rec.correct, "base", store, bar)

    calls = {"n": 0}
    real_loss = correct_mod.flow_matching_loss

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # dies after the checkpoint at step 5
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(correct_mod, "flow_matching_loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        with RunStore(tmp_path / "b") as store, progress(False) as bar:
            run_train_corrector(noises, (1, 16, 16), rec.correct, "base", store, bar)
    assert (tmp_path / "b" / "train_corrector" / "state.safetensors").exists()
    monkeypatch.setattr(correct_mod, "flow_matching_loss", real_loss)
    with RunStore(tmp_path / "b") as store, progress(False) as bar:
        resumed, _ = run_train_corrector(noises, (1, 16, 16), rec.correct, "base", store, bar)
    for (name, a), (_, b) in zip(straight.network.state_dict().items(), resumed.network.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_correct_end_to_end_then_sample_and_evaluate(tmp_path):
    """The headline command, shrunk: correct -> a self-describing file -> sample/evaluate compose it."""
    out = tmp_path / "corrected.safetensors"
    result = runner.invoke(app, ["correct", "digits", "--recipe", "inverse-noise", "--out", str(out),
                                 "--run-dir", str(tmp_path / "run"), "--json", *SMALL])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["inversion"]["reconstruction_rms_mean"] < 0.05
    for key in ("base", "corrected"):
        m = summary[key]
        assert m["num"] == 64 and m["fid"] is not None and m["features"].startswith("classifier")
    # measured FLOPs: corrected = base + corrector calls, NFE = 4 + 2
    assert summary["base"]["nfe"] == 4 and summary["corrected"]["nfe"] == 6
    calls = summary["corrected"]["flops_calls"]
    assert summary["corrected"]["flops_per_image"] == 4 * calls["base_call"] + 2 * calls["corrector_call"]
    assert summary["corrected"]["flops_parts"] == {"denoiser": 4 * calls["base_call"], "corrector": 2 * calls["corrector_call"]}
    assert 0 < calls["corrector_call"] < calls["base_call"]

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["pgraft.kind"] == "corrector" and meta["pgraft.corrector_type"] == "flow"
    base = json.loads(meta["pgraft.base"])
    assert base["source"] == "digits" and base["steps"] == 4 and base["solver"] == "euler"
    assert base["identity"] == load_model("digits").identity
    assert json.loads(meta["pgraft.metrics"])["corrected"]["nfe"] == 6

    loaded = load_model(str(out))
    assert loaded.corrector is not None and loaded.corrector.base_steps == 4 and loaded.family == "flow"

    # sample composes corrector -> base automatically, at the corrector's base steps
    s = runner.invoke(app, ["sample", str(out), "--num", "16", "--batch-size", "16", "--run-dir",
                            str(tmp_path / "s"), "--out", str(tmp_path / "png"), "--json"])
    assert s.exit_code == 0, s.output
    settings = json.loads((tmp_path / "png" / "sampler.json").read_text())
    assert settings["steps"] == 4 and settings["corrector"]["steps"] == 2
    b = runner.invoke(app, ["sample", "digits", "--num", "16", "--steps", "4", "--batch-size", "16",
                            "--run-dir", str(tmp_path / "s2"), "--out", str(tmp_path / "png2"), "--json"])
    assert b.exit_code == 0
    assert (tmp_path / "png" / "00000.png").read_bytes() != (tmp_path / "png2" / "00000.png").read_bytes()

    e = runner.invoke(app, ["evaluate", str(out), "--num", "32", "--run-dir", str(tmp_path / "ev"), "--json",
                            "--set", "evaluate.kid_subsets=2"])
    assert e.exit_code == 0, e.output
    ev = json.loads(e.stdout.strip().splitlines()[-1])
    for key in ("fid", "kid", "features", "num", "nfe", "flops_per_image", "seconds_per_image"):
        assert key in ev
    assert ev["num"] == 32 and ev["nfe"] == 6 and ev["corrected"] is True and ev["seconds_per_image"] > 0

    # a base that is not the one the corrector was fitted for is refused with one line
    other = tmp_path / "other.safetensors"
    from pgraft_cli.checkpoints import save_pgraft_safetensors

    m = load_model("digits")
    state = {k: v + 0.01 for k, v in m.network.state_dict().items()}
    save_pgraft_safetensors(other, m.network, m.model_class, m.model_config, m.scheduler_config, {}, state=state)
    bad = subprocess.run([sys.executable, "-m", "pgraft_cli", "evaluate", str(out), "--base", str(other), "--num", "8"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "--base" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
