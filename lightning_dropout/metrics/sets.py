"""torchmetrics twins of :func:`~lightning_dropout.calibration.set_coverage` and
:func:`~lightning_dropout.calibration.set_size`: fixed-shape float64 sums
(``dist_reduce_fx="sum"``), so DDP ranks merge by addition."""

from __future__ import annotations

from torch import Tensor

from lightning_dropout.calibration import set_coverage, set_size
from lightning_dropout.metrics.uncertainty import _MeanOf


class SetCoverage(_MeanOf):
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
        self._add_mean(set_coverage(sets, target), sets.shape[0])


class SetSize(_MeanOf):
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
        self._add_mean(set_size(sets), sets.shape[0])


__all__ = ["SetCoverage", "SetSize"]
