"""lightning-dropout: the dropout family of regularizers for PyTorch Lightning.

Layers (pure PyTorch), schedules, Monte-Carlo inference, torchmetrics metrics and
Lightning callbacks; see the README for the tour. The callbacks a Trainer takes are in
:mod:`lightning_dropout.callbacks`, the per-rank streams in
:mod:`lightning_dropout.random_streams`; nothing is exported twice.
"""

from typing import Any

from lightning_dropout import random_streams, schedules
from lightning_dropout._deprecation import moved_name
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
    "__version__",
    "schedules",
]


def __getattr__(name: str) -> Any:
    # Names that moved: they keep working, with one DeprecationWarning each.
    return moved_name(
        __name__,
        name,
        {"RankStreams": ("lightning_dropout.random_streams.RankStreams", random_streams.RankStreams)},
    )
