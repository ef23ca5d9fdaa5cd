"""torchmetrics Metrics that make dropout's effects measurable, with their functional forms
(no Lightning import).

Each measurement has one name: the Metric (``CoActivation``, ``ChannelDrop``,
``DropRate``), its functional form (``coactivation``, ``channel_drop``, ``drop_rate``),
the monitor that logs it and the first part of its TensorBoard tags
(``coactivation/...``, ``channel_drop/...``, ``dropout/.../realised``) say the same thing.
"""

from typing import Any

from lightning_dropout._deprecation import moved_name
from lightning_dropout.metrics.channel_drop import ChannelDrop
from lightning_dropout.metrics.coactivation import CoActivation
from lightning_dropout.metrics.drop_rate import DropRate
from lightning_dropout.metrics.functional import channel_drop, coactivation, drop_rate
from lightning_dropout.metrics.uncertainty import (
    BrierScore,
    GaussianNLL,
    IntervalCoverage,
    NegativeLogLikelihood,
    ReliabilityDiagram,
)

__all__ = [
    "BrierScore",
    "ChannelDrop",
    "CoActivation",
    "DropRate",
    "GaussianNLL",
    "IntervalCoverage",
    "NegativeLogLikelihood",
    "ReliabilityDiagram",
    "channel_drop",
    "coactivation",
    "drop_rate",
]


def __getattr__(name: str) -> Any:
    # Names that changed: they keep working, with one DeprecationWarning each.
    return moved_name(
        __name__, name, {"co_activation": ("lightning_dropout.metrics.coactivation", coactivation)}
    )
