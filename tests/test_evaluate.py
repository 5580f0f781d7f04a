"""Evaluation: FID/KID through torchmetrics against independent closed forms, streaming updates,
warnings and errors; FLOPs against hand and direct counts; the Inception input clamp."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from conftest import cli_run
import torch

from pgraft_cli.io.data import load_digits
from pgraft_cli.errors import PgraftError
from pgraft_cli.core.metrics import KID_SUBSETS, FidKid, distances, measure_flops
from pgraft_cli.stages.evaluate import classifier_features, inception_input

# fake feature extractors: an empty user cache for each test, never statistics another test left
pytestmark = pytest.mark.own_user_cache


# ----------------------------------------------------------------------------------------------
# Independent references (numpy, symmetric square roots): not the library's formulation


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + Tr S1 + Tr S2 - 2 Tr (S1^1/2 S2 S1^1/2)^1/2`` (exact for singular S too)."""
    r = _psd_sqrt(sigma1)
    inner = np.linalg.eigvalsh(r @ sigma2 @ r)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def fid_of(f1: np.ndarray, f2: np.ndarray) -> float:
    return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 with the KID kernel ``k(a, b) = (a.b / d + 1)^3`` over all rows."""
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    return float(((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean())


def test_reference_frechet_distance_matches_the_diagonal_closed_form():
    """For diagonal covariances, FD = |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n, d", [(400, 8), (30, 64), (12, 40)])  # more, and fewer, samples than dimensions
def test_fid_equals_the_independent_computation_on_the_same_features(n, d):
    rng = np.random.default_rng(n + d)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    gen = rng.normal(size=(n, d)) @ mix + 0.3
    real = rng.normal(size=(n + 7, d)) @ mix * 1.2
    out = distances(gen, real, kid_subsets=3)
    assert out["fid"] == pytest.approx(fid_of(gen, real), rel=1e-6)
    scale = np.trace(np.cov(gen, rowvar=False))  # zero up to 1e-6 of the distance's scale
    assert distances(gen, gen, kid_subsets=2)["fid"] == pytest.approx(0.0, abs=1e-6 * scale)


def test_kid_equals_the_unbiased_mmd_when_every_subset_is_the_whole_set():
    """With n <= 1000 samples each subset is a permutation of all of them: KID is the full MMD^2.

    KID keeps its rows in float32 (features are float32 network outputs), so the data here are
    float32 values; the kernel is computed in float64, as the float64 closed form."""
    rng = np.random.default_rng(1)
    x, y = (a.astype(np.float32).astype(np.float64) for a in (rng.normal(size=(60, 16)), rng.normal(loc=0.4, size=(60, 16))))
    assert distances(x, y, kid_subsets=4)["kid"] == pytest.approx(mmd2_unbiased(x, y), rel=1e-9)


def _subsets(n_real: int, n_fake: int, m: int, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.stack([torch.randperm(n_real, generator=g)[:m] for _ in range(count)]),
            torch.stack([torch.randperm(n_fake, generator=g)[:m] for _ in range(count)]))


def test_subset_mmds_from_kernels_computed_once_equal_poly_mmd_of_each_subset():
    """Each subset's MMD^2 read from the whole kernel matrices equals torchmetrics' ``poly_mmd`` of
    that subset's rows. Not bitwise: the same float64 terms are summed in another order (and the
    whole matrices' products block differently), so they agree to a few ulps of the kernel sums,
    ``1e-12`` of the kernel's mean, which KID's cancellation can make large against KID itself."""
    from torchmetrics.image.kid import poly_mmd

    from pgraft_cli.core.metrics import subset_mmds

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(300, 16, generator=g, dtype=torch.float64), 0.3 + torch.randn(200, 16, generator=g, dtype=torch.float64)
    picks_real, picks_fake = _subsets(300, 200, 150, 7)
    ours = subset_mmds(real, fake, picks_real, picks_fake)
    theirs = torch.stack([poly_mmd(real[r], fake[f]) for r, f in zip(picks_real, picks_fake)])
    scale = float(((real @ real.T / 16 + 1) ** 3).abs().mean())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12 * scale)


