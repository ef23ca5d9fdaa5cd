"""Lightning callbacks, one per file."""

from lightning_dropout.callbacks.per_rank_dropout import PerRankDropout

__all__ = ["PerRankDropout"]
