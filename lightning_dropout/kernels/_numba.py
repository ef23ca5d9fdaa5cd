"""numba kernels of the CPU path (imported only where numba is installed and switched on).

Each kernel is one serial pass that releases the GIL, so that several Python threads may
run them at once; nothing is shared between calls.

Masks come from SplitMix64 (Steele, Lea & Flood 2014): word ``k`` of the stream keyed by
``key`` is a bijective mix of ``key + (k + 1) * GAMMA``, computed without the words before
it. Entry ``i`` of a mask is the 32-bit half ``i`` of the stream (the low half of word
``i // 2`` for even ``i``) as an integer ``u``; it is kept iff ``u >= threshold``, where
``threshold = round(p * 2**32)``: dropped with probability ``p`` to within ``2**-33``.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

_jit = numba.njit(nogil=True, cache=True)
# Reassociation lets the sums use vector lanes; no flag that assumes finite values.
_sum_jit = numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})

_GAMMA, _MIX1, _MIX2 = (
    np.uint64(0x9E3779B97F4A7C15),
    np.uint64(0xBF58476D1CE4E5B9),
    np.uint64(0x94D049BB133111EB),
)
# Weight rows a block of the masked linear kernels: the block stays in cache while every
# sample of the batch meets it.
_ROWS = 16
# Mask entries drawn together (even, so that blocks start on a word).
_BLOCK = 4096


@_jit
def _draw(keep: np.ndarray, key: np.uint64, first: int, threshold: np.uint64, words: np.ndarray) -> None:
    """``keep[j]``: whether entry ``first + j`` of the stream is kept. ``words``: scratch of
    at least ``keep.size // 2 + 2`` words."""
    start = first // 2
    count = (first + keep.size + 1) // 2 - start
    for k in range(count):  # two loops that vectorise, rather than one that does not
        z = key + np.uint64(start + k + 1) * _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        words[k] = z ^ (z >> np.uint64(31))
    halves = words[:count].view(np.uint32)[first % 2 :]
    for j in range(keep.size):
        keep[j] = halves[j] >= threshold


@_jit
def _draw_blocks(keep: np.ndarray, key: np.uint64, threshold: np.uint64) -> None:
    words = np.empty(_BLOCK // 2 + 2, np.uint64)  # scratch that stays in L1
    for first in range(0, keep.size, _BLOCK):
        _draw(keep[first : first + _BLOCK], key, first, threshold, words)


def draw_keep(keep: np.ndarray, key: int, threshold: int) -> None:
    """Fill the flat bool array ``keep`` with entries ``0 ..`` of the stream keyed ``key``."""
    _draw_blocks(keep, np.uint64(key % 2**64), np.uint64(threshold))


@_jit
def apply_elements(x: np.ndarray, keep: np.ndarray, scale: Any, out: np.ndarray) -> None:
    """``out[i] = x[i] * scale`` where ``keep[i]``, else +0.0 (``x[i]`` unread)."""
    zero = scale - scale
    for i in range(x.size):
        out[i] = x[i] * scale if keep[i] else zero


@_jit
def noise_product(x: np.ndarray, noise: np.ndarray, sigma: Any, out: np.ndarray) -> None:
    """``noise = 1 + sigma * noise`` (in place) and ``out = x * noise``, in one pass."""
    for i in range(x.size):
        noise[i] = sigma * noise[i] + 1
        out[i] = x[i] * noise[i]


@_sum_jit
def masked_linear(
    x: np.ndarray,
    weight: np.ndarray,
    key: np.uint64,
    threshold: np.uint64,
    scale: Any,
    out: np.ndarray,
    start: int,
    stop: int,
) -> None:
    """``out[g, r, o] = scale * sum_i x[g, r, i] * weight[o, i]`` over the kept ``(g, o, i)``
    (entry ``(g * O + o) * I + i`` of the stream keyed ``key``, drawn here row by row), for
    the weight rows ``start <= o < stop``."""
    groups, rows, inputs = x.shape
    outputs = weight.shape[0]
    keep = np.empty(inputs, np.bool_)
    words = np.empty(inputs // 2 + 2, np.uint64)
    zero = scale - scale
    for block in range(start, stop, _ROWS):
        for g in range(groups):
            for o in range(block, min(block + _ROWS, stop)):
                _draw(keep, key, (g * outputs + o) * inputs, threshold, words)
                for r in range(rows):
                    total = zero
                    for i in range(inputs):
                        total += x[g, r, i] * weight[o, i] if keep[i] else zero
                    out[g, r, o] = total * scale


@_sum_jit
def masked_linear_backward(
    x: np.ndarray,
    weight: np.ndarray,
    key: np.uint64,
    threshold: np.uint64,
    scale: Any,
    grad: np.ndarray,
    grad_x: np.ndarray,
    grad_weight: np.ndarray,
    start: int,
    stop: int,
) -> None:
    """Add the gradients of :func:`masked_linear` over the weight rows ``start`` to ``stop``
    to ``grad_x`` (every row adds to all of it) and ``grad_weight``."""
    groups, rows, inputs = x.shape
    outputs = weight.shape[0]
    keep = np.empty(inputs, np.bool_)
    words = np.empty(inputs // 2 + 2, np.uint64)
    zero = scale - scale
    for block in range(start, stop, _ROWS):
        for g in range(groups):
            for o in range(block, min(block + _ROWS, stop)):
                _draw(keep, key, (g * outputs + o) * inputs, threshold, words)
                for r in range(rows):
                    d = grad[g, r, o] * scale
                    for i in range(inputs):
                        kept = keep[i]
                        grad_x[g, r, i] += d * weight[o, i] if kept else zero
                        grad_weight[o, i] += d * x[g, r, i] if kept else zero
