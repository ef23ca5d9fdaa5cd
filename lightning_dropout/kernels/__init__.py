"""Fast paths for the layers' training-mode work, chosen per tensor.

The layers call only the functions below; each picks the fastest implementation that
exists for the input's device and falls back to :mod:`.reference`, the exact PyTorch
definition. Every implementation draws from torch's generators, so ``torch.manual_seed``
reproduces masks whichever path runs. Nothing here validates arguments: the layers do.
"""

from __future__ import annotations

from torch import Tensor

from lightning_dropout.kernels import cpu, reference

__all__ = ["channel_dropout", "dropout", "gaussian_dropout"]

# Below this many elements the CPU path's fixed cost (a dozen small ops) exceeds what it
# saves over bernoulli_ and torch.where.
CPU_MIN_NUMEL = 4096


def _cpu_fast(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.numel() >= CPU_MIN_NUMEL


def dropout(x: Tensor, p: float, scale: float, inplace: bool = False) -> Tensor:
    """Keep each element with probability ``1 - p`` and multiply kept ones by ``scale``."""
    if _cpu_fast(x):
        return cpu.dropout(x, p, scale, inplace)
    return reference.dropout(x, p, scale, inplace)


def channel_dropout(x: Tensor, p: float, scale: float, inplace: bool = False) -> Tensor:
    """Keep each (sample, channel) of a batched (N, C, *spatial) input w.p. ``1 - p``."""
    if _cpu_fast(x):
        return cpu.channel_dropout(x, p, scale, inplace)
    return reference.channel_dropout(x, p, scale, inplace)


def gaussian_dropout(x: Tensor, sigma: float) -> Tensor:
    """Multiply ``x`` elementwise by independent N(1, sigma^2) noise."""
    return reference.gaussian_dropout(x, sigma)
