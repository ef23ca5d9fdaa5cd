"""The realised drop rate of a dropout layer: drops seen over units that could drop."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_dropout.metrics.functional import _drop_rate_update


class DropRate(Metric):
    """Streaming ratio ``sum(dropped) / sum(observed)`` with float64 sums, DDP-reduced.

    ``update(dropped, observed)`` takes counts (numbers or tensors, summed); ``compute()``
    returns the ratio, NaN when nothing was observed.

    Example:
        >>> rate = DropRate()
        >>> rate.update(torch.tensor(3), 10)
        >>> rate.update(2, torch.tensor(10))
        >>> rate.compute().item()
        0.25
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    dropped: Tensor
    observed: Tensor

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("dropped", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("observed", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, dropped: Tensor | float, observed: Tensor | float) -> None:
        """Add ``dropped`` drops out of ``observed`` units that could drop."""
        count, seen = _drop_rate_update(dropped, observed)
        self.dropped += count.to(self.device)
        self.observed += seen.to(self.device)

    def compute(self) -> Tensor:
        """The realised rate (NaN when nothing was observed)."""
        return self.dropped / self.observed
