"""Lightning callbacks, one per file."""

from lightning_dropout.callbacks.channel_drop_monitor import ChannelDropMonitor
from lightning_dropout.callbacks.coactivation_monitor import CoActivationMonitor
from lightning_dropout.callbacks.drop_rate_monitor import DropRateMonitor

__all__ = ["ChannelDropMonitor", "CoActivationMonitor", "DropRateMonitor"]
