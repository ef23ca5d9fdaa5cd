"""Srivastava et al.'s Figures 7 and 8 on MNIST: autoencoders without and with dropout.

One hidden layer of 256 ReLUs between the 784 pixels and their reconstruction (sigmoid
output, binary cross-entropy), dropout p = 0.5 on the hidden units or none. Figure 7 is
the decoder's features (each hidden unit's outgoing weights as a 28x28 image); Figure 8
the histograms of the units' mean activations and of all activations on held-out digits,
in evaluation mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import numpy
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from lightning_dropout._validation import check_positive, check_positive_int, check_probability
from lightning_dropout.demo.figures import feature_grid
from lightning_dropout.demo.measure import lag1_autocorrelation, top_energy_share
from lightning_dropout.layers import Dropout
from lightning_dropout.mixin import DropoutMixin

PIXELS = 784


class MnistAutoencoder(DropoutMixin, pl.LightningModule):
    """784 pixels -> ``hidden`` ReLUs (dropout ``p`` on them) -> 784 reconstructed pixels.

    Encoder and decoder have their own weights; a unit's feature is its column of the
    decoder, what it draws into the reconstruction. Pixels in [0, 1] are reconstructed
    through a sigmoid with binary cross-entropy.

    Args:
        hidden: hidden ReLUs.
        p: dropout probability on the hidden units; 0 builds no dropout layer.
        lr: Adam's learning rate.

    Raises:
        ValueError: a bad ``hidden``, ``p`` or ``lr``.

    Example:
        >>> model = MnistAutoencoder(hidden=16, p=0.5)
        >>> model(torch.zeros(2, 784)).shape, model.features().shape
        (torch.Size([2, 784]), torch.Size([16, 784]))
    """

    def __init__(self, hidden: int = 256, p: float = 0.0, lr: float = 1e-3) -> None:
        super().__init__()
        check_positive_int("hidden", hidden)
        check_probability("p", p)
        self.lr = check_positive("lr", lr)
        self.save_hyperparameters()
        self.encoder = nn.Linear(PIXELS, hidden)
        self.relu = nn.ReLU()
        self.drop = Dropout(p) if p > 0 else nn.Identity()
        self.decoder = nn.Linear(hidden, PIXELS)

    def hidden_units(self, x: Tensor) -> Tensor:
        """The ReLU activations (before dropout) of ``[B, 784]`` pixels."""
        return self.relu(self.encoder(x))

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction logits of ``[B, 784]`` pixels."""
        return self.decoder(self.drop(self.hidden_units(x)))

    def features(self) -> Tensor:
        """``[hidden, 784]``: each unit's decoder weights, the stroke it draws."""
        return self.decoder.weight.detach().t()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        pixels = batch[0]
        loss = F.binary_cross_entropy_with_logits(self(pixels), pixels)
        self.log("train/bce", loss * PIXELS, on_step=False, on_epoch=True)  # nats per digit
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@dataclass
class AutoencoderResult:
    """A trained autoencoder measured on held-out digits in evaluation mode.

    ``features`` are all units' decoder features, ``live`` marks the units that fire on
    at least one held-out digit; the feature measures are averages over live units.
    """

    model: str
    seed: int
    p: float
    test_bce: float
    features: Tensor
    live: Tensor
    mean_activations: Tensor
    activations: Tensor
    zero_fraction: float
    decoder_smoothness: float
    top5_energy: float

    @property
    def dead_units(self) -> int:
        """Units that never fire on the held-out digits."""
        return int((~self.live).sum())

    @property
    def mean_activation(self) -> float:
        """The mean hidden activation over units and held-out digits."""
        return float(self.mean_activations.mean())

    def metrics(self) -> dict[str, float | int]:
        """The numbers ``results.json`` keeps for this run."""
        return {
            "decoder_smoothness": self.decoder_smoothness,
            "top5_energy": self.top5_energy,
            "mean_activation": self.mean_activation,
            "zero_fraction": self.zero_fraction,
            "dead_units": self.dead_units,
            "test_bce": self.test_bce,
        }


@torch.no_grad()
def measure_autoencoder(name: str, seed: int, model: MnistAutoencoder, pixels: Tensor) -> AutoencoderResult:
    """Reconstruction loss (nats per digit), activation statistics and the live units'
    feature measures on held-out ``[N, 784]`` pixels, in evaluation mode."""
    model.eval()
    pixels = pixels.to(model.device)
    acts = model.hidden_units(pixels)
    live = (acts.amax(0) > 0).cpu()
    features = model.features().cpu()
    filters = features[live].reshape(-1, 28, 28)
    bce = F.binary_cross_entropy_with_logits(model(pixels), pixels, reduction="sum") / len(pixels)
    return AutoencoderResult(
        model=name,
        seed=seed,
        p=float(model.hparams["p"]),
        test_bce=float(bce),
        features=features,
        live=live,
        mean_activations=acts.mean(0).cpu(),
        activations=acts.flatten().cpu(),
        zero_fraction=float((acts == 0).float().mean()),
        decoder_smoothness=float(lag1_autocorrelation(filters).mean()),
        top5_energy=float(top_energy_share(filters).mean()),
    )


class FigureLogger(pl.Callback):
    """Log Figure 7 (image ``figure7/features``: the live units' decoder features) and
    Figure 8 (histograms ``figure8/mean_activation`` and ``figure8/activation``) to
    TensorBoard during training.

    Args:
        pixels: held-out ``[N, 784]`` digits the histograms are measured on.
        every_n_epochs: log after every this many epochs, and after the last.
        units: how many live units Figure 7 shows.

    Raises:
        ValueError: ``every_n_epochs`` or ``units`` below 1.
    """

    def __init__(self, pixels: Tensor, every_n_epochs: int = 10, units: int = 100) -> None:
        self.pixels = pixels
        self.every_n_epochs = check_positive_int("every_n_epochs", every_n_epochs)
        self.units = check_positive_int("units", units)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs and epoch != trainer.max_epochs:
            return
        if not isinstance(pl_module, MnistAutoencoder):
            raise TypeError(f"FigureLogger needs a MnistAutoencoder, got {type(pl_module).__name__}")
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            acts = pl_module.hidden_units(self.pixels.to(pl_module.device)).cpu()
        pl_module.train(was_training)
        live = pl_module.features().cpu()[acts.amax(0) > 0][: self.units]
        grid = numpy.asarray(feature_grid(live, side=28, zoom=2))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                writer.add_image("figure7/features", grid, trainer.global_step, dataformats="HW")
                writer.add_histogram("figure8/mean_activation", acts.mean(0), trainer.global_step)
                writer.add_histogram("figure8/activation", acts.flatten(), trainer.global_step)
