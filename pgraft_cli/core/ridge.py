"""Ridge regression in closed form, with its leave-one-out error (the text-conditioned corrector's mean)."""

from __future__ import annotations

import torch
from torch import Tensor


def ridge_fit(x: Tensor, y: Tensor, lam: float) -> tuple[Tensor, Tensor, float]:
    """``(b, W, loo)`` of the ridge regression of ``y`` (N, D) on ``x`` (N, E), intercept unpenalized.

    ``W = argmin ||Yc - Xc W||^2 + lam ||W||^2 = Xc^T (Xc Xc^T + lam I_N)^-1 Yc`` (the dual form, equal
    to ``(Xc^T Xc + lam I_E)^-1 Xc^T Yc``; N x N, cheap when images are fewer than embedding
    dimensions), with ``Xc, Yc`` centred, and ``b = mean(y) - mean(x) W``: the prediction is ``b + x W``.
    ``loo`` is the leave-one-out mean squared error per row, from the hat matrix
    ``H = 11^T / N + K (K + lam I)^-1`` (``K = Xc Xc^T``): ``mean_i ||r_i||^2 / (1 - H_ii)^2`` with ``r``
    the full fit's residuals, the exact refit-without-row-i error of a penalized least-squares fit.
    All in float64.
    """
    x, y = x.double().reshape(len(x), -1), y.double().reshape(len(y), -1)
    num = len(x)
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    kernel = xc @ xc.T
    solve = torch.linalg.solve(kernel + lam * torch.eye(num, dtype=torch.float64), torch.cat([yc, kernel], 1))
    alpha, smoother = solve[:, :y.shape[1]], solve[:, y.shape[1]:]  # (K + lam I)^-1 K = K (K + lam I)^-1
    weight = xc.T @ alpha
    residual = yc - kernel @ alpha
    leverage = 1.0 / num + smoother.diagonal()
    loo = float((residual.pow(2).sum(1) / (1 - leverage).clamp_min(1e-12).pow(2)).mean())
    return ym - xm @ weight, weight, loo
