"""The demo's classifiers: MLP and CNN on the 28x28 MNIST digits (the demo), and on the 8x8
digits (the small examples)."""

from __future__ import annotations

from collections import OrderedDict

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dropout._validation import check_choice, check_positive, check_positive_int, check_probability
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


class MnistClassifier(DropoutMixin, pl.LightningModule):
    """Cross-entropy training with Adam, shared by the demo's MNIST classifiers.

    Nothing is logged per step: :class:`~lightning_dropout.demo.measure.EpochCurves` measures
    the whole training and test splits once per epoch, in evaluation mode.
    """

    net: nn.Sequential

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = check_positive("lr", lr)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        return F.cross_entropy(self(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class MnistMLP(MnistClassifier):
    """784 - 512 - 512 - 10 ReLU MLP with dropout on the pixels and after each hidden layer.

    Srivastava et al.'s (JMLR 2014) MNIST regime: input dropout ``input_p`` (0.2 there),
    hidden dropout ``hidden_p`` (0.5). Both 0 builds no dropout layers.

    Args:
        input_p: dropout probability on the 784 pixels (``net.drop_in``).
        hidden_p: dropout probability after each hidden ReLU (``net.drop1``, ``net.drop2``).
        width: hidden units per layer.
        lr: Adam's learning rate.

    Raises:
        ValueError: a probability outside [0, 1), or a width or lr below what is allowed.

    Example:
        >>> model = MnistMLP(input_p=0.2, hidden_p=0.5, width=8)
        >>> model(torch.zeros(2, 784)).shape, sorted(model.dropout_p().values())
        (torch.Size([2, 10]), [0.2, 0.5, 0.5])
    """

    def __init__(
        self, input_p: float = 0.0, hidden_p: float = 0.0, width: int = 512, lr: float = 1e-3
    ) -> None:
        super().__init__(lr)
        check_probability("input_p", input_p)
        check_probability("hidden_p", hidden_p)
        check_positive_int("width", width)
        self.save_hyperparameters()
        dropout = input_p > 0 or hidden_p > 0
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if dropout:
            layers["drop_in"] = Dropout(input_p)
        size = 784
        for i in (1, 2):
            layers[f"fc{i}"] = nn.Linear(size, width)
            layers[f"relu{i}"] = nn.ReLU()
            if dropout:
                layers[f"drop{i}"] = Dropout(hidden_p)
            size = width
        layers["out"] = nn.Linear(size, 10)
        self.net = nn.Sequential(layers)


class MnistCNN(MnistClassifier):
    """A small CNN on 28x28 digits, with element dropout or SpatialDropout on its 28x28 maps.

    ``conv1`` (3x3, ``channels`` maps of 28x28) -> ReLU -> dropout -> 2x2 max-pool ->
    ``conv2`` (3x3, twice the channels, 14x14) -> ReLU -> 2x2 max-pool -> linear head.
    Dropout sits only on the full-resolution maps, where neighbouring activations are most
    alike: Tompson et al. (CVPR 2015) argue that element dropout barely regularizes there,
    since a dropped pixel's neighbours carry the same information, and drop whole channels
    instead (SpatialDropout, ``Dropout2d``).

    Args:
        p: dropout probability; 0 builds no dropout layer.
        dropout: ``"spatial"`` (whole channels) or ``"element"`` (single activations).
        channels: maps of the first convolution.
        lr: Adam's learning rate.

    Raises:
        ValueError: ``dropout`` is neither ``"spatial"`` nor ``"element"``, or a bad ``p``.

    Example:
        >>> MnistCNN(p=0.2, dropout="spatial", channels=4)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, p: float = 0.0, dropout: str = "spatial", channels: int = 16, lr: float = 1e-3
    ) -> None:
        super().__init__(lr)
        check_probability("p", p)
        check_choice("dropout", dropout, CNN_DROPOUT_KINDS)
        check_positive_int("channels", channels)
        self.save_hyperparameters()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv1"] = nn.Conv2d(1, channels, 3, padding=1)
        layers["relu1"] = nn.ReLU()
        if p > 0:
            layers["drop1"] = Dropout2d(p) if dropout == "spatial" else Dropout(p)
        layers["pool1"] = nn.MaxPool2d(2)
        layers["conv2"] = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        layers["relu2"] = nn.ReLU()
        layers["pool2"] = nn.MaxPool2d(2)
        layers["flatten"] = nn.Flatten()
        layers["out"] = nn.Linear(2 * channels * 49, 10)
        self.net = nn.Sequential(layers)
