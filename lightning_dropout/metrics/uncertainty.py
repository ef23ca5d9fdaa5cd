"""How good predictive uncertainty is: the scores torchmetrics lacks, as DDP-reduced Metrics.

torchmetrics provides accuracy, the calibration error (ECE), AUROC and the specificity at
a given sensitivity (FPR95 is one minus it); the Monte-Carlo evaluation uses those. What it
does not provide is here, as plain functions with thin :class:`~torchmetrics.Metric`
wrappers whose states are fixed-shape float64 sums (``dist_reduce_fx="sum"``), so DDP
ranks merge by addition:

- :class:`NegativeLogLikelihood`: mean ``-log p(y)`` of class probabilities;
- :class:`BrierScore`: mean ``sum_c (p_c - [y = c])^2`` (Brier 1950, the multiclass form);
- :class:`GaussianNLL`: mean negative log density of the targets under the predicted
  Gaussians, constant included;
- :class:`IntervalCoverage`: how often the target lies in the central interval of the
  predicted Gaussian (90% by default): 0.9 for a calibrated regressor;
- :class:`ReliabilityDiagram`: accuracy and mean confidence per confidence bin, torchmetrics'
  binning (``n_bins`` equal bins on [0, 1], a top-label confidence in bin
  ``bucketize(c, edges, right=True) - 1``, 1.0 in the last), from which the ECE follows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_dropout._validation import check_positive_int, check_probability


def negative_log_likelihood(probs: Tensor, target: Tensor) -> Tensor:
    """``-log probs[i, target[i]]`` per row (probabilities clamped at the smallest normal float).

    Example:
        >>> negative_log_likelihood(torch.tensor([[0.5, 0.5], [0.25, 0.75]]), torch.tensor([0, 1]))
        tensor([0.6931, 0.2877])
    """
    picked = probs.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    return -picked.clamp_min(torch.finfo(probs.dtype).tiny).log()


def brier_score(probs: Tensor, target: Tensor) -> Tensor:
    """``sum_c (probs[i, c] - [target[i] = c])^2`` per row.

    Example:
        >>> brier_score(torch.tensor([[0.5, 0.5], [0.0, 1.0]]), torch.tensor([0, 1]))
        tensor([0.5000, 0.0000])
    """
    one_hot = torch.nn.functional.one_hot(target.long(), probs.shape[-1]).to(probs.dtype)
    return ((probs - one_hot) ** 2).sum(-1)


def gaussian_nll(mean: Tensor, variance: Tensor, target: Tensor) -> Tensor:
    """``0.5 * (log(2 pi variance) + (target - mean)^2 / variance)`` elementwise.

    Example:
        >>> round(gaussian_nll(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.0)).item(), 4)
        0.9189
    """
    variance = variance.clamp_min(torch.finfo(variance.dtype).tiny)
    return 0.5 * (torch.log(2 * math.pi * variance) + (target - mean) ** 2 / variance)


def interval_covered(mean: Tensor, variance: Tensor, target: Tensor, level: float = 0.9) -> Tensor:
    """Whether ``target`` lies in the central ``level`` interval of ``N(mean, variance)``.

    Example:
        >>> interval_covered(torch.zeros(2), torch.ones(2), torch.tensor([1.6, 1.7])).tolist()
        [True, False]
    """
    half_width = math.sqrt(2.0) * torch.special.erfinv(torch.tensor(level, dtype=torch.float64)).item()
    return (target - mean).abs() <= half_width * variance.sqrt()


def reliability_bins(probs: Tensor, target: Tensor, n_bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Per confidence bin: (count, sum of top-label confidences, number correct), float64.

    Bins as torchmetrics' calibration error draws them: ``n_bins`` equal bins on [0, 1], a
    confidence ``c`` in bin ``bucketize(c, edges, right=True) - 1``; a confidence of exactly
    1.0 (torchmetrics' extra bin) counts in the last.

    Example:
        >>> count, confidence, correct = reliability_bins(
        ...     torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), torch.tensor([0, 0, 0]), n_bins=2
        ... )
        >>> count.tolist(), correct.tolist()
        ([0.0, 3.0], [0.0, 2.0])
    """
    confidence, predicted = probs.max(-1)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype, device=confidence.device)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
    zeros = torch.zeros(n_bins, dtype=torch.float64, device=probs.device)
    count = zeros.index_add(0, index, torch.ones_like(confidence, dtype=torch.float64))
    confidence_sum = zeros.index_add(0, index, confidence.double())
    correct = zeros.index_add(0, index, (predicted == target).double())
    return count, confidence_sum, correct


class _MeanOf(Metric):
    """The mean of per-item values, from float64 (sum, count) states."""

    full_state_update = False
    is_differentiable = False
    higher_is_better: bool | None = False

    total: Tensor
    count: Tensor

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, values: Tensor) -> None:
        self.total += values.double().sum()
        self.count += values.numel()

    def _add_mean(self, mean: Tensor, count: int) -> None:
        """Add ``count`` items whose values average ``mean``."""
        if count:  # the mean of no items is NaN
            self.total += mean.double() * count
            self.count += count

    def compute(self) -> Tensor:
        """The mean (NaN before any update)."""
        return self.total / self.count


