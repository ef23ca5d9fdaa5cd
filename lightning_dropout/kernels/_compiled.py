"""numba kernels of the CPU path (imported only where numba is installed).

Each kernel is one pass over memory and releases the GIL; all are compiled when this module
is imported (into the two C functions below), then cached on disk. Scales arrive in the
arrays' dtype, so ``x * scale`` rounds as torch's ``x * scale`` does; dropped entries are
written as +0.0 without reading the input.

The passes that run on several threads are reached through :func:`serve_float32` and
:func:`serve_float64`: C functions that torch's own OpenMP runtime runs on each thread of a
parallel region (``GOMP_parallel``, called by :mod:`.cpu`). They read one job, a header of
int64 slots (``HEADER``), and take pieces of its work in turn until none is left.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from lightning_dropout.kernels._splitmix import GAMMA, MIX1, MIX2

_jit = numba.njit(nogil=True, cache=True)

_GAMMA, _MIX1, _MIX2 = np.uint64(GAMMA), np.uint64(MIX1), np.uint64(MIX2)
_ONES, _HIGHS = np.uint64(0x0101010101010101), np.uint64(0x8080808080808080)
# Elements decided and applied together: their random words stay in L1 meanwhile.
BLOCK = 2048


@_jit
def splitmix(seed: np.uint64, counter: np.uint64) -> np.uint64:
    """Word ``counter`` of the SplitMix64 stream keyed by ``seed`` (:mod:`._splitmix`)."""
    z = seed + (counter + np.uint64(1)) * _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@_jit
def _tie_kept(position: int, seed: np.uint64, digits: np.ndarray, rounds: int) -> bool:
    """Whether an element whose first byte equals ``digits[0]`` is kept: its next bytes,
    word ``position * rounds + r`` of the tie stream, against ``digits[1:]``."""
    word = np.uint64(0)
    for k in range(1, digits.size):
        byte = (k - 1) % 8
        if byte == 0:
            word = splitmix(seed, np.uint64(position * rounds + (k - 1) // 8))
        u = (word >> np.uint64(8 * byte)) & np.uint64(255)
        if u != digits[k]:
            return u > digits[k]
    return True  # U >= p


@_jit
def draw_keep(
    keep: np.ndarray, first: int, seed: np.uint64, tie_seed: np.uint64, digits: np.ndarray, raw: np.ndarray
) -> None:
    """``keep`` (uint8, a multiple of 8 long: elements ``8 * first`` on) = 1 where kept.

    Element i's first byte is byte ``i % 8`` of word ``i // 8`` of the ``seed`` stream; it
    decides against p's first base-256 digit unless equal (never when p is on the 1/256
    grid), when the tie stream decides (:func:`_tie_kept`). ``raw``: scratch of at least
    ``keep.size // 8`` words."""
    words, lead = keep.size // 8, digits[0]
    for w in range(words):
        raw[w] = splitmix(seed, np.uint64(first + w))
    bytes_ = raw[:words].view(np.uint8)
    if digits.size == 1:
        for i in range(keep.size):
            keep[i] = bytes_[i] >= lead
        return
    for i in range(keep.size):
        keep[i] = bytes_[i] > lead
    rounds, pattern = (digits.size + 6) // 8, _ONES * np.uint64(lead)
    for w in range(words):
        v = raw[w] ^ pattern
        if (v - _ONES) & ~v & _HIGHS:  # a byte equal to the lead digit (1 word in 32)
            for b in range(8):
                if (v >> np.uint64(8 * b)) & np.uint64(255) == 0:
                    keep[8 * w + b] = _tie_kept(8 * (first + w) + b, tie_seed, digits, rounds)


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


def _ziggurat_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Marsaglia & Tsang's ziggurat of the standard normal, 256 layers of 52-bit draws (the
    layout of numpy's ``standard_normal``): each layer's accept limit, width and density at
    its edge."""
    limits, widths, densities = np.zeros(256, np.uint64), np.zeros(256), np.zeros(256)
    edge = previous = _TAIL
    q = _LAYER_AREA / math.exp(-0.5 * edge * edge)
    limits[0], widths[0], widths[255] = int(edge / q * 2.0**52), q / 2.0**52, edge / 2.0**52
    densities[0], densities[255] = 1.0, math.exp(-0.5 * edge * edge)
    for i in range(254, 0, -1):
        edge = math.sqrt(-2.0 * math.log(_LAYER_AREA / edge + math.exp(-0.5 * edge * edge)))
        limits[i + 1], previous = int(edge / previous * 2.0**52), edge
        densities[i], widths[i] = math.exp(-0.5 * edge * edge), edge / 2.0**52
    return limits, widths, densities


_TAIL, _LAYER_AREA = 3.6541528853610088, 0.00492867323399
_LIMITS, _WIDTHS, _DENSITIES = _ziggurat_tables()
_MANTISSA = np.uint64((1 << 52) - 1)


@_jit
def _uniform(seed: np.uint64, counter: int) -> float:
    """A uniform in [0, 1): the top 53 bits of a word."""
    return float(splitmix(seed, np.uint64(counter)) >> np.uint64(11)) * 2.0**-53


@_jit
def _layer_point(word: np.uint64) -> tuple[np.uint64, np.uint64, float]:
    """A word's layer (8 bits), its draw in the layer (52 bits) and that point (sign: 1 bit)."""
    layer, draw = word & np.uint64(255), (word >> np.uint64(9)) & _MANTISSA
    point = float(draw) * _WIDTHS[layer]
    return layer, draw, -point if word & np.uint64(256) else point


