"""Fast paths for the layers' training-mode work, chosen per tensor.

The layers call only the functions below; each picks the fastest implementation that
exists for the input's device and falls back to :mod:`.reference`, the exact PyTorch
definition. Every implementation draws from torch's generators, so ``torch.manual_seed``
reproduces masks whichever path runs. Nothing here validates arguments: the layers do.
"""

from __future__ import annotations

from torch import Tensor

from lightning_dropout.kernels import reference

__all__ = ["channel_dropout", "dropout", "gaussian_dropout"]


def dropout(x: Tensor, p: float, scale: float, inplace: bool = False) -> Tensor:
    """Keep each element with probability ``1 - p`` and multiply kept ones by ``scale``."""
    return reference.dropout(x, p, scale, inplace)


def channel_dropout(x: Tensor, p: float, scale: float, inplace: bool = False) -> Tensor:
    """Keep each (sample, channel) of a batched (N, C, *spatial) input w.p. ``1 - p``."""
    return reference.channel_dropout(x, p, scale, inplace)


def gaussian_dropout(x: Tensor, sigma: float) -> Tensor:
    """Multiply ``x`` elementwise by independent N(1, sigma^2) noise."""
    return reference.gaussian_dropout(x, sigma)
