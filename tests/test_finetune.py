"""The P-GRAFT training target against closed forms, the composed sampler, and a tiny training round."""

from __future__ import annotations

import math

import pytest
import torch

from pgraft_cli.core.losses import intermediate_target, training_times
from pgraft_cli.core.samplers import NoiseSchedule


def _fit_linear(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Least squares ``y ~ alpha x + beta`` over scalars (the optimal regressor for Gaussian data)."""
    design = torch.stack([x, torch.ones_like(x)], 1)
    sol = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)
    return float(sol[0]), float(sol[1])


@pytest.mark.parametrize("c,t", [(0.0, 0.4), (0.3, 0.5), (0.6, 0.9), (0.5, 1.0)])
def test_flow_target_regression_recovers_the_closed_form_velocity(c, t):
    # y ~ N(mu, sd^2) at level c; x_t = a y + s e is N(a mu, a^2 sd^2 + s^2) and the true velocity of
    # that marginal is v(x) = -(x + t score(x)) / (1 - t), score = -(x - a mu) / var. The conditional
    # target's regression on x_t (least squares, linear because everything is Gaussian) must match it.
    g = torch.Generator().manual_seed(0)
    n, mu, sd = 400_000, 0.7, 0.5
    y = mu + sd * torch.randn(n, 1, generator=g, dtype=torch.float64)
    e = torch.randn(n, 1, generator=g, dtype=torch.float64)
    tt = torch.full((n,), t, dtype=torch.float64)
    x_t, target = intermediate_target(NoiseSchedule.flow(), y, e, tt, c)
    a = (1 - t) / (1 - c)
    s2 = t**2 - a**2 * c**2
    assert torch.allclose(x_t, a * y + math.sqrt(s2) * e)
    var = a**2 * sd**2 + s2
    if t < 1.0:
        alpha_true = -(1 - t / var) / (1 - t)
        beta_true = -(t * a * mu / var) / (1 - t)
    else:  # t = 1: v = e - E[x0 | x1]; with a = 0 the target's mean is -mu/(1-c) and its slope 1/s = 1
        alpha_true, beta_true = 1.0, -mu / (1 - c)
    alpha, beta = _fit_linear(x_t.squeeze(1), target.squeeze(1))
    assert alpha == pytest.approx(alpha_true, abs=0.01)
    assert beta == pytest.approx(beta_true, abs=0.01)


def test_flow_target_at_cutoff_zero_is_the_ordinary_flow_matching_target():
    g = torch.Generator().manual_seed(1)
    y, e = torch.randn(64, 1, 4, 4, generator=g), torch.randn(64, 1, 4, 4, generator=g)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x_t, target = intermediate_target(NoiseSchedule.flow(), y, e, t, 0.0)
    tt = t.float().view(-1, 1, 1, 1)
    assert torch.allclose(x_t, (1 - tt) * y + tt * e, atol=1e-6)
    assert torch.allclose(target, e - y, atol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("c", [0.0, 0.4])
def test_ddpm_target_regression_recovers_the_closed_form_prediction(prediction, c):
    sched = NoiseSchedule.diffusion(prediction, 1000, "scaled_linear", 0.00085, 0.012)
    t = 0.7
    g = torch.Generator().manual_seed(2)
    n, mu, sd = 400_000, -0.4, 0.6
    y = mu + sd * torch.randn(n, 1, generator=g, dtype=torch.float64)
    e = torch.randn(n, 1, generator=g, dtype=torch.float64)
    tt = torch.full((n,), t, dtype=torch.float64)
    x_t, target = intermediate_target(sched, y, e, tt, c)
    a_t, s_t = (float(v) for v in sched.alpha_sigma(torch.tensor(t)))
    a_c = float(sched.alpha_sigma(torch.tensor(c))[0])
    a = a_t / a_c
    var = a**2 * sd**2 + (1 - a**2)
    # true eps(x) = -s_t * score = s_t (x - a mu) / var; x0 and v follow by the usual conversions
    eps_alpha, eps_beta = s_t / var, -s_t * a * mu / var
    if prediction == "epsilon":
        want = (eps_alpha, eps_beta)
    elif prediction == "sample":  # x0 = (x - s_t eps) / a_t
        want = ((1 - s_t * eps_alpha) / a_t, -s_t * eps_beta / a_t)
    else:  # v = a_t eps - s_t x0
        x0 = ((1 - s_t * eps_alpha) / a_t, -s_t * eps_beta / a_t)
        want = (a_t * eps_alpha - s_t * x0[0], a_t * eps_beta - s_t * x0[1])
    alpha, beta = _fit_linear(x_t.squeeze(1), target.squeeze(1))
    assert alpha == pytest.approx(want[0], abs=0.01)
    assert beta == pytest.approx(want[1], abs=0.01)


def test_ddpm_target_at_cutoff_zero_is_plain_epsilon():
    sched = NoiseSchedule.diffusion("epsilon")
    g = torch.Generator().manual_seed(3)
    y, e = torch.randn(32, 3, generator=g, dtype=torch.float64), torch.randn(32, 3, generator=g, dtype=torch.float64)
    t = torch.full((32,), 0.5, dtype=torch.float64)
    _, target = intermediate_target(sched, y, e, t, 0.0)
    assert torch.allclose(target, e)


@pytest.mark.parametrize("family", ["flow", "diffusion"])
def test_training_times_lie_strictly_above_the_cutoff(family):
    sched = NoiseSchedule.flow() if family == "flow" else NoiseSchedule.diffusion()
    t = training_times(sched, 20_000, 0.6, torch.Generator().manual_seed(0))
    assert float(t.min()) > 0.6 and float(t.max()) <= 1.0
    assert float(t.mean()) == pytest.approx(0.8, abs=0.01)
    if family == "diffusion":  # integer timesteps t * T
        assert torch.allclose(t * 1000, (t * 1000).round())


# ----------------------------------------------------------------------------------------------
# The composed model and the training stage


from pgraft_cli.io.checkpoints import load_model  # noqa: E402
from pgraft_cli.stages.finetune import KeptSet, run_finetune  # noqa: E402
from pgraft_cli.models.lora import add_lora  # noqa: E402
from pgraft_cli.models.loaded import base_only  # noqa: E402
from pgraft_cli.models.loaded import Cond  # noqa: E402
from pgraft_cli.io.recipes import FinetuneConfig  # noqa: E402
from pgraft_cli.io.runstore import RunStore  # noqa: E402
from pgraft_cli.core.samplers import sample  # noqa: E402
from pgraft_cli.report.ui import progress  # noqa: E402


def _sample(model, noise, steps=6):
    with torch.inference_mode():
        x, _ = sample(lambda x, t: model.predict(x, t, Cond()), model.schedule, noise, model.schedule.grid(steps))
    return x


def test_composed_sampler_with_an_untrained_adapter_equals_the_base_sampler_exactly():
    model = load_model("digits")
    noise = torch.randn(8, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    base = _sample(model, noise)
    add_lora(model.network, rank=4, alpha=4)
    model.lora, model.cutoff = True, 0.5
    assert torch.equal(_sample(model, noise), base)  # B = 0: the adapter adds exact zeros


def test_composed_sampler_switches_networks_at_the_cutoff():
    model = load_model("digits")
    model.tuned = load_model("digits").network
    with torch.no_grad():  # a tuned network that visibly differs
        for p in model.tuned.parameters():
            p.mul_(0.5)
    model.cutoff = 0.5
    calls = []
    model.tuned.register_forward_hook(lambda *a: calls.append("tuned"))
    model.network.register_forward_hook(lambda *a: calls.append("base"))
    noise = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(1))
    composed = _sample(model, noise, steps=4)  # grid 1, .75, .5, .25, 0: evaluated at 1, .75 | .5, .25
    assert calls == ["tuned", "tuned", "base", "base"]
    with base_only(model):
        assert not torch.equal(_sample(model, noise, steps=4), composed)


def _kept(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, 1, 16, 16, generator=g) * 0.5
    return KeptSet(y=y, t_c=0.5, x0=y.clamp(-1, 1))


def _train(tmp_path, name, cfg, interrupt_at=None):
    model = load_model("digits")

    class Stop(Exception):
        pass

    class Bar:
        n = 0

        def add_task(self, *a, **k):
            return 0

        def advance(self, *a, **k):
            Bar.n += 1
            if interrupt_at is not None and Bar.n == interrupt_at:
                raise Stop

    with RunStore(tmp_path / name) as store:
        try:
            run_finetune(model, _kept(), cfg, store, Bar())
        except Stop:
            return None
    return model


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_finetune_resumes_bit_for_bit_after_an_interruption(tmp_path, lora_rank):
    cfg = FinetuneConfig(cutoff=0.5, steps=8, batch_size=4, checkpoint_every=3, learning_rate=1e-3,
                         lora_rank=lora_rank, ema=0.9)
    whole = _train(tmp_path, "whole", cfg)
    assert _train(tmp_path, "cut", cfg, interrupt_at=5) is None  # killed after step 5; state saved at 3
    assert (tmp_path / "cut" / "finetune" / "state.safetensors").exists()
    resumed = _train(tmp_path, "cut", cfg)
    a = whole.tuned.state_dict() if lora_rank == 0 else whole.network.state_dict()
    b = resumed.tuned.state_dict() if lora_rank == 0 else resumed.network.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = load_model("digits").network.state_dict()
    changed = [k for k in base if not torch.equal(a[k.replace("weight", "base_layer.weight").replace(
        "bias", "base_layer.bias")] if k not in a else a[k], base[k])]
    if lora_rank:
        assert not changed  # LoRA leaves the base weights alone ...
        assert any(float(a[k].abs().max()) > 0 for k in a if "lora_B" in k)  # ... and trains B away from 0
    else:
        assert changed  # training did move weights


def test_finetune_learns_the_tilted_field_of_a_single_kept_state(tmp_path):
    # All kept states equal one image y: given x_t the target is deterministic (no irreducible
    # loss), so training must drive the loss well below where the base model starts (30 steps: the
    # last ten average 0.29 of the first ten; 60 steps reach 0.08 in twice the time).
    y = _kept(1).y.repeat(64, 1, 1, 1)
    cfg = FinetuneConfig(cutoff=0.5, steps=30, batch_size=16, learning_rate=2e-3, checkpoint_every=100)
    model = load_model("digits")
    with RunStore(tmp_path / "run") as store, progress(False) as bar:
        result = run_finetune(model, KeptSet(y=y, t_c=0.5, x0=y), cfg, store, bar)
    curve = result["loss_curve"]
    assert sum(curve[-10:]) / 10 < 0.5 * sum(curve[:10]) / 10


def test_a_cpu_finetune_runs_no_full_garbage_collection(tmp_path, monkeypatch):
    """accelerate's ``free_memory`` is a ``gc.collect`` (0.1-0.5 s in a big process) and a device cache
    flush: on the CPU the round's return frees as much, so it is not called there."""
    import gc

    cfg = FinetuneConfig(cutoff=0.5, steps=2, batch_size=4, learning_rate=1e-3, checkpoint_every=100)
    model = load_model("digits")
    monkeypatch.setattr(gc, "collect", lambda *a: pytest.fail("gc.collect() in a CPU fine-tune"))
    with RunStore(tmp_path / "run") as store, progress(False) as bar:
        result = run_finetune(model, _kept(4), cfg, store, bar)
    assert result["steps"] == 2 and len(result["loss_curve"]) == 2


def test_gradient_accumulation_and_bf16_mixed_precision_train(tmp_path):
    kept = _kept(16)
    for name, extra in (("accum", {"grad_accum": 2}), ("bf16", {"mixed_precision": "bf16"})):
        cfg = FinetuneConfig(cutoff=0.5, steps=2, batch_size=4, learning_rate=1e-3, **extra)
        model = load_model("digits")
        before = {k: v.clone() for k, v in model.network.state_dict().items()}
        with RunStore(tmp_path / name) as store, progress(False) as bar:
            result = run_finetune(model, kept, cfg, store, bar)
        assert len(result["loss_curve"]) == 2 and all(math.isfinite(x) for x in result["loss_curve"])
        after = model.tuned.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), name
        assert all(v.dtype == torch.float32 for v in after.values())  # master weights stay float32


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    from pgraft_cli.errors import PgraftError

    cfg = FinetuneConfig(cutoff=0.5, steps=1, batch_size=2, mixed_precision="fp16")
    with RunStore(tmp_path / "r") as store, progress(False) as bar, pytest.raises(PgraftError, match="bf16"):
        run_finetune(load_model("digits"), _kept(4), cfg, store, bar)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_hand_over_happens_at_the_captured_state_even_when_a_grid_time_rounds_onto_the_cutoff(shift):
    from pgraft_cli.core.samplers import above_cutoff

    sched = NoiseSchedule.flow(shift=shift)
    for steps in range(1, 41):
        grid = sched.grid(steps)
        for c in (0.15, 0.25, 0.3, 0.35, 0.5):
            _, (x_c, t_c) = sample(lambda x, t: torch.zeros_like(x), sched, torch.zeros(1, 1), grid, capture_at=c)
            k = int((grid == t_c).nonzero()[0])
            # the tuned model runs exactly the steps before the captured state, the base all after
            assert bool(above_cutoff(grid[:k], c).all()) and not bool(above_cutoff(grid[k:], c).any())


