"""The demo's models: digit classifiers (MLP, CNN) and the autoencoder of Figures 7 and 8."""

from __future__ import annotations

from collections import OrderedDict

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dropout.layers import Dropout, Dropout2d
from lightning_dropout.mixin import DropoutMixin

CNN_DROPOUT_KINDS = ("spatial", "element")


class DigitsClassifier(DropoutMixin, pl.LightningModule):
    """Cross-entropy training, accuracy logging and Adam, shared by the demo's classifiers."""

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
    """Two 3x3 convolutions, each followed by dropout if p > 0, then a linear head.

    Args:
        channels: channels of the two convolutions.
        p: dropout probability; 0 builds no dropout layers.
        lr: Adam's learning rate.
        dropout: ``"spatial"`` drops whole channels (SpatialDropout, ``Dropout2d``;
            Tompson et al. 2015), ``"element"`` drops single activations (``Dropout``).

    Raises:
        ValueError: ``dropout`` is neither ``"spatial"`` nor ``"element"``.

    Example:
        >>> DigitsCNN(channels=(4, 8), p=0.2)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> DigitsCNN(channels=(4, 8), p=0.2, dropout="element").net.drop1
        Dropout(p=0.2, inplace=False, inverted=True)
    """

    def __init__(
        self, channels: tuple[int, int] = (16, 32), p: float = 0.2, lr: float = 1e-3, dropout: str = "spatial"
    ) -> None:
        super().__init__(lr)
        if dropout not in CNN_DROPOUT_KINDS:
            raise ValueError(f"dropout must be one of {CNN_DROPOUT_KINDS}, got {dropout!r}")
        self.save_hyperparameters()
        drop = Dropout2d if dropout == "spatial" else Dropout
        first, second = channels
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv1"] = nn.Conv2d(1, first, 3, padding=1)
        layers["relu1"] = nn.ReLU()
        if p > 0:
            layers["drop1"] = drop(p)
        layers["conv2"] = nn.Conv2d(first, second, 3, padding=1)
        layers["relu2"] = nn.ReLU()
        if p > 0:
            layers["drop2"] = drop(p)
        layers["pool"] = nn.MaxPool2d(2)
        layers["flatten"] = nn.Flatten()
        layers["out"] = nn.Linear(second * 16, 10)
        self.net = nn.Sequential(layers)