def test_subset_mmds_of_constant_rows_match_the_closed_form():
    """Rows all a (reference) and all b (generated): every subset's MMD^2 is k(a,a) + k(b,b) - 2 k(a,b)."""
    from pgraft_cli.core.metrics import subset_mmds

    a, b = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), torch.tensor([1.5, 0.25, -0.5], dtype=torch.float64)
    k = lambda x, y: (float(x @ y) / 3 + 1) ** 3  # noqa: E731
    picks_real, picks_fake = _subsets(40, 30, 20, 5)
    out = subset_mmds(a.expand(40, 3), b.expand(30, 3), picks_real, picks_fake)
    torch.testing.assert_close(out, torch.full((5,), k(a, a) + k(b, b) - 2 * k(a, b), dtype=torch.float64),
                               rtol=1e-12, atol=0)


def test_kid_from_kernels_computed_once_equals_the_subset_by_subset_kid(monkeypatch):
    """``FidKid``'s KID through the whole kernel matrices and through one subset at a time (forced by
    ``KID_KERNEL_ELEMENTS = 0``): the same draws, so the same value to the kernel sums' rounding."""
    from pgraft_cli.core import metrics

    rng = np.random.default_rng(3)
    gen, real = rng.normal(size=(120, 8)).astype(np.float32), (0.2 + rng.normal(size=(150, 8))).astype(np.float32)
    once = distances(gen, real, kid_subsets=6, seed=4)["kid"]
    monkeypatch.setattr(metrics, "KID_KERNEL_ELEMENTS", 0)
    each = distances(gen, real, kid_subsets=6, seed=4)["kid"]
    assert once == pytest.approx(each, rel=0, abs=1e-12 * 8)  # kernel values ~ (x.y/8 + 1)^3 = O(1..10)
    assert distances(gen, real, kid_subsets=6, seed=5)["kid"] != each  # the seed draws the subsets


def test_kid_keeps_float32_rows_and_fid_float64_sums():
    """KID's subsets need every row: kept in float32 (half of float64's memory); FID keeps sums only."""
    metric = FidKid(6, kid_subsets=2)
    metric.update(np.random.default_rng(5).normal(size=(40, 6)), real=True)
    assert [r.dtype for r in metric.kid.real_features] == [torch.float32]
    assert metric.fid.real_features_sum.dtype == metric.fid.real_features_cov_sum.dtype == torch.float64


def test_kid_is_near_zero_for_one_distribution_and_reproducible():
    rng = np.random.default_rng(2)
    x, y, far = rng.normal(size=(1500, 8)), rng.normal(size=(1500, 8)), rng.normal(loc=1.0, size=(1500, 8))
    same, diff = distances(x, y, kid_subsets=5), distances(x, far, kid_subsets=5)
    assert abs(same["kid"]) < 0.02 and diff["kid"] > 0.5
    assert distances(x, far, kid_subsets=5)["kid"] == diff["kid"]  # subsets drawn from a fixed seed


def test_kid_uses_100_subsets_by_default_like_clean_fid():
    from pgraft_cli.io.recipes import EvaluateConfig

    assert KID_SUBSETS == 100 and FidKid(4).kid.subsets == 100 and EvaluateConfig().kid_subsets == 100


def test_fewer_than_two_samples_is_a_clear_error():
    one, many = np.zeros((1, 4)), np.random.default_rng(0).normal(size=(10, 4))
    for gen, real in ((one, many), (many, one)):
        with pytest.raises(PgraftError, match="at least 2 generated and 2 reference images"):
            distances(gen, real)


def test_fewer_samples_than_feature_dimensions_is_warned():
    rng = np.random.default_rng(3)
    small = distances(rng.normal(size=(10, 16)), rng.normal(size=(40, 16)), kid_subsets=2)
    assert len(small["warnings"]) == 1 and "10 generated images < 16 feature dimensions" in small["warnings"][0]
    assert distances(rng.normal(size=(20, 16)), rng.normal(size=(20, 16)), kid_subsets=2)["warnings"] == []


