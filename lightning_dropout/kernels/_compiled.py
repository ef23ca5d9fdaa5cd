"""numba kernels of the CPU path (imported only where numba is installed).

Each kernel is one pass over memory, releases the GIL and is compiled on first use, then
cached on disk. Scales arrive in the arrays' dtype, so ``x * scale`` rounds as torch's
``x * scale`` does; dropped entries are written as +0.0 without reading the input.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

_jit = numba.njit(nogil=True, cache=True)
# Byte k of entry b is bit k of b: one byte's bits spread over eight bools.
_SPREAD = np.array([sum(((b >> k) & 1) << (8 * k) for k in range(8)) for b in range(256)], np.uint64)


_ONES, _HIGHS = np.uint64(0x0101010101010101), np.uint64(0x8080808080808080)


@_jit
def decide_bytes(words: np.ndarray, threshold: int, tie: int, keep: np.ndarray, ties: np.ndarray) -> int:
    """Byte by byte of ``words`` (uint64), ``keep`` (uint64: eight 0 / 1 bytes) = byte >=
    ``threshold`` (1 to 255); into ``ties``, the positions of the bytes equal to ``tie``
    (none if -1), in order. Returns how many ties there are (more than ``ties`` holds when
    it overflows). Eight bytes a step, and no lane borrows from its neighbour."""
    low, high = np.uint64((threshold & 0x7F) * 0x0101010101010101), threshold >= 0x80
    pattern, count = _ONES * np.uint64(tie & 0xFF), 0
    for w in range(words.size):
        word = words[w]
        # high bit of each lane: the lane's low 7 bits >= the threshold's
        lanes = (word | _HIGHS) - low
        lanes = lanes & word if high else lanes | word
        keep[w] = (lanes & _HIGHS) >> np.uint64(7)
        if tie >= 0:
            v = word ^ pattern
            if (v - _ONES) & ~v & _HIGHS:  # a zero byte in v (rare: 1 word in 32)
                for b in range(8):
                    if (v >> np.uint64(8 * b)) & np.uint64(255) == 0:
                        if count < ties.size:
                            ties[count] = 8 * w + b
                        count += 1
    return count


@_jit
def spread_bits(bits: np.ndarray, out: np.ndarray) -> None:
    """``out[j]`` (uint64): the bits of byte ``bits[j]`` as eight 0 / 1 bytes, lowest first."""
    for j in range(bits.size):
        out[j] = _SPREAD[bits[j]]


@_jit
def scale_elements(x: np.ndarray, keep: np.ndarray, scale: np.floating[Any], out: np.ndarray) -> None:
    """``out[g, i] = x[i] * scale`` where ``keep[g, i]``, else 0."""
    for g in range(keep.shape[0]):
        for i in range(x.size):
            out[g, i] = x[i] * scale if keep[g, i] else 0


@_jit
def scale_rows(x: np.ndarray, keep: np.ndarray, scale: np.floating[Any], out: np.ndarray) -> None:
    """``out[e, :] = x[e, :] * scale`` where ``keep[e]``, else 0 (``x`` left unread)."""
    for e in range(keep.size):
        if keep[e]:
            for j in range(x.shape[1]):
                out[e, j] = x[e, j] * scale
        else:
            for j in range(x.shape[1]):
                out[e, j] = 0


@_jit
def noise_product(x: np.ndarray, noise: np.ndarray, sigma: np.floating[Any], out: np.ndarray) -> None:
    """``noise = 1 + sigma * noise`` in place, and ``out = x * noise``."""
    for i in range(x.size):
        noise[i] = sigma * noise[i] + 1
        out[i] = x[i] * noise[i]


# Reassociation lets the sums use vector lanes; no flag that assumes finite values.
# Weight rows a block: the block stays in cache while every sample of a chunk meets it,
# and each sample's masks for the block are read in one contiguous run.
_ROWS = 16
_sum_jit = numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})


@_sum_jit
def masked_linear(
    x: np.ndarray,
    weight: np.ndarray,
    keep: np.ndarray,
    scale: np.floating[Any],
    out: np.ndarray,
    start: int,
    stop: int,
) -> None:
    """``out[g, r, o] = scale * sum_i x[g, r, i] * weight[o, i]`` over ``keep[g, o, i]``, for
    the weight rows ``start <= o < stop``."""
    zero = scale - scale
    for block in range(start, stop, _ROWS):
        for g in range(x.shape[0]):
            for r in range(x.shape[1]):
                for o in range(block, min(block + _ROWS, stop)):
                    total = zero
                    for i in range(x.shape[2]):
                        total += x[g, r, i] * weight[o, i] if keep[g, o, i] else zero
                    out[g, r, o] = total * scale


@_sum_jit
def masked_linear_backward(
    x: np.ndarray,
    weight: np.ndarray,
    keep: np.ndarray,
    scale: np.floating[Any],
    grad: np.ndarray,
    grad_x: np.ndarray,
    grad_weight: np.ndarray,
    start: int,
    stop: int,
) -> None:
    """Add the gradients of :func:`masked_linear` (rows ``start`` to ``stop``) to the grads."""
    zero = scale - scale
    for block in range(start, stop, _ROWS):
        for g in range(x.shape[0]):
            for r in range(x.shape[1]):
                for o in range(block, min(block + _ROWS, stop)):
                    d = grad[g, r, o] * scale
                    for i in range(x.shape[2]):
                        kept = keep[g, o, i]
                        grad_x[g, r, i] += d * weight[o, i] if kept else zero
                        grad_weight[o, i] += d * x[g, r, i] if kept else zero
