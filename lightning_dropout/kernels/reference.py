"""The exact PyTorch path: the definition every fast path is tested against.

Masks are drawn with ``bernoulli_`` from torch's global generator (the stream of the
tensor's device), so ``torch.manual_seed`` reproduces them. Dropped entries are produced
with ``torch.where`` rather than a multiplication, so an infinite or NaN input in a dropped
position still gives an exact 0 (and a 0 gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor


def keep_mask(shape: torch.Size | tuple[int, ...], keep: float, device: torch.device) -> Tensor:
    """A boolean tensor whose entries are True independently with probability ``keep``."""
    return torch.empty(shape, device=device).bernoulli_(keep).bool()


def apply_mask(x: Tensor, mask: Tensor, scale: float, inplace: bool = False) -> Tensor:
    """``x * scale`` where ``mask`` is True, exactly 0 elsewhere (``mask`` broadcasts)."""
    if inplace:
        if scale != 1.0:
            x.mul_(scale)
        return x.masked_fill_(~mask, 0.0)
    kept = x * scale if scale != 1.0 else x
    return torch.where(mask, kept, torch.zeros((), dtype=x.dtype, device=x.device))


def dropout(x: Tensor, p: float, scale: float, inplace: bool = False) -> Tensor:
    """Element dropout in training mode: keep each entry with probability ``1 - p``."""
    return apply_mask(x, keep_mask(x.shape, 1.0 - p, x.device), scale, inplace)


def channel_dropout(x: Tensor, p: float, scale: float, inplace: bool = False) -> Tensor:
    """Channel dropout of a batched input (N, C, *spatial): one draw per (n, c)."""
    mask_shape = (*x.shape[:2], *([1] * (x.dim() - 2)))
    return apply_mask(x, keep_mask(mask_shape, 1.0 - p, x.device), scale, inplace)


def gaussian_dropout(x: Tensor, sigma: float) -> Tensor:
    """Multiplicative Gaussian noise: ``x * (1 + sigma * eps)``, eps ~ N(0, 1)."""
    noise = torch.randn_like(x).mul_(sigma).add_(1.0)
    return x * noise


def group_masked_weights(weight: Tensor, groups: int, p: float, generator: torch.Generator) -> Tensor:
    """``groups`` independent DropConnect copies of ``weight`` (inverted scaling), masks
    drawn from ``generator``: shape ``(groups, *weight.shape)``."""
    mask = torch.empty((groups, *weight.shape), dtype=weight.dtype, device=weight.device)
    mask.bernoulli_(1.0 - p, generator=generator).div_(1.0 - p)
    return weight * mask