def test_batched_updates_give_the_same_fid_and_kid_as_one_update():
    rng = np.random.default_rng(4)
    gen, real = rng.normal(size=(300, 12)) + 0.1, rng.normal(size=(250, 12))
    whole = distances(gen, real, kid_subsets=3)
    metric = FidKid(12, kid_subsets=3)
    for chunk in np.array_split(real, 7):
        metric.update(chunk, real=True)
    for chunk in np.array_split(gen, 5):
        metric.update(chunk, real=False)
    streamed = metric.compute()
    assert streamed["fid"] == pytest.approx(whole["fid"], rel=1e-9)
    assert streamed["kid"] == pytest.approx(whole["kid"], rel=1e-9)
    metric.reset_generated()  # the reference side survives: a second model on the same reference
    metric.update(real, real=False)
    assert metric.counts == (250, 250) and metric.compute()["fid"] == pytest.approx(0.0, abs=1e-6)


def test_fid_with_digits_classifier_features():
    """On the real digits: identical sets give FID ~0; digits against noise give a large FID."""
    images, _ = load_digits()
    feats = classifier_features()
    real = feats(images)
    assert real.shape == (len(images), 64) and real.dtype == torch.float64 and feats.num_features == 64
    same = distances(real, real, kid_subsets=2)
    assert same["fid"] == pytest.approx(0.0, abs=1e-4)
    noise = torch.rand(len(images), 1, 16, 16, generator=torch.Generator().manual_seed(0))
    far = distances(feats(noise), real, kid_subsets=2)
    assert far["fid"] > 100 * max(same["fid"], 1e-3) and far["fid"] > 1.0
    assert far["kid"] > 0.1


