"""The selection rules pinned against their acceptance formulas (docs/methods.md section 1)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pgraft_cli.errors import PgraftError
from pgraft_cli.core.selection import (
    acceptance_probability,
    condition_groups,
    deduplicate,
    empirical_cdf,
    expected_keep_fraction,
    reshaped_reward,
    select,
    select_best_of_n,
    select_threshold,
    select_top_k,
    summarize,
)

N = 200_000  # a multiple of every m below
BINS = 20


def gaussian_batch(m: int, seed: int = 0):
    """N rewards ~ N(0, 1) in consecutive groups of m, with their exact CDF values."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(N, generator=g, dtype=torch.float64)
    return r, torch.arange(N) // m, torch.special.ndtr(r)


def assert_acceptance_matches(keep, F, rule, **params):
    """Per bin of the true F: kept fraction == mean of g(F) over the bin, within 5 binomial sigmas."""
    g = acceptance_probability(rule, F, **params)
    b = (F * BINS).long().clamp(max=BINS - 1)
    for i in range(BINS):
        in_bin = b == i
        n_b = int(in_bin.sum())
        p = float(g[in_bin].mean())
        observed = float(keep[in_bin].double().mean())
        tol = 5 * math.sqrt(max(p * (1 - p), 1e-4) / n_b) + 1e-3
        assert abs(observed - p) < tol, (rule, params, i, observed, p)