def test_top_k_groups_are_runs_of_m_samples_of_one_class(tmp_path):
    from safetensors.torch import save_file

    from pgraft_cli.core.selection import condition_groups
    from pgraft_cli.stages.filter import sample_conditions

    (tmp_path / "sample").mkdir()
    idx = torch.arange(12)
    save_file({"index": idx, "class_label": idx % 3}, str(tmp_path / "sample" / "shard-00000.safetensors"))
    index, cond = sample_conditions(tmp_path, "sample")
    group = condition_groups(cond, 2)
    assert torch.equal(index, idx)
    for g in group.unique():
        members = idx[group == g]
        assert len(members) == 2 and len(set((members % 3).tolist())) == 1
    assert len(group.unique()) == 6


def test_a_sample_count_that_does_not_fill_groups_fails_before_sampling(tmp_path):
    from pgraft_cli.errors import PgraftError
    from pgraft_cli.stages.finetune import run_rounds
    from pgraft_cli.io.recipes import load_recipe
    from pgraft_cli.stages.sample import Conditions

    rec = load_recipe("pgraft", ["sample.num=30", "filter.m=4"])
    with RunStore(tmp_path / "r") as store, progress(False) as bar, pytest.raises(PgraftError, match="sample.num=32"):
        run_rounds(load_model("digits"), rec, None, Conditions(), store, bar)
    assert not (tmp_path / "r" / "sample").exists()


