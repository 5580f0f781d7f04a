"""Selection rules of generalised rejection sampling (GRS / GRAFT) and the rewards they reshape.

docs/methods.md section 1: draw ``m`` samples per prompt from the model ``p``, score them with a reward
``r``, keep some by a rule, fine-tune on what was kept. The kept samples follow
``p_acc(x) ~ p(x) exp(rhat(x))`` with ``rhat = log g(F(r(x)))``, where ``F`` is the CDF of the reward
under ``p`` and ``g`` the rule's acceptance probability given ``F`` (continuous rewards, no ties):

- ``top_k`` (k of m):  ``g(F) = sum_{j<k} C(m-1, j) (1-F)^j F^(m-1-j)``
  (the sample is kept iff fewer than k of the other m-1 beat it; that count is Binomial(m-1, 1-F));
- ``best_of_n`` (top 1 of n):  ``g(F) = F^(n-1)``;
- ``threshold`` at tau:  ``g(F) = 1[F >= F_tau]`` with ``F_tau = F(tau)``.

The functions here are pure (tensors in, tensors out, no I/O). Masks are bool tensors over the
batch; rewards are 1-D and handled in float64. Every user-facing mistake raises
:class:`~pgraft_cli.errors.PgraftError` with a one-line message.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from pgraft_cli.errors import PgraftError

RULES = ("top_k", "best_of_n", "threshold")
_RULE_PARAMS = {"top_k": ("k", "m"), "best_of_n": ("n",), "threshold": ("F_tau",)}


# ----------------------------------------------------------------------------------------------
# Validation helpers


def _rule(rule: str) -> str:
    name = str(rule).replace("-", "_")
    if name not in RULES:
        raise PgraftError(f"filter: unknown rule '{rule}'; choose one of {', '.join(RULES)}")
    return name


def _rewards(rewards: Any) -> Tensor:
    """Rewards as a 1-D float64 tensor; non-finite rewards are refused (they cannot be ranked)."""
    r = torch.as_tensor(rewards).detach().to("cpu", torch.float64)
    if r.dim() != 1:
        raise PgraftError(f"filter: rewards must be one number per sample (1-D), got shape {tuple(r.shape)}")
    bad = (~torch.isfinite(r)).nonzero().flatten()
    if bad.numel():
        shown = ", ".join(str(i) for i in bad[:5].tolist()) + (", ..." if bad.numel() > 5 else "")
        raise PgraftError(f"filter: {bad.numel()} reward(s) are NaN or infinite (samples {shown}); "
                          "the reward must return a finite number for every sample")
    return r


def _mask(keep: Any, n: int, what: str = "keep") -> Tensor:
    mask = torch.as_tensor(keep).detach().to("cpu")
    if mask.dtype != torch.bool or mask.shape != (n,):
        raise PgraftError(f"filter: {what} must be a bool mask of shape ({n},), got {mask.dtype} {tuple(mask.shape)}")
    return mask


def _groups(groups: Any, n: int) -> Tensor:
    if groups is None:  # the whole batch is one group
        return torch.zeros(n, dtype=torch.long)
    g = torch.as_tensor(groups).detach().to("cpu")
    if g.dtype.is_floating_point or g.dtype == torch.bool or g.shape != (n,):
        raise PgraftError(f"filter: groups must be one integer label per sample, shape ({n},), "
                          f"got {g.dtype} {tuple(g.shape)}")
    return g.long()


def _positive_int(value: Any, name: str, rule: str) -> int:
    if value is None:
        raise PgraftError(f"filter: rule {rule} needs {name}, e.g. --set filter.{name}=4")
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise PgraftError(f"filter: {rule} needs {name} to be an integer >= 1, got {value}")
    return int(value)


def _unit(value: Any, name: str) -> float:
    if value is None or not 0.0 <= float(value) <= 1.0:
        raise PgraftError(f"filter: {name} must be in [0, 1], got {value}")
    return float(value)


def _rule_params(rule: str, params: dict) -> dict:
    """Check the keyword parameters of :func:`acceptance_probability` for ``rule``."""
    wanted = _RULE_PARAMS[rule]
    extra = sorted(set(params) - set(wanted))
    if extra:
        raise PgraftError(f"filter: rule {rule} takes {', '.join(wanted)}; got unexpected {', '.join(extra)}")
    if rule == "top_k":
        return {"k": _positive_int(params.get("k"), "k", rule), "m": _positive_int(params.get("m"), "m", rule)}
    if rule == "best_of_n":
        return {"n": _positive_int(params.get("n"), "n", rule)}
    return {"F_tau": _unit(params.get("F_tau"), "F_tau")}


# ----------------------------------------------------------------------------------------------
# Selection: rewards -> keep mask


def condition_groups(condition: Tensor, m: Optional[int]) -> Tensor:
    """Group ids of samples in sample order: the j-th sample of a condition (prompt or class id in
    ``condition``) goes to that condition's group ``j // m`` (one group per condition when ``m`` is None)."""
    seen: dict[int, int] = {}
    ids: dict[tuple[int, int], int] = {}
    group = torch.empty(len(condition), dtype=torch.long)
    for row, c in enumerate(torch.as_tensor(condition).tolist()):
        j = seen.get(c, 0)
        seen[c] = j + 1
        group[row] = ids.setdefault((c, j // m if m else 0), len(ids))
    return group


def select_top_k(rewards: Tensor, groups: Optional[Tensor], k: int) -> Tensor:
    """Keep the ``k`` highest rewards of each group: ``keep_i = #{j in G(i): r_j > r_i or
    (r_j = r_i and j < i)} < k``.

    Ties are broken by the lower index, so the result is deterministic; a group with fewer than
    ``k`` members keeps all of them. ``groups=None`` treats the batch as one group.
    """
    r = _rewards(rewards)
    g = _groups(groups, r.numel())
    k = _positive_int(k, "k", "top_k")
    n = r.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)
    # Sort by (group, -reward, index): two stable sorts, the last one on the primary key.
    by_reward = torch.argsort(-r, stable=True)
    order = by_reward[torch.argsort(g[by_reward], stable=True)]
    g_sorted = g[order]
    pos = torch.arange(n)
    is_start = torch.ones(n, dtype=torch.bool)
    is_start[1:] = g_sorted[1:] != g_sorted[:-1]
    start = torch.where(is_start, pos, torch.zeros_like(pos)).cummax(0).values
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order] = (pos - start) < k
    return keep