@pytest.mark.parametrize("k,m", [(1, 4), (2, 4), (3, 8)])
def test_top_k_empirical_acceptance_matches_formula(k, m):
    r, groups, F = gaussian_batch(m)
    keep = select_top_k(r, groups, k)
    assert_acceptance_matches(keep, F, "top_k", k=k, m=m)
    assert keep.double().mean().item() == expected_keep_fraction("top_k", k=k, m=m) == k / m
    assert torch.equal(torch.bincount(groups[keep]), torch.full((N // m,), k))


def test_best_of_n_empirical_acceptance_matches_formula():
    r, groups, F = gaussian_batch(4, seed=1)
    keep = select_best_of_n(r, groups)
    assert_acceptance_matches(keep, F, "best_of_n", n=4)
    assert keep.double().mean().item() == expected_keep_fraction("best_of_n", n=4) == 0.25


def test_threshold_empirical_acceptance_matches_formula():
    r, _, F = gaussian_batch(1, seed=2)
    tau = 0.5
    F_tau = float(torch.special.ndtr(torch.tensor(tau, dtype=torch.float64)))
    keep = select_threshold(r, value=tau)
    assert_acceptance_matches(keep, F, "threshold", F_tau=F_tau)
    expected = expected_keep_fraction("threshold", F_tau=F_tau)
    assert abs(keep.double().mean().item() - expected) < 5 * math.sqrt(expected * (1 - expected) / N)


@pytest.mark.parametrize("q", [0.0, 0.5, 0.75, 0.9, 1.0])
def test_threshold_quantile_keeps_expected_fraction(q):
    r, _, _ = gaussian_batch(1, seed=3)
    kept = int(select_threshold(r, quantile=q).sum())
    assert kept == N - math.ceil(q * (N - 1))  # the "higher" order statistic
    assert abs(kept / N - expected_keep_fraction("threshold", F_tau=q)) <= 1 / N
    # on a tiny batch: quantile 0.75 of 4 distinct rewards keeps the top one
    assert select_threshold(torch.tensor([3.0, 1.0, 4.0, 2.0]), quantile=0.75).tolist() == [False, False, True, False]


def test_best_of_n_tilt_on_uniform_rewards_has_density_n_F_pow_n_minus_1():
    n = 4
    u = torch.rand(N, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kept = u[select_best_of_n(u, torch.arange(N) // n)]
    counts = torch.histc(kept, bins=10, min=0.0, max=1.0)
    edges = torch.linspace(0, 1, 11, dtype=torch.float64)
    expected = kept.numel() * (edges[1:] ** n - edges[:-1] ** n)  # integral of n F^(n-1) over each bin
    p = expected / kept.numel()
    sigma = torch.sqrt(kept.numel() * p * (1 - p))
    assert torch.all((counts.double() - expected).abs() < 5 * sigma + 1), (counts, expected)


# ----------------------------------------------------------------------------------------------
# The formulas themselves


F_GRID = torch.linspace(0, 1, 101, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_reshaped_best_of_n_is_n_minus_1_log_F(n):
    rhat = reshaped_reward("best_of_n", F_GRID, n=n)
    expected = torch.special.xlogy(torch.tensor(n - 1.0, dtype=torch.float64), F_GRID)
    torch.testing.assert_close(rhat, expected)
    assert rhat[-1] == 0 and (rhat[0] == -math.inf if n > 1 else rhat[0] == 0)
    torch.testing.assert_close(acceptance_probability("best_of_n", F_GRID, n=n), F_GRID ** (n - 1))


@pytest.mark.parametrize("m", [1, 2, 4, 9])
def test_top_1_is_best_of_n_and_top_m_is_zero(m):
    torch.testing.assert_close(reshaped_reward("top_k", F_GRID, k=1, m=m), reshaped_reward("best_of_n", F_GRID, n=m))
    assert torch.equal(reshaped_reward("top_k", F_GRID, k=m, m=m), torch.zeros_like(F_GRID))
    assert torch.equal(reshaped_reward("top_k", F_GRID, k=m + 3, m=m), torch.zeros_like(F_GRID))


@pytest.mark.parametrize("k,m", [(1, 4), (2, 4), (3, 8), (50, 200)])
def test_top_k_matches_direct_binomial_sum_and_is_monotone(k, m):
    F = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    direct = torch.tensor([sum(math.comb(m - 1, j) * (1 - f) ** j * f ** (m - 1 - j) for j in range(k))
                           for f in F.tolist()], dtype=torch.float64)
    g = acceptance_probability("top_k", F, k=k, m=m)
    ok = direct > 1e-250  # the direct sum underflows where the log-space one does not
    torch.testing.assert_close(g[ok], direct[ok], rtol=1e-9, atol=1e-300)
    rhat = reshaped_reward("top_k", F_GRID, k=k, m=m)
    assert torch.all(torch.diff(rhat) >= 0)
    if m <= 8:  # strictly inside (0, 1) when k < m (for large m, g rounds to 1 near F = 1)
        assert torch.all(torch.diff(rhat[1:-1]) > 0)
    assert rhat[-1] == 0 and rhat[0] == -math.inf
    assert torch.isfinite(reshaped_reward("top_k", torch.tensor([1e-12, 1 - 1e-12]), k=k, m=m)).all()


@pytest.mark.parametrize("rule,params", [("top_k", dict(k=1, m=4)), ("top_k", dict(k=3, m=8)),
                                         ("best_of_n", dict(n=5)), ("threshold", dict(F_tau=0.3))])
def test_acceptance_integrates_to_expected_keep_fraction(rule, params):
    F = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000  # midpoint rule on [0, 1]
    integral = float(acceptance_probability(rule, F, **params).mean())
    assert abs(integral - expected_keep_fraction(rule, **params)) < 1e-6


def test_threshold_reshaped_reward_is_indicator():
    rhat = reshaped_reward("threshold", torch.tensor([0.0, 0.2, 0.3, 0.9]), F_tau=0.3)
    assert rhat.tolist() == [-math.inf, -math.inf, 0.0, 0.0]


def test_empirical_cdf_is_mid_rank():
    F = empirical_cdf(torch.tensor([3.0, 1.0, 2.0, 2.0]))
    assert F(torch.tensor([1.0, 2.0, 3.0, 0.0, 9.0, 1.5])).tolist() == [0.125, 0.5, 0.875, 0.0, 1.0, 0.25]


# ----------------------------------------------------------------------------------------------
# Selection mechanics


def test_top_k_ties_break_by_lower_index():
    r = torch.tensor([1.0, 5.0, 5.0, 5.0, 0.0, 2.0, 2.0])
    g = torch.tensor([7, 3, 7, 3, 3, 7, 7])
    # group 3 = samples 1, 3, 4 (5, 5, 0); group 7 = samples 0, 2, 5, 6 (1, 5, 2, 2)
    assert select_top_k(r, g, 2).tolist() == [False, True, True, True, False, True, False]
    assert select_top_k(r, g, 1).tolist() == [False, True, True, False, False, False, False]
    assert torch.equal(select_top_k(r, g, 2), select_top_k(r.clone(), g.clone(), 2))
    assert select_top_k(torch.zeros(5), None, 3).tolist() == [True, True, True, False, False]


def test_top_k_small_groups_keep_all():
    r = torch.tensor([0.3, 0.1, 0.2, 0.9])
    assert select_top_k(r, torch.tensor([0, 0, 1, 2]), 2).tolist() == [True, True, True, True]


def test_deduplicate_keeps_one_of_exact_repeats_and_all_distinct():
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(5))
    samples = torch.cat([x, x[[1, 3, 1]]])  # 5, 6, 7 repeat 1, 3, 1
    keep = torch.ones(8, dtype=torch.bool)
    assert deduplicate(samples, keep).tolist() == [True] * 5 + [False] * 3
    # with rewards: higher reward first; equal rewards -> lower index
    rewards = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 1.0])
    assert deduplicate(samples, keep, rewards).tolist() == [True, False, True, True, True, True, False, False]
    # a dropped sample never suppresses a kept duplicate of it
    keep = torch.tensor([True, False, True, True, True, True, True, False])
    assert deduplicate(samples, keep).tolist() == [True, False, True, True, True, True, False, False]


def test_deduplicate_tolerance_is_rms_distance():
    x = torch.zeros(3, 100, dtype=torch.float64)
    x[1] += 0.01  # RMS distance 0.01 from x[0]
    x[2] += 1.0
    keep = torch.ones(3, dtype=torch.bool)
    assert deduplicate(x, keep, tol=0.0).tolist() == [True, True, True]
    assert deduplicate(x, keep, tol=0.02).tolist() == [True, False, True]
    assert deduplicate(x, keep, tol=0.005).tolist() == [True, True, True]
    big = torch.randn(600, 8, generator=torch.Generator().manual_seed(6))  # spans several blocks
    rep = torch.cat([big, big])
    out = deduplicate(rep, torch.ones(1200, dtype=torch.bool), tol=1e-6)
    assert out[:600].all() and not out[600:].any()


def test_select_dispatch():
    r = torch.tensor([0.1, 0.4, 0.3, 0.2, 0.9, 0.8, 0.7, 0.6])
    g = torch.arange(8) // 4
    assert select("top_k", r, g, k=2, m=4).tolist() == [False, True, True, False, True, True, False, False]
    assert select("best_of_n", r, g, m=4).tolist() == [False, True, False, False, True, False, False, False]
    assert select("threshold", r, threshold=0.65).tolist() == [False] * 4 + [True] * 3 + [False]
    assert select("threshold", r, quantile=0.75).sum() == 2
    samples = torch.tensor([[0.0], [1.0], [1.0], [2.0], [3.0], [4.0], [4.0], [5.0]])
    assert select("threshold", r, quantile=0.0, dedup=True, samples=samples).tolist() == \
        [True, True, False, True, True, True, False, True]


@pytest.mark.parametrize("call,message", [
    (lambda r, g: select("top_k", r, g, k=1, m=4), "top_k of m=4 needs groups of 4 samples, but group 3 has 2"),
    (lambda r, g: select("top_k", r, g, k=0), "k"),
    (lambda r, g: select("top_k", r, g), "needs k"),
    (lambda r, g: select("best_of_n", r, g, m=3), "groups of 3"),
    (lambda r, g: select("threshold", r), "exactly one"),
    (lambda r, g: select("threshold", r, threshold=0.1, quantile=0.5), "exactly one"),
    (lambda r, g: select("threshold", r, quantile=1.5), "quantile"),
    (lambda r, g: select("top_n", r, g, k=1), "unknown rule"),
    (lambda r, g: select("top_k", r, g, k=1, dedup=True), "dedup needs the samples"),
    (lambda r, g: select("top_k", r, g[:3], k=1), "groups"),
    (lambda r, g: select("top_k", torch.tensor([0.0, math.nan]), None, k=1), "NaN"),
    (lambda r, g: select_top_k(r, g.float(), 1), "groups"),
    (lambda r, g: acceptance_probability("top_k", 0.5, k=1), "needs m"),
    (lambda r, g: acceptance_probability("best_of_n", 0.5, n=0), "n"),
    (lambda r, g: acceptance_probability("best_of_n", 0.5, m=4), "unexpected m"),
    (lambda r, g: acceptance_probability("threshold", 0.5, F_tau=2.0), "F_tau"),
    (lambda r, g: reshaped_reward("best_of_n", 1.5, n=2), "[0, 1]"),
    (lambda r, g: deduplicate(torch.zeros(3, 2), torch.ones(3, dtype=torch.bool), tol=-1.0), "dedup_tol"),
])
def test_bad_params_raise_pgraft_error(call, message):
    r = torch.arange(14, dtype=torch.float64)
    g = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3] * 2)
    with pytest.raises(PgraftError) as info:
        call(r, g)
    assert message in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# The report


def test_summarize_counts_histograms_and_tilt():
    g = torch.Generator().manual_seed(7)
    r = torch.randn(400, generator=g, dtype=torch.float64)
    groups = torch.arange(400) // 4
    keep = select("best_of_n", r, groups, m=4)
    s = summarize(r, keep, "best_of_n", {"m": 4})
    assert (s.num, s.kept) == (400, 100) and s.kept_fraction == 0.25 == s.expected_kept_fraction
    assert s.kept_indices == keep.nonzero().flatten().tolist()
    assert len(s.histogram_edges) == 21 and sum(s.histogram_before) == 400 and sum(s.histogram_after) == 100
    assert all(a <= b for a, b in zip(s.histogram_after, s.histogram_before))
    assert s.reward_after["mean"] > s.reward_before["mean"] and s.reward_after["min"] >= s.reward_before["min"]
    assert abs(s.reward_before["std"] - float(r.std(correction=0))) < 1e-12
    F = empirical_cdf(r)(r[keep])
    torch.testing.assert_close(torch.tensor(s.reshaped_reward, dtype=torch.float64), 3 * torch.log(F))
    d = s.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d and d["kept"] == 100


def test_summarize_tilts_by_each_conditions_own_cdf():
    # Two classes whose rewards sit 10 apart; within a class F_c(r) = u. best-of-4 keeps by rank within a
    # class's groups, so the kept samples' F_c follows Beta(4, 1) and E[3 log F_c] = -3/4. A CDF pooled
    # over the two classes halves the lower class's F and reads about (3 log 2) / 2 lower (the bug this pins).
    g = torch.Generator().manual_seed(3)
    u = torch.rand(4000, generator=g, dtype=torch.float64)
    cls = torch.arange(4000) % 2
    r = u + 10.0 * cls
    groups = condition_groups(cls, 4)
    keep = select("best_of_n", r, groups, m=4)
    s = summarize(r, keep, "best_of_n", {"n": 4}, conditions=cls)
    assert s.cdf_scope == "condition" and s.cdf_samples_min == 2000
    idx = keep.nonzero().flatten()
    expected = torch.stack([empirical_cdf(r[cls == int(c)])(r[int(i)]) for i, c in zip(idx, cls[idx])])
    torch.testing.assert_close(torch.tensor(s.cdf, dtype=torch.float64), expected)
    assert abs(s.reshaped_reward_mean - (-0.75)) < 0.05
    pooled = summarize(r, keep, "best_of_n", {"n": 4})
    assert pooled.cdf_scope == "batch" and pooled.reshaped_reward_mean < -1.25
    # one condition, or the threshold rule (a rule over the whole batch): the batch's CDF
    one = summarize(u, keep, "best_of_n", {"n": 4}, conditions=torch.zeros(4000, dtype=torch.long))
    assert one.cdf_scope == "batch" and one.cdf == summarize(u, keep, "best_of_n", {"n": 4}).cdf
    th = summarize(r, r >= 10.5, "threshold", {"threshold": 10.5}, conditions=cls)
    assert th.cdf_scope == "batch" and th.cdf_samples_min == 4000


def test_summarize_threshold_and_empty_selection():
    r = torch.linspace(-1, 1, 50, dtype=torch.float64)
    keep = select("threshold", r, quantile=0.8)
    s = summarize(r, keep, "threshold", {"quantile": 0.8}, bins=7)
    assert s.kept == int(keep.sum()) and all(v == 0.0 for v in s.reshaped_reward)
    assert abs(s.expected_kept_fraction - 0.2) < 1e-12 and len(s.histogram_before) == 7
    # a caller may record the resolved threshold beside the quantile: the quantile decides
    both = summarize(r, keep, "threshold", {"quantile": 0.8, "threshold": 0.55}, bins=7)
    assert both.reshaped_reward == s.reshaped_reward and both.expected_kept_fraction == s.expected_kept_fraction
    s = summarize(r, torch.zeros(50, dtype=torch.bool), "top_k", {"k": 1, "m": 5})
    d = s.to_dict()
    assert d["kept"] == 0 and d["reward_after"]["mean"] is None and sum(d["histogram_after"]) == 0
    json.dumps(d, allow_nan=False)
