"""The dashboard script's HTTP part against a real tensorboard (the screenshot needs
Chromium and is left to the script itself)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from lightning_dropout import Dropout, Dropout2d
from lightning_dropout.callbacks import ChannelDropMonitor, CoActivationMonitor, DropRateMonitor

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "dashboard.py"


def load_script():
    spec = importlib.util.spec_from_file_location("dashboard_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class TinyCNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), Dropout2d(0.3), nn.Flatten(), nn.Linear(64 * 4, 16), Dropout(0.5)
        )

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_tensorboard_serves_the_layout_and_the_tags(tmp_path: Path) -> None:
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[CoActivationMonitor(), ChannelDropMonitor(), DropRateMonitor()],
    )
    trainer.fit(TinyCNN(), DataLoader(TensorDataset(torch.randn(32, 1, 8, 8)), batch_size=16))
    dashboard = load_script()
    with dashboard.tensorboard(tmp_path) as base_url:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base_url)
        summary = dashboard.check_dashboard(base_url)
    assert summary["runs"] == ["lightning_logs/version_0"]
    assert summary["categories"] == [
        "dropout: p beside the realised rate",
        "co-adaptation per layer",
        "channel drop beside its expectation",
    ]
    assert summary["image_tags"] == 2 and summary["histogram_tags"] == 3


def test_the_check_fails_on_a_run_without_monitors(tmp_path: Path) -> None:
    writer = SummaryWriter(tmp_path / "plain")
    writer.add_scalar("loss", 1.0, 0)
    writer.close()
    dashboard = load_script()
    with dashboard.tensorboard(tmp_path) as base_url, pytest.raises(AssertionError, match="coactivation"):
        dashboard.check_dashboard(base_url)
