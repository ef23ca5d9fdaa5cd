"""Lightning callbacks, one per file: scheduling, Monte-Carlo dropout and monitors."""

from lightning_dropout.callbacks.dropout_scheduler import DropoutScheduler
from lightning_dropout.callbacks.mc_dropout import MCDropout

__all__ = ["DropoutScheduler", "MCDropout"]
