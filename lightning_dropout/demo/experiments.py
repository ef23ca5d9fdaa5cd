"""The demo's runs: what each one trains and which callbacks watch it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import lightning.pytorch as pl

from lightning_dropout import schedules
from lightning_dropout.callbacks import (
    ChannelDropMonitor,
    CoActivationMonitor,
    DropoutScheduler,
    DropRateMonitor,
)
from lightning_dropout.demo.models import DigitsClassifier, DigitsCNN, DigitsMLP

MLP_P = 0.5
CNN_P = 0.2


@dataclass
class DemoConfig:
    """The demo's options (the console script's flags).

    Args:
        max_epochs: training epochs of each classifier.
        seeds: how many seeds each classifier is trained with (``seed``, ``seed + 1``, ...);
            each seed draws its own split, initialisation and dropout masks.
        seed: the first seed; the autoencoders use it.
        out: the output folder: TensorBoard logs, PNGs and ``report.md``.
        accelerator: Lightning's accelerator.
        devices: devices per run.
        width: hidden units per layer of the MLPs.
        train_size: training digits of the classifiers (200 more validate, the rest test).
        autoencoder_epochs: training epochs of each autoencoder.
        threads: torch's intra-op threads during the demo (its models are small: one thread
            is the fastest on a busy CPU).
    """

    max_epochs: int = 60
    seeds: int = 3
    seed: int = 0
    out: str = "runs"
    accelerator: str = "auto"
    devices: int | str = 1
    width: int = 1024
    train_size: int = 300
    autoencoder_epochs: int = 300
    threads: int = 1

    @property
    def seed_list(self) -> list[int]:
        """The classifiers' seeds."""
        return list(range(self.seed, self.seed + self.seeds))


def _coactivation() -> CoActivationMonitor:
    # The hidden units themselves (the ReLU outputs), so runs with and without dropout
    # share tags and TensorBoard draws them on the same charts.
    return CoActivationMonitor(modules=["net.relu1", "net.relu2"], max_units=64)


def _monitor_only() -> list[pl.Callback]:
    return [_coactivation()]


@dataclass
class Classifier:
    """One classifier of the comparison: its name, how to build it, its input kind, its callbacks."""

    name: str
    build: Callable[[], DigitsClassifier]
    images: bool
    callbacks: Callable[[], list[pl.Callback]] = _monitor_only


def classifiers(config: DemoConfig) -> list[Classifier]:
    """The compared classifiers. Models and callbacks are built per run, after seeding, so
    every run depends only on its seed."""

    def scheduled() -> list[pl.Callback]:
        # Dropout switched on gradually: from 0 to 0.5 over the first 30% of training
        # (a curriculum in the spirit of Morerio et al. 2017), then held.
        return [DropoutScheduler(schedules.Linear(0.0, MLP_P, steps=0.3)), _coactivation(), DropRateMonitor()]

    return [
        Classifier("mlp_no_dropout", lambda: DigitsMLP(width=config.width, p=0.0), False),
        Classifier("mlp_scheduled_dropout", lambda: DigitsMLP(width=config.width, p=MLP_P), False, scheduled),
        Classifier("cnn_no_dropout", lambda: DigitsCNN(p=0.0), True),
        Classifier(
            "cnn_element_dropout",
            lambda: DigitsCNN(p=CNN_P, dropout="element"),
            True,
            lambda: [_coactivation(), DropRateMonitor()],
        ),
        Classifier(
            "cnn_spatial_dropout",
            lambda: DigitsCNN(p=CNN_P, dropout="spatial"),
            True,
            lambda: [_coactivation(), ChannelDropMonitor(), DropRateMonitor()],
        ),
    ]