# ----------------------------------------------------------------------------------------------
# Guidance on the tuned segment (docs/guidance.md)


def _composed_text_model(tiny_sd_dir, tuned_guidance):
    import copy

    model = load_model(str(tiny_sd_dir))
    model.tuned = copy.deepcopy(model.network)
    with torch.no_grad():  # a tuned network that visibly differs from the base
        for p in model.tuned.parameters():
            p.mul_(0.9)
    model.cutoff, model.tuned_guidance = 0.5, tuned_guidance
    return model


def _record_calls(network, calls, name):
    def hook(module, args, kwargs):
        calls.append((name, args[0].shape[0], kwargs["encoder_hidden_states"].clone()))

    network.register_forward_pre_hook(hook, with_kwargs=True)


def test_unguided_tuned_segment_makes_one_conditional_call_per_step(tiny_sd_dir):
    model = _composed_text_model(tiny_sd_dir, "none")
    calls = []
    _record_calls(model.tuned, calls, "tuned")
    _record_calls(model.network, calls, "base")
    cond = model.encode(["a red cube"], None, guidance_scale=3.0)
    noise = torch.randn(1, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # DDIM trailing grid .999 .749 | .499 .249: two steps each side
        sample(lambda x, t: model.predict(x, t, cond), model.schedule, noise, model.schedule.grid(4))
    assert [(name, batch) for name, batch, _ in calls] == [("tuned", 1), ("tuned", 1), ("base", 2), ("base", 2)]
    for name, _, embeds in calls:  # the tuned network never sees the unconditional (negative) prompt
        want = cond.prompt_embeds if name == "tuned" else torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds])
        assert torch.equal(embeds, want)


