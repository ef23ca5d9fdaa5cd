"""The demo: dropout's effects, reproduced offline on scikit-learn's handwritten digits.

Three models are trained on the same split of the 1797 8x8 digits (real data bundled with
scikit-learn, no download): an over-sized MLP without dropout, the same MLP with dropout
whose probability is scheduled over training, and a small CNN with SpatialDropout. All the
monitors run, so TensorBoard shows co-adaptation, channel drops and realised drop rates.
At the end each model is measured on the test set the way Srivastava et al. (JMLR 2014,
Figure 8) did: test error, the co-adaptation index (mean |correlation| between the hidden
units), activation sparsity and mean activation per hidden layer, and the drop rate each
dropout layer actually realised.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dropout import schedules
from lightning_dropout.callbacks import (
    ChannelDropMonitor,
    CoActivationMonitor,
    DropoutScheduler,
    DropRateMonitor,
)
from lightning_dropout.layers import Dropout, Dropout2d, is_dropout_layer
from lightning_dropout.metrics import CoActivation
from lightning_dropout.mixin import DropoutMixin


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 handwritten digits as ``[N, 1, 8, 8]`` floats in [0, 1] and labels.

    Raises:
        ImportError: scikit-learn is missing (install ``lightning-dropout[demo]``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError("the demo needs scikit-learn: pip install 'lightning-dropout[demo]'") from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target, dtype=torch.long)


class DigitsDataModule(pl.LightningDataModule):
    """Train / validation / test split of the digits, fixed by ``seed``.

    Args:
        batch_size: samples per training batch.
        seed: the split's seed.
        flatten: serve ``[B, 64]`` vectors (MLPs) instead of ``[B, 1, 8, 8]`` images.
        train_size: samples in the training split (the paper's regime is a small training
            set for a large network); 300 are held out for validation, the rest is test.

    Example:
        >>> data = DigitsDataModule(flatten=True)
        >>> data.setup("fit")
        >>> next(iter(data.train_dataloader()))[0].shape
        torch.Size([64, 64])
    """

    def __init__(
        self, batch_size: int = 64, seed: int = 0, flatten: bool = False, train_size: int = 1000
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.flatten = flatten
        self.train_size = train_size
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        images, labels = load_digits_tensors()
        if self.flatten:
            images = images.flatten(1)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        bounds = {"train": (0, self.train_size), "val": (self.train_size, self.train_size + 300)}
        bounds["test"] = (self.train_size + 300, len(labels))
        for split, (start, stop) in bounds.items():
            index = order[start:stop]
            self.splits[split] = TensorDataset(images[index], labels[index])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=512)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=512)


class DigitsClassifier(DropoutMixin, pl.LightningModule):
    """Cross-entropy training, accuracy logging and Adam, shared by the demo's models."""

    net: nn.Sequential

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        inputs, targets = batch
        logits = self(inputs)
        loss = F.cross_entropy(logits, targets)
        accuracy = (logits.argmax(1) == targets).float().mean()
        self.log_dict({f"{stage}/loss": loss, f"{stage}/accuracy": accuracy}, prog_bar=stage == "val")
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def hidden_units(self) -> dict[str, nn.Module]:
        """The modules whose outputs are the hidden units (the ReLUs), by name."""
        return {name: m for name, m in self.net.named_children() if isinstance(m, nn.ReLU)}


