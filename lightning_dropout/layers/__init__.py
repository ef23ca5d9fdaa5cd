"""Dropout-family layers in pure PyTorch (no Lightning import): a functional form
beside each module."""

from lightning_dropout.layers.base import DropoutBase, DropProbability
from lightning_dropout.layers.dropconnect import (
    DropConnectConv1d,
    DropConnectConv2d,
    DropConnectConv3d,
    DropConnectLayer,
    DropConnectLinear,
    drop_connect,
)
from lightning_dropout.layers.dropout import Dropout, dropout
from lightning_dropout.layers.gaussian import GaussianDropout, gaussian_dropout
from lightning_dropout.layers.registry import is_dropout_layer
from lightning_dropout.layers.spatial import Dropout1d, Dropout2d, Dropout3d, channel_dropout
from lightning_dropout.layers.weight_drop import DropConnect

__all__ = [
    "DropConnect",
    "DropConnectConv1d",
    "DropConnectConv2d",
    "DropConnectConv3d",
    "DropConnectLayer",
    "DropConnectLinear",
    "DropProbability",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "DropoutBase",
    "GaussianDropout",
    "channel_dropout",
    "drop_connect",
    "dropout",
    "gaussian_dropout",
    "is_dropout_layer",
]
