"""Configure DropoutScheduler and its schedules from YAML with LightningCLI.

Run from the repository root::

    python examples/scheduler_cli.py fit --config examples/scheduler_cli.yaml

The YAML gives the scheduler and every schedule as ``class_path`` / ``init_args``; any
value can be overridden on the command line, e.g.
``--trainer.max_steps 200``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_dropout as ld


class TwoMoonsLike(pl.LightningDataModule):
    """A small synthetic binary classification problem (no download)."""

    def __init__(self, n_samples: int = 256, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.n_samples, self.batch_size, self.seed = n_samples, batch_size, seed

    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.n_samples, 2, generator=generator)
        y = ((x[:, 0] * x[:, 1] > 0) ^ (x.norm(dim=1) > 1.2)).long()
        self.data = TensorDataset(x, y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)


class Classifier(pl.LightningModule):
    """An MLP with an ``encoder`` and a ``head``, each holding dropout layers."""

    def __init__(self, hidden: int = 64, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(
            nn.Linear(2, hidden),
            nn.ReLU(),
            ld.Dropout(0.0),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(0.0),
        )
        self.head = nn.Sequential(ld.Dropout(0.0), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``args`` as on the command line; None reads ``sys.argv``)."""
    return LightningCLI(Classifier, TwoMoonsLike, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
