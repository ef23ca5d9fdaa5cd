"""DropoutCallback.check_modes: sites that user code leaves in eval mode between epochs are
named once per run, whichever and however many of the package's callbacks notice."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dropout.callbacks import DropoutScheduler, DropRateMonitor, PerRankDropout, _run
from lightning_dropout.schedules import Constant


class FreezesAfterEpochZero(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 8), nn.Dropout(0.2))
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).pow(2).mean()

    def on_train_epoch_end(self) -> None:
        self.net[3].eval()  # user code freezing a block after the first epoch

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path: Path, callbacks: list[pl.Callback]) -> list[str]:
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    data = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(FreezesAfterEpochZero(), data)
    return [str(w.message) for w in record if "gates them is in eval mode" in str(w.message)]


@pytest.mark.parametrize(
    "callbacks",
    [
        lambda: [DropoutScheduler(Constant(0.1))],
        lambda: [PerRankDropout()],
        lambda: [DropoutScheduler(Constant(0.1)), DropRateMonitor(), PerRankDropout()],
    ],
)
def test_a_site_frozen_between_epochs_is_named_once(
    tmp_path: Path, callbacks: Callable[[], list[pl.Callback]]
) -> None:
    said = fit(tmp_path, callbacks())
    assert len(said) == 1 and "net.3" in said[0] and "net.1" not in said[0]


def test_one_callback_checks_each_epoch_for_all(tmp_path: Path) -> None:
    with mock.patch.object(_run, "find_sites", wraps=_run.find_sites) as find:
        fit(tmp_path, [DropoutScheduler(Constant(0.1)), DropRateMonitor(), PerRankDropout()])
    assert find.call_count == 3  # one search per epoch, not one per callback