def test_pgraft_feature_extractors_are_torchmetrics_feature_modules():
    """torchmetrics' FID with pgraft's classifier as its feature module equals pgraft's FID."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    images, _ = load_digits()
    feats = classifier_features()
    fid = FrechetInceptionDistance(feature=feats, normalize=True)
    fid.update(images[:900], real=True)
    fid.update(images[900:], real=False)
    ours = distances(feats(images[900:]), feats(images[:900]), kid_subsets=2)["fid"]
    assert float(fid.compute()) == pytest.approx(ours, rel=1e-6)


def test_evaluate_model_streams_shards_and_matches_features_of_all_images(tmp_path):
    """FID/KID from shard-by-shard updates and batched real data equal those of the whole sets."""
    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.io.data import iter_data, load_data
    from pgraft_cli.stages.evaluate import evaluate_model
    from pgraft_cli.io.recipes import SampleConfig
    from pgraft_cli.io.runstore import RunStore
    from pgraft_cli.stages.sample import load_images
    from pgraft_cli.report.ui import progress

    model, feats = load_model("digits"), classifier_features()
    cfg = SampleConfig(num=70, seed=3, steps=2, batch_size=16, lane=8)
    with RunStore(tmp_path / "run") as store, progress(False) as bar:
        out = evaluate_model(model, iter_data("digits", (1, 16, 16), batch=100), cfg, feats, store, bar,
                             "sample", kid_subsets=4)
        whole = distances(feats(load_images(store.root)), feats(load_data("digits", (1, 16, 16))), kid_subsets=4)
    assert out["num"] == 70 and out["warnings"] == []
    # the features come from batches of another size, and with torch's default threads the
    # classifier's float32 sums differ in their last bits; FID's eigenvalues amplify that to ~3e-9
    assert out["fid"] == pytest.approx(whole["fid"], rel=1e-7) and out["kid"] == pytest.approx(whole["kid"], rel=1e-7)


def test_evaluate_with_one_sample_is_one_error_line(tmp_path):
    proc = cli_run("evaluate", "digits", "--num", "1", "--steps", "2", "--quiet", "--run-dir", tmp_path / "r")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "at least 2 generated" in proc.stderr


def test_both_inception_paths_clamp_after_the_resize(monkeypatch):
    """Bicubic resizing of a hard edge overshoots [0, 255]; Inception must see the clamped values."""
    from pgraft_cli.stages.evaluate import inception_features

    edge = torch.zeros(2, 1, 8, 8)
    edge[:, :, :, 4:] = 1.0
    raw = torch.nn.functional.interpolate(edge * 255, size=(299, 299), mode="bicubic", antialias=True)
    assert raw.min() < 0 and raw.max() > 255  # the overshoot the clamp is for
    x = inception_input(edge)
    assert x.shape == (2, 3, 299, 299) and x.min() == 0 and x.max() == 255
    seen = []

    def fake_extractor(name, device, use_dataparallel):  # clean-fid's entry point, without its weights
        def net(x):
            seen.append(x)
            return x.mean(dim=(2, 3))
        return net

    monkeypatch.setitem(sys.modules, "cleanfid", types.ModuleType("cleanfid"))
    monkeypatch.setitem(sys.modules, "cleanfid.features",
                        types.SimpleNamespace(build_feature_extractor=fake_extractor))
    feats = inception_features(None)
    assert feats.name == "inception:clean-fid+torch-bicubic-aa" and feats.num_features == 3
    feats(edge)
    assert seen[-1].min() >= 0 and seen[-1].max() <= 255


def test_flops_of_a_conv_layer_match_the_hand_count():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    x = torch.zeros(1, 3, 16, 16)
    # one multiply-add (2 FLOPs) per output element per input channel per kernel tap
    assert measure_flops(lambda: conv(x)) == 2 * 8 * 16 * 16 * 3 * 3 * 3
    lin = torch.nn.Linear(10, 4)
    assert measure_flops(lambda: lin(torch.zeros(5, 10))) == 2 * 5 * 10 * 4


def test_flops_count_the_network_that_runs_at_each_step():
    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.stages.evaluate import flops_per_image
    from pgraft_cli.models.lora import add_lora

    model = load_model("digits")
    base = flops_per_image(model, 8)
    calls = base["flops_calls"]
    assert base["nfe"] == 8 and base["flops_per_image"] == 8 * calls["base_call"] and "tuned_call" not in calls
    assert base["flops_parts"] == {"denoiser": base["denoiser_flops_per_image"]}  # pixel space, no text
    add_lora(model.network, rank=4, alpha=4)
    model.lora, model.cutoff = True, 0.5
    tuned = flops_per_image(model, 8)  # grid 1, .875, ..., .125: 4 times above 0.5
    calls = tuned["flops_calls"]
    assert calls["tuned_steps"] == 4 and calls["tuned_call"] > calls["base_call"]  # the adapter costs a little
    assert tuned["flops_per_image"] == 4 * calls["base_call"] + 4 * calls["tuned_call"]


def test_flops_of_a_full_fine_tune_at_cutoff_zero_never_run_its_parked_base():
    """No step runs the base of a full fine-tune at cutoff 0, which stays on the CPU off a GPU: its call was
    still measured, on the device's inputs ("expected all tensors on the same device" on CUDA)."""
    import copy

    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.stages.evaluate import flops_per_image

    model = load_model("digits")
    model.tuned, model.cutoff = copy.deepcopy(model.network), 0.0
    assert not model.base_runs
    ran = []
    model.network.register_forward_pre_hook(lambda module, args: ran.append(1))
    out = flops_per_image(model, 8)
    calls = out["flops_calls"]
    assert not ran and "base_call" not in calls and calls["tuned_steps"] == 8
    assert out["flops_per_image"] == 8 * calls["tuned_call"] > 0


def _counted_and_fresh(model, steps: int = 8) -> tuple[dict, dict, int]:
    """``flops_per_image`` through the process's cache, then counted afresh (cache emptied); and
    how many counts the first call added to the cache (0: every count was a hit)."""
    from pgraft_cli.core import metrics
    from pgraft_cli.stages.evaluate import flops_per_image

    before = len(metrics._COUNTED)
    cached = flops_per_image(model, steps)
    added = len(metrics._COUNTED) - before
    kept, metrics._COUNTED = metrics._COUNTED, {}
    try:
        fresh = flops_per_image(model, steps)
    finally:
        metrics._COUNTED = kept
    return cached, fresh, added


def _perturbed(model):
    """Other weights, the same structure: the key must ignore values."""
    with torch.no_grad():
        for p in model.network.parameters():
            p.add_(0.1)
    return model


