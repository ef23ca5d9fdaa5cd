"""Which modules belong to the dropout family, and how to read and set their rate.

"Dropout layers" throughout the package means this package's layers and torch's own
(``_DropoutNd`` subclasses: Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout).
Drop-path style modules (timm's DropPath, torchvision's StochasticDepth) expose their rate
as ``drop_prob`` or ``p``; :func:`rate_attribute` finds it so schedulers can drive them too.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from lightning_dropout._validation import check_probability
from lightning_dropout.layers.base import DropProbability
from lightning_dropout.layers.spatial import _ChannelDropout

TORCH_CHANNEL_DROPOUT = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout)


def is_dropout_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a dropout-family layer (this package's or torch's).

    Example:
        >>> is_dropout_layer(torch.nn.Dropout2d()), is_dropout_layer(torch.nn.ReLU())
        (True, False)
    """
    return isinstance(module, (DropProbability, _DropoutNd))


def is_channel_dropout_layer(module: nn.Module) -> bool:
    """Whether ``module`` drops whole channels (Dropout1d/2d/3d, ours or torch's).

    Example:
        >>> is_channel_dropout_layer(torch.nn.Dropout2d()), is_channel_dropout_layer(torch.nn.Dropout())
        (True, False)
    """
    return isinstance(module, (_ChannelDropout, *TORCH_CHANNEL_DROPOUT))


def rate_attribute(module: nn.Module) -> str | None:
    """The attribute holding ``module``'s drop probability, or None if it has none.

    ``"p"`` for dropout layers; ``"drop_prob"`` or ``"p"`` for drop-path style modules
    that store a float there.

    Example:
        >>> rate_attribute(torch.nn.Dropout()), rate_attribute(torch.nn.Linear(2, 2))
        ('p', None)
    """
    if is_dropout_layer(module):
        return "p"
    for name in ("drop_prob", "p"):
        value = getattr(module, name, None)
        if isinstance(value, float) and not isinstance(value, bool):
            return name
    return None


def get_rate(module: nn.Module) -> float:
    """The drop probability of ``module``.

    Raises:
        TypeError: ``module`` has no drop probability.

    Example:
        >>> get_rate(torch.nn.Dropout(0.3))
        0.3
    """
    name = rate_attribute(module)
    if name is None:
        raise TypeError(f"{type(module).__name__} has no drop probability")
    return float(getattr(module, name))


def set_rate(module: nn.Module, p: float) -> None:
    """Set the drop probability of ``module`` to ``p`` (validated).

    Raises:
        TypeError: ``module`` has no drop probability, or ``p`` is not a number.
        ValueError: ``p`` is NaN or outside [0, 1].

    Example:
        >>> layer = torch.nn.Dropout(0.5)
        >>> set_rate(layer, 0.1); layer.p
        0.1
    """
    name = rate_attribute(module)
    if name is None:
        raise TypeError(f"{type(module).__name__} has no drop probability")
    setattr(module, name, check_probability("p", p))
