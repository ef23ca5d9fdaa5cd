"""torchmetrics Metrics that make dropout's effects measurable, with their functional forms
(no Lightning import)."""

from lightning_dropout.metrics.channel_drop import ChannelDrop
from lightning_dropout.metrics.coactivation import CoActivation
from lightning_dropout.metrics.drop_rate import DropRate
from lightning_dropout.metrics.functional import channel_drop, co_activation, drop_rate
from lightning_dropout.metrics.sets import SetCoverage, SetSize
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
    "SetCoverage",
    "SetSize",
    "channel_drop",
    "co_activation",
    "drop_rate",
]
