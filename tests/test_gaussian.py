"""Colouring and whitening (core/gaussian.py): the Gaussian source of the noise corrector."""

from __future__ import annotations

import torch

from pgraft_cli.core.gaussian import colour, whiten


def _factor(dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, dtype=torch.float64, generator=g)
    return torch.randn(dim, dtype=torch.float64, generator=g), torch.linalg.cholesky(a @ a.T + dim * torch.eye(dim))


def test_colour_maps_the_unit_vectors_onto_the_mean_plus_the_factors_columns():
    """colour(e_j) = mean + L e_j = mean + L[:, j], and colour(0) = mean: the closed form, row by row."""
    mean, chol = _factor(6)
    e = torch.cat([torch.zeros(1, 6, dtype=torch.float64), torch.eye(6, dtype=torch.float64)])
    z = colour(e.reshape(7, 1, 2, 3), mean, chol)
    assert z.shape == (7, 1, 2, 3)
    torch.testing.assert_close(z.reshape(7, 6), torch.cat([mean[None], mean + chol.T]), rtol=0, atol=1e-12)


def test_whiten_inverts_colour_and_coloured_noise_has_the_fitted_moments():
    """whiten(colour(e)) = e; and for e ~ N(0, I) the coloured rows have mean ~ m and covariance ~ L L^T."""
    mean, chol = _factor(4, seed=1)
    e = torch.randn(200000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    z = colour(e, mean, chol)
    torch.testing.assert_close(whiten(z, mean, chol), e, rtol=0, atol=1e-10)
    cov = chol @ chol.T
    assert float((z.mean(0) - mean).abs().max()) < 0.05
    assert float(((torch.cov(z.T) - cov).abs() / cov.diagonal().max()).max()) < 0.02
    assert colour(e[:3].float(), mean, chol).dtype == torch.float32  # the caller's dtype