def select_best_of_n(rewards: Tensor, groups: Optional[Tensor]) -> Tensor:
    """Keep the single best reward of each group (``select_top_k`` with ``k = 1``)."""
    return select_top_k(rewards, groups, 1)


def threshold_value(rewards: Tensor, value: Optional[float] = None, quantile: Optional[float] = None) -> float:
    """The threshold ``tau``: ``value`` itself, or the empirical ``quantile`` q of the rewards.

    The quantile is the order statistic ``tau = r_(ceil(q (N-1)))`` (0-based, ascending; numpy's
    ``method="higher"``), so ``r >= tau`` keeps ``N - ceil(q (N-1))`` samples without ties: about
    the top ``1 - q`` of the batch, and never none (q = 0 keeps all, q = 1 keeps the maximum).
    """
    if (value is None) == (quantile is None):
        raise PgraftError("filter: rule threshold needs exactly one of threshold (a reward value) "
                          "or quantile (in [0, 1]), e.g. --set filter.quantile=0.75")
    if value is not None:
        if not math.isfinite(float(value)):
            raise PgraftError(f"filter: threshold must be a finite number, got {value}")
        return float(value)
    q = _unit(quantile, "quantile")
    r = _rewards(rewards)
    if r.numel() == 0:
        return math.inf
    return float(np.quantile(r.numpy(), q, method="higher"))


def select_threshold(rewards: Tensor, value: Optional[float] = None, quantile: Optional[float] = None) -> Tensor:
    """Keep ``r >= tau`` with ``tau`` from :func:`threshold_value` (exactly one of value/quantile)."""
    r = _rewards(rewards)
    return r >= threshold_value(r, value, quantile)