def test_flops_count_one_call_per_tuned_step_without_guidance_and_two_when_reapplied(tiny_sd_dir):
    from pgraft_cli.stages.evaluate import flops_per_image

    parts = {g: flops_per_image(_composed_text_model(tiny_sd_dir, g), 4, 3.0)["flops_calls"] for g in ("none", "reapply")}
    assert parts["none"]["tuned_steps"] == parts["reapply"]["tuned_steps"] == 2
    assert parts["none"]["base_call"] == parts["reapply"]["base_call"] == parts["reapply"]["tuned_call"]
    assert 2 * parts["none"]["tuned_call"] == parts["reapply"]["tuned_call"]


def test_reapplied_guidance_reproduces_the_guided_composed_sampler_bit_for_bit(tiny_sd_dir):
    # The sampler before tuned_guidance existed: uncond + w (cond - uncond) from one doubled batch,
    # with whichever network runs at t; "reapply" must give exactly its outputs.
    model = _composed_text_model(tiny_sd_dir, "reapply")
    cond = model.encode(["a red cube", "two cats"], None, guidance_scale=4.0)
    embeds = torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds])

    def guided(x, t):
        net = model.network_at(t)
        timestep = model.schedule.timestep(t).to(dtype=x.dtype).expand(2 * x.shape[0])
        uncond, text = net(torch.cat([x, x]), timestep, encoder_hidden_states=embeds).sample.chunk(2)
        return uncond + 4.0 * (text - uncond)

    noise = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(3))
    grid = model.schedule.grid(4)
    with torch.inference_mode():
        want, _ = sample(guided, model.schedule, noise, grid)
        got, _ = sample(lambda x, t: model.predict(x, t, cond), model.schedule, noise, grid)
        model.tuned_guidance = "none"
        unguided, _ = sample(lambda x, t: model.predict(x, t, cond), model.schedule, noise, grid)
    assert torch.equal(got, want)
    assert not torch.equal(unguided, want)