@_jit
def _rejected_normal(position: int, numel: int, layer: np.uint64, point: float, seed: np.uint64) -> float:
    """The normal of an element whose first point fell outside its layer's rectangle: the
    wedge or tail test, and fresh points if rejected, with draws ``k * numel + position``
    (k = 0, 1, ...) of the ``seed`` stream."""
    k = 0
    while True:
        if layer == 0:  # the tail beyond _TAIL (Marsaglia's method)
            while True:
                x = -math.log1p(-_uniform(seed, k * numel + position)) / _TAIL
                y = -math.log1p(-_uniform(seed, (k + 1) * numel + position))
                k += 2
                if y + y > x * x:
                    return -(_TAIL + x) if point < 0 else _TAIL + x
        test = (_DENSITIES[layer - 1] - _DENSITIES[layer]) * _uniform(seed, k * numel + position)
        if test + _DENSITIES[layer] < math.exp(-0.5 * point * point):
            return point
        layer, draw, point = _layer_point(splitmix(seed, np.uint64((k + 1) * numel + position)))
        k += 2
        if draw < _LIMITS[layer]:
            return point


@_jit
def draw_normals(noise: np.ndarray, first: int, numel: int, seed: np.uint64, tie_seed: np.uint64) -> None:
    """``noise[i]``: standard normal number ``first + i`` of the ``seed`` stream (ziggurat:
    one word a number, 1.3% of numbers draw more from the ``tie_seed`` stream)."""
    for i in range(noise.size):
        layer, draw, point = _layer_point(splitmix(seed, np.uint64(first + i)))
        if draw < _LIMITS[layer]:
            noise[i] = point
        else:
            noise[i] = _rejected_normal(first + i, numel, layer, point, tie_seed)


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
#   5-10 addresses of arrays, 11-18 sizes (and the streams' keys), 19 the scale (in the
#   arrays' dtype).
HEADER = 20
ELEMENTS, NOISE, LINEAR, LINEAR_BACKWARD, MASK, DROPOUT = range(6)
# Each kind's time an element, relative to a pass over memory (2 cores): what decides
# from which size sharing a pass among threads pays for waking them.
COSTS = (1, 16, 4, 4, 4, 4)


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
    scale = _pointer(header.ctypes.data + 8 * (HEADER - 1), zero)[0]
    pieces, items, kind = header[0], header[1], header[4]
    a, b, c, d, e, f = header[5], header[6], header[7], header[8], header[9], header[10]
    n0, n1, n2, n3, n4 = header[11], header[12], header[13], header[14], header[15]
    byte, thread = np.uint8(0), -1
    raw = np.empty(BLOCK // 8 if kind >= MASK else 0, np.uint64)
    scratch = np.empty(BLOCK if kind == DROPOUT else 0, np.uint8)
    while True:
        piece = _fetch_add(header.ctypes.data + 16)
        if piece >= pieces:
            return
        if thread < 0:
            thread = _fetch_add(header.ctypes.data + 24)
        start, stop = items * piece // pieces, items * (piece + 1) // pieces
        if kind >= MASK:  # pieces of mask words: keep (n0 entries, rounded up to 8; DROPOUT:
            # none at address 0), digits (n3), keys n1 and n2; DROPOUT: x, out (n0 entries of
            # n4 elements)
            digits = _carray(_pointer(d, byte), n3)
            keep = _carray(_pointer(b, byte), 8 * items if b else 0)
            for block in range(start, stop, BLOCK // 8):
                lo, hi = 8 * block, 8 * min(stop, block + BLOCK // 8)
                decided = keep[lo:hi] if b else scratch[: hi - lo]
                draw_keep(decided, block, np.uint64(n1), np.uint64(n2), digits, raw)
                hi = min(hi, n0)  # the last word's entries past n0 are no one's
                if kind == DROPOUT and n4 == 1 and lo < hi:
                    x, out = _carray(_pointer(a, zero), n0), _carray(_pointer(c, zero), n0)
                    scale_elements(x[lo:hi], decided[: hi - lo], scale, out[lo:hi])
                elif kind == DROPOUT and lo < hi:
                    x, out = _carray(_pointer(a, zero), (n0, n4)), _carray(_pointer(c, zero), (n0, n4))
                    scale_rows(x[lo:hi], decided[: hi - lo], scale, out[lo:hi])
        elif kind == ELEMENTS:  # x (n1), keep (n0, n1), out (n0, n1)
            x = _carray(_pointer(a, zero), n1)
            keep = _carray(_pointer(b, byte), (n0, n1))
            out = _carray(_pointer(c, zero), (n0, n1))
            for group in range(n0):  # one row at a time: contiguous slices vectorise
                scale_elements(x[start:stop], keep[group, start:stop], scale, out[group, start:stop])
        elif kind == NOISE:  # x, noise, out (n0); normals from the seeds n1, n2
            x, noise = _carray(_pointer(a, zero), n0), _carray(_pointer(b, zero), n0)
            out = _carray(_pointer(c, zero), n0)
            for lo in range(start, stop, BLOCK):
                hi = min(stop, lo + BLOCK)
                draw_normals(noise[lo:hi], lo, n0, np.uint64(n1), np.uint64(n2))
                noise_product(x[lo:hi], noise[lo:hi], scale, out[lo:hi])
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
