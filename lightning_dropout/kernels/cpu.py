"""The CPU fast path: exact Bernoulli masks from torch's random bytes, applied in one pass.

Masks. On CPU ``bernoulli_`` costs about 10 ns an element and a copy 0.2 ns: the draw is
what dropout pays for. This path draws 64-bit words from torch's own generator
(``random_``: reproducible under ``torch.manual_seed``, and per rank where the caller
seeds per rank) and reads them as one uniform byte per decision. An element is dropped
iff ``U < p``, where ``U = 0.u1 u2 ...`` (base 256) is uniform on [0, 1) and
``p = 0.p1 p2 ... pk`` is the exact base-256 expansion of the float64 ``p``. The first
byte decides unless ``u1 == p1`` (probability 1/256, never when ``p`` is a multiple of
1/256); only those ties draw further bytes, until the tie is gone or the expansion ends
(then ``U >= p``: kept). So every element is dropped independently with probability
exactly ``p``. ``p = 0.5`` takes one random bit a decision instead of a byte. The mask is
one bool an element (or channel), kept for backward as torch keeps its own.

Applying. With numba, one compiled pass (:mod:`._compiled`) writes ``x * scale`` on kept
entries and +0.0 on dropped ones without reading them, so a dropped inf or NaN gives an
exact 0 (float32 and float64). Without numba, and for other dtypes, torch ops compute the
same values from the same masks. Per-sample DropConnect of a linear layer multiplies by
its masks without building the masked weights (:func:`group_masked_linear`).

Threads. Large passes run on torch's own OpenMP threads (the runtime torch loaded, entered
through ``GOMP_parallel``), which claim pieces of the pass one at a time. Those threads
spin for a while after each torch op: a pool of our own (tried first) waited for them to
give up a core and ran 2-3x slower right after a torch op than alone. A thread that
claims no piece shows that the other cores are busy; passes then run on the calling
thread alone for a while (see :class:`_Threads`). Without an OpenMP runtime of torch's
(macOS, Windows), or in a forked child, passes run on the calling thread.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "NUMBA_SWITCH",
    "channel_dropout",
    "compiled",
    "dropout",
    "fits_masked_linear",
    "gaussian_dropout",
    "group_masked_linear",
    "group_masked_weights",
    "keep_mask",
    "probability_digits",
]

# Set to 0 to use torch ops instead of the numba kernels (same masks, same values).
NUMBA_SWITCH = "LIGHTNING_DROPOUT_NUMBA"
_COMPILED_DTYPES = (torch.float32, torch.float64)
_MIN_INT64 = -(2**63)
# Below this many elements a pass runs on the calling thread alone: sharing it out costs
# about what it saves (measured at 1M: 0.35 ms alone, 0.40 ms shared).
_PARALLEL_NUMEL = 1 << 21
# Channels at least this long are applied row by row; shorter ones element by element.
_ROW_LENGTH = 16


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


@functools.cache
def compiled() -> ModuleType | None:
    """The numba kernels, compiled, or None where numba is missing, switched off or fails.

    Example:
        >>> compiled() is None or callable(compiled().decide_bytes)
        True
    """
    if os.environ.get(NUMBA_SWITCH, "1") == "0":
        return None
    try:
        from lightning_dropout.kernels import _compiled
    except ImportError:
        return None
    try:  # compile every kernel now (the jobs are, on import), before any call draws numbers
        _compiled.spread_bits(np.zeros(1, np.uint8), np.empty(1, np.uint64))
        _compiled.decide_bytes(np.zeros(1, np.uint64), 1, 0, np.empty(1, np.uint64), np.empty(8, np.int64))
    except Exception as error:  # a numba that cannot compile here: torch ops instead
        warnings.warn(f"numba kernels unavailable, using torch ops: {error!r}", RuntimeWarning, stacklevel=2)
        return None
    return _compiled


def _fits_compiled(x: Tensor) -> ModuleType | None:
    return compiled() if x.dtype in _COMPILED_DTYPES else None


@functools.cache
def _openmp_parallel() -> Callable[..., None] | None:
    """``GOMP_parallel`` of the OpenMP runtime that torch's own parallel ops use, or None.

    Found among the libraries loaded from torch's installation, so that our passes run on
    the threads torch has already started (and keeps spinning a while after each op): a
    pool of our own would wait on those spinning threads for a core. LLVM's and Intel's
    runtimes export the same GNU entry point.
    """
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    torch_dir = os.path.dirname(torch.__file__)
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split(maxsplit=5)[-1].strip() for line in maps if torch_dir in line})
    except OSError:  # not Linux
        return None
    for path in paths:
        if os.path.basename(path).startswith(("libgomp", "libiomp", "libomp")):
            try:
                parallel = ctypes.CDLL(path).GOMP_parallel
            except (OSError, AttributeError):
                continue
            parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
            parallel.restype = None
            return parallel
    return None


class _Threads:
    """How many threads a pass gets: torch's count, or one after a pass found the host busy.

    A thread that claimed no piece of a pass arrived after the others had done it all: the
    cores it waits for are busy with other work, and every parallel pass would wait for
    them again (torch's own ops were measured at several times their idle time on such a
    host). Passes then run on the calling thread alone for ``_SERIAL_S`` before trying again.
    """

    def __init__(self) -> None:
        self.pid, self.serial_until = os.getpid(), 0.0

    def count(self, numel: int) -> int:
        if numel < _PARALLEL_NUMEL or _openmp_parallel() is None or os.getpid() != self.pid:
            return 1  # a forked child: GNU OpenMP hangs in a child forked after it ran
        return 1 if time.monotonic() < self.serial_until else torch.get_num_threads()

    def busy(self) -> None:
        self.serial_until = time.monotonic() + _SERIAL_S


_THREADS = _Threads()
_SERIAL_S = 0.5


def _empty(size: int, dtype: torch.dtype) -> np.ndarray:
    # torch's allocator, so that torch.profiler's memory accounting sees the buffer
    return torch.empty(size, dtype=dtype).numpy()


def _address(array: Tensor | np.ndarray) -> int:
    return array.data_ptr() if isinstance(array, Tensor) else array.ctypes.data


def _run(
    kind: int,
    items: int,
    numel: int,
    arrays: tuple[Tensor | np.ndarray, ...],
    sizes: tuple[int, ...],
    scale: float,
    threads: int | None = None,
) -> None:
    """A job of the compiled kernels (``kind``, over ``items`` in pieces) on ``arrays``
    (contiguous, float ones of ``arrays[0]``'s dtype; they must outlive the call)."""
    kernels = compiled()
    assert kernels is not None
    threads = _THREADS.count(numel) if threads is None else threads
    header = np.zeros(kernels.HEADER, np.int64)
    header[:2] = 1 if threads == 1 else min(items, 4 * threads), items
    header[4] = kind
    header[5 : 5 + len(arrays)] = [_address(array) for array in arrays]
    header[11 : 11 + len(sizes)] = sizes
    single = arrays[0].dtype in (torch.float32, np.float32)
    header[15:].view(np.float32 if single else np.float64)[0] = scale  # rounded as torch rounds it
    serve = kernels.serve_float32 if single else kernels.serve_float64
    if threads == 1:
        serve.ctypes(header.ctypes.data)  # the GIL released, as for any ctypes call
        return
    parallel = _openmp_parallel()
    assert parallel is not None
    parallel(serve.address, header.ctypes.data, threads, 0)
    if header[3] < threads:
        _THREADS.busy()


def _random_bytes(count: int, generator: torch.Generator | None) -> np.ndarray:
    """``count`` uniform bytes: the bytes of 64-bit words from torch's ``random_``."""
    words = torch.empty(-(-count // 8), dtype=torch.int64).random_(_MIN_INT64, None, generator=generator)
    return words.numpy().view(np.uint8)[:count]


def _resolve_ties(positions: np.ndarray, digits: bytes, generator: torch.Generator | None) -> np.ndarray:
    """Of the elements tied on the first digit, the positions of those kept (``U >= p``)."""
    kept = []
    for digit in digits[1:]:
        if positions.size == 0:
            break
        draws = _random_bytes(positions.size, generator)
        kept.append(positions[draws > digit])
        positions = positions[draws == digit]
    kept.append(positions)  # still tied when p's expansion ends: U >= p
    return np.concatenate(kept)


def keep_mask(
    numel: int, p: float, generator: torch.Generator | None = None, out: np.ndarray | None = None
) -> Tensor:
    """A flat bool mask of ``numel`` independent entries, each True w.p. exactly ``1 - p``.

    For ``0 < p < 1``; drawn from ``generator`` (torch's global CPU generator when None).
    ``out``: a bool array of at least ``numel`` entries rounded up to a multiple of 8, to
    write into instead of fresh memory.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> round(keep_mask(1_000_000, 0.3).float().mean().item(), 2)
        0.7
    """
    keep = _empty(-(-numel // 8) * 8, torch.bool) if out is None else out
    if p == 0.5:  # one random bit a decision: a set bit keeps
        draws, kernels = _random_bytes(-(-numel // 8), generator), compiled()
        if kernels is None:
            keep[:numel] = np.unpackbits(draws, count=numel, bitorder="little")
        else:
            kernels.spread_bits(draws, keep[: draws.size * 8].view(np.uint64))
        return torch.from_numpy(keep[:numel])
    digits = probability_digits(p)
    words = _random_bytes(-(-numel // 8) * 8, generator)
    # p = d / 256 exactly: keep iff u1 >= d, never a tie. Otherwise keep iff u1 > d.
    on_grid = len(digits) == 1
    threshold = digits[0] if on_grid else digits[0] + 1
    ties = _decide(words, numel, threshold, -1 if on_grid else digits[0], keep)
    if ties.size:
        keep[_resolve_ties(ties, digits, generator)] = True
    return torch.from_numpy(keep[:numel])


def _decide(words: np.ndarray, numel: int, threshold: int, tie: int, keep: np.ndarray) -> np.ndarray:
    """``keep = words >= threshold`` byte by byte; returns the positions below ``numel`` of
    the bytes equal to ``tie`` (about 1 in 256; none for -1)."""
    kernels = compiled()
    if kernels is not None and threshold < 256:
        ties = np.empty(numel // 128 + 64 if tie >= 0 else 0, np.int64)
        count = kernels.decide_bytes(
            words.view(np.uint64), threshold, tie, keep[: words.size].view(np.uint64), ties
        )
        if count <= ties.size:
            return ties[:count][ties[:count] < numel]
    # numpy: one thread, so a busy host does not stall it
    np.greater_equal(words[:numel], threshold, out=keep[:numel])
    return np.flatnonzero(words[:numel] == tie) if tie >= 0 else np.empty(0, np.int64)


def _masked_scale(x: Tensor, keep: Tensor, scale: float, out: Tensor) -> Tensor:
    """``out[g, e, :] = x[e, :] * scale`` where ``keep[g, e]``, exactly +0.0 elsewhere.

    ``x`` (E, L) and ``out`` (G, E, L) contiguous, ``keep`` (G, E) bool; returns ``out``.
    """
    kernels = _fits_compiled(x)
    if kernels is None:
        torch.mul(x.expand_as(out), scale, out=out)
        return out.masked_fill_(~keep.unsqueeze(-1), 0.0)
    groups, entries, length = out.shape
    if groups == 1 and length >= _ROW_LENGTH:  # channels: dropped rows are not read
        _run(kernels.ROWS, entries, out.numel(), (x, keep, out), (entries, length), scale)
    else:
        keep = keep.repeat_interleave(length, dim=1) if length > 1 else keep
        _run(kernels.ELEMENTS, x.numel(), out.numel(), (x, keep, out), (groups, x.numel()), scale)
    return out


def _apply(x: Tensor, keep: Tensor, scale: float, inplace: bool) -> Tensor:
    """``x * scale`` where the flat ``keep`` is True, each entry covering equal runs of ``x``."""
    source = x.contiguous()
    # a contiguous copy of x is ours to overwrite (backward: often a transposed gradient)
    out = source if inplace or source is not x else torch.empty_like(source)
    _masked_scale(source.view(keep.numel(), -1), keep.view(1, -1), scale, out.view(1, keep.numel(), -1))
    return x.copy_(out) if inplace and out is not x else out


class _MaskedScale(torch.autograd.Function):
    """``x * scale`` on kept entries, 0 elsewhere; backward applies the same mask."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, keep: Tensor, scale: float, inplace: bool) -> Tensor:
        out = _apply(x, keep, scale, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (keep,) = ctx.saved_tensors
        return _MaskedScale.apply(grad, keep, ctx.scale, False), None, None, None


def _masked(x: Tensor, keep: Tensor, scale: float, inplace: bool) -> Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaskedScale.apply(x, keep, scale, inplace)
    return _apply(x, keep, scale, inplace)


def dropout(x: Tensor, p: float, scale: float, inplace: bool = False) -> Tensor:
    """Element dropout of a CPU tensor with ``0 < p < 1``: keep w.p. ``1 - p``, scale kept.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> y = dropout(torch.ones(3, 5), 0.75, 4.0)
        >>> bool(((y == 0) | (y == 4)).all())
        True
    """
    return _masked(x, keep_mask(x.numel(), p), scale, inplace)


def channel_dropout(x: Tensor, p: float, scale: float, inplace: bool = False) -> Tensor:
    """Channel dropout of a batched CPU input (N, C, *spatial): one draw per (n, c).

    Example:
        >>> y = channel_dropout(torch.ones(2, 3, 4), 0.5, 2.0)
        >>> bool((y.amax(dim=2) == y.amin(dim=2)).all())
        True
    """
    return _masked(x, keep_mask(x.shape[0] * x.shape[1], p), scale, inplace)


class _GaussianNoise(torch.autograd.Function):
    """``x * (1 + sigma * eps)`` in one pass after the draw; backward multiplies by the noise."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sigma: float) -> Tensor:
        source = x.contiguous()
        noise = torch.randn_like(source)
        kernels = _fits_compiled(x)
        if kernels is None:
            out = source * noise.mul_(sigma).add_(1.0)
        else:
            out = torch.empty_like(source)
            _run(kernels.NOISE, out.numel(), out.numel(), (source, noise, out), (out.numel(),), sigma)
        ctx.save_for_backward(noise)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (noise,) = ctx.saved_tensors
        return grad * noise, None


def gaussian_dropout(x: Tensor, sigma: float) -> Tensor:
    """``x * (1 + sigma * eps)``, eps ~ N(0, 1) from ``torch.randn``: the reference's values.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> y = gaussian_dropout(torch.ones(100_000), 1.0)
        >>> round(y.mean().item(), 1), round(y.std().item(), 1)
        (1.0, 1.0)
    """
    return _GaussianNoise.apply(x, sigma)


class _GroupMaskedWeights(torch.autograd.Function):
    """One masked, scaled copy of ``weight`` per group; backward sums the masked grads."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _group_masked(weight, keep, scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        total = torch.zeros(grad.shape[1:], dtype=grad.dtype)
        # One group at a time: a contiguous copy of all of ``grad`` (often a transposed
        # view from the matmul) would cost as much memory as the chunk's masked weights.
        buffer = torch.empty_like(total)
        flat = buffer.view(-1, 1)
        for group in range(keep.shape[0]):
            buffer.copy_(grad[group])
            total.add_(_masked_scale(flat, keep[group : group + 1], ctx.scale, flat[None]).view_as(total))
        return total, None, None


def _group_masked(weight: Tensor, keep: Tensor, scale: float) -> Tensor:
    masked = weight.new_empty(keep.shape[0], *weight.shape)
    _masked_scale(weight.reshape(-1, 1), keep, scale, masked.view(*keep.shape, 1))
    return masked


def group_masked_weights(weight: Tensor, groups: int, p: float, generator: torch.Generator) -> Tensor:
    """``groups`` independent DropConnect copies of a CPU ``weight`` (inverted scaling).

    Differentiable with respect to ``weight``; the masks (one bool a weight) are drawn
    from ``generator`` and are all that backward keeps.

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> w = group_masked_weights(torch.ones(3, 4), 2, 0.5, generator)
        >>> w.shape, sorted(w.unique().tolist())
        (torch.Size([2, 3, 4]), [0.0, 2.0])
    """
    keep = keep_mask(groups * weight.numel(), p, generator).view(groups, -1)
    scale = 1.0 / (1.0 - p)
    if torch.is_grad_enabled() and weight.requires_grad:
        return _GroupMaskedWeights.apply(weight.contiguous(), keep, scale)
    return _group_masked(weight.contiguous(), keep, scale)


def _chunk_masks(
    weight: Tensor, p: float, seeds: list[int], groups: int
) -> Iterator[tuple[slice, np.ndarray]]:
    """Each chunk of groups with its masks (G, O, I), drawn from a generator seeded for it
    into one buffer that every chunk reuses (fresh memory costs page faults)."""
    chunk = -(-groups // len(seeds))
    buffer = _empty(-(-chunk * weight.numel() // 8) * 8, torch.bool)
    for index, seed in enumerate(seeds):
        part = slice(index * chunk, min(groups, (index + 1) * chunk))
        size = part.stop - part.start
        keep = keep_mask(size * weight.numel(), p, torch.Generator().manual_seed(seed), buffer)
        yield part, keep.view(size, *weight.shape).numpy()


class _MaskedLinear(torch.autograd.Function):
    """Per-group masked ``x @ weight.T / (1 - p)``, x (G, R, I), in chunks of groups whose
    masks come from the chunk's seed: drawn in forward, drawn again in backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, p: float, seeds: list[int]) -> Tensor:
        kernels = compiled()
        assert kernels is not None
        out = x.new_empty(*x.shape[:2], weight.shape[0])
        for part, keep in _chunk_masks(weight, p, seeds, x.shape[0]):
            arrays, sizes = (x[part], weight, keep, out[part]), (*x[part].shape, weight.shape[0])
            _run(kernels.LINEAR, weight.shape[0], keep.size, arrays, sizes, 1 / (1 - p))
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.seeds = p, seeds
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        kernels = compiled()
        assert kernels is not None
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x, grad_weight = torch.empty_like(x), torch.zeros_like(weight)
        for part, keep in _chunk_masks(weight, ctx.p, ctx.seeds, x.shape[0]):
            threads = _THREADS.count(keep.size)
            # one block of grad_x a thread: every weight row adds to all of x
            blocks = x.new_zeros(threads, *x[part].shape)
            arrays = (x[part], weight, keep, grad[part], blocks, grad_weight)
            sizes = (*x[part].shape, weight.shape[0])
            _run(kernels.LINEAR_BACKWARD, weight.shape[0], keep.size, arrays, sizes, 1 / (1 - ctx.p), threads)
            torch.sum(blocks, dim=0, out=grad_x[part])
        return grad_x, grad_weight, None, None


def fits_masked_linear(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`group_masked_linear` computes for these tensors (else it returns None)."""
    return _fits_compiled(x) is not None and weight.dtype == x.dtype


def group_masked_linear(x: Tensor, weight: Tensor, p: float, seeds: list[int]) -> Tensor | None:
    """``x[g] @ (weight * mask_g).T / (1 - p)`` per group ``g`` of x (G, R, in), or None.

    The groups are split into ``len(seeds)`` equal chunks (the last may be shorter); chunk
    ``k``'s masks are those :func:`group_masked_weights` draws from a generator seeded with
    ``seeds[k]``, but never multiplied out: only the chunk being computed holds them (one
    bool a weight and group), backward draws them again, and each weight row meets every
    sample of the chunk while in cache. None where the numba kernels do not apply (float32
    and float64): then mask the weights and multiply.

    Example:
        >>> y = group_masked_linear(torch.ones(2, 1, 3), torch.ones(4, 3), 0.5, [7])
        >>> y is None or y.shape == (2, 1, 4)
        True
    """
    if not fits_masked_linear(x, weight):
        return None
    return _MaskedLinear.apply(x.contiguous(), weight.contiguous(), p, seeds)