def test_cached_flop_counts_equal_fresh_ones_and_a_structural_change_misses(monkeypatch):
    """For each verb's model (evaluate: the base; finetune: a LoRA or a full fine-tune above a
    cutoff; correct: a flow corrector), the count through the cache equals a fresh count, a
    reloaded model with other weights hits it, and another rank, cutoff or corrector misses it."""
    import copy

    from pgraft_cli.core import metrics
    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.models.corrector import MLPFlow, NoiseCorrector
    from pgraft_cli.models.lora import add_lora
    from pgraft_cli.stages.evaluate import flops_per_image

    monkeypatch.setattr(metrics, "_COUNTED", {})

    def lora(rank: int, cutoff: float):
        model = load_model("digits")
        add_lora(model.network, rank=rank, alpha=rank)
        model.lora, model.cutoff = True, cutoff
        return model

    def full(cutoff: float):
        model = load_model("digits")
        model.tuned, model.cutoff = copy.deepcopy(model.network), cutoff
        return model

    def corrected(width: int):
        model = load_model("digits")
        torch.manual_seed(0)
        model.corrector = NoiseCorrector("mlp", 3, 3, network=MLPFlow([1, 16, 16], width, 1).eval())
        return model

    makers = {"base": lambda: load_model("digits"), "lora rank 2": lambda: lora(2, 0.5),
              "lora rank 4": lambda: lora(4, 0.5), "lora cutoff 0.25": lambda: lora(4, 0.25),
              "full cutoff 0.5": lambda: full(0.5),
              "corrector width 32": lambda: corrected(32), "corrector width 64": lambda: corrected(64)}
    totals = {}
    for name, make in makers.items():
        cached, fresh, added = _counted_and_fresh(make())
        assert cached == fresh, name
        assert added > 0, f"{name}: a new structure must miss the cache"
        before = len(metrics._COUNTED)
        again = flops_per_image(_perturbed(make()), 8)
        assert again == fresh and len(metrics._COUNTED) == before, f"{name}: the same structure must hit"
        totals[name] = fresh["flops_calls"]
    # the misses were real changes: the counts they produced differ where the structure does
    assert totals["lora rank 2"]["tuned_call"] < totals["lora rank 4"]["tuned_call"]
    assert totals["lora cutoff 0.25"]["tuned_steps"] > totals["lora rank 4"]["tuned_steps"]
    assert totals["corrector width 32"]["corrector_call"] < totals["corrector width 64"]["corrector_call"]


def test_structure_ignores_values_and_sees_shapes_settings_and_enabled_adapters():
    from pgraft_cli.core.metrics import structure
    from pgraft_cli.models.lora import add_lora, set_lora_enabled

    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    other = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert structure(conv) == structure(other)  # other random weights
    assert structure(conv) != structure(torch.nn.Conv2d(3, 8, 3, padding=0))  # a setting, not a shape
    assert structure(conv) != structure(conv.double())
    assert structure(torch.zeros(2, 3)) != structure(torch.zeros(3, 2))
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    add_lora(net, rank=2, alpha=2, targets=["0"])
    on = structure(net)
    set_lora_enabled(net, False)
    assert structure(net) != on
    loop = [1]
    loop.append(loop)  # cycles end in a back-reference
    assert structure(loop) == "list[ 1 @0 ]"


def _twin(square: bool):
    """Two functions with one qualified name and other code."""
    if square:
        def f(x):
            return x * x
    else:
        def f(x):
            return x + x
    return f


def test_structure_sees_partial_arguments_closures_bound_selves_and_code():
    import functools

    from pgraft_cli.core.metrics import structure

    def g(x, s=0):
        return x * s

    assert structure(functools.partial(g, s=1)) != structure(functools.partial(g, s=2))
    assert structure(functools.partial(g, 1)) != structure(functools.partial(g, 2))
    assert structure(functools.partial(g, s=1)) == structure(functools.partial(g, s=1))

    def scaled(k):
        return lambda x: x * k

    assert structure(scaled(2)) != structure(scaled(3))
    assert structure(scaled(torch.zeros(2))) != structure(scaled(torch.zeros(3)))  # captured shapes
    assert structure(scaled(torch.zeros(2))) == structure(scaled(torch.ones(2)))  # ... not values
    # a bound method is its function and its object
    assert structure(torch.nn.Linear(2, 3).forward) != structure(torch.nn.Linear(2, 4).forward)
    assert structure(torch.nn.Linear(2, 3).forward) == structure(torch.nn.Linear(2, 3).forward)
    # a function is its code, not only its name
    assert _twin(True).__qualname__ == _twin(False).__qualname__
    assert structure(_twin(True)) != structure(_twin(False))
    assert structure(_twin(True)) == structure(_twin(True))

    def countdown(n):  # its closure holds itself: the cycle ends in a back-reference
        return countdown(n - 1) if n else 0

    assert structure(countdown) == structure(countdown)
    assert structure([torch.nn.functional]) == "list[ module torch.nn.functional ]"  # a name, not a namespace