def deduplicate(samples: Tensor, keep: Tensor, rewards: Optional[Tensor] = None, tol: float = 0.0) -> Tensor:
    """Drop near-duplicates among the kept samples, so a repeated sample is kept once.

    Greedy: visit the kept samples in order of decreasing reward (ties and ``rewards=None``: by
    index) and keep one unless its RMS distance ``||x_i - x_j||_2 / sqrt(D)`` (flattened, float64)
    to an already kept ``x_j`` is ``< tol`` or exactly 0; ``tol = 0`` drops exact repeats only.
    Samples outside ``keep`` stay dropped and never suppress another.
    """
    n = samples.shape[0]
    keep = _mask(keep, n)
    if tol is None or not float(tol) >= 0.0:
        raise PgraftError(f"filter: dedup_tol must be >= 0, got {tol}")
    tol = float(tol)
    x = samples.detach().to("cpu", torch.float64).reshape(n, -1)
    scale = 1.0 / math.sqrt(max(x.shape[1], 1))
    idx = keep.nonzero().flatten()
    if rewards is not None:
        r = _rewards(rewards)
        if r.numel() != n:
            raise PgraftError(f"filter: {r.numel()} rewards for {n} samples")
        idx = idx[torch.argsort(-r[idx], stable=True)]

    def close(a: Tensor, b: Tensor) -> Tensor:
        # No matmul trick: it turns exact repeats into distances of ~1e-8.
        d = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist") * scale
        return (d < tol) | (d == 0)

    out = torch.zeros(n, dtype=torch.bool)
    accepted = x[:0]
    block = 256
    for s in range(0, idx.numel(), block):
        cand = idx[s:s + block]
        xc = x[cand]
        alive = torch.ones(cand.numel(), dtype=torch.bool)
        if accepted.shape[0]:
            alive &= ~close(xc, accepted).any(1)
        within = close(xc, xc)
        for i in range(cand.numel()):
            if alive[i]:
                alive[i + 1:] &= ~within[i, i + 1:]
        out[cand[alive]] = True
        accepted = torch.cat([accepted, xc[alive]])
    return out


def select(
    rule: str,
    rewards: Tensor,
    groups: Optional[Tensor] = None,
    *,
    k: Optional[int] = None,
    m: Optional[int] = None,
    threshold: Optional[float] = None,
    quantile: Optional[float] = None,
    dedup: bool = False,
    samples: Optional[Tensor] = None,
    dedup_tol: float = 0.0,
) -> Tensor:
    """The filter stage's keep mask: one rule, then optional de-duplication of what it kept.

    - ``top_k``: the ``k`` best of each group (:func:`select_top_k`);
    - ``best_of_n``: the best of each group (``k = 1``; ``m`` plays the part of ``n``);
    - ``threshold``: ``r >= threshold`` or ``r >=`` the ``quantile`` of the batch (groups unused).

    With ``m`` given, every group must have exactly ``m`` members (``groups=None`` is one group).
    Parameters a rule does not use are ignored. ``dedup`` then applies :func:`deduplicate` to the
    kept ``samples`` with ``dedup_tol``, visiting higher rewards first.
    """
    rule = _rule(rule)
    r = _rewards(rewards)
    n = r.numel()
    if rule in ("top_k", "best_of_n"):
        g = _groups(groups, n)
        kk = 1 if rule == "best_of_n" else _positive_int(k, "k", rule)
        if m is not None:
            m = _positive_int(m, "m", rule)
            labels, counts = torch.unique(g, return_counts=True)
            wrong = (counts != m).nonzero().flatten()
            if wrong.numel():
                i = int(wrong[0])
                what = f"top_k of m={m}" if rule == "top_k" else f"best_of_n of n=m={m}"
                raise PgraftError(f"filter: {what} needs groups of {m} samples, but group {int(labels[i])} has "
                                  f"{int(counts[i])}; sample num = m x prompts")
        keep = select_top_k(r, g, kk)
    else:
        keep = select_threshold(r, threshold, quantile)
    if dedup:
        if samples is None:
            raise PgraftError("filter: dedup needs the samples themselves; pass samples or turn dedup off")
        if samples.shape[0] != n:
            raise PgraftError(f"filter: {samples.shape[0]} samples for {n} rewards")
        keep = deduplicate(samples, keep, r, dedup_tol)
    return keep


# ----------------------------------------------------------------------------------------------
# The maths of the tilt: F -> acceptance probability -> reshaped reward


def empirical_cdf(rewards: Tensor) -> Callable[[Any], Tensor]:
    """The mid-rank empirical CDF of a batch: ``F(r) = (#{r_j < r} + #{r_j = r} / 2) / N``.

    Mid-rank rather than ``#{r_j <= r} / N``: at the batch's own (distinct) rewards it gives
    ``(rank - 1/2) / N``, strictly inside (0, 1) and centred on the true CDF, so ``log F`` and
    ``log(1 - F)`` of every sample are finite. It is non-decreasing in ``r``; the result is float64.
    """
    sorted_r = torch.sort(_rewards(rewards)).values
    n = sorted_r.numel()
    if n == 0:
        raise PgraftError("filter: empirical CDF of an empty batch")

    def F(r: Any) -> Tensor:
        q = torch.as_tensor(r, dtype=torch.float64)
        below = torch.searchsorted(sorted_r, q, side="left")
        at_or_below = torch.searchsorted(sorted_r, q, side="right")
        return (below + at_or_below).to(torch.float64) / (2 * n)

    return F


