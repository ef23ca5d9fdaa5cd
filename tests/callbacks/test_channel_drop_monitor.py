from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_dropout import Dropout1d, Dropout2d, Dropout3d
from lightning_dropout.callbacks import ChannelDropMonitor
from lightning_dropout.callbacks.channel_drop_monitor import channels_first

SIGMAS = 4.0


def measured(layer: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One measured forward through ``layer``, as a measured step runs it."""
    monitor, model = ChannelDropMonitor(), nn.Sequential(layer)
    monitor._select(model)
    handles = monitor._attach()
    model(x)
    for handle in handles:
        handle.remove()
    return monitor._metrics["0"].compute()


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (Dropout2d(0.4), (256, 8, 3, 3)),
        (Dropout2d(0.4, inplace=True), (256, 8, 3, 3)),
        (nn.Dropout2d(0.4), (256, 8, 3, 3)),
        (Dropout1d(0.4), (256, 8, 5)),
        (nn.Dropout1d(0.4), (8, 5)),  # unbatched (C, L)
        (Dropout3d(0.4), (256, 8, 2, 2, 2)),
    ],
)
def test_fraction_matches_p_within_sigmas(layer: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.rand(shape) + 0.1
    out = measured(layer, x)
    n = out["observed"].sum().item()
    assert n == (shape[0] if len(shape) == 2 else shape[0] * shape[1])  # (sample, channel) pairs
    assert out["expected"].item() == pytest.approx(0.4)
    assert abs(out["fraction"].item() - 0.4) <= SIGMAS * math.sqrt(0.24 / n)


def test_all_zero_channels_going_in_are_not_counted() -> None:
    x = torch.rand(64, 4, 3, 3) + 0.1
    x[:, 0] = 0.0
    out = measured(nn.Dropout2d(0.5), x)
    assert out["observed"].tolist() == [0.0, 64.0, 64.0, 64.0]
    assert out["drop_count"][0].item() == 0.0


def test_channels_first_reads_unbatched_inputs_as_the_layer_does() -> None:
    assert channels_first(Dropout2d(batched=False), torch.ones(3, 4, 4)).shape == (1, 3, 4, 4)
    assert channels_first(nn.Dropout2d(), torch.ones(3, 4, 4)).shape == (3, 4, 4)  # torch: (N, C, L)
    assert channels_first(nn.Dropout3d(), torch.ones(3, 2, 2, 2)).shape == (1, 3, 2, 2, 2)


def test_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        ChannelDropMonitor(every_n_steps=0)
    with pytest.raises(TypeError, match="sites"):
        ChannelDropMonitor(sites=[2])  # type: ignore[list-item]
    assert ChannelDropMonitor(sites="features.2").site_patterns == ["features.2"]  # one glob