def test_a_patched_predict_or_family_adapter_misses_the_flop_cache(monkeypatch):
    """The model's class and its family adapter are in the key: patching either (a test, or another
    adapter in the same process) counts afresh instead of reusing the old count."""
    from pgraft_cli.core import metrics
    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.models.loaded import LoadedModel
    from pgraft_cli.stages.evaluate import flops_per_image

    monkeypatch.setattr(metrics, "_COUNTED", {})
    model = load_model("digits")
    once = flops_per_image(model, 4)["flops_calls"]["base_call"]
    assert once > 0
    predict, adapter = LoadedModel.predict, type(model.adapter)
    call = adapter.call

    def predict_twice(self, x, t, cond, network=None):
        return predict(self, x, t, cond, network) + predict(self, x, t, cond, network)

    monkeypatch.setattr(LoadedModel, "predict", predict_twice)
    assert flops_per_image(model, 4)["flops_calls"]["base_call"] == 2 * once  # an add is no FLOP

    def call_thrice(self, network, x, timestep, cond):
        return call(self, network, x, timestep, cond) + call(self, network, x, timestep, cond) + \
            call(self, network, x, timestep, cond)

    monkeypatch.setattr(adapter, "call", call_thrice)
    assert flops_per_image(model, 4)["flops_calls"]["base_call"] == 6 * once


def test_flops_of_a_text_model_count_both_halves_of_classifier_free_guidance(tiny_sd_dir, monkeypatch):
    from pgraft_cli.core import metrics
    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.stages.evaluate import flops_per_image

    monkeypatch.setattr(metrics, "_COUNTED", {})
    model = load_model(str(tiny_sd_dir))
    plain = flops_per_image(model, 3, guidance_scale=1.0)
    guided = flops_per_image(model, 3, guidance_scale=5.0)
    assert guided["nfe"] == plain["nfe"] == 3  # NFE counts a guided step once ...
    assert guided["denoiser_flops_per_image"] == 2 * plain["denoiser_flops_per_image"]  # ... FLOPs both halves
    # the negative prompt is encoded too under guidance; the decoder runs once per image either way
    assert guided["flops_parts"]["text_encoders"] == 2 * plain["flops_parts"]["text_encoders"] > 0
    assert guided["flops_parts"]["vae_decoder"] == plain["flops_parts"]["vae_decoder"]
    counted = len(metrics._COUNTED)  # the key of a latent text model is stable: measuring again hits
    assert flops_per_image(model, 3, guidance_scale=5.0) == guided and len(metrics._COUNTED) == counted


def test_flops_of_a_latent_text_model_include_the_vae_decoder_and_text_encoders(tiny_sd_dir):
    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.stages.evaluate import flops_per_image

    model = load_model(str(tiny_sd_dir))
    out = flops_per_image(model, 4, guidance_scale=3.0)
    parts = out["flops_parts"]
    assert set(parts) == {"denoiser", "text_encoders", "vae_decoder"}
    assert sum(parts.values()) == out["flops_per_image"] > out["denoiser_flops_per_image"] == parts["denoiser"]
    assert parts["denoiser"] == 4 * out["flops_calls"]["base_call"]
    latents = torch.zeros((1, *model.sample_shape))
    assert parts["vae_decoder"] == measure_flops(lambda: model.vae.decode(latents)) > 0
    tokens = model.pipeline.tokenizer([""], padding="max_length", max_length=model.pipeline.tokenizer.model_max_length,
                                      return_tensors="pt").input_ids
    assert parts["text_encoders"] == 2 * measure_flops(lambda: model.pipeline.text_encoder(tokens)) > 0