class DigitsMLP(DigitsClassifier):
    """64 - width x depth - 10 ReLU MLP, with element dropout after each hidden layer if p > 0.

    Args:
        width: hidden units per layer.
        depth: hidden layers.
        p: dropout probability after each hidden layer; 0 builds no dropout layers.
        lr: Adam's learning rate.

    Example:
        >>> DigitsMLP(width=8, depth=1, p=0.5)(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(self, width: int = 1024, depth: int = 2, p: float = 0.0, lr: float = 1e-3) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        size = 64
        for i in range(1, depth + 1):
            layers[f"fc{i}"] = nn.Linear(size, width)
            layers[f"relu{i}"] = nn.ReLU()
            if p > 0:
                layers[f"drop{i}"] = Dropout(p)
            size = width
        layers["out"] = nn.Linear(size, 10)
        self.net = nn.Sequential(layers)


class DigitsCNN(DigitsClassifier):
    """Two 3x3 convolutions with SpatialDropout (Dropout2d) after each, then a linear head.

    Args:
        channels: channels of the two convolutions.
        p: channel dropout probability; 0 builds no dropout layers.
        lr: Adam's learning rate.

    Example:
        >>> DigitsCNN(channels=(4, 8), p=0.2)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, channels: tuple[int, int] = (16, 32), p: float = 0.2, lr: float = 1e-3) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        first, second = channels
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv1"] = nn.Conv2d(1, first, 3, padding=1)
        layers["relu1"] = nn.ReLU()
        if p > 0:
            layers["drop1"] = Dropout2d(p)
        layers["conv2"] = nn.Conv2d(first, second, 3, padding=1)
        layers["relu2"] = nn.ReLU()
        if p > 0:
            layers["drop2"] = Dropout2d(p)
        layers["pool"] = nn.MaxPool2d(2)
        layers["flatten"] = nn.Flatten()
        layers["out"] = nn.Linear(second * 16, 10)
        self.net = nn.Sequential(layers)


@dataclass
class LayerReport:
    """What the demo measured for one hidden layer on the test set."""

    name: str
    mean_abs_corr: float
    sparsity: float
    mean_activation: float
    p: float | None = None
    realised: float | None = None


@dataclass
class ModelReport:
    """What the demo measured for one model."""

    name: str
    test_error: float
    layers: list[LayerReport] = field(default_factory=list)


@torch.no_grad()
def measure(name: str, model: DigitsClassifier, data: DigitsDataModule) -> ModelReport:
    """Test error, co-adaptation, sparsity and mean activation per hidden layer, realised drop rates.

    Activations are measured in evaluation mode (the network as used at test time); the
    realised drop rate in training mode, as the fraction of each dropout layer's nonzero
    inputs that it zeroed, over the test set.
    """
    model.eval()
    inputs, targets = data.splits["test"].tensors
    inputs, targets = inputs.to(model.device), targets.to(model.device)
    units = model.hidden_units()
    captured: dict[str, Tensor] = {}
    handles = [m.register_forward_hook(_capture(captured, n)) for n, m in units.items()]
    try:
        error = float((model(inputs).argmax(1) != targets).float().mean())
    finally:
        for handle in handles:
            handle.remove()
    report = ModelReport(name, error)
    dropout_after = _dropout_after_units(model)
    realised = _realised_rates(model, inputs)
    for unit_name, acts in captured.items():
        stats = CoActivation(acts.shape[1]).to(acts.device)
        stats.update(acts)
        result = stats.compute()
        layer = LayerReport(
            unit_name,
            float(result["mean_abs_corr"]),
            float(result["sparsity"]),
            float(result["mean_activation"].mean()),
        )
        drop_name = dropout_after.get(unit_name)
        if drop_name is not None:
            layer.p = float(getattr(model.net, drop_name).p)
            layer.realised = realised[drop_name]
        report.layers.append(layer)
    return report


def _capture(store: dict[str, Tensor], name: str) -> Any:
    def hook(module: nn.Module, args: Any, output: Tensor) -> None:
        store[name] = output.detach()

    return hook


def _dropout_after_units(model: DigitsClassifier) -> dict[str, str]:
    names = [name for name, _ in model.net.named_children()]
    pairs = {}
    for unit, following in itertools.pairwise(names):
        if unit in model.hidden_units() and is_dropout_layer(getattr(model.net, following)):
            pairs[unit] = following
    return pairs