def reshaped_reward(rule: str, F: Any, **params: Any) -> Tensor:
    """``rhat(F) = log g(F)`` (docs/methods.md section 1, alpha = 1, up to a constant), float64, -inf where g = 0.

    - ``top_k`` (``k``, ``m``): ``logsumexp_{j < min(k, m)} [log C(m-1, j) + j log(1-F) + (m-1-j) log F]``
      (0 everywhere when ``k >= m``);
    - ``best_of_n`` (``n``): ``(n - 1) log F``;
    - ``threshold`` (``F_tau``): ``0`` where ``F >= F_tau``, else ``-inf``.

    Computed in log space with ``0 log 0 = 0``, so large ``m`` and F near 0 or 1 are stable.
    """
    rule = _rule(rule)
    p = _rule_params(rule, params)
    F = torch.as_tensor(F, dtype=torch.float64)
    if F.numel() and not bool(((F >= 0) & (F <= 1)).all()):
        raise PgraftError("filter: CDF values F must lie in [0, 1]")
    if rule == "threshold":
        return torch.where(F >= p["F_tau"], 0.0, -math.inf).to(torch.float64)
    if rule == "best_of_n":
        return torch.special.xlogy(torch.tensor(p["n"] - 1.0, dtype=torch.float64), F)
    k, m = p["k"], p["m"]
    if k >= m:
        return torch.zeros_like(F)
    j = torch.arange(k, dtype=torch.float64)
    log_comb = math.lgamma(m) - torch.lgamma(j + 1) - torch.lgamma(m - j)
    Fe = F.unsqueeze(-1)
    terms = log_comb + torch.special.xlogy(j, 1 - Fe) + torch.special.xlogy(m - 1 - j, Fe)
    return torch.logsumexp(terms, dim=-1).clamp(max=0.0)  # a probability: rounding must not exceed 1


def acceptance_probability(rule: str, F: Any, **params: Any) -> Tensor:
    """``g(F)``: the probability that a sample whose reward has CDF value ``F`` is kept.

    ``top_k`` (``k``, ``m``): ``sum_{j<k} C(m-1, j) (1-F)^j F^(m-1-j)`` = P(Binomial(m-1, 1-F) < k);
    ``best_of_n`` (``n``): ``F^(n-1)``; ``threshold`` (``F_tau``): ``1[F >= F_tau]``.
    Continuous rewards, no ties. Equals ``exp(reshaped_reward(rule, F, **params))``.
    """
    return torch.exp(reshaped_reward(rule, F, **params))


def expected_keep_fraction(rule: str, **params: Any) -> float:
    """``E_F[g(F)]`` with ``F ~ U(0, 1)``: ``min(k, m) / m`` for top_k, ``1 / n`` for best_of_n,
    ``1 - F_tau`` for threshold."""
    rule = _rule(rule)
    p = _rule_params(rule, params)
    if rule == "top_k":
        return min(p["k"], p["m"]) / p["m"]
    if rule == "best_of_n":
        return 1.0 / p["n"]
    return 1.0 - p["F_tau"]


# ----------------------------------------------------------------------------------------------
# What a filter run reports


def _stats(r: Tensor) -> dict:
    if r.numel() == 0:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": float(r.mean()), "std": float(r.std(correction=0)), "min": float(r.min()), "max": float(r.max())}