def _null_class_model(tmp_path):
    from pgraft_cli.io.checkpoints import save_pgraft_safetensors

    from conftest import build_scheduler, build_tiny_unet

    net = build_tiny_unet(num_class_embeds=4)
    path = tmp_path / "classes.safetensors"
    save_pgraft_safetensors(path, net, "UNet2DModel", dict(net.config), dict(build_scheduler("flow").config), {},
                            extra={"pgraft.null_class": "3"})
    return path


def test_a_class_model_with_a_null_class_is_guided_against_it(tmp_path):
    model = load_model(str(_null_class_model(tmp_path)))
    assert model.guided and model.null_class == 3 and model.num_classes == 3  # classes 0..2 stay real
    x = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(0.6, dtype=torch.float64)
    labels = torch.tensor([0, 2])
    with torch.inference_mode():
        guided = model.predict(x, t, model.encode(None, [0, 2], guidance_scale=2.5))
        ts = model.schedule.timestep(t).to(x.dtype).expand(2)
        uncond = model.network(x, ts, class_labels=torch.full_like(labels, 3)).sample
        conditional = model.network(x, ts, class_labels=labels).sample
    assert torch.allclose(guided, uncond + 2.5 * (conditional - uncond), atol=1e-5)


def test_a_null_class_that_is_not_the_last_class_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from pgraft_cli.errors import ModelLoadError
    from pgraft_cli.io.checkpoints import read_safetensors_metadata

    path = _null_class_model(tmp_path)
    meta = {**read_safetensors_metadata(path), "pgraft.null_class": "1"}
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(ModelLoadError, match="last class index"):
        load_model(str(path))


@pytest.mark.parametrize("tuned_guidance", ["none", "reapply"])
def test_the_tuned_guidance_round_trips_through_the_finetuned_file(tmp_path, tuned_guidance):
    from pgraft_cli.io.checkpoints import base_info_of, save_finetuned
    from pgraft_cli.stages.finetune import prepare_tuning
    from pgraft_cli.models.loaded import tuned_identity

    model = load_model("digits")
    cfg = FinetuneConfig(cutoff=0.5, tuned_guidance=tuned_guidance)
    prepare_tuning(model, cfg)
    assert model.tuned_guidance == tuned_guidance
    ident = tuned_identity(model)
    model.tuned_guidance = {"none": "reapply", "reapply": "none"}[tuned_guidance]
    assert tuned_identity(model) != ident  # the two samplers never share cached samples
    model.tuned_guidance = tuned_guidance
    path = save_finetuned(tmp_path / "tuned.safetensors", model, base_info_of(model), cfg, {}, {})
    loaded = load_model(str(path))
    assert loaded.finetuned and loaded.cutoff == 0.5 and loaded.tuned_guidance == tuned_guidance