def _realised_rates(model: DigitsClassifier, inputs: Tensor) -> dict[str, float]:
    counts: dict[str, tuple[int, int]] = {}

    def counting(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            nonzero_in = args[0] != 0
            counts[name] = (int((nonzero_in & (output == 0)).sum()), int(nonzero_in.sum()))

        return hook

    layers = {n: m for n, m in model.net.named_children() if is_dropout_layer(m)}
    handles = [m.register_forward_hook(counting(n)) for n, m in layers.items()]
    try:
        model.train()
        model(inputs)
    finally:
        model.eval()
        for handle in handles:
            handle.remove()
    return {n: (dropped / total if total else math.nan) for n, (dropped, total) in counts.items()}


@dataclass
class DemoConfig:
    """The demo's options (the console script's flags)."""

    max_epochs: int = 40
    out: str = "runs"
    seed: int = 0
    accelerator: str = "auto"
    devices: int | str = 1
    width: int = 1024
    progress_bar: bool = True


def _trainer(config: DemoConfig, name: str, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=config.max_epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        logger=TensorBoardLogger(config.out, name=name, version=f"seed{config.seed}"),
        callbacks=callbacks,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=config.progress_bar,
        enable_model_summary=False,
    )


def _coactivation() -> CoActivationMonitor:
    # The hidden units themselves (the ReLU outputs), so the runs with and without
    # dropout share tags and TensorBoard draws them on the same charts.
    return CoActivationMonitor(layers=["net.relu1", "net.relu2"], max_units=64)


@dataclass
class Experiment:
    """One of the demo's runs: how to build its model, its input kind and its callbacks."""

    name: str
    build: Callable[[], DigitsClassifier]
    images: bool
    callbacks: list[pl.Callback]


def experiments(config: DemoConfig) -> list[Experiment]:
    """The demo's runs. Models are built by ``run_demo`` after seeding, so that every
    model's initialisation, the first one's included, depends only on ``config.seed``."""
    # Dropout switched on gradually: from 0 to 0.5 over the first 30% of training
    # (a curriculum in the spirit of Morerio et al. 2017), then held.
    scheduler = DropoutScheduler(schedules.Linear(0.0, 0.5, steps=0.3))
    return [
        Experiment("mlp_no_dropout", lambda: DigitsMLP(width=config.width, p=0.0), False, [_coactivation()]),
        Experiment(
            "mlp_scheduled_dropout",
            lambda: DigitsMLP(width=config.width, p=0.5),
            False,
            [scheduler, _coactivation(), DropRateMonitor()],
        ),
        Experiment(
            "cnn_spatial_dropout",
            lambda: DigitsCNN(p=0.2),
            True,
            [_coactivation(), ChannelDropMonitor(), DropRateMonitor()],
        ),
    ]


def run_demo(config: DemoConfig) -> list[ModelReport]:
    """Train every experiment, measure it, and return the reports (printing is the caller's)."""
    reports = []
    for experiment in experiments(config):
        pl.seed_everything(config.seed, verbose=False)
        model = experiment.build()
        data = DigitsDataModule(seed=config.seed, flatten=not experiment.images)
        trainer = _trainer(config, experiment.name, experiment.callbacks)
        trainer.fit(model, datamodule=data)
        if trainer.is_global_zero:
            reports.append(measure(experiment.name, model, data))
    return reports


def format_table(reports: list[ModelReport]) -> str:
    """The comparison table, one row per hidden layer, as GitHub markdown."""
    header = (
        "| model | test error | hidden layer | mean abs corr | sparsity | mean activation | p "
        "| realised drop |\n|---|---|---|---|---|---|---|---|"
    )
    rows = [header]
    for report in reports:
        for i, layer in enumerate(report.layers):
            p = "-" if layer.p is None else f"{layer.p:.2f}"
            realised = "-" if layer.realised is None else f"{layer.realised:.3f}"
            error = f"{report.test_error:.3f}" if i == 0 else ""
            name = report.name if i == 0 else ""
            rows.append(
                f"| {name} | {error} | {layer.name} | {layer.mean_abs_corr:.3f} | {layer.sparsity:.3f} "
                f"| {layer.mean_activation:.3f} | {p} | {realised} |"
            )
    return "\n".join(rows)


def tensorboard_command(out: str) -> str:
    """The exact command that opens the demo's dashboard (the tensorboard beside this
    Python, so it works from the demo's virtual environment without activating it)."""
    beside = Path(sys.executable).parent / "tensorboard"
    program = str(beside) if beside.exists() else "tensorboard"
    return f"{program} --logdir {Path(out).resolve()} --host 127.0.0.1 --port 6006"
