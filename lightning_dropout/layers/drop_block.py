"""DropBlock (Ghiasi, Lin and Le, "DropBlock: A regularization method for convolutional
networks", NeurIPS 2018): drop contiguous square regions of feature maps.

Like SpatialDropout, it answers the correlation of neighbouring units, but it keeps the
channel and drops a ``block_size x block_size`` square of it, so the network has to look
elsewhere in the map.

How the blocks are drawn. Each output position is covered by a block whose top-left
corner lies ``0 .. k - 1`` rows above and columns left of it, for the block
``kh x kw = min(block_size, H) x min(block_size, W)``. Block corners ("seeds") are drawn
independently with probability ``gamma`` on the grid of every corner whose block touches
the map, ``(H + kh - 1) x (W + kw - 1)``; blocks reaching over the border are clipped.
Every position is then covered by exactly ``kh * kw`` candidate seeds, so it is dropped
with probability ``1 - (1 - gamma) ** (kh * kw)``, and

    gamma = 1 - (1 - p) ** (1 / (kh * kw))

makes that exactly ``p``, at the border as in the middle, for odd and even block sizes,
square or not, and for maps smaller than the block. (The paper's
``gamma = p / block_size**2 * feat_size**2 / (feat_size - block_size + 1)**2`` places
seeds only where a whole block fits and ignores overlaps: it drops less than ``p``, and
less at the border than in the middle.) The mask is the maximum of the seeds over each
position's ``kh x kw`` window, computed as two one-dimensional max-pools.

Scaling: by the kept fraction (the paper's ``count(M) / count_ones(M)`` over the whole
mask), or by ``1 / (1 - p)``, its expectation (``normalize="expected"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_dropout._validation import check_bool, check_choice, check_positive_int
from lightning_dropout.layers.base import DropoutBase
from lightning_dropout.layers.common import (
    check_floating,
    check_p,
    exact_output,
    keep_mask,
    keep_scale,
    p_equals,
)

NORMALIZATIONS = ("kept", "expected")


def _block_shape(x: Tensor, block_size: int) -> tuple[int, int]:
    if x.dim() != 4:
        raise ValueError(f"DropBlock2d expects a 4-D input (N, C, H, W); got shape {tuple(x.shape)}")
    return min(block_size, x.shape[2]), min(block_size, x.shape[3])


def seed_probability(p: float | Tensor, block: tuple[int, int]) -> float | Tensor:
    """The probability ``gamma`` of a block corner that drops each position with probability ``p``.

    Example:
        >>> gamma = seed_probability(0.1, (7, 7))
        >>> round(gamma, 6), round(1 - (1 - gamma) ** 49, 12)
        (0.002148, 0.1)
    """
    return 1.0 - (1.0 - p) ** (1.0 / (block[0] * block[1]))


def _minus_keep(minus_no_seed: Tensor, block: tuple[int, int]) -> Tensor:
    """-1 where a position is kept, 0 where a seed's block covers it, from ``minus_no_seed``
    (-1 where the extended grid has no seed, 0 at seeds): the maximum over each position's
    window. Negated so that one max-pool (two one-dimensional ones) does it."""
    rows = F.max_pool2d(minus_no_seed, (block[0], 1), stride=1)
    return F.max_pool2d(rows, (1, block[1]), stride=1)


def _seed_shape(x: Tensor, block: tuple[int, int], share_channels: bool) -> tuple[int, int, int, int]:
    n, c, h, w = x.shape
    return n, 1 if share_channels else c, h + block[0] - 1, w + block[1] - 1


def _scaled_keep(minus_keep: Tensor, normalize: str, p: float | Tensor) -> Tensor:
    """The mask to multiply by: 0 where dropped, the scale where kept."""
    if normalize == "kept":
        # All dropped (possible below p = 1 on small maps): zeros, not 0 / 0.
        kept = minus_keep.sum(dtype=torch.float32).neg().clamp_min(1.0)
        return minus_keep * (-minus_keep.numel() / kept).to(minus_keep.dtype)
    return minus_keep * -keep_scale(p)


def drop_block_2d(
    x: Tensor,
    p: float | Tensor,
    block_size: int = 7,
    training: bool = True,
    share_channels: bool = False,
    normalize: str = "kept",
) -> Tensor:
    """Drop ``block_size`` squares of every feature map of ``x`` so that each position is
    dropped with probability ``p``.

    The identity when not training or when ``p = 0``; exact zeros (and zero gradients) at
    ``p = 1``. See the module doc for how blocks are drawn. A dropped position is ``x * 0``:
    exact zeros for finite inputs.

    Args:
        x: floating-point input ``(N, C, H, W)``.
        p: probability of dropping each position, in [0, 1]: a float or a 0-d tensor (see
            :mod:`lightning_dropout.layers.common`).
        block_size: the side of the dropped squares, >= 1 (even sizes too); a map smaller
            than the block gets blocks as large as the map.
        training: drop (True) or return ``x`` (False).
        share_channels: one block mask per sample for all channels (True, timm's default)
            or one per channel (False, the paper's Algorithm 1).
        normalize: ``"kept"`` scales by the kept fraction of the whole mask (the paper),
            ``"expected"`` by ``1 / (1 - p)``.

    Raises:
        TypeError: ``x`` is not a floating-point tensor, or a wrongly typed argument.
        ValueError: ``p`` outside [0, 1], ``block_size`` < 1, an unknown ``normalize``, or
            ``x`` not 4-D.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> y = drop_block_2d(torch.ones(256, 1, 6, 6), p=0.3, block_size=3)
        >>> round((y == 0).double().mean().item(), 1)
        0.3
        >>> round(y.mean().item(), 4)  # scaled by the kept fraction
        1.0
    """
    check_floating(x)
    p = check_p(p)
    block = _block_shape(x, check_positive_int("block_size", block_size))
    share_channels = check_bool("share_channels", share_channels)
    normalize = check_choice("normalize", normalize, NORMALIZATIONS)
    if not training:
        return x
    if (exact := exact_output(x, p)) is not None:
        return exact
    gamma = seed_probability(p, block)
    if p_equals(gamma, 0.0):  # p so small that 1 - p rounds to 1
        return x
    # -1 (no seed) with probability 1 - gamma, else 0.
    minus_no_seed = keep_mask(_seed_shape(x, block, share_channels), gamma, x).to(x.dtype).neg_()
    return x * _scaled_keep(_minus_keep(minus_no_seed, block), normalize, p)


class DropBlock2d(DropoutBase):
    """DropBlock: drop ``block_size`` squares of feature maps ``(N, C, H, W)`` in training.

    Ghiasi, Lin and Le, "DropBlock: A regularization method for convolutional networks",
    NeurIPS 2018. Every position is dropped with probability exactly ``p`` (see
    :mod:`lightning_dropout.layers.drop_block` for how blocks are drawn); kept positions
    are scaled by the kept fraction. The paper ramps ``p`` up over training: schedule it
    with :class:`~lightning_dropout.callbacks.DropoutScheduler`.

    Args:
        p: probability of dropping each position, in [0, 1]; may be reassigned between steps.
        block_size: side of the dropped squares, >= 1.
        share_channels: one mask for all channels of a sample (True) or one per channel
            (False, the paper's Algorithm 1; ``C`` times as many random draws).
        normalize: ``"kept"`` (the kept fraction of the mask) or ``"expected"`` (``1 / (1 - p)``).

    Raises:
        TypeError: a wrongly typed argument.
        ValueError: ``p`` outside [0, 1], ``block_size`` < 1 or an unknown ``normalize``;
            in forward, an input that is not 4-D.

    Example:
        >>> layer = DropBlock2d(0.1, block_size=3)
        >>> layer
        DropBlock2d(p=0.1, block_size=3)
        >>> layer(torch.randn(2, 4, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
        >>> x = torch.randn(2, 4, 8, 8)
        >>> torch.equal(layer.eval()(x), x)
        True
    """

    site_kind = "drop_block"

    def __init__(
        self, p: float, block_size: int = 7, share_channels: bool = False, normalize: str = "kept"
    ) -> None:
        super().__init__(p)
        self.block_size = check_positive_int("block_size", block_size)
        self.share_channels = check_bool("share_channels", share_channels)
        self.normalize = check_choice("normalize", normalize, NORMALIZATIONS)

    def forward(self, x: Tensor) -> Tensor:
        return drop_block_2d(
            x, self.forward_p, self.block_size, self.training, self.share_channels, self.normalize
        )

    def extra_repr(self) -> str:
        extra = ", share_channels=True" if self.share_channels else ""
        extra += "" if self.normalize == "kept" else f", normalize={self.normalize!r}"
        return f"p={self.p}, block_size={self.block_size}{extra}"