def test_a_finetuned_file_without_the_key_reapplies_guidance_as_before(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from pgraft_cli.io.checkpoints import read_safetensors_metadata
    from pgraft_cli.io.checkpoints import base_info_of, save_finetuned
    from pgraft_cli.stages.finetune import prepare_tuning

    model = load_model("digits")
    cfg = FinetuneConfig(cutoff=0.5)
    prepare_tuning(model, cfg)
    path = save_finetuned(tmp_path / "old.safetensors", model, base_info_of(model), cfg, {}, {})
    meta = read_safetensors_metadata(path)
    tuning = json.loads(meta["pgraft.finetune"])
    del tuning["tuned_guidance"]
    save_file(load_file(str(path)), str(path), metadata={**meta, "pgraft.finetune": json.dumps(tuning)})
    assert load_model(str(path)).tuned_guidance == "reapply"


@pytest.mark.parametrize("source", ["digits", "class", "text"])
def test_lora_under_bf16_trains_its_frozen_layers_in_bf16_with_the_same_bits_and_restores_them(
        tmp_path, monkeypatch, unet_model_dir, tiny_sd_dir, source):
    """Autocast casts the linear and convolution layers' frozen weights to bf16 on every call; held in
    bf16 while the adapter trains, the run computes the same adapter bit for bit, and the base is
    float32 again afterwards."""
    import contextlib

    from pgraft_cli.stages import finetune

    path = {"digits": "digits", "class": str(unet_model_dir("flow", num_class_embeds=3)), "text": str(tiny_sd_dir)}[source]
    base = load_model(path)
    y = torch.randn((8, *base.sample_shape), generator=torch.Generator().manual_seed(0))
    kept = KeptSet(y=y, t_c=0.0, x0=y, class_labels=torch.arange(8) % 3 if source == "class" else None,
                   prompts=["a cat", "a dog"] * 4 if source == "text" else None)
    cfg = FinetuneConfig(steps=3, batch_size=4, learning_rate=1e-2, lora_rank=2, mixed_precision="bf16")
    seen: list[set] = []

    class Bar:
        def add_task(self, *a, **k):
            return 0

        def advance(self, *a, **k):
            seen.append({p.dtype for n, p in model.network.named_parameters() if "lora_" not in n})

    runs = {}
    for name in ("bf16 frozen layers", "float32 frozen layers"):
        if name.startswith("float32"):
            monkeypatch.setattr(finetune, "frozen_layers_in", lambda network, dtype: contextlib.nullcontext())
        model = load_model(path)
        with RunStore(tmp_path / name.split()[0]) as store:
            runs[name] = (run_finetune(model, kept, cfg, store, Bar()), model.network.state_dict())
        if name.startswith("bf16"):
            assert len(seen) == 3 and all(d == {torch.float32, torch.bfloat16} for d in seen)  # bf16 while training
    (result_a, a), (result_b, b) = runs.values()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same adapter, same base
    assert result_a["loss_curve"] == result_b["loss_curve"]
    assert all(v.dtype == torch.float32 for v in a.values())  # the base is float32 again ...
    frozen = {k: v for k, v in base.network.state_dict().items()}
    restored = {k.replace("base_layer.", ""): v for k, v in a.items() if "lora_" not in k}
    assert all(torch.equal(restored[k], frozen[k]) for k in frozen)  # ... with its original bits


@pytest.mark.parametrize("fixture", ["tiny_sd_dir", "tiny_sdxl_dir"])
def test_a_finetune_encodes_each_prompt_once_and_trains_the_same_bits_as_encoding_every_step(
        tmp_path, monkeypatch, request, fixture):
    """The frozen text encoders give a prompt the same bits alone whatever the batch, so a fine-tune
    encodes each distinct prompt once (``PromptCache``) and trains exactly as re-encoding every step."""
    from pgraft_cli.stages import finetune

    path = str(request.getfixturevalue(fixture))
    y = torch.randn((12, *load_model(path).sample_shape), generator=torch.Generator().manual_seed(0))
    kept = KeptSet(y=y, t_c=0.0, x0=y, prompts=["a cat", "a dog", "a red cube"] * 4)
    cfg = FinetuneConfig(steps=4, batch_size=4, learning_rate=1e-2, lora_rank=2)
    runs = {}
    for budget in (0, finetune.PROMPT_CACHE_BYTES):  # 0: nothing fits, every step encodes its prompts
        monkeypatch.setattr(finetune, "PROMPT_CACHE_BYTES", budget)
        model = load_model(path)
        calls: list[int] = []
        model.pipeline.text_encoder.register_forward_pre_hook(lambda *a: calls.append(1))
        with RunStore(tmp_path / str(budget)) as store, progress(False) as bar:
            result = run_finetune(model, kept, cfg, store, bar)
        runs[budget] = (result["loss_curve"], model.network.state_dict(), len(calls))
    (curve_a, a, encoded_a), (curve_b, b, encoded_b) = runs.values()
    assert encoded_b == 3 and encoded_a > 3 * 2  # once per prompt, against each step's distinct prompts
    assert curve_a == curve_b
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(b[k].abs().max()) > 0 for k in b if "lora_B" in k)  # the adapter did train


