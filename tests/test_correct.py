"""Inverse noise correction: inversion round trip, corrector training/resume, composition, CLI."""

from __future__ import annotations

import json
import math

import pytest
from conftest import cli_run
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from pgraft_cli.stages import correct as correct_mod
from pgraft_cli.io.checkpoints import load_model, save_corrected
from pgraft_cli.cli import app
from pgraft_cli.models.corrector import NoiseCorrector, fit_gaussian
from pgraft_cli.stages.correct import run_invert, run_train_corrector
from pgraft_cli.io.data import load_digits
from pgraft_cli.errors import PgraftError
from pgraft_cli.models.loaded import Cond
from pgraft_cli.io.recipes import load_recipe
from pgraft_cli.io.runstore import RunStore
from pgraft_cli.core.samplers import NoiseSchedule, invert, sample
from pgraft_cli.report.ui import progress

runner = CliRunner()
# A shrunk inverse-noise recipe: few images, steps and training steps (the real defaults run minutes).
SMALL = ["--set", "correct.base_steps=4", "--set", "correct.num_images=32", "--set", "correct.inversion_iterations=8", "--set",
         "correct.corrector_train_steps=10", "--set", "correct.corrector_batch_size=16", "--set",
         "correct.corrector_checkpoint_every=10", "--set", "correct.corrector_sample_steps=2", "--set",
         "evaluate.num=16", "--set", "evaluate.kid_subsets=2", "--set", "correct.max_reconstruction_rms=0.05"]


def test_inversion_round_trip_on_bundled_model():
    """T(T^-1(x)) = x per image: RMS < 0.02 and max < 0.1 (data in [-1, 1]), within the call cap."""
    model = load_model("digits")
    images, _ = load_digits()
    x0 = images[:16] * 2 - 1
    fn = lambda x, t: model.predict(x, t, Cond())  # noqa: E731
    grid = model.schedule.grid(8)
    with torch.inference_mode():
        z, info = invert(fn, model.schedule, x0, grid, iterations=12)
        back, _ = sample(fn, model.schedule, z, grid)
    err = (back - x0).reshape(16, -1)
    assert float(err.pow(2).mean(1).sqrt().max()) < 0.02
    assert float(err.abs().max()) < 0.1
    assert info.iterations.shape == (16,) and info.residual.shape == (16,)
    assert int(info.iterations.max()) <= 8 * 12
    # the inverted noise is noise-like: roughly zero mean and unit scale
    assert abs(float(z.mean())) < 0.2 and 0.7 < float(z.std()) < 1.4


