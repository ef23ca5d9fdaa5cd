"""torchmetrics twins of :func:`~lightning_dropout.calibration.set_coverage` and
:func:`~lightning_dropout.calibration.set_size`: fixed-shape float64 sums
(``dist_reduce_fx="sum"``), so DDP ranks merge by addition."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_dropout.calibration import set_coverage, set_size


class _SetMean(Metric):
    full_state_update = False
    is_differentiable = False

    total: Tensor
    count: Tensor

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, mean: Tensor, rows: int) -> None:
        if rows == 0:  # the mean of no rows is NaN
            return
        self.total += mean.double() * rows
        self.count += rows

    def compute(self) -> Tensor:
        """The mean over every input seen (NaN before any update)."""
        return self.total / self.count


class SetCoverage(_SetMean):
    """The fraction of inputs whose prediction set holds their class.

    Example:
        >>> metric = SetCoverage()
        >>> metric.update(torch.tensor([[True, False], [True, True]]), torch.tensor([1, 1]))
        >>> metric.compute().item()
        0.5
    """

    higher_is_better = True

    def update(self, sets: Tensor, target: Tensor) -> None:
        """Add boolean sets ``[N, C]`` with their classes ``[N]``."""
        self._add(set_coverage(sets, target), sets.shape[0])


class SetSize(_SetMean):
    """The mean number of classes per prediction set.

    Example:
        >>> metric = SetSize()
        >>> metric.update(torch.tensor([[True, False], [True, True]]))
        >>> metric.compute().item()
        1.5
    """

    higher_is_better = False

    def update(self, sets: Tensor) -> None:
        """Add boolean sets ``[N, C]``."""
        self._add(set_size(sets), sets.shape[0])


__all__ = ["SetCoverage", "SetSize"]
