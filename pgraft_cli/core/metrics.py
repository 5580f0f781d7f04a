"""Metric maths: FID and KID from feature matrices (torchmetrics, streamed) and measured FLOPs."""

from __future__ import annotations

import enum
import functools
import hashlib
import marshal
import math
import re
import types
import weakref
from collections import OrderedDict
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import PgraftError


KID_SUBSETS = 100  # clean-fid's and torchmetrics' default


KID_SUBSET_SIZE = 1000


PR_K = 3  # Kynkaanniemi et al.'s k for the k-NN manifolds


PR_MAX_ROWS = 10_000  # per side, drawn at random: the radii cost N^2 distances


class GivenFeatures(nn.Module):
    """The identity as a torchmetrics feature module: pgraft extracts each batch's features once
    (``Features``) and feeds the same matrix to FID and KID, instead of running the network twice."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: Tensor) -> Tensor:
        return features


def sample_warnings(num_generated: int, num_reference: int, dim: int) -> list[str]:
    """Warnings for FID from fewer samples than feature dimensions (a singular covariance)."""
    return [f"{n} {what} images < {dim} feature dimensions: the covariance is singular and FID is biased "
            f"upwards; use at least {dim} {what} images" + (" (raise evaluate.num)" if what == "generated" else "")
            for what, n in (("generated", num_generated), ("reference", num_reference)) if n < dim]


class FidKid:
    """FID and KID of generated against reference features, accumulated in streaming updates.

    FID is torchmetrics' ``FrechetInceptionDistance`` (float64 sums of ``f`` and ``f f^T``, so no
    feature matrix is kept); KID is its ``KernelInceptionDistance`` (kernel ``(x.y / d + 1)^3``,
    ``kid_subsets`` subsets of ``min(1000, n_gen, n_ref)`` rows, drawn from ``seed``). KID's random
    subsets need every row, so it does keep them, in float32 (200 MB per side for 50k Inception
    features; pgraft's features are float32 network outputs, so no value is lost), and computes
    each subset's kernel in float64 (``_kid``). The reference side survives ``reset_generated``, so
    one reference serves several models.
    """

    def __init__(self, num_features: int, kid_subsets: int = KID_SUBSETS, seed: int = 0):
        import warnings

        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        given = GivenFeatures(num_features)
        # Every process computes on all shards (evaluation runs on the main process alone in some
        # verbs), so no cross-process reduction: it would count each image once per process.
        self.fid = FrechetInceptionDistance(feature=given, reset_real_features=False, sync_on_compute=False)
        with warnings.catch_warnings():  # "KID keeps all features": by design, it needs them
            warnings.simplefilter("ignore", UserWarning)
            self.kid = KernelInceptionDistance(feature=given, subsets=kid_subsets, subset_size=KID_SUBSET_SIZE,
                                               reset_real_features=False, sync_on_compute=False)
        self.num_features, self.seed = int(num_features), seed
        self.reference_notes: list[str] = []  # about the reference side (e.g. the stats file it came from)

    def update(self, features: Tensor | np.ndarray, real: bool) -> None:
        f = torch.as_tensor(features, dtype=torch.float64).cpu()
        if f.ndim != 2 or f.shape[1] != self.num_features:
            raise ValueError(f"expected (N, {self.num_features}) features, got {tuple(f.shape)}")
        if len(f):
            self.fid.update(f, real=real)
            self.kid.update(f.float(), real=real)  # KID keeps the rows: in float32, half the memory

    def reset_generated(self) -> None:
        self.fid.reset()
        self.kid.reset()

    @property
    def counts(self) -> tuple[int, int]:
        """(generated, reference) sample counts so far."""
        return int(self.fid.fake_features_num_samples), int(self.fid.real_features_num_samples)

    def rows(self, real: bool) -> Optional[Tensor]:
        """One side's feature rows as KID keeps them (float32), concatenated once and kept so; None where
        it keeps none (statistics written without rows)."""
        from torchmetrics.utilities import dim_zero_cat

        kept = self.kid.real_features if real else self.kid.fake_features
        if not kept:
            return None
        rows = dim_zero_cat(kept)
        kept[:] = [rows]  # KID keeps the one concatenated tensor: a caller holding it adds no copy
        return rows

    def compute(self) -> dict[str, Any]:
        """``{"fid", "kid", "warnings"}``; a clear error below 2 samples on either side."""
        gen, ref = self.counts
        if min(gen, ref) < 2:
            raise PgraftError(f"FID and KID need at least 2 generated and 2 reference images, got {gen} and {ref}; "
                              f"raise evaluate.num (--num) or pass more --data")
        warnings = sample_warnings(gen, ref, self.num_features)
        kid = precision = recall = None
        if self.kid.real_features:
            self.kid.subset_size = min(KID_SUBSET_SIZE, gen, ref)
            with torch.random.fork_rng(devices=[]):  # KID's subsets come from torch's global generator
                torch.manual_seed(self.seed)
                kid = self._kid()
                precision, recall = self._precision_recall()
        else:
            warnings.append("the reference statistics hold no feature rows: KID and precision/recall skipped "
                            "(write them with pgraft stats, which keeps the rows)")
        return {"fid": float(self.fid.compute()), "kid": kid, "precision": precision, "recall": recall,
                "warnings": warnings}

    def _precision_recall(self) -> tuple[Optional[float], Optional[float]]:
        """``precision_recall`` (k = PR_K) on ``n = min(n_real, n_gen, PR_MAX_ROWS)`` rows of each side
        (``equal_rows``: unequal counts make the two manifolds' radii incomparable, and the k-NN radii
        cost N^2 distances); None when a side has too few rows."""
        from torchmetrics.utilities import dim_zero_cat

        real, fake = dim_zero_cat(self.kid.real_features), dim_zero_cat(self.kid.fake_features)
        if min(len(real), len(fake)) <= PR_K:
            return None, None
        n = min(len(real), len(fake), PR_MAX_ROWS)
        pr = precision_recall(equal_rows(real, n, self.seed), equal_rows(fake, n, self.seed), PR_K)
        return pr["precision"], pr["recall"]

    def reference_state(self) -> dict[str, np.ndarray]:
        """The reference side as arrays (``sum``, ``cov_sum`` float64 as torchmetrics accumulates them,
        ``n``, ``mu``, ``sigma`` and the float32 feature rows) for ``from_reference_state``."""
        from torchmetrics.utilities import dim_zero_cat

        fid, n = self.fid, int(self.fid.real_features_num_samples)
        total, cov_sum = fid.real_features_sum.double(), fid.real_features_cov_sum.double()
        mu = total / max(n, 1)
        sigma = (cov_sum - n * torch.outer(mu, mu)) / max(n - 1, 1)
        rows = dim_zero_cat(self.kid.real_features) if self.kid.real_features else torch.zeros(0, self.num_features)
        return {"sum": total.numpy(), "cov_sum": cov_sum.numpy(), "n": np.array(n), "mu": mu.numpy(),
                "sigma": sigma.numpy(), "features": rows.float().numpy()}

    @classmethod
    def from_reference_state(cls, state: dict[str, np.ndarray], kid_subsets: int = KID_SUBSETS,
                             seed: int = 0) -> "FidKid":
        """A ``FidKid`` whose reference side is ``state`` (``reference_state``'s arrays; ``features``
        may be empty: FID is then exact, KID and precision/recall skipped)."""
        metric = cls(int(np.shape(state["sum"])[0]), kid_subsets, seed)
        metric.fid.real_features_sum = torch.as_tensor(np.asarray(state["sum"]), dtype=torch.float64).clone()
        metric.fid.real_features_cov_sum = torch.as_tensor(np.asarray(state["cov_sum"]), dtype=torch.float64).clone()
        metric.fid.real_features_num_samples = torch.tensor(int(state["n"]))
        rows = np.asarray(state.get("features", np.zeros((0, metric.num_features))))
        if len(rows):
            metric.kid.update(torch.as_tensor(rows, dtype=torch.float32), real=True)
        return metric

    def _kid(self) -> float:
        """``KernelInceptionDistance.compute``'s mean over subsets: the same ``randperm`` draws
        (reference then generated, subset by subset) and its ``poly_mmd`` maths, in float64 from the
        float32 rows: KID is a difference of cubic-kernel means that cancels for near-equal sets
        (float32 arithmetic moved it by up to 1.6e-5 relative on the tests' data). The kernel
        matrices are computed once over all rows (``subset_mmds``) where they fit ``KID_KERNEL_ELEMENTS``
        and the rows are at most 4 subsets' worth; otherwise each subset's kernels one at a time."""
        from torchmetrics.image.kid import poly_mmd
        from torchmetrics.utilities import dim_zero_cat

        kid = self.kid
        real, fake = dim_zero_cat(kid.real_features), dim_zero_cat(kid.fake_features)
        picks = [(torch.randperm(len(real))[: kid.subset_size], torch.randperm(len(fake))[: kid.subset_size])
                 for _ in range(kid.subsets)]
        rows = len(real) + len(fake)
        if rows**2 <= KID_KERNEL_ELEMENTS and rows <= 4 * kid.subset_size:  # else the subsets' kernels cost less
            scores = subset_mmds(real.double(), fake.double(), torch.stack([r for r, _ in picks]),
                                 torch.stack([f for _, f in picks]), kid.degree, kid.gamma, kid.coef)
        else:
            scores = torch.stack([poly_mmd(real[r].double(), fake[f].double(), kid.degree, kid.gamma, kid.coef)
                                  for r, f in picks])
        return float(scores.mean())


KID_KERNEL_ELEMENTS = 1 << 24  # (reference + generated rows)^2: the kernel matrices' float64 values (128 MB)


def subset_mmds(real: Tensor, fake: Tensor, picks_real: Tensor, picks_fake: Tensor, degree: int = 3,
                gamma: Optional[float] = None, coef: float = 1.0) -> Tensor:
    """The unbiased MMD^2 of each subset pair ``s`` (rows ``picks_real[s]`` of ``real``, ``picks_fake[s]``
    of ``fake``, m distinct rows each), kernel ``k(x, y) = (gamma x.y + coef)^degree`` (gamma = 1/D
    by default), as torchmetrics' ``poly_mmd``:

        MMD^2_s = (sum_{i != j} k(x_i, x_j) + sum_{i != j} k(y_i, y_j)) / (m (m - 1)) - 2 sum_{i,j} k(x_i, y_j) / m^2

    Each kernel matrix is computed once over all rows, and a subset's sums are read from it with
    its 0/1 indicator vectors v, w: ``sum_{i != j in s} K_ij = v^T K v - sum_i v_i K_ii``, ``v^T K w``
    for the cross term (one matrix product for all subsets).
    """
    gamma = 1.0 / real.shape[1] if gamma is None else gamma
    m = picks_real.shape[1]

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        return (a @ b.T * gamma + coef) ** degree

    def indicator(picks: Tensor, n: int) -> Tensor:
        return torch.zeros(len(picks), n, dtype=real.dtype).scatter_(1, picks, 1.0)

    v, w = indicator(picks_real, len(real)), indicator(picks_fake, len(fake))
    k_rr, k_ff = kernel(real, real), kernel(fake, fake)
    within = ((v @ k_rr) * v).sum(1) - v @ k_rr.diagonal() + ((w @ k_ff) * w).sum(1) - w @ k_ff.diagonal()
    cross = ((v @ kernel(real, fake)) * w).sum(1)
    return within / (m * (m - 1)) - 2 * cross / m**2


_COUNTED: dict[str, int] = {}  # measure_flops' counts in this process, by the hash of their structure key


def measure_flops(fn: Callable[[], Any], key: Any = None) -> int:
    """FLOPs of one call of ``fn`` as counted by ``torch.utils.flop_counter`` (a multiply-add is 2).

    ``key``: everything ``fn`` reads (modules, inputs, flags), or None; the count of a ``structure``
    already counted in this process is reused. The counter counts each op from its input shapes
    alone, so a count depends on which ops run on which shapes, never on the weights' values.
    """
    from torch.utils.flop_counter import FlopCounterMode

    digest = None if key is None else hashlib.sha256(structure(key).encode()).hexdigest()
    if digest in _COUNTED:
        return _COUNTED[digest]
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    flops = int(counter.get_total_flops())
    if digest is not None:
        _COUNTED[digest] = flops
    return flops


_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, enum.Enum)
_PLAIN = {type(None), bool, int, float, str}
_CONTAINERS = {dict, OrderedDict, list, tuple, set}
_METHODS = (types.FunctionType, staticmethod, classmethod, property)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_CODE_DIGESTS: "weakref.WeakKeyDictionary[types.CodeType, str]" = weakref.WeakKeyDictionary()


def _code_digest(code: types.CodeType) -> str:
    """A short digest of a code object's bytecode, constants (nested code too) and names."""
    digest = _CODE_DIGESTS.get(code)
    if digest is None:
        digest = _CODE_DIGESTS[code] = hashlib.sha1(marshal.dumps(code)).hexdigest()[:16]
    return digest


def structure(value: Any) -> str:
    """``value`` described down to everything but tensors' values: the key of a FLOP count.

    Tensors (parameters, buffers) are their shape, dtype and device; an object (a module too) is its
    class and every attribute (config, flags, processors, enabled adapters, hooks, submodules in order)
    but those its class names in ``_structure_skip`` (memos); containers their items. A class (outside
    ``builtins``) is its name, its bases and the functions and public attributes of its namespace; a
    function its name, a digest of its code (``marshal``: bytecode, constants, names), its defaults and
    its closure's contents; a bound method its function and object; a ``functools.partial`` its
    function, arguments and keywords. An object met again is a back-reference (cycles end). Two values
    with one description run the same ops on the same shapes, as long as no forward branches on a
    tensor's values (none of diffusers' networks, peft's LoRA layers or pgraft's correctors do) and the
    module-level names their code calls are not rebound in between (functions' globals are not walked).
    """
    out: list[str] = []
    seen: dict[int, int] = {}
    alive: list[Any] = []  # every object met stays referenced: no id is reused during the walk

    def walk(v: Any) -> None:
        if type(v) in _PLAIN:  # most values: a set lookup before the isinstance chain
            out.append(repr(v))
            return
        if isinstance(v, _ATOMS):
            out.append(repr(v))
            return
        if isinstance(v, Tensor):
            out.append(f"T{tuple(v.shape)}{v.dtype}{v.device}")
            return
        if isinstance(v, np.ndarray):
            out.append(f"A{v.shape}{v.dtype}")
            return
        if id(v) in seen:
            out.append(f"@{seen[id(v)]}")
            return
        seen[id(v)] = len(seen)
        alive.append(v)
        if isinstance(v, (list, tuple)):
            out.append(f"{type(v).__name__}[")
            for item in v:
                walk(item)
            out.append("]")
        elif isinstance(v, (set, frozenset)):
            out.append("set" + repr(sorted(map(repr, v))))
        elif isinstance(v, dict):
            out.append(f"{type(v).__name__}{{")
            for k, item in v.items():
                walk(k)
                walk(item)
            out.append("}")
        elif isinstance(v, types.FunctionType):
            out.append(f"{v.__module__}.{v.__qualname__}#{_code_digest(v.__code__)}(")
            walk(v.__defaults__)
            walk(v.__kwdefaults__)
            for cell in v.__closure__ or ():
                try:
                    walk(cell.cell_contents)
                except ValueError:  # a cell not yet filled
                    out.append("<empty>")
            out.append(")")
        elif isinstance(v, (types.MethodType, types.BuiltinFunctionType)):
            owner = getattr(v, "__self__", None)
            out.append(f"{getattr(v, '__qualname__', v.__name__)}(")
            walk(getattr(v, "__func__", None))
            if not isinstance(owner, types.ModuleType):  # a builtin function's module is not its state
                walk(owner)
            out.append(")")
        elif isinstance(v, functools.partial):
            out.append("partial(")
            walk(v.func)
            walk(v.args)
            walk(v.keywords)
            out.append(")")
        elif isinstance(v, types.ModuleType):  # a module object: its name, never its namespace
            out.append(f"module {v.__name__}")
        elif isinstance(v, type):
            out.append(f"{v.__module__}.{v.__qualname__}<")
            if v.__module__ != "builtins":
                for base in v.__bases__:
                    walk(base)
                for name, item in vars(v).items():
                    if isinstance(item, _METHODS) or not name.startswith("__"):
                        out.append(name)
                        walk((item.fget, item.fset) if isinstance(item, property) else getattr(item, "__func__", item))
            out.append(">")
        elif hasattr(v, "__dict__"):
            out.append("(")
            walk(type(v))
            skip = getattr(type(v), "_structure_skip", ())  # a class's memo attributes: not its state
            for name, item in vars(v).items():
                if name in skip:
                    continue
                out.append(name)
                if type(item) in _CONTAINERS and not item:  # a module's many empty hook dicts: one word
                    out.append(type(item).__name__)
                    continue
                # hooks are keyed by their handles' ids, new for every instance: their functions count
                walk(list(item.values()) if name.endswith(("hooks", "hooks_with_kwargs", "always_called")) else item)
            out.append(")")
        else:
            out.append(_ADDRESS.sub("", repr(v)))

    walk(value)
    return " ".join(out)


def distances(gen: Tensor | np.ndarray, real: Tensor | np.ndarray, kid_subsets: int = KID_SUBSETS,
              seed: int = 0) -> dict[str, Any]:
    """FID, KID and warnings of two (N, D) feature matrices (``FidKid`` fed in one update each)."""
    metric = FidKid(np.shape(gen)[1], kid_subsets, seed)
    metric.update(gen, real=False)
    metric.update(real, real=True)
    return metric.compute()


# ----------------------------------------------------------------------------------------------
# Rewards per prompt, and diversity in feature space


def best_of_n(rewards: Tensor, groups: Tensor) -> dict[str, Any]:
    """The paper's best-of-n protocol: ``b_g = max_{i in g} r_i`` per group (a prompt's samples),
    then ``mean_g b_g`` and ``std_g b_g`` (population std) over the G groups."""
    rewards, groups = torch.as_tensor(rewards, dtype=torch.float64), torch.as_tensor(groups, dtype=torch.long)
    ids, inverse = torch.unique(groups, return_inverse=True)
    best = torch.full((len(ids),), -torch.inf, dtype=torch.float64).scatter_reduce(0, inverse, rewards, "amax")
    sizes = torch.bincount(inverse, minlength=len(ids))
    return {"mean": float(best.mean()), "std": float(best.std(unbiased=False)), "groups": len(ids),
            "min_group_size": int(sizes.min()), "max_group_size": int(sizes.max())}


def _pairwise(a: Tensor, b: Tensor, chunk: int = 1024) -> Iterator[tuple[int, Tensor]]:
    """Row chunks of the Euclidean distance matrix ``||a_i - b_j||`` in float64."""
    b = b.double()
    for start in range(0, len(a), chunk):
        yield start, torch.cdist(a[start:start + chunk].double(), b)


def knn_radii(features: Tensor, k: int = 3) -> Tensor:
    """``rho_i`` = the distance from row i to its k-th nearest other row (the point itself excluded)."""
    if len(features) <= k:
        raise PgraftError(f"precision/recall with k={k} needs more than {k} samples per side, got {len(features)}")
    radii = torch.empty(len(features), dtype=torch.float64)
    for start, d in _pairwise(features, features):
        radii[start:start + len(d)] = d.kthvalue(k + 1, dim=1).values  # the 1st is the point itself (0)
    return radii


def manifold_coverage(queries: Tensor, support: Tensor, k: int = 3) -> float:
    """Fraction of ``queries`` inside the k-NN manifold of ``support``: ``mean_q 1[exists s: ||q - s|| <= rho_s]``."""
    radii = knn_radii(support, k)
    inside = [(d <= radii).any(dim=1) for _, d in _pairwise(queries, support)]
    return float(torch.cat(inside).double().mean())


def equal_rows(x: Tensor, n: int, seed: int) -> Tensor:
    """``n`` rows of ``x`` drawn without replacement from ``seed`` (the same rows on every call);
    ``x`` itself when it has at most ``n``."""
    if len(x) <= n:
        return x
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]]


