"""Lightning callbacks, one per file: scheduling, Monte-Carlo dropout, monitors and the
Concrete dropout regulariser."""

from lightning_dropout.callbacks.channel_drop_monitor import ChannelDropMonitor
from lightning_dropout.callbacks.coactivation_monitor import CoActivationMonitor
from lightning_dropout.callbacks.concrete_dropout_regularizer import ConcreteDropoutRegularizer
from lightning_dropout.callbacks.drop_rate_monitor import DropRateMonitor
from lightning_dropout.callbacks.dropout_scheduler import DropoutScheduler
from lightning_dropout.callbacks.mc_dropout import MCDropout
from lightning_dropout.callbacks.per_rank_dropout import PerRankDropout

__all__ = [
    "ChannelDropMonitor",
    "CoActivationMonitor",
    "ConcreteDropoutRegularizer",
    "DropRateMonitor",
    "DropoutScheduler",
    "MCDropout",
    "PerRankDropout",
]
