"""Dropout-family layers in pure PyTorch (no Lightning import): a functional form
beside each module. Every function takes ``p`` as a float or a 0-d tensor (see
:mod:`lightning_dropout.layers.common`), and each module's ``forward`` is one call of its
function."""

from lightning_dropout.layers.base import DropCounter, DropoutBase, DropProbability, WeightMaskLayer
from lightning_dropout.layers.concrete import ConcreteDropout, concrete_dropout
from lightning_dropout.layers.drop_block import DropBlock2d, drop_block_2d
from lightning_dropout.layers.drop_connect import DropConnect, drop_connect
from lightning_dropout.layers.drop_connect_layers import (
    DropConnectConv1d,
    DropConnectConv2d,
    DropConnectConv3d,
    DropConnectLayer,
    DropConnectLinear,
)
from lightning_dropout.layers.drop_path import DropPath, drop_path, drop_path_rates, drop_path_residual
from lightning_dropout.layers.dropout import Dropout, dropout
from lightning_dropout.layers.embedding import EmbeddingDropout, embedding_dropout
from lightning_dropout.layers.gaussian import GaussianDropout, gaussian_dropout
from lightning_dropout.layers.locked import LockedDropout, locked_dropout
from lightning_dropout.layers.registry import is_dropout_layer
from lightning_dropout.layers.spatial import ChannelDropout, Dropout1d, Dropout2d, Dropout3d, channel_dropout

__all__ = [
    "ChannelDropout",
    "ConcreteDropout",
    "DropBlock2d",
    "DropConnect",
    "DropConnectConv1d",
    "DropConnectConv2d",
    "DropConnectConv3d",
    "DropConnectLayer",
    "DropConnectLinear",
    "DropCounter",
    "DropPath",
    "DropProbability",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "DropoutBase",
    "EmbeddingDropout",
    "GaussianDropout",
    "LockedDropout",
    "WeightMaskLayer",
    "channel_dropout",
    "concrete_dropout",
    "drop_block_2d",
    "drop_connect",
    "drop_path",
    "drop_path_rates",
    "drop_path_residual",
    "dropout",
    "embedding_dropout",
    "gaussian_dropout",
    "is_dropout_layer",
    "locked_dropout",
]
