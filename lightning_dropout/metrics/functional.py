"""Plain functions behind the metrics: activations to units, moments to statistics.

Everything here is pure torch. Statistics are computed from float64 sums (count, sum,
sum of outer products), which stream, merge across processes by addition, and keep the
cancellation in ``E[xy] - E[x]E[y]`` harmless for activations of ordinary scale.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def units_of(acts: Tensor) -> Tensor:
    """View activations as ``[samples, units]``: ``[B, D]`` as is, ``[B, C, ...]`` per channel.

    A channel's value for a sample is its mean over the remaining (spatial) dimensions.

    Args:
        acts: activations of shape ``[B, D]`` or ``[B, C, *spatial]``.

    Raises:
        ValueError: ``acts`` has fewer than 2 dimensions.

    Example:
        >>> units_of(torch.ones(4, 3, 5, 5)).shape
        torch.Size([4, 3])
    """
    if acts.dim() < 2:
        raise ValueError(f"acts must have shape [B, D] or [B, C, ...], got shape {tuple(acts.shape)}")
    if acts.dim() == 2:
        return acts
    return acts.flatten(2).mean(dim=2)


def zero_counts(acts: Tensor) -> Tensor:
    """Exact zeros per unit (per channel for ``[B, C, ...]``), counted over all elements.

    Example:
        >>> zero_counts(torch.tensor([[0.0, 1.0], [0.0, 0.0]])).tolist()
        [2, 1]
    """
    return acts.eq(0).flatten(2).sum(dim=(0, 2)) if acts.dim() > 2 else acts.eq(0).sum(dim=0)


def covariance_from_moments(count: Tensor | float, total: Tensor, outer: Tensor) -> Tensor:
    """The covariance with 1/N normalisation from ``N``, ``sum x`` and ``sum x x^T``.

    Example:
        >>> x = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
        >>> covariance_from_moments(torch.tensor(2.0), x.sum(0), x.T @ x).item()
        1.0
    """
    n = float(count)
    mean = total / n
    return torch.addr(outer, mean, mean, beta=1.0 / n, alpha=-1.0)


def correlation_from_covariance(cov: Tensor) -> Tensor:
    """Pearson correlation from a covariance matrix; a constant unit correlates 0, never NaN.

    Example:
        >>> correlation_from_covariance(torch.tensor([[4.0, 2.0], [2.0, 0.0]])).tolist()
        [[1.0, 0.0], [0.0, 0.0]]
    """
    var = cov.diagonal()
    # Relative threshold: a constant unit's variance is rounding noise of its mean square.
    scale = var.abs().amax().clamp_min(torch.finfo(cov.dtype).tiny)
    varies = var > scale * 1e3 * torch.finfo(cov.dtype).eps
    std = torch.where(varies, var.clamp_min(0).sqrt(), torch.ones_like(var))
    corr = (cov / torch.outer(std, std)).clamp(-1.0, 1.0)
    both = torch.outer(varies, varies)
    return torch.where(both, corr, torch.zeros_like(corr))


def mean_abs_off_diagonal(matrix: Tensor) -> Tensor:
    """Mean absolute off-diagonal entry (0 for a 1 x 1 matrix): the co-adaptation index.

    Example:
        >>> mean_abs_off_diagonal(torch.tensor([[1.0, -0.5], [-0.5, 1.0]])).item()
        0.5
    """
    d = matrix.shape[0]
    if d < 2:
        return matrix.new_zeros(())
    return (matrix.abs().sum() - matrix.diagonal().abs().sum()) / (d * (d - 1))


def decov(cov: Tensor) -> Tensor:
    """DeCov loss (Cogswell et al., ICLR 2016): ``0.5 (||C||_F^2 - ||diag C||_2^2)``.

    Example:
        >>> decov(torch.tensor([[2.0, 1.0], [1.0, 3.0]])).item()
        1.0
    """
    return 0.5 * (cov.square().sum() - cov.diagonal().square().sum())


def binomial_z(observed: Tensor, expected: Tensor, variance: Tensor) -> Tensor:
    """z-score of an observed count against a sum of binomials; 0 where the variance is 0
    and the observation matches, +-inf where it is 0 and they differ.

    Example:
        >>> binomial_z(torch.tensor(60.0), torch.tensor(50.0), torch.tensor(25.0)).item()
        2.0
    """
    diff = observed - expected
    safe = torch.where(variance > 0, variance, torch.ones_like(variance)).sqrt()
    degenerate = torch.where(diff == 0, torch.zeros_like(diff), diff * math.inf)
    return torch.where(variance > 0, diff / safe, degenerate)