def precision_recall(real: Tensor | np.ndarray, gen: Tensor | np.ndarray, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the fraction of
    generated samples inside the real k-NN manifold (fidelity), recall the fraction of real samples
    inside the generated one (diversity); each manifold is the union of balls around its points
    of radius the distance to the k-th nearest neighbour."""
    real, gen = torch.as_tensor(real), torch.as_tensor(gen)
    return {"precision": manifold_coverage(gen, real, k), "recall": manifold_coverage(real, gen, k)}


PAIRWISE_ROWS = 2048  # a group's first rows that its mean pairwise distance is taken over


def mean_pairwise_distance(features: Tensor | np.ndarray, groups: Tensor | np.ndarray) -> Optional[float]:
    """Within-condition diversity: ``mean_g [ 2 / (n_g (n_g - 1)) sum_{i<j in g} ||f_i - f_j|| ]`` over the
    groups with at least two samples (None if there is none). A group of more than ``PAIRWISE_ROWS``
    samples (an unconditional model's one group) is measured on its first ``PAIRWISE_ROWS``: the samples
    of a condition are exchangeable, so that is an unbiased estimate of the same mean, at a bounded cost
    (all pairs of 50,000 samples would be a 20 GB distance matrix)."""
    features, groups = torch.as_tensor(features), torch.as_tensor(groups)
    means = []
    for g in torch.unique(groups):
        rows = (groups == g).nonzero().flatten()[:PAIRWISE_ROWS]
        f = features[rows].double()  # only the rows measured are copied, in float64
        if len(f) >= 2:
            d = torch.cdist(f, f)
            means.append(float(d.sum() / (len(f) * (len(f) - 1))))
    return float(np.mean(means)) if means else None


# ----------------------------------------------------------------------------------------------
# Data copying: are samples nearer the training images than unseen images are?

COPY_NEAR_QUANTILE = 0.05  # "near": below this quantile of the unseen images' nearest-training distances
# Two rows this near (relative to the training rows' RMS spread) are one image: on the bundled classifier
# the features of one image recomputed in other batches move by about 4e-7 of it, under emulated TF32
# products by up to 1.8e-3 and under bf16 autocast by up to 7.9e-3, and distinct digits lie at least 0.053
# apart (bench/RESULTS.md, seventeenth and eighteenth sessions). Features are computed in full float32 on
# every device (io.host.ieee_float32); for deeper feature networks on another device the margin is not measured.
COPY_SAME_IMAGE = 1e-2


def rms_spread(rows: Tensor | np.ndarray, chunk: int = 4096) -> float:
    """``sqrt(mean_i |x_i - mean|^2)`` of feature rows (float64, a chunk at a time): their scale."""
    rows = torch.as_tensor(rows)
    centre = rows.mean(0, dtype=torch.float64)
    total = sum(float(((c.double() - centre) ** 2).sum()) for c in rows.split(chunk))
    return math.sqrt(total / max(1, len(rows)))


def nearest_distances(queries: Tensor | np.ndarray, support: Tensor | np.ndarray, chunk: int = 256,
                      candidates: int = 8) -> Tensor:
    """Each query row's Euclidean distance to its nearest ``support`` row, float64.

    The ``candidates`` nearest rows are found in float32 by the matrix-product form ``|s|^2 - 2 q.s`` on
    rows centred on the support's mean (its rounding scales with ``|x - mean|^2``, about 1e-7 of it), then
    their distances are recomputed in float64 from the differences themselves and the least is kept: exact,
    and exactly 0 for a query that is a support row, unless more than ``candidates`` rows tie within that
    rounding. Memory: the support once more in float32 and a chunk's scores, not its pairwise differences."""
    queries, support = torch.as_tensor(queries), torch.as_tensor(support)
    centre = support.mean(0, dtype=torch.float64)
    search = (support.double() - centre).float() if support.dtype == torch.float64 else support.float() - centre.float()
    norms = (search * search).sum(1)
    k = min(candidates, len(support))
    out = torch.empty(len(queries), dtype=torch.float64)
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk].double()
        scores = torch.addmm(norms, (q - centre).float(), search.T, alpha=-2)  # |q - s|^2 - |q|^2
        picks = scores.topk(k, dim=1, largest=False).indices
        out[start:start + len(q)] = (q[:, None, :] - support[picks].double()).norm(dim=2).amin(1)
    return out


def mann_whitney(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> tuple[float, float]:
    """The Mann-Whitney U test of ``a`` against ``b`` as ``(Z, AUC)``: ``U`` counts the pairs with
    ``a_i > b_j``, ties a half (from mid-ranks: ``U = R_a - m (m + 1) / 2``), ``AUC = U / (m n)`` and
    ``Z = (U - m n / 2) / sigma``, the normal approximation with the tie-corrected null variance
    ``sigma^2 = m n / 12 ((N + 1) - sum_t (t^3 - t) / (N (N - 1)))`` (N = m + n, t each tied group's size;
    0 when every value is equal). Negative: ``a`` tends to be smaller."""
    a, b = torch.as_tensor(a).double().reshape(-1), torch.as_tensor(b).double().reshape(-1)
    m, n = len(a), len(b)
    if min(m, n) < 1:
        raise PgraftError(f"the Mann-Whitney test needs values on both sides, got {m} and {n}")
    values, order = torch.sort(torch.cat([a, b]), stable=True)
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mid = (ends - (counts.double() - 1) / 2)[inverse]  # 1-based mid-rank of each sorted value
    ranks = torch.empty_like(mid).scatter_(0, order, mid)
    u = float(ranks[:m].sum()) - m * (m + 1) / 2
    total, t = m + n, counts.double()
    variance = m * n / 12 * ((total + 1) - float((t ** 3 - t).sum()) / (total * (total - 1))) if total > 1 else 0.0
    z = (u - m * n / 2) / math.sqrt(variance) if variance > 0 else 0.0
    return z, u / (m * n)


def copy_stats(d_samples: Tensor | np.ndarray, d_heldout: Tensor | np.ndarray,
               near_quantile: float = COPY_NEAR_QUANTILE) -> dict[str, Any]:
    """The global data-copying test of Meehan, Chaudhuri and Dasgupta (AISTATS 2020), from distances.

    ``d_samples``: each sample's distance to its nearest training row; ``d_heldout``: the same for
    held-out rows (real images neither model saw, drawn like the training rows), the reference.
    ``auc`` (the effect: ``P(d_s > d_q)``, ties a half) and its ``z`` (``mann_whitney``): 0.5 and 0 when
    samples lie as far from the training rows as unseen images do; below when they lie nearer, as copies
    would, or bunch where the training rows are dense; above when farther (an under-fitted sampler, samples
    off the data). ``near``: the share of samples below the held-out rows' ``near_quantile`` (``torch.quantile``,
    linear), against ``near_null = ((n - 1) q + 1) / (n + 1)``, that share's expectation for samples drawn
    like the held-out rows, and ``near_null_se = sqrt(e (1 - e) (1/m + 1/n))``, its sampling error from both
    sides; ``near_z`` the excess in those errors. The same density caveat holds for it as for the AUC.
    ``min`` / ``heldout_min``: the nearest sample and held-out row (not comparable as they are: the least of
    m draws falls below the least of n drawn alike with probability m / (m + n)). The test is global: a
    sampler otherwise farther than unseen images hides a share of copies from ``z`` and ``auc`` (a quarter
    of training digits among the bundled model's corrected samples reads about 0.5); ``near`` rises with
    them from the first few percent."""
    d_s, d_q = torch.as_tensor(d_samples).double(), torch.as_tensor(d_heldout).double()
    if min(len(d_s), len(d_q)) < 2:
        raise PgraftError(f"the copy test needs at least 2 samples and 2 held-out images, got {len(d_s)} and {len(d_q)}")
    z, auc = mann_whitney(d_s, d_q)
    q, m, n = near_quantile, len(d_s), len(d_q)
    near = float((d_s < torch.quantile(d_q, q)).double().mean())
    null = ((n - 1) * q + 1) / (n + 1)
    se = math.sqrt(null * (1 - null) * (1 / m + 1 / n))
    return {"z": z, "auc": auc, "median": float(d_s.median()), "min": float(d_s.min()), "near": near,
            "near_quantile": q, "near_null": null, "near_null_se": se, "near_z": (near - null) / se,
            "heldout_median": float(d_q.median()), "heldout_min": float(d_q.min()), "num": m, "num_heldout": n}


COPY_CELL_HELDOUT = 20  # held-out images a cell holds on average: the number of cells is n // this (at most 50)
COPY_CELL_MIN_SAMPLES = 20  # a cell enters C_T only with more samples than this (the paper's tau, as a count)
COPY_CELL_MIN_HELDOUT = 5  # and with at least this many held-out rows (with 2 to 4 its Z cannot reach a small p)


KMEANS_MAX_ROWS = 10_000  # k-means fits on at most this many rows (drawn from its seed); every row is then assigned


def nearest_centre(x: Tensor | np.ndarray, centres: Tensor, chunk: int = 8192) -> Tensor:
    """Each row's nearest centre (argmin of ``|c|^2 - 2 x.c`` in float64), a chunk of rows at a time."""
    x, centres = torch.as_tensor(x), torch.as_tensor(centres).double()
    norms = (centres * centres).sum(1)
    return torch.cat([torch.addmm(norms, c.double(), centres.T, alpha=-2).argmin(1) for c in x.split(chunk)])


def kmeans(x: Tensor | np.ndarray, k: int, seed: int = 0, iterations: int = 50) -> Tensor:
    """``k`` centres (float64) of the rows of ``x`` by Lloyd's algorithm from a k-means++ start, both drawn
    from ``seed``, fitted on at most ``KMEANS_MAX_ROWS`` rows drawn from it too (an emptied cluster keeps its
    centre). Deterministic for a given ``x``, ``k``, ``seed`` and host."""
    x = torch.as_tensor(x)
    g = torch.Generator().manual_seed(seed)
    if len(x) > KMEANS_MAX_ROWS:
        x = x[torch.randperm(len(x), generator=g)[:KMEANS_MAX_ROWS]]
    x = x.double()
    squares = (x * x).sum(1)
    centres = x[torch.randint(len(x), (1,), generator=g)]
    d2 = (squares - 2 * x @ centres[0] + squares.new_tensor(float(centres[0] @ centres[0]))).clamp(min=0)
    for _ in range(1, min(k, len(x))):  # k-means++: each next centre drawn in proportion to the squared distance
        pick = torch.multinomial(d2 / d2.sum(), 1, generator=g) if float(d2.sum()) > 0 else torch.randint(len(x), (1,), generator=g)
        centres = torch.cat([centres, x[pick]])
        d2 = torch.minimum(d2, (squares - 2 * x @ centres[-1] + float(centres[-1] @ centres[-1])).clamp(min=0))
    for _ in range(iterations):
        labels = nearest_centre(x, centres)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=len(centres)).double()[:, None]
        moved = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
        if torch.equal(moved, centres):
            break
        centres = moved
    return centres


def copy_cells(heldout_count: int, sample_count: int) -> int:
    """The number of cells of the cell-wise copy statistic: one per ``COPY_CELL_HELDOUT`` held-out rows and per
    twice ``COPY_CELL_MIN_SAMPLES`` samples (so an average cell has enough of both), 1 to 50."""
    return max(1, min(50, heldout_count // COPY_CELL_HELDOUT, sample_count // (2 * COPY_CELL_MIN_SAMPLES)))


def cell_copy_stat(samples: Tensor | np.ndarray, train: Tensor | np.ndarray, heldout: Tensor | np.ndarray,
                   centres: Tensor, min_samples: int = COPY_CELL_MIN_SAMPLES,
                   min_heldout: int = COPY_CELL_MIN_HELDOUT) -> dict[str, Any]:
    """Meehan, Chaudhuri and Dasgupta's cell-wise statistic ``C_T`` over the cells of ``centres`` (k-means
    of the training rows, ``kmeans``): in each cell the Mann-Whitney Z (``mann_whitney``) of its samples'
    distances to the cell's nearest training row against its held-out rows', over the cells with more than
    ``min_samples`` samples and at least ``min_heldout`` held-out rows (the paper's code: any); ``c_t`` their mean weighted by each cell's share
    of the held-out rows (the paper's statistic; Z here with the tie correction, no continuity correction).
    ``z_min``: the lowest cell's Z, and ``p_min = min(1, k Phi(z_min))`` its one-sided p-value corrected for
    the k cells used (Bonferroni): a sampler that copies in one region reads it there, while ``c_t`` and
    the global test average it away. ``c_t`` and the rest are None where no cell qualifies."""
    samples, train, heldout = (torch.as_tensor(t) for t in (samples, train, heldout))
    cell = {name: nearest_centre(rows, centres) for name, rows in (("s", samples), ("t", train), ("q", heldout))}
    weights, zs = [], []
    for c in range(len(centres)):
        s, t, q = samples[cell["s"] == c], train[cell["t"] == c], heldout[cell["q"] == c]
        if len(s) <= min_samples or len(q) < min_heldout or len(t) == 0:
            continue
        zs.append(mann_whitney(nearest_distances(s, t), nearest_distances(q, t))[0])
        weights.append(len(q) / len(heldout))
    out: dict[str, Any] = {"cells": len(centres), "cells_used": len(zs), "heldout_share_used": float(sum(weights)),
                           "c_t": None, "z_min": None, "p_min": None}
    if zs:
        w = torch.tensor(weights, dtype=torch.float64)
        low = min(zs)
        out.update(c_t=float((w * torch.tensor(zs, dtype=torch.float64)).sum() / w.sum()), z_min=low,
                   p_min=min(1.0, len(zs) * 0.5 * math.erfc(-low / math.sqrt(2))))
    return out


def copy_test(samples: Tensor | np.ndarray, train: Tensor | np.ndarray, heldout: Tensor | np.ndarray,
              near_quantile: float = COPY_NEAR_QUANTILE) -> dict[str, Any]:
    """``copy_stats`` of feature rows: ``samples`` and ``heldout`` against their nearest ``train`` rows."""
    return copy_stats(nearest_distances(samples, train), nearest_distances(heldout, train), near_quantile)
