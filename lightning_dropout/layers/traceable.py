"""The activation-dropout layers' forward as torch.compile sees it: p as a 0-d tensor.

torch.compile specialises a graph on every Python float it reads, so a layer whose
``p`` changes every step (as under :class:`~lightning_dropout.callbacks.DropoutScheduler`)
would recompile every step until the recompile limit and then run uncompiled. The layers
therefore mirror ``p`` on their device (:attr:`DropProbability.p_tensor
<lightning_dropout.layers.base.DropProbability.p_tensor>`, float64) and, while being
compiled, compute from that tensor: p becomes a graph input and the graph is compiled
once. Where a kernel that keeps no mask exists for the input (Triton on CUDA), the
compiled graph calls it as a custom op; elsewhere the rule is written in torch ops. The
results follow the eager definitions exactly in distribution (masks come from the
compiled program's random stream, so they are not the eager masks bit for bit); draws
are made in float32 or wider whatever the input's dtype, so a bf16 or fp16 input is
dropped at p itself, not at p rounded to its dtype; ``p = 0`` is an exact identity and
``p = 1`` gives exact zeros with zero gradients, without branching on p.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_dropout import kernels


def traceable_dropout(
    x: Tensor, p: Tensor, training: bool, inverted: bool, inplace: bool, channel_dims: int = 0
) -> Tensor:
    """Dropout with one Bernoulli draw per element, or per channel.

    Args:
        x: the input.
        p: 0-d tensor, the drop probability in [0, 1].
        training: drop (True) or apply the evaluation rule (False).
        inverted: scale kept entries by ``1 / (1 - p)`` in training (True) or all entries
            by ``1 - p`` in evaluation (False).
        inplace: write the result into ``x``.
        channel_dims: 0 for element dropout; otherwise one draw per index of the first
            ``channel_dims`` dimensions, shared by the rest: 2 for a batched
            ``(N, C, *spatial)`` input, 1 for an unbatched ``(C, *spatial)`` one.

    Example:
        >>> y = traceable_dropout(torch.ones(3, 5), torch.tensor(0.75), True, True, False)
        >>> bool(((y == 0) | (y == 4)).all())
        True
    """
    if training and not inplace:
        fast = kernels.dropout_with_p_tensor(x, p, inverted, channel_dims)
        if fast is not None:
            return fast
    if training:
        mask_shape = (*x.shape[:channel_dims], *[1] * (x.dim() - channel_dims)) if channel_dims else x.shape
        # rand is in [0, 1): p = 0 keeps everything, p = 1 nothing.
        keep = torch.rand(mask_shape, dtype=_draw_dtype(x), device=x.device) >= p
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
    fast = kernels.gaussian_dropout_with_p_tensor(x, p)
    if fast is not None:
        return fast
    below_one = p < 1.0
    # The variance is finite only below p = 1; p = 1 is taken as "drop everything".
    sigma = torch.where(below_one, p / (1.0 - p), 0.0).sqrt()
    noise = torch.randn(x.shape, dtype=_draw_dtype(x), device=x.device)
    return torch.where(below_one, (x * (1.0 + sigma * noise)).to(x.dtype), 0.0)


def _draw_dtype(x: Tensor) -> torch.dtype:
    # bf16 random numbers have 8 significant bits: p = 0.3 would drop 0.301 of the input.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _keep_scale(p: Tensor) -> Tensor:
    """``1 / (1 - p)``, and 0 (not inf) at p = 1 so that no NaN reaches the gradient."""
    return torch.where(p < 1.0, 1.0 / (1.0 - p), 0.0)
