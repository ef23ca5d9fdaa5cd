"""The exact PyTorch path: the definition every fast path is tested against.

``p`` is a float in (0, 1) or a 0-d tensor in [0, 1] (compiled layers: a graph input that
is never read on the host, so a new value recompiles nothing; ``p = 0`` keeps everything
and ``p = 1`` drops everything without a branch on p). Masks are the comparison ``U >= p`` of uniform
draws from torch's global generator (the stream of the tensor's device), so
``torch.manual_seed`` reproduces them, and out-of-place draws follow torch.func.vmap's
``randomness`` contract. Draws are made in float32 or wider whatever the input's dtype, so a bf16 or fp16
input is dropped at p itself, not at p rounded to its dtype. Dropped entries are produced
with ``torch.where`` rather than a multiplication, so an infinite or NaN input in a dropped
position still gives an exact 0 (and a 0 gradient).
"""

from __future__ import annotations

from typing import overload

import torch
from torch import Tensor


def draw_dtype(x: Tensor) -> torch.dtype:
    """The dtype of ``x``'s random draws: float64 for float64, else float32.

    bf16 random numbers have 8 significant bits: p = 0.3 would drop 0.301 of the input.

    Example:
        >>> draw_dtype(torch.ones(1, dtype=torch.bfloat16))
        torch.float32
    """
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@overload
def keep_scale(p: float, inverted: bool = True) -> float: ...


@overload
def keep_scale(p: Tensor, inverted: bool = True) -> float | Tensor: ...


def keep_scale(p: float | Tensor, inverted: bool = True) -> float | Tensor:
    """The factor of kept entries: ``1 / (1 - p)`` (inverted) or 1; 0, not inf, at a tensor
    ``p = 1``, so that no NaN reaches the gradient.

    Example:
        >>> keep_scale(0.75), keep_scale(torch.tensor(1.0))
        (4.0, tensor(0.))
    """
    if not inverted:
        return 1.0
    if isinstance(p, Tensor):
        return torch.where(p < 1.0, 1.0 / (1.0 - p), 0.0)
    return 1.0 / (1.0 - p)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float | Tensor, like: Tensor) -> Tensor:
    """A boolean tensor on ``like``'s device whose entries are True independently w.p. ``1 - p``."""
    # rand is in [0, 1): p = 0 keeps everything, p = 1 nothing.
    return torch.rand(shape, dtype=draw_dtype(like), device=like.device) >= p


def apply_mask(x: Tensor, mask: Tensor, scale: float | Tensor, inplace: bool = False) -> Tensor:
    """``x * scale`` where ``mask`` is True, exactly 0 elsewhere (``mask`` broadcasts)."""
    scaled = isinstance(scale, Tensor) or scale != 1.0
    if inplace:
        if scaled:
            x.mul_(scale)
        return x.masked_fill_(~mask, 0.0)
    kept = x * scale if scaled else x
    return torch.where(mask, kept, torch.zeros((), dtype=x.dtype, device=x.device))


def dropout(x: Tensor, p: float | Tensor, inverted: bool = True, inplace: bool = False) -> Tensor:
    """Element dropout in training mode: keep each entry with probability ``1 - p``."""
    return apply_mask(x, keep_mask(x.shape, p, x), keep_scale(p, inverted), inplace)


def channel_dropout(x: Tensor, p: float | Tensor, inverted: bool = True, inplace: bool = False) -> Tensor:
    """Channel dropout of a batched input (N, C, *spatial): one draw per (n, c).

    One multiplication by the broadcast (N, C, 1, ...) mask, as torch's own channel
    dropout computes it: the mask is small and the product one pass over ``x``, where a
    ``torch.where`` would cost a second pass. So, as in torch, a dropped channel holding an
    infinity or a NaN gives NaN there (p = 1 aside: the layers return exact zeros).
    """
    mask_shape = (*x.shape[:2], *([1] * (x.dim() - 2)))
    scale = torch.as_tensor(keep_scale(p, inverted), dtype=x.dtype, device=x.device)
    mask = torch.where(keep_mask(mask_shape, p, x), scale, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.mul_(mask) if inplace else x * mask


def gaussian_dropout(x: Tensor, sigma: float | Tensor) -> Tensor:
    """Multiplicative Gaussian noise: ``x * (1 + sigma * eps)``, eps ~ N(0, 1).

    A tensor ``sigma`` may be infinite (p = 1 of the matching Bernoulli dropout): exact zeros.
    """
    if isinstance(sigma, Tensor):
        finite = sigma < torch.inf
        noise = torch.randn(x.shape, dtype=draw_dtype(x), device=x.device)
        factor = 1.0 + torch.where(finite, sigma, 0.0) * noise
        return torch.where(finite, (x * factor).to(x.dtype), 0.0)
    return x * torch.randn_like(x).mul_(sigma).add_(1.0)


def group_masked_weights(weight: Tensor, groups: int, p: float, generator: torch.Generator) -> Tensor:
    """``groups`` independent DropConnect copies of ``weight`` (inverted scaling), masks
    drawn from ``generator``: shape ``(groups, *weight.shape)``."""
    mask = torch.empty((groups, *weight.shape), dtype=weight.dtype, device=weight.device)
    mask.bernoulli_(1.0 - p, generator=generator).div_(1.0 - p)
    return weight * mask
