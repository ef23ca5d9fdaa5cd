"""Which modules are dropout layers: this package's and torch's own.

"Dropout layers" throughout the package means this package's layers and torch's own
(``_DropoutNd`` subclasses: Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout).
Every other place a model drops (timm's drop-path modules, rates read in a forward,
attention dropout) is a dropout *site*: see :mod:`lightning_dropout.sites`.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from lightning_dropout.layers.base import DropProbability


def is_dropout_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a dropout-family layer (this package's or torch's).

    Example:
        >>> is_dropout_layer(torch.nn.Dropout2d()), is_dropout_layer(torch.nn.ReLU())
        (True, False)
    """
    return isinstance(module, (DropProbability, _DropoutNd))
