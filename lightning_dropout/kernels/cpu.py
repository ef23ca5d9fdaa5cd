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

Threads. Large passes are cut into pieces that the calling thread and helper threads
(the GIL released, blocking rather than spinning) claim one at a time; a helper the OS has
not scheduled yet claims nothing, so on a host whose other cores are busy the caller
finishes alone instead of waiting, where torch's own parallel ops were measured at
several times their idle time.
"""

from __future__ import annotations

import functools
import itertools
import os
import queue
import threading
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
        >>> compiled() is None or callable(compiled().scale_rows)
        True
    """
    if os.environ.get(NUMBA_SWITCH, "1") == "0":
        return None
    try:
        from lightning_dropout.kernels import _compiled
    except ImportError:
        return None
    try:  # compile every kernel now, before any call draws random numbers
        for dtype in (np.float32, np.float64):
            x, keep, two = np.ones(2, dtype), np.ones((1, 2), np.bool_), dtype(2)
            x2, x3, keep3 = x[None], x[None, None], keep[None]
            _compiled.scale_elements(x, keep, two, np.empty((1, 2), dtype))
            _compiled.scale_rows(x[:, None], keep[0], two, np.empty((2, 1), dtype))
            _compiled.noise_product(x, x.copy(), two, np.empty(2, dtype))
            _compiled.masked_linear(x3, x2, keep3, two, np.empty((1, 1, 1), dtype), 0, 1)
            _compiled.masked_linear_backward(x3, x2, keep3, two, x3[..., :1], x3.copy(), x2.copy(), 0, 1)
        _compiled.spread_bits(np.zeros(1, np.uint8), np.empty(1, np.uint64))
        _compiled.decide_bytes(np.zeros(1, np.uint64), 1, 0, np.empty(1, np.uint64), np.empty(8, np.int64))
    except Exception as error:  # a numba that cannot compile here: torch ops instead
        warnings.warn(f"numba kernels unavailable, using torch ops: {error!r}", RuntimeWarning, stacklevel=2)
        return None
    return _compiled


def _fits_compiled(x: Tensor) -> ModuleType | None:
    return compiled() if x.dtype in _COMPILED_DTYPES else None