def test_inversion_converges_per_image_on_the_bundled_model():
    """Every step but the last (where |dt| = t and the map barely contracts, see ``invert``) converges:
    each image's residual is below tol in well under the cap, and the noise that made x comes back."""
    model = load_model("digits")
    fn = lambda x, t: model.predict(x, t, Cond())  # noqa: E731
    grid = model.schedule.grid(8)[:-1]  # 1 -> 0.125: seven steps
    noise = torch.randn(16, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        x, _ = sample(fn, model.schedule, noise, grid)
        z, info = invert(fn, model.schedule, x, grid, iterations=12, tol=1e-5)
    assert bool((info.residual < 1e-5).all()), info.residual
    assert float(info.iterations.double().mean()) <= 7 * 6  # at most half the cap of 12 per step, on average
    assert float((z - noise).pow(2).mean().sqrt()) < 1e-3


def test_invert_is_exact_for_a_linear_flow():
    """v(x, t) = a x: backward Euler solves x = y - dt a x exactly, so the round trip is exact."""
    schedule = NoiseSchedule.flow()
    fn = lambda x, t: 0.3 * x  # noqa: E731
    y = torch.randn(3, 4, dtype=torch.float64)
    grid = schedule.grid(5)
    z, info = invert(fn, schedule, y, grid, iterations=60, tol=1e-14)
    back, _ = sample(fn, schedule, z, grid)
    torch.testing.assert_close(back, y, atol=1e-10, rtol=0)
    # closed form: each Euler step multiplies by (1 + dt a) with dt = -0.2
    torch.testing.assert_close(z, y / (1 - 0.2 * 0.3) ** 5, atol=1e-10, rtol=0)
    # Anderson solves a linear map from two differences; the plain fixed point contracts by 0.06 a call
    assert bool((info.iterations <= 5 * 4).all()) and bool((info.residual < 1e-14).all())
    _, plain = invert(fn, schedule, y, grid, iterations=60, tol=1e-14, memory=0)
    assert bool((plain.iterations >= 5 * 8).all())


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


def _invert_digits(tmp_path, name, *sets):
    rec = load_recipe("inverse-noise", ["correct.base_steps=4", "correct.invert_shard_size=8", *sets])
    model = load_model("digits")
    images, _ = load_digits()
    with RunStore(tmp_path / name) as store, progress(False) as bar:
        return run_invert(model, images[:8], rec.correct, 8, store, bar)[:2]


def test_inversion_drops_and_counts_images_above_the_per_image_limit(tmp_path):
    _, full = _invert_digits(tmp_path, "a")
    assert full["num"] == 8 and full["dropped"] == 0 and full["used"] == 8
    assert sum(full["iterations_histogram"].values()) == 8 and full["iterations_max"] <= full["iterations_cap"]
    stored = json.loads((tmp_path / "a" / "invert" / "stats.json").read_text())
    assert stored["converged"] == full["converged"] and stored["iterations_histogram"] == full["iterations_histogram"]
    from safetensors.torch import load_file

    rms = load_file(str(next((tmp_path / "a" / "invert").glob("shard-*.safetensors"))))["rms"].sort().values
    limit = float(rms[5] + rms[6]) / 2  # between the 6th and 7th smallest: two images above it
    kept, stats = _invert_digits(tmp_path, "b", f"correct.max_reconstruction_rms={limit}",
                                 "correct.max_dropped_fraction=0.3")
    assert stats["dropped"] == 2 and stats["used"] == 6 and len(kept) == 6


def test_inversion_stats_count_the_images_that_met_every_steps_own_tolerance():
    """Every largest residual is below the loosest tolerance (1e-2), but only the flagged images
    met each step's own one: the count follows the flags."""
    from pgraft_cli.io.recipes import CorrectConfig

    per_image = {"rms": torch.full((4,), 1e-3), "max": torch.full((4,), 2e-3), "iterations": torch.full((4,), 9),
                 "residual": torch.full((4,), 5e-3, dtype=torch.float64),
                 "converged": torch.tensor([True, False, True, False])}
    cfg = CorrectConfig(inversion_tol=1e-3, inversion_tol_last=1e-2)
    assert correct_mod.inversion_stats(per_image, torch.zeros(4, 1, 2, 2), cfg)["converged"] == 2


def test_the_converged_label_names_each_steps_own_tolerance():
    """The terminal line and report.html say what the count means: one tolerance, or the last step's apart."""
    from pgraft_cli.report.ui import converged_rule

    assert converged_rule(5e-3) == converged_rule(5e-3, 5e-3) == "every step's residual RMS < 0.005"
    for last in (1e-2, 1e-3):
        assert converged_rule(5e-3, last) == (f"every step's residual RMS < its own tolerance: 0.005, the last "
                                              f"step's (into the data) {last:g}")


def test_the_invert_stage_stores_each_images_flag_the_default_counts_as_before_and_old_shards_read(tmp_path):
    """With one tolerance (the recipe's default) an image converged iff its largest residual is below it:
    the stored flags say that, and a shard written before them (no flag) reads with that rule. With a
    last step's own tolerance that rule cannot tell which step missed, so those shards are keyed apart."""
    from dataclasses import asdict

    from safetensors.torch import load_file, save_file
    from pgraft_cli.io.recipes import CorrectConfig

    few = "correct.inversion_iterations=16"  # some images reach the tolerance, some stop at the cap
    _, stats = _invert_digits(tmp_path, "a", few)
    cfg = load_recipe("inverse-noise", ["correct.base_steps=4", "correct.invert_shard_size=8", few]).correct
    shard = load_file(str(next((tmp_path / "a" / "invert").glob("shard-*.safetensors"))))
    before = shard["residual"] < cfg.inversion_tol
    assert shard["converged"].dtype == torch.bool and torch.equal(shard["converged"], before)
    assert stats["converged"] == int(before.sum()) and 0 < stats["converged"] < 8
    save_file({k: v for k, v in shard.items() if k != "converged"}, str(tmp_path / "old.safetensors"))
    per_image, kept = correct_mod.read_inversion([tmp_path / "old.safetensors"], cfg)
    assert torch.equal(per_image["converged"], before) and len(kept) == 8
    for keys, apart in (({}, False), ({"inversion_tol_last": 1e-2}, True)):  # a key beyond the recipe's own
        c = CorrectConfig(**keys)
        assert bool(set(correct_mod.invert_config(c)) - set(asdict(c))) == apart


def test_inversion_runs_the_base_in_the_sampling_memory_format_keyed_and_given_back(tmp_path):
    """The invert stage runs the base as sampling does (channels_last on the CPU by default, keyed), the
    same bytes on a rerun, contiguous noises to rounding, and the network's weights contiguous after."""
    rec = load_recipe("inverse-noise", ["correct.base_steps=4", "correct.invert_shard_size=8"])
    model = load_model("digits")
    images, _ = load_digits()
    out = {}
    for name, fmt in (("auto", "auto"), ("again", "auto"), ("contiguous", "contiguous")):
        with RunStore(tmp_path / name) as store, progress(False) as bar:
            kept, _, _ = run_invert(model, images[:8], rec.correct, 8, store, bar, memory_format=fmt)
            entry = store.read_manifest()["stages"]["invert"]
        out[name] = kept, entry["key"], entry["config"]["memory_format"]
        assert all(p.is_contiguous() for p in model.network.parameters())
    (auto, key, used), (again, key_again, _), (contiguous, key_contiguous, _) = out.values()
    assert used == "channels_last" and key == key_again != key_contiguous
    assert torch.equal(auto, again)
    torch.testing.assert_close(auto, contiguous, rtol=0, atol=0.05)  # the ill-conditioned last step amplifies rounding


def test_inversion_fails_in_one_line_when_too_many_images_are_dropped(tmp_path):
    with pytest.raises(PgraftError) as err:
        _invert_digits(tmp_path, "a", "correct.max_reconstruction_rms=1e-9")
    message = str(err.value)
    assert "8 of 8 images" in message and "correct.max_dropped_fraction" in message and "\n" not in message


def test_data_is_encoded_only_while_the_inversion_is_not_done(tmp_path, monkeypatch):
    calls = []
    real = correct_mod._model_space
    monkeypatch.setattr(correct_mod, "_model_space", lambda *a: calls.append(1) or real(*a))
    first, _ = _invert_digits(tmp_path, "a")
    assert len(calls) == 1
    again, _ = _invert_digits(tmp_path, "a")
    assert len(calls) == 1 and torch.equal(first, again)


def test_full_covariance_gaussian_is_refused_with_no_more_images_than_dimensions():
    with pytest.raises(PgraftError, match="gaussian-diag"):
        fit_gaussian(torch.randn(16, 1, 4, 4))
    with pytest.raises(PgraftError, match="gaussian-diag"):
        fit_gaussian(torch.randn(2, 16385))


def test_diagonal_gaussian_corrector_fits_saves_loads_and_counts_flops(tmp_path):
    from pgraft_cli.stages.evaluate import flops_per_image

    g = torch.Generator().manual_seed(0)
    noises = 0.5 + 2.0 * torch.randn(4000, 1, 16, 16, generator=g)  # fewer images than the 256^2 a full fit needs
    rec = load_recipe("inverse-noise", ["correct.corrector=gaussian-diag"])
    with RunStore(tmp_path / "run") as store, progress(False) as bar:
        corrector, info = run_train_corrector(noises, (1, 16, 16), rec.correct, "base", store, bar)
    assert info["kind"] == "gaussian-diag" and corrector.chol is None
    assert abs(float(corrector.mean.mean()) - 0.5) < 0.01 and abs(float(corrector.std.mean()) - 2.0) < 0.01
    e = torch.randn(3, 1, 16, 16, generator=g)
    torch.testing.assert_close(corrector(e), corrector.mean.reshape(1, 1, 16, 16) + corrector.std.reshape(1, 1, 16, 16) * e)
    base = load_model("digits")
    out = save_corrected(tmp_path / "diag.safetensors", corrector, base, {}, {})
    loaded = load_model(str(out))
    assert loaded.corrector.kind == "gaussian-diag"
    torch.testing.assert_close(loaded.corrector(e), corrector(e))
    parts = flops_per_image(loaded, 4)["flops_parts"]
    assert parts["corrector"] == 2 * 256  # one multiply-add per dimension


@pytest.mark.parametrize("width, blocks", [(32, 1), (64, 3)])
def test_mlp_flow_flops_match_the_closed_form(width, blocks):
    from pgraft_cli.core.metrics import measure_flops
    from pgraft_cli.models.corrector import MLPFlow, mlp_flow_flops

    network = MLPFlow([2, 4, 3], width, blocks, time_dim=16)
    measured = measure_flops(lambda: network(torch.randn(1, 2, 4, 3), torch.tensor([500.0])))
    d = 2 * 4 * 3
    assert measured == mlp_flow_flops(d, width, blocks, 16)
    assert measured == 2 * (d * width + 16 * width + width**2 + 2 * blocks * width**2 + width * d)


def test_an_untrained_mlp_corrector_is_the_identity():
    from pgraft_cli.models.corrector import MLPFlow

    corrector = NoiseCorrector("mlp", 4, 3, network=MLPFlow([1, 16, 16], 32, 1).eval())
    e = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(corrector(e), e)


def test_mlp_corrector_learns_a_shift_saves_loads_and_counts_flops(tmp_path):
    """Trained on 0.5 + e (constant velocity, so Euler is exact), the MLP corrector's samples have
    mean ~0.5 and std ~1; the file round-trips bit for bit and the corrected model's FLOPs are its
    steps times the closed form."""
    from pgraft_cli.models.corrector import mlp_flow_flops
    from pgraft_cli.stages.evaluate import flops_per_image

    g = torch.Generator().manual_seed(0)
    noises = 0.5 + torch.randn(512, 1, 16, 16, generator=g)
    rec = load_recipe("inverse-noise", ["correct.corrector=mlp", "correct.corrector_width=64",
                                        "correct.corrector_train_steps=300", "correct.corrector_batch_size=64",
                                        "correct.corrector_learning_rate=3e-3", "correct.corrector_sample_steps=4",
                                        "correct.corrector_sampler=euler"])
    with RunStore(tmp_path / "run") as store, progress(False) as bar:
        corrector, info = run_train_corrector(noises, (1, 16, 16), rec.correct, "base", store, bar)
    assert info["kind"] == "mlp" and info["parameters"] == corrector.parameter_count() > 0
    z = corrector(torch.randn(2000, 1, 16, 16, generator=g))
    assert abs(float(z.mean()) - 0.5) < 0.05 and abs(float(z.std()) - 1.0) < 0.05
    out = save_corrected(tmp_path / "mlp.safetensors", corrector, load_model("digits"), {}, {})
    loaded = load_model(str(out))
    assert loaded.corrector.kind == "mlp" and loaded.corrector.steps == 4
    e = torch.randn(3, 1, 16, 16, generator=g)
    assert torch.equal(loaded.corrector(e), corrector(e))
    parts = flops_per_image(loaded, 4)["flops_parts"]
    assert parts["corrector"] == 4 * mlp_flow_flops(256, 64, rec.correct.corrector_blocks, 64)


def test_a_heun_corrector_saves_loads_and_counts_two_calls_a_step(tmp_path):
    """The corrector's sampler is in the file (an older file without it reads as Euler), Heun's output
    is the in-memory corrector's bit for bit and not Euler's, and its NFE and FLOPs count 2 calls a step."""
    from diffusers import UNet2DModel

    from pgraft_cli.stages.evaluate import flops_per_image

    torch.manual_seed(0)
    config = dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, sample_size=16, in_channels=1,
                  out_channels=1, down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"])
    heun = NoiseCorrector("flow", 4, 3, "heun", network=UNet2DModel(**config).eval(), model_config=config)
    loaded = load_model(str(save_corrected(tmp_path / "heun.safetensors", heun, load_model("digits"), {}, {})))
    e = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    assert loaded.corrector.sampler == "heun" and loaded.corrector.calls == 6
    assert torch.equal(loaded.corrector(e), heun(e))
    euler = NoiseCorrector("flow", 4, 3, network=heun.network, model_config=config)
    assert float((euler(e) - heun(e)).abs().max()) > 1e-4
    info = flops_per_image(loaded, 4)
    assert info["nfe"] == 4 + 6 and info["flops_parts"]["corrector"] == 6 * info["flops_calls"]["corrector_call"]


@pytest.mark.parametrize("scale", [1.1, 2.0])
def test_few_euler_steps_of_the_exact_corrector_flow_shrink_the_spread_as_derived(scale):
    """docs/methods.md: from N(0, I) to N(0, s^2 I) along x_t = (1 - t) z + t e the exact velocity is
    ``v = a(t) x``, ``a = (t - (1 - t) s^2) / ((1 - t)^2 s^2 + t^2)``, so N Euler steps scale the
    std by ``prod_k (1 - h a(t_k))`` (0.79 at 4 steps for s = 1.1): the corrector's own sampler
    step count, not its training, is what narrows its samples."""
    schedule = NoiseSchedule.flow()
    e = torch.randn(20000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def a(t):
        return (t - (1 - t) * scale**2) / ((1 - t) ** 2 * scale**2 + t**2)

    for steps in (4, 16, 64):
        grid = schedule.grid(steps)
        z, _ = sample(lambda x, t: a(t) * x, schedule, e, grid)
        factor = math.prod(1 - float(grid[k] - grid[k + 1]) * float(a(grid[k])) for k in range(steps))
        assert float(z.std() / e.std()) == pytest.approx(factor, rel=1e-9)
        assert factor < scale and (steps < 64 or factor > 0.97 * scale)
    assert scale != 1.1 or 0.78 < math.prod(1 - 0.25 * a(1 - 0.25 * k) for k in range(4)) < 0.80


def _untrained_flow_corrector(base_steps: int = 4) -> NoiseCorrector:
    from diffusers import UNet2DModel

    rec = load_recipe("inverse-noise", ["correct.corrector_channels=[8, 16]"])
    config = correct_mod.corrector_config(rec.correct, (1, 16, 16))
    torch.manual_seed(0)
    return NoiseCorrector("flow", base_steps, 2, network=UNet2DModel(**config).eval(), model_config=config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_corrector_composes_with_a_half_precision_base_model(dtype):
    from pgraft_cli.stages.sample import initial_noise
    from pgraft_cli.core.samplers import sample as run_sampler

    model = load_model("digits")
    model.corrector = _untrained_flow_corrector()
    noise = initial_noise(0, list(range(4)), model.sample_shape)
    grid = model.schedule.grid(4)

    def composed():
        z = model.corrector(noise.to(model.dtype))
        assert z.dtype == model.dtype
        with torch.inference_mode():
            x, _ = run_sampler(lambda x, t: model.predict(x, t, Cond()), model.schedule, z, grid)
        return x.float()

    reference = composed()
    model.to("cpu", dtype)
    half = composed()
    assert bool(torch.isfinite(half).all())
    assert float((half - reference).abs().max()) < 0.1


def test_the_corrector_network_sees_float32_timesteps():
    corrector = _untrained_flow_corrector()
    seen = []
    network = corrector.network
    corrector.network = type("Spy", (), {"parameters": network.parameters, "__call__": lambda self, z, ts: (
        seen.append(ts.dtype) or network(z, ts))})()
    corrector(torch.randn(2, 1, 16, 16).to(torch.bfloat16))
    assert seen and set(seen) == {torch.float32}


def test_a_short_corrector_training_forgets_its_random_init(tmp_path):
    """With the EMA warm-up, one step leaves 10 % of the initial weights (0.999 without it)."""
    from diffusers import UNet2DModel

    base = ["correct.corrector_train_steps=1", "correct.corrector_batch_size=4", "correct.corrector_channels=[8, 16]"]
    noises = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    runs = {}
    for name, ema in (("ema", 0.999), ("raw", 0.0)):
        rec = load_recipe("inverse-noise", [*base, f"correct.corrector_ema={ema}"])
        with RunStore(tmp_path / name) as store, progress(False) as bar:
            runs[name], _ = run_train_corrector(noises, (1, 16, 16), rec.correct, "base", store, bar)
    torch.manual_seed(0)
    init = UNet2DModel(**runs["raw"].model_config).state_dict()
    ema, raw = runs["ema"].network.state_dict(), runs["raw"].network.state_dict()
    moved = sum(float((raw[k] - init[k]).pow(2).sum()) for k in raw) ** 0.5
    left = sum(float((ema[k] - raw[k]).pow(2).sum()) for k in raw) ** 0.5
    assert moved > 0 and left / moved == pytest.approx(0.1, rel=1e-3)


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


def test_the_corrector_trains_with_the_fused_adamw_and_keys_its_stage_by_it(tmp_path, monkeypatch):
    """torch's CPU default is its per-parameter AdamW loop; the corrector asks for the fused kernel,
    which gives other bytes, so a corrector cached by another path is retrained, not reused."""
    made = []
    real = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: made.append(real(params, **kw)) or made[-1])
    rec = load_recipe("inverse-noise", ["correct.corrector_train_steps=2", "correct.corrector_batch_size=4",
                                        "correct.corrector_channels=[8, 16]"])
    noises = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with RunStore(tmp_path) as store, progress(False) as bar:
        run_train_corrector(noises, (1, 16, 16), rec.correct, "base", store, bar)
        inputs = store.read_manifest()["stages"]["train_corrector"]["inputs"]
    assert len(made) == 1 and made[0].defaults["fused"] is True
    assert inputs["optimizer"] == "adamw-fused"


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
        assert m["num"] == 16 and m["fid"] is not None and m["features"].startswith("classifier")
    # measured FLOPs: corrected = base + corrector calls, NFE = 4 + 2 Heun steps x 2 calls
    assert summary["base"]["nfe"] == 4 and summary["corrected"]["nfe"] == 8
    calls = summary["corrected"]["flops_calls"]
    assert summary["corrected"]["flops_per_image"] == 4 * calls["base_call"] + 4 * calls["corrector_call"]
    assert summary["corrected"]["flops_parts"] == {"denoiser": 4 * calls["base_call"], "corrector": 4 * calls["corrector_call"]}
    assert 0 < calls["corrector_call"] < calls["base_call"]

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["pgraft.kind"] == "corrector" and meta["pgraft.corrector_type"] == "flow"
    base = json.loads(meta["pgraft.base"])
    assert base["source"] == "digits" and base["steps"] == 4 and base["solver"] == "euler"
    assert base["identity"] == load_model("digits").identity
    assert json.loads(meta["pgraft.metrics"])["corrected"]["nfe"] == 8

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
    assert ev["num"] == 32 and ev["nfe"] == 8 and ev["corrected"] is True and ev["seconds_per_image"] > 0

    # a base that is not the one the corrector was fitted for is refused with one line
    other = tmp_path / "other.safetensors"
    from pgraft_cli.io.checkpoints import save_pgraft_safetensors

    m = load_model("digits")
    state = {k: v + 0.01 for k, v in m.network.state_dict().items()}
    save_pgraft_safetensors(other, m.network, m.model_class, m.model_config, m.scheduler_config, {}, state=state)
    bad = cli_run("evaluate", out, "--base", other, "--num", "8", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "--base" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def _invert_shard_digits(dtype: torch.dtype, num: int = 32) -> dict:
    from pgraft_cli.stages.correct import _invert_shard
    from pgraft_cli.io.data import load_data
    from pgraft_cli.io.recipes import CorrectConfig

    model = load_model("digits").to("cpu", dtype)
    x = load_data("digits-train", model.image_shape)[:num] * 2 - 1
    with torch.inference_mode():
        return _invert_shard(model, x, CorrectConfig(), 16, lambda n: None)


def test_the_last_steps_tolerance_and_the_memory_reach_the_solver_and_the_round_trip_stays_in_the_gate():
    """``inversion_tol_last`` loosens only the step into the data (the round trip's error there is that
    step's residual, so it stays below the gate) and ``inversion_memory`` is Anderson's memory."""
    from pgraft_cli.stages.correct import _invert_shard
    from pgraft_cli.io.data import load_data
    from pgraft_cli.io.recipes import CorrectConfig

    model = load_model("digits")
    x = load_data("digits-train", model.image_shape)[:4] * 2 - 1
    with torch.inference_mode():
        runs = [_invert_shard(model, x, CorrectConfig(**keys), 4, lambda n: None)
                for keys in ({}, {"inversion_tol_last": 0.01}, {"inversion_tol_last": 0.01, "inversion_memory": 0})]
    calls = [int(run["iterations"].sum()) for run in runs]
    assert calls[1] < calls[0] - 4 and calls[2] != calls[1], calls
    assert float(runs[1]["rms"].max()) < CorrectConfig().max_reconstruction_rms
    assert float(runs[1]["rms"].mean()) > float(runs[0]["rms"].mean())  # looser, but inside the gate


def test_inversion_runs_the_network_under_the_samplers_autocast_and_keeps_a_float32_iterate(monkeypatch):
    """With model.autocast set (bf16 on CUDA by default; bf16 on the CPU here), every network call of the
    inversion and of its round trip runs under autocast, as sampling does; the iterate stays float32."""
    from pgraft_cli.stages.correct import _invert_shard
    from pgraft_cli.io.recipes import CorrectConfig

    model = load_model("digits")
    model.autocast = torch.bfloat16
    seen, predict = [], model.predict

    def recording(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return predict(*args, **kwargs)

    monkeypatch.setattr(model, "predict", recording)
    x = load_digits()[0][:2] * 2 - 1
    out = _invert_shard(model, x, CorrectConfig(base_steps=4, inversion_iterations=3), 2, lambda n: None)
    assert len(seen) > 4 and all(seen) and out["noise"].dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")


def test_inversion_at_the_recipe_defaults_converges_for_most_images_and_bf16_stays_close():
    """On the real 8-step grid (last step included) at the recipe's tolerance most float32 images
    converge. In bf16 the network's own rounding sets a residual floor near that tolerance
    (measured at tol 2e-3: median 2.4e-3 against 1.9e-3 in float32), so few bf16 images pass ``tol``; the
    solver still iterates in float32 and the round trip, which the gate judges, stays well inside it.
    bf16 on the first 16 of the 32 images (one lane): where bf16 is emulated (an AVX2 CPU) it costs 6x
    float32 an image, 64 s for 32 images, which made this the suite's slowest test."""
    from pgraft_cli.io.recipes import CorrectConfig

    cfg = CorrectConfig()
    f32, bf16 = _invert_shard_digits(torch.float32), _invert_shard_digits(torch.bfloat16, num=16)
    assert int((f32["residual"] < cfg.inversion_tol).sum()) >= 0.8 * 32, f32["residual"]
    assert float(bf16["residual"].median()) < 1.5 * cfg.inversion_tol
    assert float(bf16["rms"].max()) < 0.5 * cfg.max_reconstruction_rms  # the round trip scales with tol (5e-3)
    assert float(bf16["iterations"].double().mean()) <= 1.3 * float(f32["iterations"][:16].double().mean())


@pytest.mark.slow  # the whole command end to end
def test_raising_the_gate_reuses_the_inversion_and_reports_the_new_verdict(tmp_path):
    """max_reconstruction_rms / max_dropped_fraction only judge the shards: changing them re-judges
    without inverting again, and the stats say what the new gate dropped."""
    run = tmp_path / "run"
    base = [*SMALL, "--set", "correct.corrector_train_steps=2", "--set", "evaluate.num=8", "--json"]
    first = json.loads(runner.invoke(app, ["correct", "digits", "--run-dir", str(run), *base]).stdout)
    finished = json.loads((run / "manifest.json").read_text())["stages"]["invert"]["finished"]
    gate = first["inversion"]["reconstruction_rms_mean"]  # drops roughly half of the images
    strict = runner.invoke(app, ["correct", "digits", "--run-dir", str(run), *base, "--set",
                                 f"correct.max_reconstruction_rms={gate}", "--set", "correct.max_dropped_fraction=0.9", "--features", "classifier"])
    assert strict.exit_code == 0, strict.output
    again = json.loads((run / "manifest.json").read_text())["stages"]["invert"]
    assert again["finished"] == finished  # the inversion was not redone
    stats = json.loads((run / "invert" / "stats.json").read_text())
    assert first["inversion"]["dropped"] == 0 and 0 < stats["dropped"] < stats["num"] == first["inversion"]["num"]
    assert stats["max_reconstruction_rms"] == gate
    # where each run's time went: the second read the inversion from its shards
    stages = {"load", "inversion", "corrector_training", "sampling", "evaluation", "report"}
    timed = [first["stage_seconds"], json.loads(strict.stdout)["stage_seconds"]]
    assert all(set(t) == stages and min(t.values()) >= 0 for t in timed)
    assert sum(v for k, v in timed[0].items() if k != "report") <= first["seconds"] + 0.01
    assert timed[1]["inversion"] < timed[0]["inversion"]
    # with the CPU they were measured on (its model, threads and vector ISA), in the summary and the provenance
    from pgraft_cli.io.host import describe_cpu

    provenance = json.loads((run / "provenance.json").read_text())["correct"]
    assert first["device_name"] == provenance["device_name"] == describe_cpu()


def test_inversion_reads_only_the_rows_of_shards_not_done_and_matches_a_tensor_bit_for_bit(tmp_path):
    """Data read by row range: the key hashes it batch by batch, a resumed run reads only its undone
    shard, and the noises and stats equal those of the whole tensor, bit for bit."""
    from safetensors.torch import load_file

    from pgraft_cli.io.data import DataRows

    rec = load_recipe("inverse-noise", ["correct.base_steps=4", "correct.invert_shard_size=8"])
    model = load_model("digits")
    images = load_digits()[0][:24]
    reads = []
    rows = DataRows(24, lambda a, b: reads.append((a, b)) or images[a:b])

    def invert(name, data):
        with RunStore(tmp_path / name) as store, progress(False) as bar:
            return run_invert(model, data, rec.correct, 8, store, bar)[:2]

    kept, stats = invert("rows", rows)
    assert reads == [(0, 24), (0, 8), (8, 16), (16, 24)]  # the key's digest, then one read per shard
    whole, whole_stats = invert("tensor", images)
    assert torch.equal(kept, whole) and stats == whole_stats
    for k in range(3):
        name = f"shard-{k:05d}.safetensors"
        a, b = (load_file(str(tmp_path / run / "invert" / name)) for run in ("rows", "tensor"))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    (tmp_path / "rows" / "invert" / "shard-00001.safetensors").unlink()
    reads.clear()
    again, _ = invert("rows", rows)
    assert reads == [(0, 24), (8, 16)] and torch.equal(again, whole)


@pytest.mark.slow  # the whole command end to end
def test_correct_reads_its_data_by_row_ranges_never_whole(tmp_path, streamed_digits_file):
    """`pgraft correct` never loads the data set at once: `load_data` may not be called, and no read
    of the 300-image file holds more than a 256-image batch (inversion shards are 16 of its first 32 rows)."""
    path, read_sizes = streamed_digits_file
    result = runner.invoke(app, ["correct", "digits", "--data", str(path), "--run-dir", str(tmp_path / "run"), "--json",
                                 *SMALL, "--set", "correct.invert_shard_size=16", "--set", "correct.corrector_train_steps=2"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["inversion"]["num"] == 32 and summary["base"]["num"] == 16
    assert max(read_sizes) <= 256 and sorted(set(read_sizes)) == [16, 32, 44, 256]


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_correct_inverts_a_diffusion_checkpoint_and_the_corrected_file_samples(tmp_path, scheduler):
    """A DDPM/DDIM checkpoint, sampled by DDIM (eta = 0): invert, fit a corrector, write, sample it back.

    v-prediction: with a small random head it is near the exact denoiser of N(0, I) data. A random
    epsilon head is no denoiser (x0_hat = x / a - ...: its inverse noise is ~a_T x0, where the
    network's GroupNorm blows up); the epsilon and x0 conversions are pinned in test_samplers."""
    prediction = "v_prediction"
    from conftest import build_scheduler, build_tiny_unet

    folder = tmp_path / "model"  # 16 px, the bundled classifier's features
    unet = build_tiny_unet(sample_size=16)
    with torch.no_grad():  # a small nonlinear term on v = 0
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.mul_(0.05)
    unet.save_pretrained(folder, safe_serialization=True)
    build_scheduler(scheduler, prediction).save_config(folder)
    out = tmp_path / "corrected.safetensors"
    result = runner.invoke(app, ["correct", str(folder), "--data", "digits", "--out", str(out), "--run-dir",
                                 str(tmp_path / "run"), "--json", *SMALL, "--set", "correct.corrector=gaussian-diag",
                                 "--set", "correct.max_reconstruction_rms=1e-3", "--set", "correct.inversion_tol=1e-5",
                                 "--features", "classifier"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    inv = summary["inversion"]
    assert inv["num"] == 32 and inv["dropped"] == 0 and inv["reconstruction_rms_max"] < 1e-4
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["pgraft.base"])["solver"] == "ddim"
    loaded = load_model(str(out))
    assert loaded.family == "diffusion" and loaded.corrector is not None
    assert 0.5 < inv["noise_std"] < 2 and summary["corrected"]["fid"] is not None
    s = runner.invoke(app, ["sample", str(out), "--num", "16", "--batch-size", "16", "--run-dir",
                            str(tmp_path / "s"), "--out", str(tmp_path / "png"), "--json"])
    assert s.exit_code == 0, s.output


@pytest.mark.slow
def test_correct_under_accelerate_with_two_processes_equals_one_process(tmp_path):
    """Inversion and evaluation split their shards across the processes; the corrector trains once;
    the summary and the corrected file are those of one process."""
    from conftest import forked_launch, torch_threads  # test_sample runs `accelerate launch` itself

    # two shards per stage, one per process: 16 inverted and 8 sampled images each
    args = ["correct", "digits", "--json", "--device", "cpu", *SMALL, "--set", "correct.invert_shard_size=16",
            "--set", "sample.batch_size=8"]
    with torch_threads(1):  # as each launched process; first: the forks reuse its imports
        one = json.loads(runner.invoke(app, [*args, "--run-dir", str(tmp_path / "one"), "--out",
                                             str(tmp_path / "one.safetensors")]).stdout.strip().splitlines()[-1])
    proc = forked_launch([*args, "--run-dir", str(tmp_path / "two"), "--out", str(tmp_path / "two.safetensors")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout.strip().splitlines()[-1])
    writers = set()
    for stage in ("invert", "evaluate-base", "evaluate-corrected"):
        for path in sorted((tmp_path / "two" / stage).glob("shard-*.safetensors")):
            with safe_open(str(path), "pt") as f:
                writers.add((stage, (f.metadata() or {}).get("pgraft.process")))
    assert {w for _, w in writers} == {"0/2", "1/2"}, writers  # both processes did shards of every stage
    for key in ("reconstruction_rms_mean", "used", "noise_std", "iterations_mean"):
        assert two["inversion"][key] == pytest.approx(one["inversion"][key], rel=1e-6), key
    assert two["corrector"]["final_loss"] == pytest.approx(one["corrector"]["final_loss"], rel=1e-6)
    for model in ("base", "corrected"):
        assert two[model]["fid"] == pytest.approx(one[model]["fid"], rel=1e-4), model
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / "two.safetensors")), load_file(str(tmp_path / "one.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_class_conditioned_diagonal_gaussian_fits_each_class_and_pools_the_rare_ones():
    from pgraft_cli.models.corrector import fit_gaussian_diag_by_class

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 50 + [2] * 60 + [1])  # class 1 has one sample, class 3 none
    shift = torch.tensor([3.0, 0.0, -2.0, 0.0])[labels].view(-1, 1, 1, 1)
    noises = torch.randn(len(labels), 1, 2, 2, generator=g) * (1 + labels.view(-1, 1, 1, 1)) + shift
    mean, std = fit_gaussian_diag_by_class(noises, labels, 4)
    flat = noises.flatten(1).double()
    for c in (0, 2):
        torch.testing.assert_close(mean[c], flat[labels == c].mean(0))
        torch.testing.assert_close(std[c], flat[labels == c].std(0))
    for c in (1, 3):
        torch.testing.assert_close(mean[c], flat.mean(0))
        torch.testing.assert_close(std[c], flat.std(0))


def test_a_corrected_file_records_the_precision_it_was_fitted_in_and_a_mismatch_is_noted(tmp_path):
    """The inverted noises depend on the base sampler's precision (weights' dtype, autocast): the file
    records it, inspect shows it, and sample/evaluate in another precision run as asked with one note."""
    from pgraft_cli.models.corrector import fit_gaussian_diag

    from conftest import cli_in_process

    model = load_model("digits")
    mean, std = fit_gaussian_diag(torch.randn(64, *model.sample_shape, generator=torch.Generator().manual_seed(0)))
    corrector = NoiseCorrector("gaussian-diag", 4, mean=mean, std=std, autocast="torch.bfloat16", dtype="torch.float32")
    path = save_corrected(tmp_path / "c.safetensors", corrector, model, {}, {})
    back = load_model(str(path)).corrector
    fitted = "float32 weights under bfloat16 autocast"
    assert (back.autocast, back.dtype, back.fitted_precision(torch.float32)) == ("torch.bfloat16", "torch.float32", fitted)
    (out, _), code = cli_in_process("inspect", str(path), "--json")
    assert code == 0 and json.loads(out)["composition"]["fitted_precision"] == fitted

    def sample(name, *sets):
        (_, err), code = cli_in_process("sample", str(path), "--num", "2", "--run-dir", str(tmp_path / name),
                                        "--out", str(tmp_path / f"{name}-png"), *sets)
        assert code == 0, err
        notes = [line for line in err.splitlines() if "was fitted to its base sampling in" in line]
        return notes, json.loads((tmp_path / f"{name}-png" / "sampler.json").read_text())["autocast"]

    notes, autocast = sample("as-asked")  # the CPU's default: no autocast
    assert autocast is None and len(notes) == 1  # sampled as asked, and said once
    assert notes[0].startswith("note: ") and fitted in notes[0] and "--set model.autocast=bf16" in notes[0]
    assert sample("matched", "--set", "model.autocast=bf16") == ([], "torch.bfloat16")
    (_, err), code = cli_in_process("evaluate", str(path), "--num", "2", "--features", "none", "--run-dir",
                                    str(tmp_path / "ev"))
    assert code == 0, err
    ev = json.loads((tmp_path / "ev" / "evaluate.json").read_text())
    assert sum(fitted in n for n in ev["notes"]) == 1


def test_a_corrector_file_from_before_the_precision_record_prints_no_precision_note():
    """A file that predates the record (autocast and dtype None) fitted in an unknown precision: a bf16-autocast
    run (a GPU's default) prints no note, where a file that records float32 without autocast gets one."""
    from pgraft_cli.pipelines.skeleton import precision_note

    model = load_model("digits")
    model.autocast = torch.bfloat16
    dim = 16 * 16
    model.corrector = NoiseCorrector("gaussian-diag", 4, mean=torch.zeros(dim), std=torch.ones(dim))
    assert precision_note(model) is None
    model.corrector.dtype = "torch.float32"
    assert "was fitted to its base sampling in float32" in precision_note(model)


def test_a_flow_corrector_from_the_gaussian_source_starts_there_saves_loads_and_refuses_export(tmp_path):
    """correct.corrector_source = "gaussian": the flow starts from the inverted noises' fitted
    N(mean, L L^T) (core.gaussian.colour), so with a zero velocity it is exactly that Gaussian; the
    source round-trips through the corrected file, its colouring is counted in the FLOPs, and the
    diffusers export (which would start from N(0, I)) is refused in one line."""
    from pgraft_cli.core.gaussian import colour
    from pgraft_cli.io.export import ExportError, export_diffusers
    from pgraft_cli.stages.evaluate import flops_per_image

    g = torch.Generator().manual_seed(0)
    noises = 0.3 + 1.1 * torch.randn(300, 1, 16, 16, generator=g)
    rec = load_recipe("inverse-noise", ["correct.corrector_source=gaussian", "correct.corrector_train_steps=2",
                                        "correct.corrector_batch_size=8", "correct.corrector_channels=[8, 16]",
                                        "correct.base_steps=4", "correct.corrector_sample_steps=3"])
    with RunStore(tmp_path / "run") as store, progress(False) as bar:
        corrector, _ = run_train_corrector(noises, (1, 16, 16), rec.correct, "base", store, bar)
    mean, chol = fit_gaussian(noises)
    torch.testing.assert_close(corrector.mean, mean.float())
    torch.testing.assert_close(corrector.chol, chol.float())
    e = torch.randn(4, 1, 16, 16, generator=g)
    trained = corrector(e)
    out = save_corrected(tmp_path / "src.safetensors", corrector, load_model("digits"), {}, {})
    loaded = load_model(str(out))
    assert torch.equal(loaded.corrector(e), trained)
    base_part = flops_per_image(loaded, 4)["flops_calls"]["corrector_call"] * 3 * 2  # 3 Heun steps, 2 calls each
    assert flops_per_image(loaded, 4)["flops_parts"]["corrector"] == base_part + 2 * 256 * 256
    with pytest.raises(ExportError, match="Gaussian source"):
        export_diffusers(loaded, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    torch.nn.init.zeros_(corrector.network.conv_out.weight)
    torch.nn.init.zeros_(corrector.network.conv_out.bias)
    torch.testing.assert_close(corrector(e), colour(e, mean, chol), rtol=0, atol=1e-5)


def test_a_gaussian_source_with_too_few_images_names_the_source_key(tmp_path):
    # the flow's Gaussian source needs more images than dimensions; the error named corrector = "flow" (already set)
    rec = load_recipe("inverse-noise", ["correct.corrector_source=gaussian", "correct.corrector_train_steps=2",
                                        "correct.corrector_batch_size=8", "correct.corrector_channels=[8, 16]"])
    noises = torch.randn(100, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with RunStore(tmp_path / "run") as store, progress(False) as bar:
        with pytest.raises(PgraftError, match='corrector_source = "normal"') as err:
            run_train_corrector(noises, (1, 16, 16), rec.correct, "base", store, bar)
    assert "100 of dimension 256" in str(err.value) and "corrector = " not in str(err.value)


def _one_step(mixed_precision):
    """One ``corrector_step_loss`` step of a tiny UNet corrector: its loss, gradients, and whether the
    network ran under autocast."""
    from diffusers import UNet2DModel

    from pgraft_cli.stages.correct import corrector_network, corrector_step_loss

    rec = load_recipe("inverse-noise", ["correct.corrector_batch_size=8", "correct.corrector_channels=[8, 16]",
                                        f"correct.corrector_mixed_precision={mixed_precision}"])
    torch.manual_seed(0)
    network, _ = corrector_network(rec.correct, (1, 16, 16))
    seen = []
    real_forward = UNet2DModel.forward
    network.forward = lambda *a, **kw: seen.append(torch.is_autocast_enabled("cpu")) or real_forward(network, *a, **kw)
    noises = torch.randn(20, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    loss = corrector_step_loss(network, noises, rec.correct)(3)
    return rec.correct, network, noises, loss, [p.grad for p in network.parameters()], seen


def test_corrector_training_without_mixed_precision_is_the_plain_step_bit_for_bit():
    """``corrector_mixed_precision = "no"``: the step's loss and gradients are those of the plain
    float32 flow-matching loss on the step's batch (seeded by (seed, step)), outside any autocast."""
    from pgraft_cli.core.losses import flow_matching_loss
    from pgraft_cli.io.runstore import derive_seed

    cfg, network, noises, loss, grads, seen = _one_step("no")
    assert seen == [False]
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "corrector-step", 3))
    idx = torch.randint(0, len(noises), (8,), generator=g)
    e, t = torch.randn((8, 1, 16, 16), generator=g), torch.rand(8, generator=g)
    network.zero_grad()
    plain = flow_matching_loss(network, NoiseCorrector.schedule, noises[idx], e, t)
    plain.backward()
    assert torch.equal(loss, plain.detach())
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, network.parameters()))


def test_corrector_training_under_bf16_autocast_keeps_float32_weights_loss_and_gradients():
    """``"bf16"``: the forward under bf16 autocast (another loss than float32's, within bf16's rounding),
    the loss and every gradient float32, the weights untouched in float32."""
    _, network, _, loss, grads, seen = _one_step("bf16")
    _, _, _, loss32, grads32, _ = _one_step("no")
    assert seen == [True]
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert all(p.dtype == torch.float32 for p in network.parameters())
    assert not torch.equal(loss, loss32) and float(loss) == pytest.approx(float(loss32), rel=2e-2)


def test_corrector_mixed_precision_is_in_the_training_key_and_recorded(tmp_path):
    """Changing the key retrains (another stage key), the summary says how the corrector was trained,
    and the inversion's key does not read it."""
    from pgraft_cli.stages.correct import invert_config, training_config

    base = ["correct.corrector_train_steps=2", "correct.corrector_batch_size=4", "correct.corrector_channels=[8, 16]"]
    noises = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    infos, weights, keys = {}, {}, {}
    for setting in ("no", "bf16"):
        cfg = load_recipe("inverse-noise", [*base, f"correct.corrector_mixed_precision={setting}"]).correct
        with RunStore(tmp_path) as store, progress(False) as bar:
            corrector, infos[setting] = run_train_corrector(noises, (1, 16, 16), cfg, "base", store, bar)
            keys[setting] = store.read_manifest()["stages"]["train_corrector"]["key"]
        weights[setting] = corrector.network.state_dict()
        assert invert_config(cfg) == invert_config(load_recipe("inverse-noise", base).correct)
    assert training_config(cfg)["corrector_mixed_precision"] == "bf16" and keys["no"] != keys["bf16"]
    assert any(not torch.equal(weights["no"][k], weights["bf16"][k]) for k in weights["no"])
    assert infos["no"]["trained_precision"] == "float32"
    assert infos["bf16"]["trained_precision"] == "float32 weights under bfloat16 autocast"


def test_bf16_corrector_training_on_a_device_without_bf16_autocast_is_refused_before_inverting():
    from types import SimpleNamespace

    from pgraft_cli.stages.correct import check_correctable, corrector_autocast

    cfg = load_recipe("inverse-noise", ["correct.corrector_mixed_precision=bf16"]).correct
    with pytest.raises(PgraftError, match='corrector_mixed_precision = "no"'):
        corrector_autocast(cfg, "meta")
    with pytest.raises(PgraftError, match="meta device"):
        check_correctable(SimpleNamespace(device=torch.device("meta"), conditioning="none"), cfg, check_data=False)
    check_correctable(SimpleNamespace(device=torch.device("cpu"), conditioning="none"), cfg, check_data=False)


@pytest.mark.parametrize("native", [True, False])
def test_auto_mixed_precision_trains_as_the_setting_it_resolves_to_on_this_cpu(tmp_path, monkeypatch, native):
    """``auto`` is bf16 where the CPU multiplies bf16 natively and float32 elsewhere (emulated bf16 is slower):
    the same stage key, weights and record as the explicit setting it resolves to; a device without bf16
    is float32, not refused."""
    import pgraft_cli.stages.correct as stage

    monkeypatch.setattr(stage, "native_cpu_bf16", lambda: native)
    base = ["correct.corrector_train_steps=2", "correct.corrector_batch_size=4", "correct.corrector_channels=[8, 16]"]
    noises = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    runs = {}
    for setting in ("auto", "bf16" if native else "no"):
        cfg = load_recipe("inverse-noise", [*base, f"correct.corrector_mixed_precision={setting}"]).correct
        with RunStore(tmp_path / setting) as store, progress(False) as bar:
            corrector, info = run_train_corrector(noises, (1, 16, 16), cfg, "base", store, bar)
            runs[setting] = (store.read_manifest()["stages"]["train_corrector"]["key"], corrector.network.state_dict(),
                             info["trained_precision"])
    (key, weights, record), (key2, weights2, record2) = runs.values()
    assert key == key2 and record == record2 and all(torch.equal(weights[k], weights2[k]) for k in weights)
    assert record == ("float32 weights under bfloat16 autocast" if native else "float32")
    auto = load_recipe("inverse-noise", [*base, "correct.corrector_mixed_precision=auto"]).correct
    assert stage.corrector_precision(auto, "meta") == "no"
    assert load_recipe("inverse-noise", []).correct.corrector_mixed_precision == "auto"  # the main job's recipe


def test_a_gaussian_corrector_key_does_not_depend_on_the_hosts_bf16(tmp_path, monkeypatch):
    """A Gaussian corrector never trains a network, so ``auto`` is not resolved into its key: the same
    cached fit on a CPU with bf16 and one without."""
    import pgraft_cli.stages.correct as stage

    cfg = load_recipe("inverse-noise", ["correct.corrector=gaussian-diag"]).correct
    noises = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    keys = []
    for native in (True, False):
        monkeypatch.setattr(stage, "native_cpu_bf16", lambda: native)
        with RunStore(tmp_path / str(native)) as store, progress(False) as bar:
            run_train_corrector(noises, (1, 16, 16), cfg, "base", store, bar)
            keys.append(store.read_manifest()["stages"]["train_corrector"]["key"])
    assert keys[0] == keys[1]
