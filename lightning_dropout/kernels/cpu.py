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
works in place on a few small buffers: fresh 4 MB temporaries cost more in page faults
than the arithmetic on them.

Threads. Every op runs on pieces below torch's parallel grain size, so on one thread.
Measured on this 2-core host shared with other jobs, a pipeline of some 100 parallel
regions took 0.5 s instead of 20 ms (each region waits until both its threads are
scheduled), while ``bernoulli_``, serial anyway, was unaffected; serially the path is
about as fast on an idle host and stays fast on a busy one. (A thread pool over the
pieces gave nothing measurable here.)
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
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
# torch runs an elementwise op on one thread below 32768 elements (GRAIN_SIZE). The path
# works in pieces below that: on a busy host every parallel region waits until all its
# threads are scheduled, which made a many-op pipeline 10x slower than its idle time.
_SERIAL = 32767
# Mask entries covering at least this many elements (channels) are applied whole rows at
# a time.
_WHOLE_ROWS = 64


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


def _tie_flags(words: Tensor, digit: int, out: Tensor, scratch: Tensor) -> None:
    """Into ``out``: each byte lane's high bit set iff the lane equals ``digit`` (exact)."""
    diff = torch.bitwise_xor(words, digit * _ONES, out=scratch)
    torch.bitwise_and(diff, _LOW7, out=out)
    out.add_(_LOW7).bitwise_or_(diff).bitwise_or_(_LOW7).bitwise_not_()


def _keep_lanes(words: Tensor, digit: int, out: Tensor, scratch: Tensor) -> None:
    """Into ``out``: each byte lane 0xFF iff the lane (unsigned) is greater than ``digit``."""
    threshold = digit + 1
    if threshold == 256:
        out.zero_()
        return
    # Setting each lane's high bit first means no lane borrows from its neighbour; the
    # high bit of the difference is then "low 7 bits >= threshold's low 7 bits".
    torch.bitwise_or(words, _HIGH, out=out).sub_((threshold & 0x7F) * _ONES)
    if threshold & 0x80:
        out.bitwise_and_(words)
    else:
        out.bitwise_or_(words)
    out.bitwise_and_(_HIGH)
    # Spread each lane's high bit over the lane (shifts stay inside the lane).
    for shift in (1, 2, 4):
        out.bitwise_or_(torch.bitwise_right_shift(out, shift, out=scratch))


def _resolve_ties(positions: np.ndarray, digits: bytes, generator: torch.Generator | None) -> np.ndarray:
    """Of the elements tied on the first digit, the positions of those kept (``U >= p``)."""
    kept = []
    for digit in digits[1:]:
        if positions.size == 0:
            break
        draws = _random_words(-(-positions.size // _LANES), generator).numpy()
        lanes = draws.view(np.uint8)[: positions.size]
        kept.append(positions[lanes > digit])
        positions = positions[lanes == digit]
    kept.append(positions)  # still tied when p's expansion ends: U >= p
    return np.concatenate(kept)


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
    count = -(-numel // _LANES)
    words = _random_words(count, generator)
    lanes = torch.empty(count, dtype=torch.int64)
    tie_flags = torch.empty(min(count, _SERIAL), dtype=torch.int64)
    scratch = torch.empty_like(tie_flags)
    # p = d / 256 exactly: a tie means U >= p, kept; so keep iff u1 >= d, no ties to find.
    on_grid = len(digits) == 1
    tied_words = []
    for start in range(0, count, _SERIAL):
        piece = words[start : start + _SERIAL]
        size = piece.numel()
        if on_grid:
            _keep_lanes(piece, digits[0] - 1, lanes[start : start + size], scratch[:size])
            continue
        _tie_flags(piece, digits[0], tie_flags[:size], scratch[:size])
        tied_words.append(np.flatnonzero(tie_flags[:size].numpy()) + start)
        _keep_lanes(piece, digits[0], lanes[start : start + size], scratch[:size])
    keep = lanes.view(torch.int8)[:numel]
    if tied_words:
        # Few elements (about 1 in 256): numpy, whose small ops never wait for a thread.
        ties = np.concatenate(tied_words)
        flags = words.numpy()[ties].view(np.uint8).reshape(-1, _LANES) == digits[0]
        rows, lanes_of_rows = np.nonzero(flags)
        positions = ties[rows] * _LANES + lanes_of_rows
        keep.numpy()[_resolve_ties(positions[positions < numel], digits, generator)] = -1
    return keep


def _elements_per_entry(x: Tensor, keep: Tensor) -> int | None:
    """How many elements of ``x`` each mask entry covers, if ``keep`` matches ``x``'s
    leading dims and broadcasts over the rest (element and channel masks); else None."""
    if keep.dim() != x.dim() or x.numel() == 0:
        return None
    lead = keep.dim()
    while lead and keep.shape[lead - 1] == 1:
        lead -= 1
    if keep.shape[:lead] != x.shape[:lead]:
        return None
    return x.numel() // keep.numel()


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
        out = x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
    integer = _INT_OF_SIZE[out.element_size()]
    per_entry = _elements_per_entry(x, keep)
    if per_entry is None or not (x.is_contiguous() and out.is_contiguous()):
        torch.mul(x, scale, out=out)
        out.view(integer).bitwise_and_(keep.to(integer))
        return out
    if per_entry >= _WHOLE_ROWS:
        # Channel masks: one broadcast multiply, then the dropped rows (where an inf or
        # NaN input left a NaN) are overwritten with exact zeros.
        torch.mul(x, (keep != 0).to(x.dtype).mul_(scale), out=out)
        dropped = torch.nonzero(keep.reshape(-1) == 0).flatten()
        out.view(keep.numel(), per_entry).index_fill_(0, dropped, 0.0)
        return out
    # Piece by piece, each op below torch's parallel grain size (see _SERIAL), widening
    # the byte mask into one small reused buffer: no full-size integer mask and no
    # mixed-dtype AND (which converts through a full-size copy).
    entries = keep.numel()
    flat_x, flat_out = x.view(entries, per_entry), out.view(entries, per_entry)
    flat_keep = keep.reshape(entries, 1)
    step = max(1, _SERIAL // per_entry)

    wide = torch.empty(min(step, entries), 1, dtype=integer)
    for start in range(0, entries, step):
        part = flat_out[start : start + step]
        torch.mul(flat_x[start : start + step], scale, out=part)
        mask = wide[: part.shape[0]].copy_(flat_keep[start : start + step])
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
        # One group at a time: a contiguous copy of all of ``grad`` (often a transposed
        # view from the matmul) would cost as much memory as the chunk's masked weights.
        total = torch.zeros(keep.shape[1:], dtype=grad.dtype)
        buffer = torch.empty_like(total)
        flat_total, flat_buffer = total.view(-1), buffer.view(-1)
        for group in range(keep.shape[0]):
            buffer.copy_(grad[group])
            apply_keep_bytes(buffer, keep[group], ctx.scale, inplace=True)
            for start in range(0, flat_total.numel(), _SERIAL):
                flat_total[start : start + _SERIAL].add_(flat_buffer[start : start + _SERIAL])
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
