"""Lightning callbacks, one per file: scheduling, Monte-Carlo dropout and monitors."""

from lightning_dropout.callbacks.dropout_scheduler import DropoutScheduler
from lightning_dropout.callbacks.mc_dropout import MCDropout
from lightning_dropout.callbacks.per_rank_dropout import PerRankDropout

__all__ = ["DropoutScheduler", "MCDropout", "PerRankDropout"]
