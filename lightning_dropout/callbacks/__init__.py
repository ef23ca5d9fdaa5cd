"""Lightning callbacks, one per file."""

from lightning_dropout.callbacks.mc_dropout import MCDropout

__all__ = ["MCDropout"]
