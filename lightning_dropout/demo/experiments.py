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
from lightning_dropout.demo.models import MnistClassifier, MnistCNN, MnistMLP

INPUT_P = 0.2
HIDDEN_P = 0.5
CNN_P = 0.2
RAMP = 0.25  # the scheduled model reaches its rates after this fraction of training


@dataclass
class DemoConfig:
    """The demo's options (the console script's flags).

    Args:
        max_epochs: training epochs of each classifier.
        seeds: how many seeds each classifier is trained with (``seed``, ``seed + 1``, ...);
            each seed draws its own stratified split, initialisation and dropout masks.
        seed: the first seed; the autoencoders use it.
        out: the output folder: TensorBoard logs, PNGs, ``results.json`` and ``report.md``.
        train_size: training digits of the classifiers.
        test_size: test digits of the classifiers.
        autoencoder_epochs: training epochs of each autoencoder.
        autoencoder_digits: training digits of the autoencoders (1,000 others are held out).
        cnn: also compare CNNs with element dropout and SpatialDropout.
        threads: torch's intra-op threads during the demo.
        accelerator: Lightning's accelerator.
        devices: devices per run.
    """

    max_epochs: int = 30
    seeds: int = 5
    seed: int = 0
    out: str = "runs"
    train_size: int = 2000
    test_size: int = 3000
    autoencoder_epochs: int = 20
    autoencoder_digits: int = 4000
    cnn: bool = False
    threads: int = 1
    accelerator: str = "auto"
    devices: int | str = 1

    @property
    def seed_list(self) -> list[int]:
        """The classifiers' seeds."""
        return list(range(self.seed, self.seed + self.seeds))


def _no_callbacks() -> list[pl.Callback]:
    return []


@dataclass
class Classifier:
    """One classifier of the comparison: its name, how to build it, its input kind, its callbacks."""

    name: str
    build: Callable[[], MnistClassifier]
    images: bool
    callbacks: Callable[[], list[pl.Callback]] = _no_callbacks


def _dropout_dashboard() -> list[pl.Callback]:
    return [
        DropRateMonitor(),
        CoActivationMonitor(sites=["net.drop1", "net.drop2"], every_n_steps=16, max_units=64),
    ]


def _scheduled() -> list[pl.Callback]:
    # Curriculum dropout (Morerio et al., ICCV 2017): the rates rise linearly from 0 over
    # the first quarter of training, then hold at Srivastava et al.'s 0.2 and 0.5.
    ramp: dict[str, schedules.Schedule] = {
        "net.drop_in": schedules.Linear(0.0, INPUT_P, steps=RAMP),
        "net.drop?": schedules.Linear(0.0, HIDDEN_P, steps=RAMP),
    }
    return [DropoutScheduler(ramp), *_dropout_dashboard()]


def classifiers(config: DemoConfig) -> list[Classifier]:
    """The compared classifiers. Models and callbacks are built per run, after seeding, so
    every run depends only on its seed."""
    runs = [
        Classifier("mlp_no_dropout", MnistMLP, False),
        Classifier("mlp_dropout", lambda: MnistMLP(INPUT_P, HIDDEN_P), False, _dropout_dashboard),
        Classifier("mlp_scheduled_dropout", lambda: MnistMLP(INPUT_P, HIDDEN_P), False, _scheduled),
    ]
    if config.cnn:
        runs += [
            Classifier("cnn_no_dropout", MnistCNN, True),
            Classifier(
                "cnn_element_dropout", lambda: MnistCNN(CNN_P, "element"), True, lambda: [DropRateMonitor()]
            ),
            Classifier(
                "cnn_spatial_dropout",
                lambda: MnistCNN(CNN_P, "spatial"),
                True,
                lambda: [DropRateMonitor(), ChannelDropMonitor()],
            ),
        ]
    return runs
