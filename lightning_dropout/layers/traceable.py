"""The activation-dropout layers' forward as torch.compile sees it: p as a 0-d tensor.

torch.compile specialises a graph on every Python float it reads, so a layer whose
``p`` changes every step (as under :class:`~lightning_dropout.callbacks.DropoutScheduler`)
would recompile every step until the recompile limit and then run uncompiled. The layers
therefore mirror ``p`` in a 0-d buffer (:class:`~lightning_dropout.layers.DropoutBase`)
and, while being compiled, compute from that tensor: p becomes a graph input and the
graph is compiled once. The results follow the eager definitions exactly in distribution
(masks come from the compiled program's random stream, so they are not the eager
masks bit for bit); ``p = 0`` is an exact identity and ``p = 1`` gives exact zeros with
zero gradients, without branching on p.
"""

from __future__ import annotations

import torch
from torch import Tensor


def traceable_dropout(
    x: Tensor, p: Tensor, mask_shape: tuple[int, ...], training: bool, inverted: bool, inplace: bool
) -> Tensor:
    """Dropout with one Bernoulli draw per entry of ``mask_shape`` (broadcast over ``x``).

    Args:
        x: the input.
        p: 0-d tensor, the drop probability in [0, 1].
        mask_shape: ``x.shape`` for element dropout, ``(N, C, 1, ...)`` for channel dropout.
        training: drop (True) or apply the evaluation rule (False).
        inverted: scale kept entries by ``1 / (1 - p)`` in training (True) or all entries
            by ``1 - p`` in evaluation (False).
        inplace: write the result into ``x``.

    Example:
        >>> y = traceable_dropout(torch.ones(3, 5), torch.tensor(0.75), (3, 5), True, True, False)
        >>> bool(((y == 0) | (y == 4)).all())
        True
    """
    p = p.to(x.dtype)
    if training:
        # rand is in [0, 1): p = 0 keeps everything, p = 1 nothing.
        keep = torch.rand(mask_shape, dtype=x.dtype, device=x.device) >= p
        out = torch.where(keep, x * _keep_scale(p) if inverted else x, 0.0)
    elif inverted:
        return x
    else:
        out = x * (1.0 - p)
    return x.copy_(out) if inplace else out


def traceable_gaussian_dropout(x: Tensor, p: Tensor, training: bool) -> Tensor:
    """Multiplicative N(1, p / (1 - p)) noise in training; exact zeros at ``p = 1``.

    Example:
        >>> y = traceable_gaussian_dropout(torch.ones(4), torch.tensor(1.0), True)
        >>> y.tolist()
        [0.0, 0.0, 0.0, 0.0]
    """
    if not training:
        return x
    p = p.to(x.dtype)
    below_one = p < 1.0
    # The variance is finite only below p = 1; p = 1 is taken as "drop everything".
    sigma = torch.where(below_one, p / (1.0 - p), 0.0).sqrt()
    return torch.where(below_one, x * (1.0 + sigma * torch.randn_like(x)), 0.0)


def _keep_scale(p: Tensor) -> Tensor:
    """``1 / (1 - p)``, and 0 (not inf) at p = 1 so that no NaN reaches the gradient."""
    return torch.where(p < 1.0, 1.0 / (1.0 - p), 0.0)