class NegativeLogLikelihood(_MeanOf):
    """Mean negative log-likelihood of integer targets under class probabilities.

    Example:
        >>> metric = NegativeLogLikelihood()
        >>> metric.update(torch.tensor([[0.5, 0.5], [0.25, 0.75]]), torch.tensor([0, 1]))
        >>> round(metric.compute().item(), 4)
        0.4904
    """

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add rows of ``probs`` (``[N, C]``) with their targets (``[N]``)."""
        self._add(negative_log_likelihood(probs, target))


class BrierScore(_MeanOf):
    """Mean multiclass Brier score: squared distance of the probabilities to the one-hot target.

    Example:
        >>> metric = BrierScore()
        >>> metric.update(torch.tensor([[0.5, 0.5], [0.0, 1.0]]), torch.tensor([0, 1]))
        >>> metric.compute().item()
        0.25
    """

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add rows of ``probs`` (``[N, C]``) with their targets (``[N]``)."""
        self._add(brier_score(probs, target))


class GaussianNLL(_MeanOf):
    """Mean negative log density of targets under predicted Gaussians (constant included).

    Example:
        >>> metric = GaussianNLL()
        >>> metric.update(torch.zeros(3), torch.ones(3), torch.zeros(3))
        >>> round(metric.compute().item(), 4)
        0.9189
    """

    def update(self, mean: Tensor, variance: Tensor, target: Tensor) -> None:
        """Add predictions (mean and variance, elementwise) with their targets."""
        self._add(gaussian_nll(mean, variance, target))


class IntervalCoverage(_MeanOf):
    """How often targets fall in the central ``level`` interval of the predicted Gaussians.

    Args:
        level: the interval's probability, in (0, 1).

    Raises:
        ValueError: ``level`` outside (0, 1).

    Example:
        >>> metric = IntervalCoverage(0.9)
        >>> metric.update(torch.zeros(4), torch.ones(4), torch.tensor([0.0, 1.0, -1.6, 2.0]))
        >>> metric.compute().item()
        0.75
    """

    higher_is_better = None

    def __init__(self, level: float = 0.9, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.level = check_probability("level", level)
        if self.level in (0.0, 1.0):
            raise ValueError(f"level must be in (0, 1), got {level!r}")

    def update(self, mean: Tensor, variance: Tensor, target: Tensor) -> None:
        """Add predictions (mean and variance, elementwise) with their targets."""
        self._add(interval_covered(mean, variance, target, self.level))


class ReliabilityDiagram(Metric):
    """Accuracy against confidence per confidence bin, from float64 per-bin sums.

    ``compute()`` returns ``{"count", "confidence", "accuracy"}``, one value per bin (the
    mean top-label confidence and the accuracy of the predictions in the bin; 0 where a bin
    is empty). ``calibration_error(result)`` gives the ECE of those bins.

    Args:
        n_bins: the number of equal bins on [0, 1].

    Raises:
        TypeError: ``n_bins`` is not an int.
        ValueError: ``n_bins`` below 1.

    Example:
        >>> metric = ReliabilityDiagram(n_bins=2)
        >>> metric.update(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), torch.tensor([0, 0, 0]))
        >>> result = metric.compute()
        >>> result["accuracy"].tolist(), round(ReliabilityDiagram.calibration_error(result).item(), 4)
        ([0.0, 0.6666666666666666], 0.1)
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    counts: Tensor
    confidence_sums: Tensor
    correct: Tensor

    def __init__(self, n_bins: int = 15, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.n_bins = check_positive_int("n_bins", n_bins)
        for name in ("counts", "confidence_sums", "correct"):
            self.add_state(name, torch.zeros(self.n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add rows of ``probs`` (``[N, C]``) with their targets (``[N]``)."""
        count, confidence, correct = reliability_bins(probs, target, self.n_bins)
        self.counts += count
        self.confidence_sums += confidence
        self.correct += correct

    def compute(self) -> dict[str, Tensor]:
        """Per bin: ``count``, mean ``confidence`` and ``accuracy`` (0 for empty bins)."""
        filled = self.counts.clamp_min(1.0)
        return {
            "count": self.counts,
            "confidence": self.confidence_sums / filled,
            "accuracy": self.correct / filled,
        }

    @staticmethod
    def calibration_error(result: dict[str, Tensor]) -> Tensor:
        """The expected calibration error of computed bins: ``sum_b n_b |acc_b - conf_b| / N``."""
        count = result["count"]
        return (count * (result["accuracy"] - result["confidence"]).abs()).sum() / count.sum()


__all__ = [
    "BrierScore",
    "GaussianNLL",
    "IntervalCoverage",
    "NegativeLogLikelihood",
    "ReliabilityDiagram",
    "brier_score",
    "gaussian_nll",
    "interval_covered",
    "negative_log_likelihood",
    "reliability_bins",
]
