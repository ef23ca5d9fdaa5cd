"""lightning-dropout: the dropout family of regularizers for PyTorch Lightning.

Layers (pure PyTorch), schedules, Monte-Carlo inference, torchmetrics metrics and
Lightning callbacks; see the README for the tour.
"""

from lightning_dropout import schedules
from lightning_dropout.layers import (
    ConcreteDropout,
    DropBlock2d,
    DropConnect,
    DropConnectConv1d,
    DropConnectConv2d,
    DropConnectConv3d,
    DropConnectLinear,
    Dropout,
    Dropout1d,
    Dropout2d,
    Dropout3d,
    DropPath,
    EmbeddingDropout,
    GaussianDropout,
    LockedDropout,
)
from lightning_dropout.mc import MCOutput
from lightning_dropout.mixin import DropoutMixin
from lightning_dropout.random_streams import RankStreams

__version__ = "0.1.0"

__all__ = [
    "ConcreteDropout",
    "DropBlock2d",
    "DropConnect",
    "DropConnectConv1d",
    "DropConnectConv2d",
    "DropConnectConv3d",
    "DropConnectLinear",
    "DropPath",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "DropoutMixin",
    "EmbeddingDropout",
    "GaussianDropout",
    "LockedDropout",
    "MCOutput",
    "RankStreams",
    "__version__",
    "schedules",
]
