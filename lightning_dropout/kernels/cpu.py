"""The CPU fast path: exact Bernoulli masks from 64-bit random words, 8 decisions a word.

On CPU, ``bernoulli_`` costs about 12 ns an element while a copy costs about 0.2 ns: the
random draw, not memory, is what dropout pays for. This path draws 64-bit words from
torch's own generator (``random_`` over the full 64-bit range: reproducible under
``torch.manual_seed``, and per rank where the caller seeds per rank) and reads each word
as 8 uniform random bytes, one byte per decision.

Exactness. An element is dropped iff ``U < p``, where ``U = 0.u1 u2 u3 ...`` (base 256)
is uniform on [0, 1) and ``p = 0.p1 p2 p3 ...`` is the exact base-256 expansion of the
float64 ``p``. The first byte decides unless ``u1 == p1`` (probability 1/256); only
those ties draw a further byte, and so on until the ties are gone or the expansion of
``p`` ends (a tie then means ``U >= p``: kept). So every element is dropped
independently with probability exactly ``p`` as a double, whether or not ``p`` is a
multiple of 1/256; the extra draws touch about ``n / 256`` elements.

The first byte is compared with SWAR arithmetic on whole int64 words (a lane never
borrows from its neighbour), which is several times faster than a byte-wise comparison.
The mask is one byte an element (-1 kept, 0 dropped), kept for backward like torch's
bool mask. It is applied with an integer AND on the scaled input's bits, so a dropped
infinite or NaN input gives an exact 0, as :mod:`.reference` does (``torch.where`` and
``masked_fill`` cost about 4 ns an element here; the AND about 0.5 ns). Every step
works in place on a few buffers: fresh 4 MB temporaries cost more in page faults than
the arithmetic on them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "apply_keep_bytes",
    "channel_dropout",
    "dropout",
    "group_masked_weights",
    "keep_bytes",
    "probability_digits",
]

_LANES = 8
_ONES = 0x0101010101010101
_HIGH = -0x7F7F7F7F7F7F7F80  # 0x8080808080808080 as a signed int64
_LOW7 = 0x7F7F7F7F7F7F7F7F
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_MIN_INT64 = -(2**63)
_APPLY_CHUNK = 1 << 20


@functools.lru_cache(maxsize=256)
def probability_digits(p: float) -> bytes:
    """The exact base-256 expansion of the float ``p`` in [0, 1), most significant first.

    Example:
        >>> list(probability_digits(0.75)), list(probability_digits(0.5 + 2**-12))
        ([192], [128, 16])
    """
    numerator, denominator = float(p).as_integer_ratio()
    bits = denominator.bit_length() - 1
    length = max(1, -(-bits // 8))
    return (numerator << (8 * length - bits)).to_bytes(length, "big")


def _random_words(count: int, generator: torch.Generator | None) -> Tensor:
    words = torch.empty(count, dtype=torch.int64)
    return words.random_(_MIN_INT64, None, generator=generator)


def _tie_flags(words: Tensor, digit: int) -> Tensor:
    """High bit of each byte lane set iff the lane equals ``digit`` (exact: no carries)."""
    diff = words ^ (digit * _ONES)
    flags = diff & _LOW7
    return flags.add_(_LOW7).bitwise_or_(diff).bitwise_or_(_LOW7).bitwise_not_()


def _keep_lanes(words: Tensor, digit: int) -> Tensor:
    """Each byte lane 0xFF iff the lane (unsigned) is greater than ``digit``, else 0.

    Consumes ``words`` (its buffer is reused).
    """
    threshold = digit + 1
    if threshold == 256:
        return words.zero_()
    # Setting each lane's high bit first means no lane borrows from its neighbour; the
    # high bit of the difference is then "low 7 bits >= threshold's low 7 bits".
    low = (words | _HIGH).sub_((threshold & 0x7F) * _ONES)
    flags = low.bitwise_and_(words) if threshold & 0x80 else low.bitwise_or_(words)
    flags.bitwise_and_(_HIGH)
    # Spread each lane's high bit over the lane (shifts stay inside the lane).
    shifted = torch.empty_like(flags)
    for shift in (1, 2, 4):
        flags.bitwise_or_(torch.bitwise_right_shift(flags, shift, out=shifted))
    return flags


def _resolve_ties(positions: Tensor, digits: bytes, generator: torch.Generator | None) -> Tensor:
    """Of the elements tied on the first digit, the positions of those kept (``U >= p``)."""
    kept = []
    for digit in digits[1:]:
        if positions.numel() == 0:
            break
        draws = _random_words(-(-positions.numel() // _LANES), generator)
        lanes = draws.view(torch.uint8)[: positions.numel()]
        kept.append(positions[lanes > digit])
        positions = positions[lanes == digit]
    kept.append(positions)  # still tied when p's expansion ends: U >= p
    return torch.cat(kept)


def keep_bytes(numel: int, p: float, generator: torch.Generator | None = None) -> Tensor:
    """A flat int8 mask of ``numel`` entries: -1 (all bits set) w.p. ``1 - p``, else 0.

    Entries are independent, and exact for every float ``p`` in (0, 1) (see the module
    doc); drawn from ``generator`` (torch's global CPU generator when None). The -1 / 0
    form is what an integer AND needs; ``mask != 0`` is the boolean keep mask.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> mask = keep_bytes(1_000_000, 0.3)
        >>> round((mask != 0).float().mean().item(), 2), sorted(mask.unique().tolist())
        (0.7, [-1, 0])
    """
    digits = probability_digits(p)
    words = _random_words(-(-numel // _LANES), generator)
    ties = _tie_flags(words, digits[0])
    keep = _keep_lanes(words, digits[0]).view(torch.int8)[:numel]
    tied_words = torch.nonzero(ties).flatten()
    if tied_words.numel():
        lanes = ties[tied_words].view(torch.uint8).view(-1, _LANES) >= 0x80
        offsets = torch.nonzero(lanes)
        positions = tied_words[offsets[:, 0]] * _LANES + offsets[:, 1]
        positions = positions[positions < numel]
        keep[_resolve_ties(positions, digits, generator)] = -1
    return keep


def apply_keep_bytes(
    x: Tensor, keep: Tensor, scale: float, inplace: bool = False, out: Tensor | None = None
) -> Tensor:
    """``x * scale`` where ``keep`` (int8 -1 / 0, broadcastable) is -1, exactly 0 elsewhere.

    Writes into ``out`` when given (``x`` itself when ``inplace``).

    Example:
        >>> keep = torch.tensor([-1, 0, -1], dtype=torch.int8)
        >>> apply_keep_bytes(torch.tensor([1.0, float("inf"), 3.0]), keep, 2.0)
        tensor([2., 0., 6.])
    """
    if out is None:
        out = x if inplace else torch.empty_like(x)
    integer = _INT_OF_SIZE[out.element_size()]
    if keep.shape != x.shape or not (x.is_contiguous() and out.is_contiguous()):
        # A broadcast (channel) mask is small: widen it once.
        torch.mul(x, scale, out=out)
        out.view(integer).bitwise_and_(keep.to(integer))
        return out
    # Widen the byte mask a chunk at a time into one reused buffer: no full-size integer
    # mask (fresh memory costs page faults) and no mixed-dtype AND (it converts through a
    # full-size copy). Chunks are large because every op is a parallel region, and on a
    # busy host each region waits for its threads to be scheduled.
    flat_x, flat_out, flat_keep = x.view(-1), out.view(-1), keep.reshape(-1)
    wide = torch.empty(min(_APPLY_CHUNK, flat_x.numel()), dtype=integer)
    for start in range(0, flat_x.numel(), _APPLY_CHUNK):
        part = flat_out[start : start + _APPLY_CHUNK]
        torch.mul(flat_x[start : start + _APPLY_CHUNK], scale, out=part)
        mask = wide[: part.numel()].copy_(flat_keep[start : start + _APPLY_CHUNK])
        part.view(integer).bitwise_and_(mask)
    return out


class _MaskedScale(torch.autograd.Function):
    """``x * scale`` on kept entries, 0 elsewhere; backward applies the same mask."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, keep: Tensor, scale: float, inplace: bool) -> Tensor:
        out = apply_keep_bytes(x, keep, scale, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (keep,) = ctx.saved_tensors
        return _MaskedScale.apply(grad, keep, ctx.scale, False), None, None, None


def _masked_scale(x: Tensor, keep: Tensor, scale: float, inplace: bool) -> Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaskedScale.apply(x, keep, scale, inplace)
    return apply_keep_bytes(x, keep, scale, inplace)


def dropout(x: Tensor, p: float, scale: float, inplace: bool = False) -> Tensor:
    """Element dropout of a CPU tensor with ``0 < p < 1``: keep w.p. ``1 - p``, scale kept.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> y = dropout(torch.ones(3, 5), 0.75, 4.0)
        >>> bool(((y == 0) | (y == 4)).all())
        True
    """
    keep = keep_bytes(x.numel(), p).view(x.shape)
    return _masked_scale(x, keep, scale, inplace)


def channel_dropout(x: Tensor, p: float, scale: float, inplace: bool = False) -> Tensor:
    """Channel dropout of a batched CPU input (N, C, *spatial): one draw per (n, c).

    Example:
        >>> y = channel_dropout(torch.ones(2, 3, 4), 0.5, 2.0)
        >>> bool((y.amax(dim=2) == y.amin(dim=2)).all())
        True
    """
    keep = keep_bytes(x.shape[0] * x.shape[1], p).view(*x.shape[:2], *([1] * (x.dim() - 2)))
    return _masked_scale(x, keep, scale, inplace)


def _mask_groups(weight: Tensor, keep: Tensor, scale: float) -> Tensor:
    masked = weight.new_empty(keep.shape)
    for group in range(keep.shape[0]):
        apply_keep_bytes(weight, keep[group], scale, out=masked[group])
    return masked


class _GroupMaskedWeights(torch.autograd.Function):
    """One masked, scaled copy of ``weight`` per group; backward sums the masked grads."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, keep: Tensor, scale: float) -> Tensor:
        masked = _mask_groups(weight, keep, scale)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return masked

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        grad = grad.contiguous()
        total = apply_keep_bytes(grad[0], keep[0], ctx.scale)
        buffer = torch.empty_like(total)
        for group in range(1, keep.shape[0]):
            total += apply_keep_bytes(grad[group], keep[group], ctx.scale, out=buffer)
        return total, None, None


def group_masked_weights(weight: Tensor, groups: int, p: float, generator: torch.Generator) -> Tensor:
    """``groups`` independent DropConnect copies of a CPU ``weight`` (inverted scaling).

    Differentiable with respect to ``weight``; the masks (one byte a weight) are drawn
    from ``generator`` and are all that backward keeps.

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> w = group_masked_weights(torch.ones(3, 4), 2, 0.5, generator)
        >>> w.shape, sorted(w.unique().tolist())
        (torch.Size([2, 3, 4]), [0.0, 2.0])
    """
    keep = keep_bytes(groups * weight.numel(), p, generator).view(groups, *weight.shape)
    scale = 1.0 / (1.0 - p)
    if torch.is_grad_enabled() and weight.requires_grad:
        return _GroupMaskedWeights.apply(weight.contiguous(), keep, scale)
    return _mask_groups(weight.contiguous(), keep, scale)
