"""core.ridge: the closed-form ridge fit against numpy's lstsq, and its leave-one-out error against refits."""

from __future__ import annotations

import numpy as np
import torch

from pgraft_cli.core.ridge import ridge_fit


def _data(n: int = 9, e: int = 5, d: int = 3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, e, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


def test_ridge_fit_is_the_augmented_least_squares_solution():
    """``min ||Yc - Xc W||^2 + lam ||W||^2`` is lstsq of ``[Xc; sqrt(lam) I] W = [Yc; 0]``; b = ybar - xbar W."""
    x, y = _data()
    for lam in (0.3, 5.0):
        b, w, _ = ridge_fit(x, y, lam)
        xc, yc = (x - x.mean(0)).numpy(), (y - y.mean(0)).numpy()
        want = np.linalg.lstsq(np.vstack([xc, np.sqrt(lam) * np.eye(5)]), np.vstack([yc, np.zeros((5, 3))]), rcond=None)[0]
        np.testing.assert_allclose(w.numpy(), want, atol=1e-12)
        np.testing.assert_allclose(b.numpy(), y.mean(0).numpy() - x.mean(0).numpy() @ want, atol=1e-12)


def test_ridge_fit_interpolates_with_more_dimensions_than_rows_as_lam_vanishes():
    x, y = _data(n=4, e=6)
    b, w, _ = ridge_fit(x, y, 1e-10)
    torch.testing.assert_close(b + x @ w, y, atol=1e-6, rtol=0)


def test_ridge_leave_one_out_error_equals_refitting_without_each_row():
    x, y = _data()
    _, _, loo = ridge_fit(x, y, 0.7)
    errors = []
    for i in range(len(x)):
        rest = torch.arange(len(x)) != i
        b, w, _ = ridge_fit(x[rest], y[rest], 0.7)
        errors.append(float((y[i] - b - x[i] @ w).pow(2).sum()))
    assert abs(loo - float(np.mean(errors))) < 1e-9
