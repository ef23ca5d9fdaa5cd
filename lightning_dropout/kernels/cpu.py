"""The CPU fast path: exact Bernoulli masks drawn and applied in one pass on every thread.

Masks. On CPU ``bernoulli_`` costs about 10 ns an element and a copy 0.2 ns: the draw is
what torch's dropout pays for. Here each call draws two 64-bit keys from torch's own
generator (so ``torch.manual_seed`` reproduces every mask, and per-rank seeding gives
per-rank masks) and reads the masks from SplitMix64 streams under those keys
(:mod:`._splitmix`): word ``k`` of a stream is a function of the key and ``k`` alone, so
every thread computes its own piece, about 0.5 ns a word. An element is dropped iff
``U < p``, where ``U = 0.u1 u2 ...`` (base 256) is uniform on [0, 1) and ``p = 0.p1 p2 ...
pk`` is the exact base-256 expansion of the float64 ``p``. Element i's first byte is byte
``i % 8`` of word ``i // 8`` of the first stream; it decides unless ``u1 == p1``
(probability 1/256, never when ``p`` is a multiple of 1/256), when the element's further
bytes come from the second stream until the tie is gone or the expansion ends (then
``U >= p``: kept). So every element is dropped independently with probability exactly
``p``. Backward draws the same masks again from the same keys, so nothing per element is
kept for it (torch keeps a mask as large as the input; the torch-ops path a bool an entry).

Applying. With numba, one compiled pass (:mod:`._compiled`) draws a block of masks and
writes ``x * scale`` on its kept entries and +0.0 on dropped ones without reading them, so
a dropped inf or NaN gives an exact 0 (float32 and float64). Without numba, and for other
dtypes, torch ops compute the same masks and values. Gaussian noise is drawn the same way
(a ziggurat on the streams). Per-sample DropConnect of a linear layer multiplies by its
masks without building the masked weights (:func:`group_masked_linear`).

Threads. Large passes run on torch's own OpenMP threads (the runtime torch loaded, entered
through ``GOMP_parallel``), which claim pieces of the pass one at a time. Those threads
spin for a while after each torch op: a pool of our own (tried first) waited for them to
give up a core and ran 2-3x slower right after a torch op than alone. A pass that waited
for a thread that claimed nothing shows that the other cores are busy; passes then run on
the calling thread alone for a while (:class:`_Threads`). Without an OpenMP runtime of
torch's (macOS, Windows), or in a forked child, passes run on the calling thread.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from lightning_dropout.kernels._splitmix import shifted, splitmix

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
# Below this much work (elements times the kind's cost) a pass runs on the calling thread
# alone: sharing it out costs about what it saves (measured on 2 cores: a pass over 256K
# elements took 68 us alone and 53 us shared, a dropout pass over 64K 55 and 38 us).
_PARALLEL_WORK = 1 << 18


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
        >>> compiled() is None or callable(compiled().splitmix)
        True
    """
    if os.environ.get(NUMBA_SWITCH, "1") == "0":
        return None
    try:
        from lightning_dropout.kernels import _compiled  # compiles the jobs (cached on disk)

        # SplitMix64's first word from key 0: the compiled streams are the torch-ops ones
        if _compiled.splitmix(np.uint64(0), np.uint64(0)) != 0xE220A8397B1DCDAF:
            raise RuntimeError("compiled SplitMix64 gives wrong words")
    except ImportError:  # numba is not installed
        return None
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

    A pass that took more than ``_LATE_S`` while one of its threads claimed no piece waited
    for a thread that arrived after the others had done all the work: the cores it waits
    for are busy with other work, and every parallel pass would wait for them again
    (torch's own ops were measured at several times their idle time on such a host).
    Passes then run on the calling thread alone for ``_SERIAL_S`` before trying again. (A
    short pass is often done before a sleeping thread wakes: no sign of a busy host.)
    """

    def __init__(self) -> None:
        self.pid, self.serial_until = os.getpid(), 0.0

    def count(self, work: int) -> int:
        if work < _PARALLEL_WORK or _openmp_parallel() is None or os.getpid() != self.pid:
            return 1  # a forked child: GNU OpenMP hangs in a child forked after it ran
        return 1 if time.monotonic() < self.serial_until else torch.get_num_threads()

    def busy(self) -> None:
        self.serial_until = time.monotonic() + _SERIAL_S


_THREADS = _Threads()
_SERIAL_S, _LATE_S = 0.5, 1e-3


def _empty(size: int, dtype: torch.dtype) -> np.ndarray:
    # torch's allocator, so that torch.profiler's memory accounting sees the buffer
    return torch.empty(size, dtype=dtype).numpy()


def _address(array: Tensor | np.ndarray | None) -> int:
    if array is None:
        return 0
    return array.data_ptr() if isinstance(array, Tensor) else array.ctypes.data


def _run(
    kind: int,
    items: int,
    numel: int,
    arrays: tuple[Tensor | np.ndarray | None, ...],
    sizes: tuple[int, ...],
    scale: float,
    threads: int | None = None,
) -> None:
    """A job of the compiled kernels (``kind``, over ``items`` in pieces) on ``arrays``
    (contiguous; the float ones of ``arrays[0]``'s dtype; they must outlive the call)."""
    kernels = compiled()
    assert kernels is not None
    threads = _THREADS.count(numel * kernels.COSTS[kind]) if threads is None else threads
    double = isinstance(arrays[0], Tensor) and arrays[0].dtype == torch.float64
    # the scale's bits in the arrays' dtype, rounded as torch rounds a float64 scalar
    bits = struct.unpack("<q" if double else "<i", struct.pack("<d" if double else "<f", scale))
    header = _Header(
        1 if threads == 1 else min(items, 4 * threads),
        items,
        0,
        0,
        kind,
        *[_address(array) for array in arrays],
        *[0] * (6 - len(arrays)),
        *sizes,
        *[0] * (8 - len(sizes)),
        *bits,
    )
    serve = kernels.serve_float64 if double else kernels.serve_float32
    if threads == 1:
        serve.ctypes(header)  # the GIL released, as for any ctypes call
        return
    parallel = _openmp_parallel()
    assert parallel is not None
    start = time.perf_counter()
    parallel(serve.address, header, threads, 0)
    if header[3] < threads and time.perf_counter() - start > _LATE_S:
        _THREADS.busy()


_Header = ctypes.c_int64 * 20  # the layout of _compiled.HEADER


class _Draw(NamedTuple):
    """``entries`` masks still to be drawn: ``p`` and the keys of the streams they are read
    from."""

    p: float
    entries: int
    seeds: tuple[int, int]


def _seeds(generator: torch.Generator | None = None) -> tuple[int, int]:
    """Keys of two streams, drawn from ``generator`` (torch's global CPU generator when
    None): what makes the draws reproducible under ``torch.manual_seed``."""
    words = getattr(_SEED_WORDS, "words", None)
    if words is None:  # one buffer a thread: a fresh tensor costs more than the draw
        words = _SEED_WORDS.words = torch.empty(2, dtype=torch.int64)
    first, second = words.random_(_MIN_INT64, None, generator=generator).tolist()
    return first, second


_SEED_WORDS = threading.local()


def _draw(p: float, entries: int, generator: torch.Generator | None = None) -> _Draw:
    return _Draw(p, entries, _seeds(generator))


@functools.lru_cache(maxsize=256)
def _digit_array(p: float) -> Tensor:
    return torch.frombuffer(bytearray(probability_digits(p)), dtype=torch.uint8)


def keep_mask(
    numel: int, p: float, generator: torch.Generator | None = None, out: np.ndarray | None = None
) -> Tensor:
    """A flat bool mask of ``numel`` independent entries, each True w.p. exactly ``1 - p``.

    For ``0 < p < 1``; the streams' keys are drawn from ``generator`` (torch's global CPU
    generator when None). ``out``: a bool array of at least ``numel`` entries rounded up to
    a multiple of 8, to write into instead of fresh memory.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> round(keep_mask(1_000_000, 0.3).float().mean().item(), 2)
        0.7
    """
    return _keep(_draw(p, numel, generator), out)


def _keep(draw: _Draw, out: np.ndarray | None = None) -> Tensor:
    numel = draw.entries
    keep = torch.empty(-(-numel // 8) * 8, dtype=torch.bool) if out is None else torch.from_numpy(out)
    kernels = compiled()
    if kernels is None:
        keep[:numel] = _keep_by_torch_ops(draw)
    else:
        digits = _digit_array(draw.p)
        sizes = (numel, *draw.seeds, digits.numel())
        _run(kernels.MASK, -(-numel // 8), numel, (None, keep, None, digits), sizes, 0.0)
    return keep[:numel]


def _keep_by_torch_ops(draw: _Draw) -> Tensor:
    """The masks :func:`._compiled.draw_keep` draws, from the same streams, in torch ops."""
    numel, digits, (seed, tie_seed) = draw.entries, probability_digits(draw.p), draw.seeds
    first = splitmix(torch.arange(-(-numel // 8)), seed).view(torch.uint8)[:numel]
    if len(digits) == 1:
        return first >= digits[0]
    keep = first > digits[0]
    tied, rounds = torch.nonzero(first == digits[0]).flatten(), (len(digits) + 6) // 8
    for k, digit in enumerate(digits[1:]):
        if k % 8 == 0:
            words = splitmix(tied * rounds + k // 8, tie_seed)
        byte = shifted(words, 8 * (k % 8)) & 255
        keep[tied[byte > digit]] = True
        tied, words = tied[byte == digit], words[byte == digit]
    keep[tied] = True  # U >= p
    return keep


def _masked_scale(x: Tensor, keep: Tensor, scale: float, out: Tensor, groups: int = 1) -> Tensor:
    """``out[g, e, :] = x[e, :] * scale`` where ``keep[g, e]``, exactly +0.0 elsewhere.

    Contiguous ``x`` (E entries of equal runs), ``keep`` (G * E bools) and ``out`` (G
    copies of ``x``'s size), G = ``groups``; returns ``out``. (Masks that are drawn in
    the pass never come here: see :func:`_apply`.)
    """
    entries = keep.numel() // groups
    length = x.numel() // entries if entries else 0
    kernels = _fits_compiled(x)
    if kernels is not None and length == 1:
        _run(kernels.ELEMENTS, x.numel(), out.numel(), (x, keep, out), (groups, x.numel()), scale)
        return out
    shape = (groups, entries, length)
    torch.mul(x.view(1, entries, length).expand(shape), scale, out=out.view(shape))
    out.view(shape).masked_fill_(~keep.view(groups, entries, 1), 0.0)
    return out


def _apply(x: Tensor, mask: Tensor | _Draw, scale: float, inplace: bool) -> tuple[Tensor, Tensor | _Draw]:
    """``x * scale`` where the flat mask is True (each entry covering an equal run of ``x``),
    and what backward needs to apply the same mask: masks still to draw are drawn in the
    pass that applies them, and backward draws them again from the same keys (nothing per
    element is kept), except on the torch-ops path, which keeps them."""
    source = x.contiguous()
    # a contiguous copy of x is ours to overwrite (backward: often a transposed gradient)
    out = source if inplace or source is not x else torch.empty_like(source)
    kernels = _fits_compiled(source)
    kept: Tensor | _Draw = mask
    if isinstance(mask, _Draw) and kernels is not None:
        entries, digits = mask.entries, _digit_array(mask.p)
        length = source.numel() // entries if entries else 1
        sizes = (entries, *mask.seeds, digits.numel(), length)
        _run(kernels.DROPOUT, -(-entries // 8), source.numel(), (source, None, out, digits), sizes, scale)
    else:
        kept = _keep(mask) if isinstance(mask, _Draw) else mask
        _masked_scale(source, kept, scale, out)
    return (x.copy_(out) if inplace and out is not x else out), kept


class _MaskedScale(torch.autograd.Function):
    """``x * scale`` on kept entries, 0 elsewhere; backward applies the same mask."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, mask: Tensor | _Draw, scale: float, inplace: bool) -> Tensor:
        out, kept = _apply(x, mask, scale, inplace)
        if inplace:
            ctx.mark_dirty(x)
        if isinstance(kept, Tensor):
            ctx.save_for_backward(kept)
        ctx.draw, ctx.scale = kept if isinstance(kept, _Draw) else None, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        mask = ctx.draw if ctx.draw is not None else ctx.saved_tensors[0]
        # differentiable again only when a second derivative is being built
        masked = _MaskedScale.apply if torch.is_grad_enabled() else _masked_plain
        return masked(grad, mask, ctx.scale, False), None, None, None


def _masked(x: Tensor, mask: Tensor | _Draw, scale: float, inplace: bool) -> Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaskedScale.apply(x, mask, scale, inplace)
    return _masked_plain(x, mask, scale, inplace)


def _masked_plain(x: Tensor, mask: Tensor | _Draw, scale: float, inplace: bool) -> Tensor:
    return _apply(x, mask, scale, inplace)[0]


def dropout(x: Tensor, p: float, scale: float, inplace: bool = False) -> Tensor:
    """Element dropout of a CPU tensor with ``0 < p < 1``: keep w.p. ``1 - p``, scale kept.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> y = dropout(torch.ones(3, 5), 0.75, 4.0)
        >>> bool(((y == 0) | (y == 4)).all())
        True
    """
    return _masked(x, _draw(p, x.numel()), scale, inplace)


def channel_dropout(x: Tensor, p: float, scale: float, inplace: bool = False) -> Tensor:
    """Channel dropout of a batched CPU input (N, C, *spatial): one draw per (n, c).

    Example:
        >>> y = channel_dropout(torch.ones(2, 3, 4), 0.5, 2.0)
        >>> bool((y.amax(dim=2) == y.amin(dim=2)).all())
        True
    """
    return _masked(x, _draw(p, x.shape[0] * x.shape[1]), scale, inplace)


class _GaussianNoise(torch.autograd.Function):
    """``x * (1 + sigma * eps)``, drawn and multiplied in one pass; backward multiplies by
    the noise."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sigma: float) -> Tensor:
        source = x.contiguous()
        kernels = _fits_compiled(x)
        if kernels is None:
            noise = torch.randn_like(source)
            out = source * noise.mul_(sigma).add_(1.0)
        else:
            noise, out, numel = torch.empty_like(source), torch.empty_like(source), source.numel()
            _run(kernels.NOISE, numel, numel, (source, noise, out), (numel, *_seeds()), sigma)
        ctx.save_for_backward(noise)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (noise,) = ctx.saved_tensors
        return grad * noise, None


def gaussian_dropout(x: Tensor, sigma: float) -> Tensor:
    """``x * (1 + sigma * eps)``, eps ~ N(0, 1).

    With numba (float32, float64), eps comes from a ziggurat on SplitMix64 streams keyed
    from torch's generator (:func:`._compiled.draw_normals`), drawn on every thread in the
    pass that multiplies; otherwise from ``torch.randn`` (the reference's values).

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
        for group in range(keep.shape[0]):
            buffer.copy_(grad[group])
            total.add_(_masked_scale(buffer, keep[group], ctx.scale, buffer))
        return total, None, None


def _group_masked(weight: Tensor, keep: Tensor, scale: float) -> Tensor:
    masked = weight.new_empty(keep.shape[0], *weight.shape)
    _masked_scale(weight, keep, scale, masked, groups=keep.shape[0])
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
            threads = _THREADS.count(keep.size * kernels.COSTS[kernels.LINEAR_BACKWARD])
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