class _Helpers:
    """Helper threads that wait for work (starting a thread costs about 0.1 ms a call)."""

    def __init__(self) -> None:
        self.pid, self.count, self.tasks = -1, 0, queue.SimpleQueue[Callable[[], None]]()

    def submit(self, task: Callable[[], None], copies: int) -> None:
        if self.pid != os.getpid():  # none yet, or a forked child that has none
            self.pid, self.count, self.tasks = os.getpid(), 0, queue.SimpleQueue()
        for _ in range(copies - self.count):
            threading.Thread(target=self._serve, args=(self.tasks,), daemon=True).start()
        self.count = max(self.count, copies)
        for _ in range(copies):
            self.tasks.put(task)

    @staticmethod
    def _serve(tasks: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            tasks.get()()


_HELPERS = _Helpers()


def _in_threads(run: Callable[[slice], None], count: int, numel: int) -> None:
    """``run(piece)`` over slices covering ``range(count)``, shared out among threads.

    The calling thread works through the pieces with ``torch.get_num_threads() - 1``
    helpers, each claiming the next piece when free. A helper that the OS does not
    schedule soon (the other cores busy) claims nothing: the caller then does the work
    alone and waits only for pieces already under way.
    """
    threads = torch.get_num_threads()
    pieces = 1 if numel < _PARALLEL_NUMEL or threads < 2 else min(count, 4 * threads)
    if pieces == 1:
        return run(slice(0, count))
    bounds = [count * k // pieces for k in range(pieces + 1)]
    claims = itertools.count()
    finished = threading.Semaphore(0)
    jobs = [run]  # emptied at the end: a helper scheduled late holds no tensor alive

    def work() -> None:
        while (piece := next(claims)) < pieces:
            try:
                jobs[0](slice(bounds[piece], bounds[piece + 1]))
            finally:
                finished.release()

    _HELPERS.submit(work, min(threads, pieces) - 1)
    work()
    for _ in range(pieces):
        finished.acquire()
    jobs.clear()


def _empty(size: int, dtype: torch.dtype) -> np.ndarray:
    # torch's allocator, so that torch.profiler's memory accounting sees the buffer
    return torch.empty(size, dtype=dtype).numpy()


class _Memory:
    """A tensor's memory as numpy reads it. ``Tensor.numpy()`` would mark the storage as
    never resizable again, and FSDP2 frees gathered parameters by resizing them to 0: the
    tensors of callers are viewed this way (the tensor must outlive the view)."""

    def __init__(self, tensor: Tensor) -> None:
        size = tensor.element_size()
        self.__array_interface__ = {
            "version": 3,
            "data": (tensor.data_ptr(), False),
            "shape": tuple(tensor.shape),
            "strides": tuple(stride * size for stride in tensor.stride()),
            "typestr": _NUMPY_TYPES[tensor.dtype],
        }


_NUMPY_TYPES = {torch.float32: np.dtype(np.float32).str, torch.float64: np.dtype(np.float64).str}


def _array(tensor: Tensor) -> np.ndarray:
    return np.asarray(_Memory(tensor))


def _zeros(like: Tensor) -> tuple[Tensor, np.ndarray]:
    # zeroed by numpy on one thread: torch's zeros_like is a parallel op (see _in_threads)
    zeros = torch.empty_like(like, memory_format=torch.contiguous_format)
    array = _array(zeros)
    array.fill(0)
    return zeros, array


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
    xs, keeps, outs = _array(x), keep.numpy(), _array(out)
    factor = xs.dtype.type(scale)
    groups, entries, length = out.shape
    if groups == 1 and length >= _ROW_LENGTH:  # channels: dropped rows are not read

        def run(piece: slice) -> None:
            kernels.scale_rows(xs[piece], keeps[0, piece], factor, outs[0, piece])

        _in_threads(run, entries, out.numel())
        return out
    if length > 1:
        xs, keeps, outs = xs.reshape(-1), np.repeat(keeps, length, axis=1), outs.reshape(groups, -1)
    else:
        xs, outs = xs.reshape(-1), outs.reshape(groups, -1)
    if groups > 1:  # pieces of the groups

        def run(piece: slice) -> None:
            kernels.scale_elements(xs, keeps[piece], factor, outs[piece])

        _in_threads(run, groups, out.numel())
    else:  # pieces of the elements

        def run(piece: slice) -> None:
            kernels.scale_elements(xs[piece], keeps[:, piece], factor, outs[:, piece])

        _in_threads(run, xs.size, out.numel())
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
            xs, noises, outs = _array(source.view(-1)), noise.view(-1).numpy(), _array(out.view(-1))
            factor = noises.dtype.type(sigma)

            def run(piece: slice) -> None:
                kernels.noise_product(xs[piece], noises[piece], factor, outs[piece])

            _in_threads(run, xs.size, xs.size)
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
        xs, weights, outs = _array(x), _array(weight), _array(out)
        factor = xs.dtype.type(1.0 / (1.0 - p))
        for part, keep in _chunk_masks(weight, p, seeds, x.shape[0]):

            def run(rows: slice, part: slice = part, keep: np.ndarray = keep) -> None:
                kernels.masked_linear(xs[part], weights, keep, factor, outs[part], rows.start, rows.stop)

            _in_threads(run, weight.shape[0], keep.size)
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
        xs, weights, grads = _array(x), _array(weight), _array(grad)
        factor = xs.dtype.type(1.0 / (1.0 - ctx.p))
        (grad_x, grad_xs), (grad_weight, grad_weights) = _zeros(x), _zeros(weight)
        for part, keep in _chunk_masks(weight, ctx.p, ctx.seeds, x.shape[0]):
            partial: list[np.ndarray] = []  # one per piece: every weight row adds to all of x

            def run(
                rows: slice, part: slice = part, keep: np.ndarray = keep, partial: list = partial
            ) -> None:
                into = np.zeros_like(xs[part])
                partial.append(into)
                kernels.masked_linear_backward(
                    xs[part], weights, keep, factor, grads[part], into, grad_weights, rows.start, rows.stop
                )

            _in_threads(run, weight.shape[0], keep.size)
            for into in partial:
                grad_xs[part] += into
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
