"""Co-activation of units: the quantities behind "dropout prevents co-adaptation"
(Srivastava et al., JMLR 2014, section 7.2 and Figure 8; Cogswell et al., "Reducing
Overfitting in Deep Networks by Decorrelating Representations", ICLR 2016).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_dropout._validation import check_positive_int
from lightning_dropout.metrics.functional import _coactivation_compute, _coactivation_update


class CoActivation(Metric):
    """Streaming correlation, DeCov, sparsity and mean activation of ``num_units`` units.

    States are float64 sums (samples, per-unit sums, the sum of outer products, zero and
    element counts), reduced across processes by addition.

    ``compute()`` returns a dict:

    - ``corr``: ``[D, D]`` Pearson correlation (a constant unit correlates 0, never NaN);
    - ``mean_abs_corr``: mean |off-diagonal correlation|, the co-adaptation index;
    - ``decov``: ``0.5 (||C||_F^2 - ||diag C||^2)`` with ``C`` the 1/N covariance;
    - ``sparsity``: fraction of exact zeros among all elements seen;
    - ``mean_activation``: ``[D]`` mean of each unit;
    - ``num_samples``: the number of samples seen.

    Args:
        num_units: ``D``, the number of units (channels for ``[B, C, ...]`` input).

    Raises:
        TypeError: ``num_units`` is not an int.
        ValueError: ``num_units`` < 1; in ``update``, activations with another unit count.

    Example:
        >>> metric = CoActivation(num_units=2)
        >>> x = torch.randn(100, 1)
        >>> metric.update(torch.cat([x, -x], dim=1))
        >>> round(metric.compute()["mean_abs_corr"].item(), 6)
        1.0
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    count: Tensor
    total: Tensor
    outer: Tensor
    zeros: Tensor
    elements: Tensor

    def __init__(self, num_units: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.num_units = check_positive_int("num_units", num_units)
        f64 = torch.float64
        self.add_state("count", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_units, dtype=f64), dist_reduce_fx="sum")
        self.add_state("outer", torch.zeros(num_units, num_units, dtype=f64), dist_reduce_fx="sum")
        self.add_state("zeros", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("elements", torch.zeros((), dtype=f64), dist_reduce_fx="sum")

    def update(self, acts: Tensor) -> None:
        """Add a batch of activations ``[B, D]`` or ``[B, C, ...]`` (reduced per channel)."""
        count, total, outer, zeros, elements = _coactivation_update(acts, self.num_units)
        self.count += count
        self.total += total
        self.outer += outer
        self.zeros += zeros
        self.elements += elements

    def compute(self) -> dict[str, Tensor]:
        """The statistics of everything seen since the last reset (see the class doc)."""
        return _coactivation_compute(self.count, self.total, self.outer, self.zeros, self.elements)