class _TinyInception(torch.nn.Module):
    """Stands in for clean-fid's TorchScript Inception: same call signature, tiny network."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.conv(x / 255.0).mean(dim=(2, 3))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # clean-fid ships TorchScript; torch deprecates it
def test_inception_features_from_a_local_torchscript_file(tmp_path):
    from pgraft_cli.errors import PgraftError
    from pgraft_cli.stages.evaluate import pick_features

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(_TinyInception()), str(path))
    feats = pick_features("auto", (1, 16, 16), str(path))  # weights given: Inception even for digits
    assert feats.name == "inception:inception-2015-12-05.pt+torch-bicubic-aa"
    out = feats(torch.rand(5, 1, 16, 16))
    assert out.shape == (5, 8) and feats.num_features == 8
    with pytest.raises(PgraftError, match="no such file"):
        pick_features("inception", (3, 32, 32), str(tmp_path / "missing.pt"))
    with pytest.raises(PgraftError, match="1x16x16"):
        pick_features("classifier", (3, 32, 32), None)


class _TracedInside(torch.nn.Module):
    """A scripted forward around traced convolutions, as a saved Inception may be."""

    def __init__(self):
        super().__init__()
        probe = torch.rand(1, 3, 32, 32)
        self.stem = torch.jit.trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()), probe)
        self.head = torch.jit.trace(torch.nn.Conv2d(4, 8, 1), self.stem(probe).detach())

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.head(self.stem(x / 255.0)).mean(dim=(2, 3))


def _tf32_flags(graph) -> list:
    return [list(n.inputs())[12].toIValue() for n in graph.nodes() if n.kind() == "aten::_convolution"]


def _module_tf32_flags(module) -> list:
    return [flag for m in module.modules() for flag in _tf32_flags(m.graph)]


class _ConvInABranch(torch.nn.Module):
    """A convolution with its TF32 flag written out, inside an ``if`` block of a scripted forward."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, twice: bool = True) -> torch.Tensor:
        if twice:
            x = torch.ops.aten._convolution(x, self.conv.weight, self.conv.bias, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                            1, False, False, True, True)
        return x


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_traced_networks_convolutions_lose_the_tf32_flag_they_were_traced_with(tmp_path, monkeypatch):
    """torch.jit.trace records cuDNN's allow_tf32 of that moment (True by default) in each convolution; a GPU
    would then run them in TF32 whatever the flags say when they run. ``tf32_off`` rewrites the constants
    before the first call: the executed graph carries False, and on the CPU the outputs are the same bytes."""
    from pgraft_cli.models.traced import tf32_off
    from pgraft_cli.stages import evaluate

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(_TracedInside()), str(path))
    x = torch.rand(2, 3, 32, 32) * 255
    before = torch.jit.load(str(path))
    assert _module_tf32_flags(before) == [True, True]
    expected = before(x, True)
    net = torch.jit.load(str(path))
    assert tf32_off(net) == 2 and tf32_off(net) == 0  # the second pass finds nothing left
    assert _module_tf32_flags(net) == [False, False]
    for _ in range(3):  # the profiling executor optimises on a later call
        assert torch.equal(net(x, True), expected)
    assert _tf32_flags(torch.jit.last_executed_optimized_graph()) == [False, False]
    seen = []
    monkeypatch.setattr(evaluate, "tf32_off", lambda m: seen.append(m) or 0)
    evaluate.pick_features("inception", (1, 16, 16), str(path))
    assert len(seen) == 1 and isinstance(seen[0], torch.jit.ScriptModule)  # before Features' probe call

    class Wrapper(torch.nn.Module):  # clean-fid's InceptionV3W: the TorchScript file inside a module
        def __init__(self):
            super().__init__()
            self.base = torch.jit.load(str(path))

        def forward(self, x):
            return self.base(x, True)

    made = []

    def fake_extractor(name, device, use_dataparallel):  # clean-fid returns a function around its module
        model = Wrapper()
        made.append(model)

        def model_fn(x):
            return model(x)
        return model_fn

    monkeypatch.setitem(sys.modules, "cleanfid", types.ModuleType("cleanfid"))
    monkeypatch.setitem(sys.modules, "cleanfid.features", types.SimpleNamespace(build_feature_extractor=fake_extractor))
    monkeypatch.setattr(evaluate, "tf32_off", tf32_off)
    evaluate.pick_features("inception", (1, 16, 16), None)
    assert len(made) == 1 and _module_tf32_flags(made[0].base) == [False, False]
    eager = _ConvInABranch()
    branchy = torch.jit.script(eager)
    inner = next(n for n in branchy.graph.nodes() if n.kind() == "prim::If")
    x = torch.rand(2, 3, 8, 8)
    expected = eager(x)
    assert tf32_off(branchy) == 1 and all(_tf32_flags(b) == [False] for b in inner.blocks() if _tf32_flags(b))
    assert torch.equal(branchy(x), expected)


