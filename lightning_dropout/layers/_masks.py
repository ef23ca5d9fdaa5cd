"""Scaled keep masks for layers that draw a small mask and broadcast it over their input."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_dropout import kernels
from lightning_dropout.layers.traceable import traceable_dropout


def scaled_keep_mask(
    shape: tuple[int, ...], p: float | Tensor, like: Tensor, inverted: bool = True
) -> Tensor:
    """A mask of ``shape`` in ``like``'s dtype and device: ``1 / (1 - p)`` (1 when not
    ``inverted``) with probability ``1 - p``, else 0, each entry independent.

    A float ``p`` must lie in (0, 1) and draws on the element fast path of
    :mod:`lightning_dropout.kernels`; a 0-d tensor ``p`` (torch.compile) may be anything in
    [0, 1] and is never read on the host.

    Example:
        >>> mask = scaled_keep_mask((2, 3), 0.5, torch.empty(0))
        >>> bool(((mask == 0) | (mask == 2)).all())
        True
    """
    ones = torch.ones(shape, dtype=like.dtype, device=like.device)
    if isinstance(p, Tensor):
        return traceable_dropout(ones, p, True, inverted, False)
    return kernels.dropout(ones, p, 1.0 / (1.0 - p) if inverted else 1.0)
