"""Lightning callbacks, one per file: scheduling, Monte-Carlo dropout and monitors."""

from lightning_dropout.callbacks.dropout_scheduler import DropoutScheduler

__all__ = ["DropoutScheduler"]
