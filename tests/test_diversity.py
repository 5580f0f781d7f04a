"""Precision/recall (k-NN manifolds), within-prompt distances and best-of-n, against closed forms."""

import math

import numpy as np
import pytest
import torch

from pgraft_cli.core.metrics import (FidKid, best_of_n, distances, knn_radii, mean_pairwise_distance,
                                     precision_recall)


def test_identical_sets_have_precision_and_recall_one():
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone()) == {"precision": 1.0, "recall": 1.0}


def test_disjoint_far_sets_have_precision_and_recall_zero():
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x + 1000.0) == {"precision": 0.0, "recall": 0.0}


def test_a_collapsed_generator_has_precision_one_and_low_recall():
    # Real points on a line 0..99; generated points all copies of real point 50 (mode collapse):
    # each generated point sits on a real point (precision 1); the generated manifold is that one
    # point with radius 0, so only real point 50 is inside it (recall 1/100).
    real = torch.arange(100.0).unsqueeze(1)
    gen = torch.full((10, 1), 50.0)
    assert precision_recall(real, gen) == {"precision": 1.0, "recall": 0.01}


def test_knn_radius_is_the_kth_nearest_other_point():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0], [15.0]])
    # 0: others at 1, 3, 7 -> 7; 7: others at 4, 6, 7, 8 -> 7; 15: at 8, 12, 14 -> 14
    assert knn_radii(x, k=3).tolist() == [7.0, 6.0, 4.0, 7.0, 14.0]


def test_mean_pairwise_distance_per_group():
    f = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [9.0, 9.0]])
    groups = torch.tensor([0, 0, 1, 1, 1, 2])  # group 2 has one sample: left out
    # group 0: one pair at 5; group 1: pairs at 1, 2, 1 -> 4/3
    assert mean_pairwise_distance(f, groups) == pytest.approx((5 + 4 / 3) / 2)
    assert mean_pairwise_distance(f[:1], groups[:1]) is None


def test_mean_pairwise_distance_of_a_large_group_is_its_first_rows():
    from pgraft_cli.core.metrics import PAIRWISE_ROWS

    g = torch.Generator().manual_seed(0)
    f = torch.randn(PAIRWISE_ROWS + 300, 3, generator=g, dtype=torch.float64)
    f[PAIRWISE_ROWS:] *= 100  # rows past the cap would move the mean a lot
    one = torch.zeros(len(f), dtype=torch.long)
    first = f[:PAIRWISE_ROWS]
    expected = float(torch.cdist(first, first).sum() / (PAIRWISE_ROWS * (PAIRWISE_ROWS - 1)))
    assert mean_pairwise_distance(f, one) == pytest.approx(expected, rel=1e-12)
    assert abs(expected - 4 / math.sqrt(math.pi)) < 0.03  # E||x - y|| for x, y ~ N(0, I_3): sqrt(2) E[chi_3]


def test_best_of_n_takes_each_groups_max_then_the_mean():
    r = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.4])
    out = best_of_n(r, torch.tensor([0, 1, 2, 0, 1, 2]))  # prompts cycle as in sampling
    assert out["mean"] == pytest.approx((0.3 + 0.9 + 0.5) / 3)
    assert out["std"] == pytest.approx(np.std([0.3, 0.9, 0.5]))
    assert (out["groups"], out["min_group_size"], out["max_group_size"]) == (3, 2, 2)


def test_fid_and_kid_report_precision_and_recall():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    out = distances(x, x)
    assert out["precision"] == 1.0 and out["recall"] == 1.0


def test_reference_state_round_trips_fid_kid_bit_identically():
    g = torch.Generator().manual_seed(2)
    real, gen = torch.randn(60, 6, generator=g), torch.randn(50, 6, generator=g) + 0.3
    metric = FidKid(6, kid_subsets=5)
    metric.update(real, real=True)
    state = metric.reference_state()
    assert np.allclose(state["mu"], real.double().mean(0).numpy())
    assert np.allclose(state["sigma"], np.cov(real.double().numpy(), rowvar=False))
    metric.update(gen, real=False)
    again = FidKid.from_reference_state(state, kid_subsets=5)
    again.update(gen, real=False)
    assert again.compute() == metric.compute()
    no_rows = FidKid.from_reference_state({**state, "features": np.zeros((0, 6), np.float32)}, kid_subsets=5)
    no_rows.update(gen, real=False)
    out = no_rows.compute()
    assert out["fid"] == metric.compute()["fid"] and out["kid"] is None and out["precision"] is None
    assert any("KID and precision/recall skipped" in w for w in out["warnings"])


def test_precision_recall_compare_equally_many_rows_of_each_side():
    """Ten times more reference rows than generated ones: both sides are cut to the smaller count
    (a seeded draw, the same on every call) before the k-NN manifolds are built."""
    from pgraft_cli.core.metrics import equal_rows

    g = torch.Generator().manual_seed(0)
    real, gen = torch.randn(400, 6, generator=g), torch.randn(40, 6, generator=g)
    metric = FidKid(6, kid_subsets=2)
    metric.update(real, real=True)
    metric.update(gen, real=False)
    first, again = metric.compute(), metric.compute()
    want = precision_recall(equal_rows(real, 40, seed=0), gen)
    assert (first["precision"], first["recall"]) == (again["precision"], again["recall"])
    assert (first["precision"], first["recall"]) == (want["precision"], want["recall"])
    assert len(equal_rows(real, 40, seed=0)) == 40 and equal_rows(gen, 40, seed=0) is gen
    assert (first["precision"], first["recall"]) != tuple(precision_recall(real, gen).values())  # all rows differ


def test_best_of_groups_of_a_class_model_hold_one_class(tmp_path):
    """Image i of a class model has class i mod n: a best-of group (and a pairwise-distance group)
    is best_of images of one class, never consecutive images of several."""
    from conftest import build_scheduler, build_tiny_unet
    from pgraft_cli.io.checkpoints import load_model, save_pgraft_safetensors
    from pgraft_cli.stages.evaluate import image_groups
    from pgraft_cli.stages.sample import Conditions

    net = build_tiny_unet(num_class_embeds=3)
    path = tmp_path / "classes.safetensors"
    save_pgraft_safetensors(path, net, "UNet2DModel", dict(net.config), dict(build_scheduler("flow").config), {})
    model, cond = load_model(str(path)), Conditions()
    index = torch.tensor([5, 0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11])  # shards may come in any order
    groups = image_groups(model, cond, index, best_of=2)
    _, labels = cond.for_indices(model, index.tolist())
    by_group: dict[int, list[int]] = {}
    for g, c in zip(groups.tolist(), labels):
        by_group.setdefault(g, []).append(c)
    assert sorted(len(v) for v in by_group.values()) == [2] * 6 and all(len(set(v)) == 1 for v in by_group.values())
    assert image_groups(model, Conditions(class_label=1), index, best_of=4).unique().numel() == 3
