"""Srivastava et al.'s Figures 7 and 8 on the digits: autoencoders with and without dropout.

One hidden layer of 256 ReLUs between the 64 pixels and their reconstruction, dropout
(p = 0.5) on the hidden units or none. Figure 7 is the units' features (their weights, as
8x8 images); Figure 8 the histograms of the units' mean activations and of all
activations on held-out digits, in evaluation mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import numpy
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from lightning_dropout.demo.figures import feature_grid
from lightning_dropout.demo.measure import unit_stats
from lightning_dropout.layers import Dropout
from lightning_dropout.mixin import DropoutMixin


class DigitsAutoencoder(DropoutMixin, pl.LightningModule):
    """64 pixels -> ``hidden`` ReLUs (dropout ``p`` on them) -> 64 reconstructed pixels.

    The weights are tied: the decoder is the encoder's transpose, so a unit's feature is
    both what it detects and what it draws. Pixels in [0, 1] are reconstructed through a
    sigmoid with binary cross-entropy.

    Args:
        hidden: hidden ReLUs.
        p: dropout probability on the hidden units; 0 builds no dropout layer.
        lr: Adam's learning rate.

    Example:
        >>> model = DigitsAutoencoder(hidden=16, p=0.5)
        >>> model(torch.zeros(2, 64)).shape, model.features().shape
        (torch.Size([2, 64]), torch.Size([16, 64]))
    """

    def __init__(self, hidden: int = 256, p: float = 0.0, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.encoder = nn.Linear(64, hidden)
        self.relu = nn.ReLU()
        self.drop = Dropout(p) if p > 0 else nn.Identity()
        self.decoder_bias = nn.Parameter(torch.zeros(64))
        # Small weights, as in the autoencoders of the time: pixels the data never lights
        # keep their initial weights, which would otherwise be noise of the learnt size.
        nn.init.normal_(self.encoder.weight, std=0.01)
        nn.init.constant_(self.encoder.bias, 0.1)

    def hidden_units(self, x: Tensor) -> Tensor:
        """The ReLU activations (before dropout) of ``[B, 64]`` pixels."""
        return self.relu(self.encoder(x))

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction logits of ``[B, 64]`` pixels."""
        return F.linear(self.drop(self.hidden_units(x)), self.encoder.weight.t(), self.decoder_bias)

    def features(self) -> Tensor:
        """``[hidden, 64]``: each unit's weights on the 64 pixels."""
        return self.encoder.weight.detach()

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        pixels = batch[0]
        loss = F.binary_cross_entropy_with_logits(self(pixels), pixels)
        self.log(f"{stage}/loss", loss)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@dataclass
class AutoencoderResult:
    """A trained autoencoder measured on held-out digits in evaluation mode."""

    model: str
    seed: int
    p: float
    test_loss: float
    features: Tensor
    mean_activation: Tensor
    activations: Tensor
    sparsity: float
    mean_abs_corr: float

    @property
    def dead_units(self) -> int:
        """Units that never fire on the held-out digits."""
        return int((self.mean_activation == 0).sum())

    @property
    def peak_share(self) -> float:
        """How local the live units' features are: the median, over units that fire, of
        the share of a feature's squared weights on its strongest pixel (1 for a single
        pixel, 1/64 for a feature spread evenly)."""
        squares = self.features[self.mean_activation > 0].square()
        return float((squares.amax(1) / squares.sum(1).clamp_min(1e-30)).median())


@torch.no_grad()
def measure_autoencoder(name: str, seed: int, model: DigitsAutoencoder, pixels: Tensor) -> AutoencoderResult:
    """Reconstruction loss, features and activation statistics on held-out ``pixels``."""
    model.eval()
    pixels = pixels.to(model.device)
    acts = model.hidden_units(pixels)
    stats = unit_stats(acts)
    return AutoencoderResult(
        model=name,
        seed=seed,
        p=float(model.hparams["p"]),
        test_loss=float(F.binary_cross_entropy_with_logits(model(pixels), pixels)),
        features=model.features().cpu(),
        mean_activation=acts.mean(0).cpu(),
        activations=acts.flatten().cpu(),
        sparsity=float(stats["sparsity"]),
        mean_abs_corr=float(stats["mean_abs_corr"]),
    )


class FigureLogger(pl.Callback):
    """Log Figure 7 (image ``figure7/features``) and Figure 8 (histograms
    ``figure8/mean_activation`` and ``figure8/activation``) to TensorBoard during training.

    Args:
        pixels: held-out ``[N, 64]`` digits the histograms are measured on.
        every_n_epochs: log after every this many epochs, and after the last.
    """

    def __init__(self, pixels: Tensor, every_n_epochs: int = 10) -> None:
        self.pixels = pixels
        self.every_n_epochs = every_n_epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs and epoch != trainer.max_epochs:
            return
        if not isinstance(pl_module, DigitsAutoencoder):
            raise TypeError(f"FigureLogger needs a DigitsAutoencoder, got {type(pl_module).__name__}")
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            acts = pl_module.hidden_units(self.pixels.to(pl_module.device)).cpu()
        pl_module.train(was_training)
        grid = numpy.asarray(feature_grid(pl_module.features(), alive=acts.amax(0) > 0))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                writer.add_image("figure7/features", grid, trainer.global_step, dataformats="HW")
                writer.add_histogram("figure8/mean_activation", acts.mean(0), trainer.global_step)
                writer.add_histogram("figure8/activation", acts.flatten(), trainer.global_step)
