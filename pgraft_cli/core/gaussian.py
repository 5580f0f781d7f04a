"""Colouring and whitening by a Gaussian's mean and Cholesky factor (the corrector's Gaussian source)."""

from __future__ import annotations

import torch
from torch import Tensor


def colour(e: Tensor, mean: Tensor, chol: Tensor) -> Tensor:
    """``z = mean + L e`` per row of ``e`` (B, ...), flattened to D = ``mean.numel()`` values: maps
    ``e ~ N(0, I)`` onto ``N(mean, L L^T)``. Computed in float64, returned in ``e``'s dtype and shape."""
    flat = e.reshape(e.shape[0], -1).double()
    return (mean.double() + flat @ chol.double().T).to(e.dtype).reshape(e.shape)


def whiten(z: Tensor, mean: Tensor, chol: Tensor) -> Tensor:
    """The inverse of :func:`colour`: ``e = L^-1 (z - mean)`` per row (a triangular solve, float64)."""
    flat = z.reshape(z.shape[0], -1).double() - mean.double()
    e = torch.linalg.solve_triangular(chol.double(), flat.T, upper=False).T
    return e.to(z.dtype).reshape(z.shape)
