"""Realised channel drops of SpatialDropout (Tompson et al., CVPR 2015), checked
against the binomial distribution the drop probability implies.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_dropout._validation import check_positive, check_positive_int
from lightning_dropout.metrics.functional import _channel_drop_compute, _channel_drop_update


class ChannelDrop(Metric):
    """Per-channel drop counts and their consistency with the expected drop probability.

    Each ``update(dropped, p)`` adds one batch of (sample, channel) drop indicators drawn
    with probability ``p``; ``p`` may differ between updates (a schedule), so the
    expectation is the sum of the binomials' means. Entries marked invalid (e.g. channels
    that were all zero before dropout, where a drop cannot be seen) are not counted.

    ``compute()`` returns a dict:

    - ``drop_count`` / ``observed``: ``[C]`` drops and observations per channel;
    - ``per_channel``: ``[C]`` realised drop frequency of each channel;
    - ``fraction``: realised fraction of dropped (sample, channel) pairs;
    - ``expected``: the fraction the probabilities predict;
    - ``z_score``: ``(drops - expected drops) / sd`` over all channels, binomial sd;
    - ``channel_z``: ``[C]`` the same per channel;
    - ``consistent``: whether ``|z_score| <= tolerance_sigmas``.

    Args:
        num_channels: ``C``, the number of channels.
        tolerance_sigmas: the ``|z|`` beyond which drops are called inconsistent with ``p``.

    Raises:
        TypeError: ``num_channels`` is not an int.
        ValueError: ``num_channels`` < 1, ``tolerance_sigmas`` <= 0; in ``update``, a
            ``dropped`` of the wrong shape or ``p`` outside [0, 1].

    Example:
        >>> metric = ChannelDrop(num_channels=3)
        >>> metric.update(torch.tensor([[True, False, False], [False, True, False]]), p=0.5)
        >>> out = metric.compute()
        >>> out["per_channel"].tolist(), round(out["fraction"].item(), 4), out["expected"].item()
        ([0.5, 0.5, 0.0], 0.3333, 0.5)
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    drop_count: Tensor
    observed: Tensor
    expected_drops: Tensor
    drop_variance: Tensor

    def __init__(self, num_channels: int, tolerance_sigmas: float = 4.0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.num_channels = check_positive_int("num_channels", num_channels)
        self.tolerance_sigmas = check_positive("tolerance_sigmas", tolerance_sigmas)
        for name in ("drop_count", "observed", "expected_drops", "drop_variance"):
            self.add_state(name, torch.zeros(num_channels, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, dropped: Tensor, p: float, valid: Tensor | None = None) -> None:
        """Add drop indicators ``dropped`` ``[N, C]`` drawn with probability ``p``.

        Args:
            dropped: bool (or 0/1) ``[N, C]``: whether channel ``c`` of sample ``n`` was dropped.
            p: the drop probability the layer used.
            valid: optional bool ``[N, C]``: which entries to count (default: all).
        """
        drops, observed, expected, variance = _channel_drop_update(dropped, p, valid, self.num_channels)
        self.drop_count += drops
        self.observed += observed
        self.expected_drops += expected
        self.drop_variance += variance

    def compute(self) -> dict[str, Tensor]:
        """The drop statistics of everything seen since the last reset (see the class doc)."""
        return _channel_drop_compute(
            self.drop_count, self.observed, self.expected_drops, self.drop_variance, self.tolerance_sigmas
        )
