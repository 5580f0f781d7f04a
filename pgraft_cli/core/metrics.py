"""Metric maths: FID and KID from feature matrices (torchmetrics, streamed) and measured FLOPs."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import PgraftError


KID_SUBSETS = 100  # clean-fid's and torchmetrics' default


KID_SUBSET_SIZE = 1000


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

    def compute(self) -> dict[str, Any]:
        """``{"fid", "kid", "warnings"}``; a clear error below 2 samples on either side."""
        gen, ref = self.counts
        if min(gen, ref) < 2:
            raise PgraftError(f"FID and KID need at least 2 generated and 2 reference images, got {gen} and {ref}; "
                              f"raise evaluate.num (--num) or pass more --data")
        self.kid.subset_size = min(KID_SUBSET_SIZE, gen, ref)
        with torch.random.fork_rng(devices=[]):  # KID's subsets come from torch's global generator
            torch.manual_seed(self.seed)
            kid = self._kid()
        return {"fid": float(self.fid.compute()), "kid": kid,
                "warnings": sample_warnings(gen, ref, self.num_features)}

    def _kid(self) -> float:
        """``KernelInceptionDistance.compute``'s mean over subsets (the same ``randperm`` draws, reference
        then generated, and its ``poly_mmd``) with each subset's float32 rows cast to float64: KID is
        a difference of cubic-kernel means that cancels for near-equal sets (float32 arithmetic moved
        it by up to 1.6e-5 relative on the tests' data), and casting a subset, not every row, keeps
        memory at the float32 rows."""
        from torchmetrics.image.kid import poly_mmd
        from torchmetrics.utilities import dim_zero_cat

        kid = self.kid
        real, fake = dim_zero_cat(kid.real_features), dim_zero_cat(kid.fake_features)
        scores = []
        for _ in range(kid.subsets):
            f_real = real[torch.randperm(len(real))[: kid.subset_size]].double()
            f_fake = fake[torch.randperm(len(fake))[: kid.subset_size]].double()
            scores.append(poly_mmd(f_real, f_fake, kid.degree, kid.gamma, kid.coef))
        return float(torch.stack(scores).mean())



def measure_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as counted by ``torch.utils.flop_counter`` (a multiply-add is 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def distances(gen: Tensor | np.ndarray, real: Tensor | np.ndarray, kid_subsets: int = KID_SUBSETS,
              seed: int = 0) -> dict[str, Any]:
    """FID, KID and warnings of two (N, D) feature matrices (``FidKid`` fed in one update each)."""
    metric = FidKid(np.shape(gen)[1], kid_subsets, seed)
    metric.update(gen, real=False)
    metric.update(real, real=True)
    return metric.compute()