def _json_float(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {key: _json_float(x) for key, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_float(x) for x in v]
    return v


@dataclass
class SelectionSummary:
    """What a selection did: counts, rewards before/after, the applied tilt and histograms.

    ``cdf`` and ``reshaped_reward`` are per kept sample (in ``kept_indices`` order), with ``F`` the
    mid-rank :func:`empirical_cdf` over ``cdf_scope``: the whole batch, or each sample's own condition
    (prompt or class) for the grouped rules. ``expected_kept_fraction`` is the rule's
    :func:`expected_keep_fraction` (before de-duplication). Reward std is the population std.
    """

    rule: str
    params: dict
    num: int
    kept: int
    kept_fraction: float
    expected_kept_fraction: Optional[float]
    reward_before: dict
    reward_after: dict
    kept_indices: list = field(default_factory=list)
    cdf: list = field(default_factory=list)
    reshaped_reward: list = field(default_factory=list)
    reshaped_reward_mean: Optional[float] = None
    cdf_scope: str = "batch"  # "batch", or "condition": F of each prompt's (class's) own rewards
    cdf_samples_min: Optional[int] = None  # the fewest rewards any such F was built from
    histogram_edges: list = field(default_factory=list)
    histogram_before: list = field(default_factory=list)
    histogram_after: list = field(default_factory=list)
    acceptance: dict = field(default_factory=dict)  # the keywords of reshaped_reward for this rule

    def to_dict(self) -> dict:
        """A plain, strictly JSON-able dict (non-finite floats become ``None``)."""
        return _json_float(asdict(self))


def condition_cdf(rewards: Tensor, conditions: Optional[Tensor]) -> tuple[Tensor, int, int]:
    """``(F, fewest, count)``: each sample's mid-rank :func:`empirical_cdf` value among the rewards of its own
    condition (the whole batch when ``conditions`` is None), the fewest rewards any condition has, and how
    many conditions there are.

    The grouped rules keep by rank within a prompt (class), so the tilt they apply is ``g(F_c(r))``
    with ``F_c`` the reward's CDF under ``p(. | c)`` (docs/methods.md section 1): a CDF pooled over
    prompts whose rewards sit at different levels would misstate it.
    """
    r = _rewards(rewards)
    c = _groups(conditions, r.numel())
    F = torch.empty(r.numel(), dtype=torch.float64)
    fewest, labels = r.numel(), torch.unique(c)
    for label in labels:
        rows = (c == label).nonzero().flatten()
        F[rows] = empirical_cdf(r[rows])(r[rows])
        fewest = min(fewest, rows.numel())
    return F, fewest, labels.numel()


def summarize(
    rewards: Tensor, keep: Tensor, rule: str, params: Optional[dict] = None, bins: int = 20,
    conditions: Optional[Tensor] = None,
) -> SelectionSummary:
    """Summarise a keep mask chosen by ``rule`` with ``params`` (the :func:`select` keywords:
    ``k``, ``m``, ``threshold``, ``quantile``; ``n`` or ``m`` for best_of_n).

    The reshaped reward of each kept sample is ``rhat(F_hat(r_i))``. For ``top_k`` and ``best_of_n``,
    which rank within a prompt (class), ``F_hat`` is the empirical CDF of the sample's own condition's
    rewards (``conditions``, one label per sample; None: one condition, the batch); the fewer rewards a
    condition has, the coarser it is (``cdf_samples_min``). For threshold, a rule over the whole batch,
    ``F_hat`` is the batch's and ``F_tau = F_hat(tau)``, so every sample with ``r >= tau`` gets 0
    (``tau`` from ``quantile`` when given, as :func:`select` does, else from ``threshold``).
    Histograms share ``bins`` numpy bin edges over all rewards.
    """
    rule = _rule(rule)
    params = dict(params or {})
    r = _rewards(rewards)
    n = r.numel()
    if n == 0:
        raise PgraftError("filter: nothing to summarise, the batch has no samples")
    keep = _mask(keep, n)
    F_hat = empirical_cdf(r)
    if rule == "top_k":
        acc = {"k": params.get("k"), "m": params.get("m")}
    elif rule == "best_of_n":
        acc = {"n": params.get("n", params.get("m"))}
    else:
        q = params.get("quantile")
        # Both may be given (a caller recording the resolved threshold): the quantile is what selected.
        tau = threshold_value(r, quantile=q) if q is not None else threshold_value(r, value=params.get("threshold"))
        acc = {"F_tau": float(F_hat(tau))}
        expected_F_tau = float(q) if q is not None else float((r < tau).double().mean())
    expected = expected_keep_fraction(rule, **(acc if rule != "threshold" else {"F_tau": expected_F_tau}))

    idx = keep.nonzero().flatten()
    if rule == "threshold":
        F_kept, scope, fewest = F_hat(r[idx]), "batch", n
    else:
        F_all, fewest, count = condition_cdf(r, conditions)
        F_kept, scope = F_all[idx], ("condition" if count > 1 else "batch")
    rhat = reshaped_reward(rule, F_kept, **acc)
    edges = np.histogram_bin_edges(r.numpy(), bins=bins)
    before, _ = np.histogram(r.numpy(), bins=edges)
    after, _ = np.histogram(r[idx].numpy(), bins=edges)
    return SelectionSummary(
        rule=rule,
        params=params,
        num=n,
        kept=int(idx.numel()),
        kept_fraction=idx.numel() / n,
        expected_kept_fraction=expected,
        reward_before=_stats(r),
        reward_after=_stats(r[idx]),
        kept_indices=idx.tolist(),
        cdf=F_kept.tolist(),
        reshaped_reward=rhat.tolist(),
        reshaped_reward_mean=float(rhat.mean()) if idx.numel() else None,
        cdf_scope=scope,
        cdf_samples_min=fewest,
        histogram_edges=edges.tolist(),
        histogram_before=before.tolist(),
        histogram_after=after.tolist(),
        acceptance=acc,
    )
