"""Plain functions behind the metrics: activations to units, moments to statistics, and
the functional forms of the metrics (``coactivation``, ``channel_drop``, ``drop_rate``),
which share each Metric's update and compute.

Everything here is pure torch. Statistics are computed from float64 sums (count, sum,
sum of outer products), which stream, merge across processes by addition, and keep the
cancellation in ``E[xy] - E[x]E[y]`` harmless for activations of ordinary scale.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_dropout._deprecation import moved_name
from lightning_dropout._validation import check_positive, check_probability


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


# The metrics' update and compute, shared by the Metric classes (streaming, DDP-reduced
# sums) and the functional forms below (one batch), as torchmetrics pairs them.


def _coactivation_update(acts: Tensor, num_units: int | None = None) -> tuple[Tensor, ...]:
    """Float64 sums of one batch: (samples, per-unit sums, outer products, zeros, elements).

    Raises:
        ValueError: fewer than 2 dimensions, or another unit count than ``num_units``.
    """
    acts = acts.detach()
    units = units_of(acts).to(torch.float64)
    if num_units is not None and units.shape[1] != num_units:
        raise ValueError(
            f"acts has {units.shape[1]} units (dimension 1 of shape {tuple(acts.shape)}), "
            f"but this metric has num_units={num_units}"
        )
    f64 = torch.float64
    return (
        torch.tensor(float(units.shape[0]), dtype=f64, device=acts.device),
        units.sum(dim=0),
        units.T @ units,
        zero_counts(acts).sum().to(f64),
        torch.tensor(float(acts.numel()), dtype=f64, device=acts.device),
    )


def _coactivation_compute(
    count: Tensor, total: Tensor, outer: Tensor, zeros: Tensor, elements: Tensor
) -> dict[str, Tensor]:
    cov = covariance_from_moments(count, total, outer)
    corr = correlation_from_covariance(cov)
    return {
        "corr": corr,
        "mean_abs_corr": mean_abs_off_diagonal(corr),
        "decov": decov(cov),
        "sparsity": zeros / elements,
        "mean_activation": total / count,
        "num_samples": count,
    }


def coactivation(acts: Tensor) -> dict[str, Tensor]:
    """Co-activation statistics of one batch of activations (functional
    :class:`~lightning_dropout.metrics.CoActivation`).

    Args:
        acts: ``[B, D]`` units, or ``[B, C, ...]`` reduced per channel.

    Returns:
        ``corr``, ``mean_abs_corr``, ``decov``, ``sparsity``, ``mean_activation`` and
        ``num_samples``, as :meth:`CoActivation.compute` returns them.

    Raises:
        ValueError: ``acts`` has fewer than 2 dimensions.

    Example:
        >>> x = torch.randn(100, 1)
        >>> round(coactivation(torch.cat([x, -x], dim=1))["mean_abs_corr"].item(), 6)
        1.0
    """
    return _coactivation_compute(*_coactivation_update(acts))


def _channel_drop_update(
    dropped: Tensor, p: float, valid: Tensor | None = None, num_channels: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per channel: (drops, observations, expected drops, drop variance), float64.

    Raises:
        ValueError: ``dropped`` is not ``[N, C]`` (with ``C = num_channels`` when given) or
            ``p`` outside [0, 1].
    """
    p = check_probability("p", p)
    channels = dropped.shape[1] if dropped.dim() == 2 else -1
    if dropped.dim() != 2 or (num_channels is not None and channels != num_channels):
        expected = "C" if num_channels is None else num_channels
        raise ValueError(f"dropped must have shape [N, {expected}], got {tuple(dropped.shape)}")
    dropped = dropped.detach().to(torch.bool)
    seen = torch.ones_like(dropped) if valid is None else valid.detach().to(torch.bool)
    observed = seen.sum(dim=0, dtype=torch.float64)
    drops = (dropped & seen).sum(dim=0, dtype=torch.float64)
    return drops, observed, p * observed, p * (1.0 - p) * observed


def _channel_drop_compute(
    drop_count: Tensor,
    observed: Tensor,
    expected_drops: Tensor,
    drop_variance: Tensor,
    tolerance_sigmas: float,
) -> dict[str, Tensor]:
    seen = observed.sum().clamp_min(1)
    z = binomial_z(drop_count.sum(), expected_drops.sum(), drop_variance.sum())
    return {
        "drop_count": drop_count,
        "observed": observed,
        "per_channel": drop_count / observed.clamp_min(1),
        "fraction": drop_count.sum() / seen,
        "expected": expected_drops.sum() / seen,
        "z_score": z,
        "channel_z": binomial_z(drop_count, expected_drops, drop_variance),
        "consistent": z.abs() <= tolerance_sigmas,
    }


def channel_drop(
    dropped: Tensor, p: float, valid: Tensor | None = None, tolerance_sigmas: float = 4.0
) -> dict[str, Tensor]:
    """Channel-drop statistics of one batch (functional :class:`~lightning_dropout.metrics.ChannelDrop`).

    Args:
        dropped: bool (or 0/1) ``[N, C]``: whether channel ``c`` of sample ``n`` was dropped.
        p: the drop probability the layer used.
        valid: optional bool ``[N, C]``: which entries to count (default: all).
        tolerance_sigmas: the ``|z|`` beyond which drops are called inconsistent with ``p``.

    Raises:
        TypeError: ``p`` or ``tolerance_sigmas`` is not a number.
        ValueError: ``dropped`` is not 2-D, ``p`` outside [0, 1], ``tolerance_sigmas`` <= 0.

    Example:
        >>> out = channel_drop(torch.tensor([[True, False], [False, False]]), p=0.5)
        >>> out["per_channel"].tolist(), out["fraction"].item()
        ([0.5, 0.0], 0.25)
    """
    tolerance = check_positive("tolerance_sigmas", tolerance_sigmas)
    return _channel_drop_compute(*_channel_drop_update(dropped, p, valid), tolerance)


def _drop_rate_update(dropped: Tensor | float, observed: Tensor | float) -> tuple[Tensor, Tensor]:
    """The summed counts, float64."""
    f64 = torch.float64
    return torch.as_tensor(dropped, dtype=f64).sum(), torch.as_tensor(observed, dtype=f64).sum()


def drop_rate(dropped: Tensor | float, observed: Tensor | float) -> Tensor:
    """The realised drop rate ``sum(dropped) / sum(observed)`` (functional
    :class:`~lightning_dropout.metrics.DropRate`); NaN when nothing was observed.

    Example:
        >>> drop_rate(torch.tensor([3, 2]), 20).item()
        0.25
    """
    count, seen = _drop_rate_update(dropped, observed)
    return count / seen


def __getattr__(name: str) -> Any:
    # Names that changed: they keep working, with one DeprecationWarning each.
    return moved_name(
        __name__, name, {"co_activation": ("lightning_dropout.metrics.functional.coactivation", coactivation)}
    )