def test_a_reference_from_images_batches_or_features_gives_bit_identical_fid():
    """Every route to the reference (a tensor, iter_data's batches, a feature matrix) gives the same bits."""
    from pgraft_cli.io.data import iter_data, load_data
    from pgraft_cli.stages.evaluate import reference

    feats = classifier_features()
    real = load_data("digits", (1, 16, 16))
    gen = feats(torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(1)))
    fids = []
    for given in (real, iter_data("digits", (1, 16, 16)), feats(real)):
        metric = reference(feats, given, kid_subsets=2)
        metric.update(gen, real=False)
        fids.append(metric.compute()["fid"])
    assert fids[0] == fids[1] == fids[2]


def test_auto_features_avoid_the_reward_being_optimised():
    """FID of a fine-tune that optimises the bundled classifier is measured in the judge's features."""
    from pgraft_cli.stages.evaluate import pick_features
    from pgraft_cli.stages.rewards import parse_reward

    shape = (1, 16, 16)
    assert pick_features("auto", shape, None).name.startswith("classifier:digits-classifier")
    reward = parse_reward("classifier:digits:3")
    assert pick_features("auto", shape, None, reward_identity=reward.identity).name.startswith("classifier:digits-judge")
    other = parse_reward("jpeg-compressibility")
    assert pick_features("auto", shape, None, reward_identity=other.identity).name.startswith("classifier:digits-classifier")
    # an explicit choice is kept
    assert pick_features("classifier", shape, None, reward_identity=reward.identity).name.startswith("classifier:digits-classifier")
    # the classifier as a term of a weighted reward is still the reward's network (it was matched as a prefix)
    for spec in ("1.0*classifier:digits:3", "0.5*jpeg-compressibility+0.5*classifier:digits:3"):
        weighted = parse_reward(spec)
        assert pick_features("auto", shape, None, reward_identity=weighted.identity).name.startswith("classifier:digits-judge")


def test_evaluate_measures_fid_off_the_reward_a_file_was_tuned_on(tmp_path):
    """`pgraft evaluate` of a file tuned on the bundled classifier, or with --reward that classifier, takes
    the judge's features, as `pgraft finetune` does; it took the classifier's (the optimised network's)."""
    from pgraft_cli.io.checkpoints import base_info_of, load_model, save_finetuned
    from pgraft_cli.io.recipes import FinetuneConfig
    from pgraft_cli.models.lora import add_lora
    from pgraft_cli.stages.rewards import parse_reward

    model = load_model("digits")
    add_lora(model.network, rank=2, alpha=2)
    model.lora, model.cutoff = True, 0.5
    spec = "classifier:digits:3"
    metrics = {"reward": spec, "reward_identity": parse_reward(spec).identity}
    tuned = save_finetuned(tmp_path / "tuned.safetensors", model, base_info_of(load_model("digits")),
                           FinetuneConfig(cutoff=0.5, lora_rank=2, lora_alpha=2), metrics, {})
    small = ["--num", "8", "--steps", "2", "--json", "--quiet"]

    notes = []

    def features(*args):
        result = cli_run("evaluate", *args, *small, "--run-dir", tmp_path / f"run{len(list(tmp_path.iterdir()))}")
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        notes.append(any("FID in the bundled judge's features" in n for n in out["notes"]))
        return out["features"]

    assert features(tuned).startswith("classifier:digits-judge")
    assert features("digits").startswith("classifier:digits-classifier")
    assert features("digits", "--reward", spec).startswith("classifier:digits-judge")
    assert features("digits", "--reward", "jpeg-compressibility").startswith("classifier:digits-classifier")
    assert notes == [True, False, True, False]  # the switch is said where it happens
