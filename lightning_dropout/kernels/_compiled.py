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
def sum_masked(grad: np.ndarray, keep: np.ndarray, scale: np.floating[Any], total: np.ndarray) -> None:
    """``total[e] += grad[g, e] * scale`` over the groups ``g`` where ``keep[g, e]``."""
    for g in range(keep.shape[0]):
        for e in range(keep.shape[1]):
            if keep[g, e]:
                total[e] += grad[g, e] * scale


@_jit
def noise_product(x: np.ndarray, noise: np.ndarray, sigma: np.floating[Any], out: np.ndarray) -> None:
    """``noise = 1 + sigma * noise`` in place, and ``out = x * noise``."""
    for i in range(x.size):
        noise[i] = sigma * noise[i] + 1
        out[i] = x[i] * noise[i]
