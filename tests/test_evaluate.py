"""Evaluation maths pinned against closed forms; FLOPs against a hand count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgraft_cli.data import load_digits
from pgraft_cli.evaluate import (classifier_features, distances, feature_stats, frechet_distance,
                                 kernel_distance, measure_flops)


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    """For diagonal covariances, FD = |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_zero_for_identical_stats():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 8))
    mu, sigma = feature_stats(f)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


def test_kid_near_zero_for_same_distribution_and_large_for_different():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    far = rng.normal(loc=1.0, size=(600, 16))
    same = kernel_distance(x, y, subsets=5, subset_size=300)
    diff = kernel_distance(x, far, subsets=5, subset_size=300)
    assert abs(same) < 0.05 and diff > 0.5


def test_fid_with_digits_classifier_features():
    """On the real digits: identical sets give FID ~0; digits against noise give a large FID."""
    images, _ = load_digits()
    feats = classifier_features()
    real = feats(images)
    assert real.shape == (len(images), 64)
    same = distances(real, real, kid_subsets=2)
    assert same["fid"] == pytest.approx(0.0, abs=1e-4)
    noise = torch.rand(len(images), 1, 16, 16, generator=torch.Generator().manual_seed(0))
    far = distances(feats(noise), real, kid_subsets=2)
    assert far["fid"] > 100 * max(same["fid"], 1e-3) and far["fid"] > 1.0
    assert far["kid"] > 0.1


def test_flops_of_a_conv_layer_match_the_hand_count():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    x = torch.zeros(1, 3, 16, 16)
    # one multiply-add (2 FLOPs) per output element per input channel per kernel tap
    assert measure_flops(lambda: conv(x)) == 2 * 8 * 16 * 16 * 3 * 3 * 3
    lin = torch.nn.Linear(10, 4)
    assert measure_flops(lambda: lin(torch.zeros(5, 10))) == 2 * 5 * 10 * 4


def test_flops_count_the_network_that_runs_at_each_step():
    from pgraft_cli.checkpoints import load_model
    from pgraft_cli.evaluate import flops_per_image
    from pgraft_cli.finetune import add_lora

    model = load_model("digits")
    nfe, base_total, parts = flops_per_image(model, 8)
    assert nfe == 8 and base_total == 8 * parts["base_call"] and "tuned_call" not in parts
    add_lora(model.network, rank=4, alpha=4)
    model.lora, model.cutoff = True, 0.5
    nfe, total, parts = flops_per_image(model, 8)  # grid 1, .875, ..., .125: 4 times above 0.5
    assert parts["tuned_steps"] == 4 and parts["tuned_call"] > parts["base_call"]  # the adapter costs a little
    assert total == 4 * parts["base_call"] + 4 * parts["tuned_call"]


def test_flops_of_a_text_model_count_both_halves_of_classifier_free_guidance(tiny_sd_dir):
    from pgraft_cli.checkpoints import load_model
    from pgraft_cli.evaluate import flops_per_image

    model = load_model(str(tiny_sd_dir))
    _, plain, _ = flops_per_image(model, 3, guidance_scale=1.0)
    _, guided, _ = flops_per_image(model, 3, guidance_scale=5.0)
    assert guided == 2 * plain


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
    from pgraft_cli.evaluate import pick_features

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(_TinyInception()), str(path))
    feats = pick_features("auto", (1, 16, 16), str(path))  # weights given: Inception even for digits
    assert feats.name == "inception:inception-2015-12-05.pt"
    out = feats(torch.rand(5, 1, 16, 16))
    assert out.shape == (5, 8)
    with pytest.raises(PgraftError, match="no such file"):
        pick_features("inception", (3, 32, 32), str(tmp_path / "missing.pt"))
    with pytest.raises(PgraftError, match="1x16x16"):
        pick_features("classifier", (3, 32, 32), None)
