"""Each metric's functional form gives what the Metric gives on one batch."""

from __future__ import annotations

import pytest
import torch

from lightning_dropout.metrics import (
    ChannelDrop,
    CoActivation,
    DropRate,
    channel_drop,
    coactivation,
    drop_rate,
)


def test_coactivation_matches_the_metric() -> None:
    acts = torch.relu(torch.randn(64, 3, 4, 4))
    metric = CoActivation(num_units=3)
    metric.update(acts)
    expected = metric.compute()
    for key, value in coactivation(acts).items():
        torch.testing.assert_close(value, expected[key], msg=key)
    with pytest.raises(ValueError, match="shape"):
        coactivation(torch.ones(5))


def test_channel_drop_matches_the_metric_and_validates_like_it() -> None:
    dropped = torch.rand(32, 6) < 0.3
    valid = torch.rand(32, 6) < 0.9
    metric = ChannelDrop(num_channels=6)
    metric.update(dropped, 0.3, valid)
    expected = metric.compute()
    for key, value in channel_drop(dropped, 0.3, valid).items():
        torch.testing.assert_close(value, expected[key], msg=key)
    with pytest.raises(ValueError, match="p must be in"):
        channel_drop(dropped, 1.5)
    with pytest.raises(ValueError, match="tolerance_sigmas"):
        channel_drop(dropped, 0.3, tolerance_sigmas=0)
    with pytest.raises(ValueError, match=r"shape \[N, 6\]"):
        metric.update(torch.zeros(4, 5, dtype=torch.bool), 0.3)


def test_drop_rate_matches_the_metric() -> None:
    metric = DropRate()
    metric.update(torch.tensor([3, 4]), torch.tensor([10, 10]))
    assert drop_rate(torch.tensor([3, 4]), torch.tensor([10, 10])).item() == metric.compute().item() == 0.35