def test_the_prompt_cache_keeps_what_fits_its_budget_and_encodes_the_rest_each_time():
    from pgraft_cli.models.loaded import Cond, PromptCache

    def encoder(p: str):
        return lambda: Cond(prompt_embeds=torch.full((1, 4, 8), float(len(p))), pooled=torch.ones(1, 8))

    cache = PromptCache(max_bytes=(4 * 8 + 8) * 4)  # one prompt's embeddings and pooled vector, float32
    for _ in range(3):
        for p in ("cat", "a dog"):
            part = cache.get((p, False), encoder(p))
            assert torch.equal(part.prompt_embeds, torch.full((1, 4, 8), float(len(p))))
    assert list(cache.parts) == [("cat", False)] and cache.held == cache.max_bytes
    assert cache.encoded == 1 + 3  # "cat" once; "a dog" did not fit and was encoded each time


def test_adam_fine_tunes_take_torchs_fused_kernel_where_it_exists_and_key_the_stage_by_it(tmp_path):
    """One fused Adam/AdamW kernel on the CPU (and CUDA, MPS, XPU) instead of torch's per-parameter CPU
    default: other roundings, so the path is in the fine-tune stage's config and an old cache is retrained."""
    from pgraft_cli.stages.finetune import _optimizer, optimizer_path

    cpu = torch.device("cpu")
    assert optimizer_path(FinetuneConfig(), cpu) == "fused"
    assert optimizer_path(FinetuneConfig(optimizer="adam"), cpu) == "fused"
    assert optimizer_path(FinetuneConfig(optimizer="sgd"), cpu) == "default"
    assert optimizer_path(FinetuneConfig(), torch.device("meta")) == "default"
    assert optimizer_path(FinetuneConfig(), torch.device("mps")) == "default"  # fp16 GradScaler: not tested there
    params = [torch.nn.Parameter(torch.randn(3))]
    assert _optimizer(FinetuneConfig(), params, "fused").defaults["fused"] is True
    assert not _optimizer(FinetuneConfig(), params).defaults["fused"]
    cfg = FinetuneConfig(cutoff=0.5, steps=1, batch_size=2)
    with RunStore(tmp_path / "r") as store, progress(False) as bar:
        run_finetune(load_model("digits"), _kept(4), cfg, store, bar)
        stages = store.read_manifest()["stages"]
    assert [entry["config"]["optimizer_path"] for name, entry in stages.items() if name.startswith("finetune")] == ["fused"]


def test_round_seeds_step_over_the_evaluation_seed():
    from pgraft_cli.stages.finetune import round_seed

    assert [round_seed(0, r, 1) for r in (1, 2, 3)] == [0, 2, 3]  # the recipes' seeds: round 2 drew seed 1
    assert [round_seed(0, r, 0) for r in (1, 2)] == [1, 2]
    assert [round_seed(5, r, 1) for r in (1, 2)] == [5, 6] and [round_seed(0, r, 9) for r in (1, 2)] == [0, 1]


def test_finetune_default_run_directory_tells_classes_apart():
    """Runs of two --class values shared one default run directory (and overwrote its tuned.safetensors)."""
    from pgraft_cli.pipelines.finetune import sampling_payload
    from pgraft_cli.pipelines.skeleton import default_run_dir, resolve_recipe
    from pgraft_cli.stages.sample import Conditions

    rec = resolve_recipe("graft", None)
    names = {default_run_dir("finetune", sampling_payload("m", rec, Conditions(class_label=k))) for k in (None, 1, 2)}
    assert len(names) == 3
    unchanged = {"model": "m", "sample": rec.to_dict()["sample"], "cutoff": rec.finetune.cutoff, "prompts": None}
    assert default_run_dir("finetune", sampling_payload("m", rec, Conditions())) == default_run_dir("finetune", unchanged)

