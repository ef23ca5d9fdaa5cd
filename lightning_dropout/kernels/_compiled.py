"""numba kernels of the CPU path (imported only where numba is installed).

Each kernel is one pass over memory, releases the GIL and is compiled on first use, then
cached on disk. Scales arrive in the arrays' dtype, so ``x * scale`` rounds as torch's
``x * scale`` does; dropped entries are written as +0.0 without reading the input.

The passes that run on several threads are reached through :func:`serve_float32` and
:func:`serve_float64`: C functions that torch's own OpenMP runtime runs on each thread of a
parallel region (``GOMP_parallel``, called by :mod:`.cpu`). They read one job, a header of
int64 slots (``HEADER``), and take pieces of its work in turn until none is left.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

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
    """``out[i] = x[i] * scale`` where ``keep[i]``, else 0."""
    for i in range(x.size):
        out[i] = x[i] * scale if keep[i] else 0


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


# ---------------------------------------------------------------------------------------
# Jobs shared out among torch's OpenMP threads. Header slots (int64):
#   0 pieces, 1 items the pieces cover, 2 next piece (claimed atomically), 3 threads that
#   claimed a piece (each thread's number, counted from 0, is its claim), 4 job kind,
#   5-10 addresses of arrays, 11-14 sizes, 15 the scale (in the arrays' dtype).
HEADER = 16
ROWS, ELEMENTS, NOISE, LINEAR, LINEAR_BACKWARD = range(5)


def _fetch_add_typing(typingctx: Any, address: Any) -> Any:
    """``_fetch_add(address)``: atomically add 1 to the int64 at ``address``; returns the
    value before."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        pointer = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.atomic_rmw("add", pointer, ir.Constant(ir.IntType(64), 1), "seq_cst")

    return types.int64(types.int64), codegen


def _pointer_typing(typingctx: Any, address: Any, like: Any) -> Any:
    """``_pointer(address, like)``: ``address`` as a pointer to values of ``like``'s type."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return types.CPointer(like)(address, like), codegen


_fetch_add: Any = intrinsic(_fetch_add_typing)
_carray: Any = numba.carray  # (its stubs know no 3-D shapes)
_pointer: Any = intrinsic(_pointer_typing)


@_jit
def _serve(data: Any, zero: Any) -> None:
    """Claim pieces of the job at ``data`` until none is left, and do them."""
    header = _carray(data, HEADER, np.int64)
    scale = _pointer(header.ctypes.data + 120, zero)[0]
    pieces, items, kind = header[0], header[1], header[4]
    a, b, c, d, e, f = header[5], header[6], header[7], header[8], header[9], header[10]
    n0, n1, n2, n3 = header[11], header[12], header[13], header[14]
    byte, thread = np.uint8(0), -1
    while True:
        piece = _fetch_add(header.ctypes.data + 16)
        if piece >= pieces:
            return
        if thread < 0:
            thread = _fetch_add(header.ctypes.data + 24)
        start, stop = items * piece // pieces, items * (piece + 1) // pieces
        if kind == ROWS:  # x (n0, n1), keep (n0), out (n0, n1)
            x, out = _carray(_pointer(a, zero), (n0, n1)), _carray(_pointer(c, zero), (n0, n1))
            keep = _carray(_pointer(b, byte), n0)
            scale_rows(x[start:stop], keep[start:stop], scale, out[start:stop])
        elif kind == ELEMENTS:  # x (n1), keep (n0, n1), out (n0, n1)
            x = _carray(_pointer(a, zero), n1)
            keep = _carray(_pointer(b, byte), (n0, n1))
            out = _carray(_pointer(c, zero), (n0, n1))
            for group in range(n0):  # one row at a time: contiguous slices vectorise
                scale_elements(x[start:stop], keep[group, start:stop], scale, out[group, start:stop])
        elif kind == NOISE:  # x, noise, out (n0)
            x, noise = _carray(_pointer(a, zero), n0), _carray(_pointer(b, zero), n0)
            out = _carray(_pointer(c, zero), n0)
            noise_product(x[start:stop], noise[start:stop], scale, out[start:stop])
        else:  # x (n0, n1, n2), weight (n3, n2), keep (n0, n3, n2), out or grad (n0, n1, n3)
            x = _carray(_pointer(a, zero), (n0, n1, n2))
            weight = _carray(_pointer(b, zero), (n3, n2))
            keep = _carray(_pointer(c, byte), (n0, n3, n2))
            out = _carray(_pointer(d, zero), (n0, n1, n3))
            if kind == LINEAR:
                masked_linear(x, weight, keep, scale, out, start, stop)
            else:  # each thread its own block of grad_x (at e): every weight row adds to all of x
                grad_x = _carray(_pointer(e + thread * x.size * x.itemsize, zero), (n0, n1, n2))
                grad_weight = _carray(_pointer(f, zero), (n3, n2))
                masked_linear_backward(x, weight, keep, scale, out, grad_x, grad_weight, start, stop)


@numba.cfunc(types.void(types.voidptr), cache=True)
def serve_float32(data: Any) -> None:
    """A job on float32 arrays: the function each OpenMP thread runs."""
    _serve(data, np.float32(0))


@numba.cfunc(types.void(types.voidptr), cache=True)
def serve_float64(data: Any) -> None:
    """A job on float64 arrays: the function each OpenMP thread runs."""
    _serve(data, np.float64(0))
