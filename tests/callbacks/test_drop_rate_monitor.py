from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_dropout import DropConnectLinear, Dropout, GaussianDropout
from lightning_dropout.callbacks import DropRateMonitor
from lightning_dropout.callbacks.drop_rate_monitor import realised_rate

SIGMAS = 4.0


def realised(layer: nn.Module, x: torch.Tensor) -> float:
    """One measured forward through ``layer``, as a measured step runs it."""
    monitor = DropRateMonitor()
    monitor.layers = {"layer": layer}
    handles = monitor._hooks("layer", layer)
    layer(x)
    for handle in handles:
        handle.remove()
    return realised_rate(layer, monitor._rates["layer"].compute().item())


@pytest.mark.parametrize(
    "layer", [Dropout(0.3), Dropout(0.3, inplace=True), nn.Dropout(0.3), nn.Dropout(0.3, inplace=True)]
)
def test_realised_rate_of_element_dropout_is_p_within_sigmas(layer: nn.Module) -> None:
    x = torch.randn(64, 1024)
    x[:, :24] = 0.0  # zeros going in are not counted as drops
    n = 64 * 1000
    assert abs(realised(layer, x) - 0.3) <= SIGMAS * math.sqrt(0.3 * 0.7 / n)


def test_realised_rate_of_gaussian_dropout_matches_its_variance() -> None:
    # p = 0.2: noise variance 0.25, estimated from 65536 draws with sd 0.25 * sqrt(2 / n);
    # p = v / (1 + v) moves by 1 / (1 + v)^2 = 0.64 of that.
    n = 64 * 1024
    sd = 0.64 * 0.25 * math.sqrt(2 / n)
    assert abs(realised(GaussianDropout(0.2), torch.randn(64, 1024)) - 0.2) <= SIGMAS * sd


def test_eval_mode_layers_are_not_measured() -> None:
    assert math.isnan(realised(Dropout(0.3).eval(), torch.randn(8, 8)))


def test_dropconnect_logs_only_p() -> None:
    monitor = DropRateMonitor()
    assert monitor._hooks("fc", DropConnectLinear(4, 4)) == []
