from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dropout import DropConnectLinear, Dropout, GaussianDropout
from lightning_dropout.callbacks import DropRateMonitor
from lightning_dropout.callbacks.drop_rate_monitor import realised_rate

SIGMAS = 4.0


def realised(layer: nn.Module, x: torch.Tensor) -> float:
    """One measured forward through ``layer``, as a measured step runs it."""
    monitor, model = DropRateMonitor(), nn.Sequential(layer)
    monitor._select(model)
    handles = monitor._attach()
    model(x)
    for handle in handles:
        handle.remove()
    return realised_rate(monitor.sites["0"].kind, monitor._rates["0"].compute().item())


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
    monitor._select(nn.Sequential(DropConnectLinear(4, 4)))
    assert list(monitor.sites) == ["0"] and not monitor._rates


class DropConnectNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = DropConnectLinear(4, 2, p=0.25)

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.fc(batch[0]).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_p_is_logged_for_layers_whose_drops_cannot_be_seen(tmp_path: Path) -> None:
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        logger=CSVLogger(tmp_path),
        callbacks=[DropRateMonitor()],
    )
    with pytest.warns(UserWarning, match="skipped for CSVLogger"):
        trainer.fit(DropConnectNet(), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["dropout/fc/p"]) for row in rows if row.get("dropout/fc/p")] == [0.25, 0.25]
    assert "dropout/fc/realised" not in rows[0]


def test_realised_rate_of_locked_dropout_on_a_packed_sequence() -> None:
    from torch.nn.utils.rnn import pack_padded_sequence

    from lightning_dropout import LockedDropout

    lengths = torch.randint(1, 9, (64,)).sort(descending=True).values
    packed = pack_padded_sequence(torch.rand(64, 8, 64) + 0.1, lengths, batch_first=True)
    # One mask entry per (sequence, feature): 64 x 64 draws, each weighted by its length.
    weights = lengths.float() / lengths.sum()
    sd = math.sqrt(0.3 * 0.7 * (weights**2).sum().item() / 64)
    assert abs(realised(LockedDropout(0.3), packed) - 0.3) <= SIGMAS * sd
