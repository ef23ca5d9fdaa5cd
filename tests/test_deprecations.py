"""Renamed public names: each old spelling still works, means what it meant, and warns once."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import lightning_dropout
from lightning_dropout import _deprecation, metrics
from lightning_dropout.callbacks import ChannelDropMonitor, CoActivationMonitor, DropoutScheduler
from lightning_dropout.metrics import functional
from lightning_dropout.mixin import DropoutMixin
from lightning_dropout.random_streams import RankStreams
from lightning_dropout.schedules import Constant


@pytest.fixture(autouse=True)
def _fresh_process() -> Iterator[None]:
    # Each old name warns once per process: start every test as a new process would.
    said = set(_deprecation._said)
    _deprecation._said.clear()
    yield
    _deprecation._said.clear()
    _deprecation._said.update(said)


class Net(DropoutMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
        self.head = nn.Sequential(nn.Dropout2d(0.2), nn.Linear(4, 2))


def deprecations(call: Callable[[], Any]) -> tuple[Any, list[str]]:
    """``call()``'s result and the DeprecationWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]


def test_mixin_pattern_is_sites_and_warns_once() -> None:
    model = Net()
    layers, said = deprecations(lambda: model.dropout_layers(pattern="head"))
    assert list(layers) == ["head.0"] == list(model.dropout_layers(sites="head"))
    new = "DropoutMixin.dropout_layers(sites=)"
    assert said == [f"DropoutMixin.dropout_layers(pattern=) is deprecated; use {new} instead."]
    _, said = deprecations(lambda: model.set_dropout_p(0.3, pattern="encoder"))
    assert model.dropout_p() == {"encoder.1": 0.3, "head.0": 0.2}
    assert len(said) == 1 and "set_dropout_p(sites=)" in said[0]
    _, again = deprecations(lambda: model.set_dropout_p(0.4, pattern="encoder"))
    assert again == [] and model.dropout_p()["encoder.1"] == 0.4
    with pytest.raises(TypeError, match="both sites= and its deprecated name pattern="):
        model.set_dropout_p(0.1, "head", pattern="head")


def test_the_warning_points_at_the_callers_line() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ChannelDropMonitor(layers=["head"])
    assert caught[0].filename == __file__


def test_channel_drop_monitor_layers_is_sites() -> None:
    monitor, said = deprecations(lambda: ChannelDropMonitor(layers="head"))
    assert monitor.site_patterns == ["head"] == ChannelDropMonitor(sites="head").site_patterns
    assert said == ["ChannelDropMonitor(layers=) is deprecated; use ChannelDropMonitor(sites=) instead."]
    with pytest.raises(TypeError, match="both sites="):
        ChannelDropMonitor(sites="head", layers="head")


def test_coactivation_monitor_layers_keeps_its_meaning_as_modules() -> None:
    # `layers` always named modules whose outputs are measured; `sites` chooses sites.
    monitor, said = deprecations(lambda: CoActivationMonitor(layers=["encoder.0"]))
    assert monitor.module_patterns == ["encoder.0"] and monitor.site_patterns is None
    assert said == ["CoActivationMonitor(layers=) is deprecated; use CoActivationMonitor(modules=) instead."]
    assert CoActivationMonitor(["encoder.0"]).module_patterns == ["encoder.0"]  # positional as before
    with pytest.raises(TypeError, match="both modules="):
        CoActivationMonitor(modules=["a"], layers=["a"])


def test_scheduler_targets_is_extra_modules() -> None:
    class Mask(nn.Module):  # a rate no discovery rule finds
        def __init__(self) -> None:
            super().__init__()
            self.p = 0.5

    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), Mask())
    scheduler, said = deprecations(lambda: DropoutScheduler(Constant(0.2), targets=Mask))
    assert said == ["DropoutScheduler(targets=) is deprecated; use DropoutScheduler(extra_modules=) instead."]
    assert scheduler.extra_modules == [Mask]
    assert [site.name for site in scheduler.find_groups(net)["all"]] == ["1", "2"]
    assert repr(scheduler) == f"DropoutScheduler(Constant(p=0.2), extra_modules={[Mask]!r})"
    with pytest.raises(TypeError, match="both extra_modules="):
        DropoutScheduler(Constant(0.2), extra_modules=Mask, targets=Mask)


def test_moved_names_still_import_and_warn_once() -> None:
    streams, said = deprecations(lambda: lightning_dropout.RankStreams)
    assert streams is RankStreams and "RankStreams" not in lightning_dropout.__all__
    new = "lightning_dropout.random_streams.RankStreams"
    assert said == [f"lightning_dropout.RankStreams is deprecated; use {new} instead."]
    assert deprecations(lambda: lightning_dropout.RankStreams)[1] == []
    for module in (metrics, functional):
        old, said = deprecations(lambda module=module: module.co_activation)
        assert old is functional.coactivation
        assert said == [
            f"{module.__name__}.co_activation is deprecated; use {module.__name__}.coactivation instead."
        ]
    x = torch.randn(64, 3)
    assert torch.equal(functional.coactivation(x)["corr"], metrics.coactivation(x)["corr"])
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = lightning_dropout.nothing  # type: ignore[attr-defined]
