"""The CPU path: masks drawn and applied by the numba kernels of :mod:`._numba`.

On CPU torch's ``bernoulli_`` costs several nanoseconds an element and a copy a fraction
of one: the draw is what torch's dropout pays for. Here each call draws one 64-bit key
from torch's global generator (so ``torch.manual_seed`` reproduces every mask, and
per-rank seeding gives per-rank masks) and reads the mask from a SplitMix64 stream under
that key, serially on the calling thread. The mask (a bool an entry, or a row) is kept for
backward, which applies it with the same kernel, so every derivative order is right.

Every autograd Function here is new-style (``setup_context``) with a ``vmap`` rule that
follows torch's ``randomness`` contract; nothing is cached across calls. Without numba
(or with ``LIGHTNING_DROPOUT_NUMBA=0``) :func:`numba_kernels` is None and the dispatch in
:mod:`lightning_dropout.kernels` takes torch ops instead.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor

# Set to 0 to take torch ops instead of the numba kernels.
NUMBA_SWITCH = "LIGHTNING_DROPOUT_NUMBA"
_DTYPES = (torch.float32, torch.float64)


@functools.cache
def numba_kernels() -> ModuleType | None:
    """The compiled kernels, or None where numba is missing, switched off or cannot compile."""
    if os.environ.get(NUMBA_SWITCH, "1") == "0":
        return None
    try:
        from lightning_dropout.kernels import _numba

        check = np.zeros(3, dtype=np.bool_)
        _numba.draw_keep(check, 0, 0)  # compiles (or loads from the disk cache) now
        if not check.all():
            raise RuntimeError("a mask at p = 0 dropped entries")
    except ImportError:
        return None
    except Exception as error:  # a numba that cannot compile here: torch ops instead
        warnings.warn(f"numba kernels unavailable, using torch ops: {error!r}", RuntimeWarning, stacklevel=2)
        return None
    return _numba


def fits(x: Tensor) -> bool:
    """Whether the kernels take ``x``: a CPU float32 / float64 tensor, numba present."""
    return x.device.type == "cpu" and x.dtype in _DTYPES and numba_kernels() is not None


def _key(generator: torch.Generator) -> int:
    return int(torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, generator=generator))


def _threshold(p: float) -> int:
    return round(p * 2**32)


def keep_mask(shape: tuple[int, ...], p: float, key: int) -> Tensor:
    """A contiguous bool tensor, True w.p. ``1 - p``, from the stream ``key``."""
    kernels = numba_kernels()
    assert kernels is not None
    keep = torch.empty(shape, dtype=torch.bool)
    kernels.draw_keep(_np(keep.view(-1)), key, _threshold(p))
    return keep


def _dense_flat(t: Tensor) -> Tensor | None:
    """``t``'s elements in memory order as a 1-D view, or None if its memory has gaps."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True)
    permuted = t.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else None


def _flat_arrays(*tensors: Tensor) -> list[Any] | None:
    """Arrays of the tensors' elements in one memory order, or None unless all are laid
    out alike without gaps."""
    if any(t.shape != tensors[0].shape or t.stride() != tensors[0].stride() for t in tensors):
        return None
    flat = [_dense_flat(t) for t in tensors]
    return [_np(f) for f in flat if f is not None] if all(f is not None for f in flat) else None


_TYPESTR = {torch.float32: "<f4", torch.float64: "<f8", torch.bool: "|b1"}


def _np(t: Tensor) -> Any:
    """A numpy view of a CPU tensor's memory through the array interface: unlike
    ``Tensor.numpy()``, it leaves the storage resizable (FSDP2 frees parameters so)."""
    if t.numel() == 0:  # no memory to view
        return np.empty(tuple(t.shape), dtype=_TYPESTR[t.dtype])
    strides = tuple(stride * t.element_size() for stride in t.stride())
    interface = {"data": (t.data_ptr(), False), "shape": tuple(t.shape), "strides": strides}
    return np.asarray(
        SimpleNamespace(__array_interface__={**interface, "typestr": _TYPESTR[t.dtype], "version": 3})
    )


def _scalar(scale: float, like: Tensor) -> Any:
    # the scale rounded to the dtype, as torch rounds a Python scalar in ``x * scale``
    return np.float32(scale) if like.dtype == torch.float32 else np.float64(scale)


def apply_keep(x: Tensor, keep: Tensor, scale: float) -> Tensor:
    """``x * scale`` where ``keep`` (bool, ``x``'s shape) is True, exactly 0 elsewhere (an
    infinite or NaN ``x`` too), laid out as ``x``."""
    kernels = numba_kernels()
    if kernels is None or x.dtype not in _DTYPES or x.device.type != "cpu":
        return torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype))
    out = torch.empty_like(x)
    arrays = _flat_arrays(x, keep, out)
    if arrays is not None:
        kernels.apply_elements(arrays[0], arrays[1], _scalar(scale, x), arrays[2])
    else:
        return torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype))
    return out


def _batch_first(x: Tensor, dim: int | None, size: int) -> Tensor:
    return x.movedim(dim, 0) if dim is not None else x.expand(size, *x.shape)


class _ApplyKeep(torch.autograd.Function):
    """``x * scale`` on kept entries, 0 elsewhere; linear in ``x``, so backward is itself."""

    @staticmethod
    def forward(x: Tensor, keep: Tensor, scale: float) -> Tensor:
        return apply_keep(x, keep, scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, keep, scale = inputs
        ctx.save_for_backward(keep)
        ctx.scale = scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return _ApplyKeep.apply(grad, keep, ctx.scale), None, None

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[Any, ...], x: Tensor, keep: Tensor, scale: float
    ) -> tuple[Tensor, int]:
        x = _batch_first(x, in_dims[0], info.batch_size)
        keep = _batch_first(keep, in_dims[1], info.batch_size)
        return _ApplyKeep.apply(x, keep, scale), 0


class _Dropout(torch.autograd.Function):
    """Element dropout: the mask drawn in forward from the stream ``key`` (a 0-d int64
    tensor drawn outside, so that vmap sees the randomness) and kept for backward."""

    @staticmethod
    def forward(x: Tensor, key: Tensor, p: float, scale: float) -> tuple[Tensor, Tensor]:
        # laid out as x, so that the pass runs in memory order (channels_last too)
        keep = torch.empty_like(x, dtype=torch.bool)
        arrays = _flat_arrays(keep)
        if arrays is None:
            keep = keep_mask(tuple(x.shape), p, int(key))
        else:
            kernels = numba_kernels()
            assert kernels is not None
            kernels.draw_keep(arrays[0], int(key), _threshold(p))
        return apply_keep(x, keep, scale), keep

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        keep = output[1]
        ctx.mark_non_differentiable(keep)
        ctx.save_for_backward(keep)
        ctx.scale = inputs[3]

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _: Any) -> tuple[Tensor, None, None, None]:
        (keep,) = ctx.saved_tensors
        return _ApplyKeep.apply(grad, keep, ctx.scale), None, None, None

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[Any, ...], x: Tensor, key: Tensor, p: float, scale: float
    ) -> tuple[tuple[Tensor, Tensor], tuple[int, int]]:
        x = _batch_first(x, in_dims[0], info.batch_size)
        if in_dims[1] is None:  # randomness="same": one key, one mask for every element
            keep = keep_mask(tuple(x.shape[1:]), p, int(key))
            keep = keep.expand(info.batch_size, *keep.shape).contiguous()
            return (_ApplyKeep.apply(x, keep, scale), keep), (0, 0)
        keys = key.movedim(in_dims[1], 0)  # "different": a key, and a mask, per element
        pairs = [_Dropout.apply(x[b], keys[b], p, scale) for b in range(info.batch_size)]
        return (torch.stack([out for out, _ in pairs]), torch.stack([keep for _, keep in pairs])), (0, 0)


def dropout(x: Tensor, p: float, scale: float, inplace: bool = False) -> Tensor:
    """Element dropout of a CPU float32 / float64 tensor with ``0 < p < 1``: keep w.p.
    ``1 - p``, kept entries times ``scale``."""
    key = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)
    out, _ = _Dropout.apply(x, key, p, scale)
    return x.copy_(out) if inplace else out


class _NoiseProduct(torch.autograd.Function):
    """``x * (1 + sigma * noise)`` in one pass; backward multiplies by the same factor.
    ``noise`` is the caller's fresh draw: the factor overwrites it (no second buffer)."""

    @staticmethod
    def forward(x: Tensor, noise: Tensor, sigma: float) -> Tensor:
        kernels, out = numba_kernels(), torch.empty_like(x)
        arrays = _flat_arrays(x, noise, out)
        if kernels is None or arrays is None:
            return out.copy_(x * noise.mul_(sigma).add_(1.0))
        kernels.noise_product(arrays[0], arrays[1], _scalar(sigma, x), arrays[2])
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (factor,) = ctx.saved_tensors
        return grad * factor, None, None

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[Any, ...], x: Tensor, noise: Tensor, sigma: float
    ) -> tuple[Tensor, int]:
        x = _batch_first(x, in_dims[0], info.batch_size)
        noise = _batch_first(noise, in_dims[1], info.batch_size).contiguous()  # written over
        return _NoiseProduct.apply(x, noise, sigma), 0


def gaussian_dropout(x: Tensor, sigma: float) -> Tensor:
    """``x * (1 + sigma * eps)``, eps ~ N(0, 1) from ``torch.randn_like`` (which follows
    torch's vmap ``randomness`` contract), the product taken in one pass."""
    return _NoiseProduct.apply(x, torch.randn_like(x), sigma)


def _chunk_keys(seeds: list[int]) -> list[int]:
    return [_key(torch.Generator().manual_seed(seed)) for seed in seeds]


def group_masked_weights(weight: Tensor, groups: int, p: float, generator: torch.Generator) -> Tensor:
    """``groups`` independent DropConnect copies of a CPU ``weight`` (inverted scaling),
    the masks from the stream keyed by a draw of ``generator``; differentiable (torch ops)."""
    keep = keep_mask((groups, *weight.shape), p, _key(generator))
    return torch.where(keep, weight * (1.0 / (1.0 - p)), torch.zeros((), dtype=weight.dtype))


def _stream(key: int, p: float) -> tuple[Any, Any]:
    return np.uint64(key % 2**64), np.uint64(_threshold(p))


def _chunks(groups: int, seeds: list[int]) -> list[slice]:
    size = -(-groups // len(seeds))
    return [slice(k * size, min(groups, (k + 1) * size)) for k in range(len(seeds))]


def _row_parts(rows: int) -> list[tuple[int, int]]:
    """Weight rows in as many parts as torch has threads (each part at least 64 rows)."""
    parts = max(1, min(torch.get_num_threads(), rows // 64))
    return [(rows * k // parts, rows * (k + 1) // parts) for k in range(parts)]


def _run_parts(kernel: Callable[..., None], calls: list[tuple[Any, ...]]) -> None:
    """``kernel(*call)`` for each call: the first on this thread, the others on threads
    started for this call (the kernels release the GIL), so nothing outlives it or a fork."""
    helpers = [threading.Thread(target=kernel, args=call) for call in calls[1:]]
    for helper in helpers:
        helper.start()
    kernel(*calls[0])
    for helper in helpers:
        helper.join()


class _MaskedLinear(torch.autograd.Function):
    """Per-group masked ``x @ weight.T / (1 - p)``, x (G, R, I): chunk ``k`` of the groups
    has the masks of :func:`group_masked_weights` under a generator seeded ``seeds[k]``,
    drawn row by row inside the products and again in backward, never stored."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, p: float, seeds: list[int]) -> Tensor:
        kernels = numba_kernels()
        assert kernels is not None
        out = x.new_empty(*x.shape[:2], weight.shape[0])
        scale, parts = _scalar(1.0 / (1.0 - p), x), _row_parts(weight.shape[0])
        for chunk, key in zip(_chunks(x.shape[0], seeds), _chunk_keys(seeds), strict=True):
            arrays = (_np(x[chunk]), _np(weight), *_stream(key, p), scale, _np(out[chunk]))
            _run_parts(kernels.masked_linear, [(*arrays, start, stop) for start, stop in parts])
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, ctx.p, ctx.seeds = inputs
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        x, weight = ctx.saved_tensors
        chunks, keys = _chunks(x.shape[0], ctx.seeds), _chunk_keys(ctx.seeds)
        if torch.is_grad_enabled():  # a graph of the backward (double backward): torch ops
            grads_x, grad_weight = [], torch.zeros_like(weight)
            for chunk, key in zip(chunks, keys, strict=True):
                keep = keep_mask((chunk.stop - chunk.start, *weight.shape), ctx.p, key)
                scaled = torch.where(keep, 1.0 / (1.0 - ctx.p), 0.0).to(weight.dtype)
                grads_x.append(torch.bmm(grad[chunk], weight * scaled))
                grad_weight = grad_weight + (torch.bmm(grad[chunk].transpose(1, 2), x[chunk]) * scaled).sum(0)
            return torch.cat(grads_x), grad_weight, None, None
        kernels = numba_kernels()
        assert kernels is not None
        grad, scale = grad.contiguous(), _scalar(1.0 / (1.0 - ctx.p), x)
        rows = _row_parts(weight.shape[0])
        # one grad_x a part: every weight row adds to all of it
        grad_xs, grad_weight = x.new_zeros(len(rows), *x.shape), torch.zeros_like(weight)
        for chunk, key in zip(chunks, keys, strict=True):
            arrays = (_np(x[chunk]), _np(weight), *_stream(key, ctx.p), scale, _np(grad[chunk]))
            calls = [
                (*arrays, _np(grad_xs[k, chunk]), _np(grad_weight), start, stop)
                for k, (start, stop) in enumerate(rows)
            ]
            _run_parts(kernels.masked_linear_backward, calls)
        return grad_xs.sum(0), grad_weight, None, None


def group_masked_linear(x: Tensor, weight: Tensor, p: float, seeds: list[int]) -> Tensor:
    """``x[g] @ (weight * mask_g).T / (1 - p)`` per group ``g`` of ``x`` (G, R, in), float32
    or float64 on CPU, the masks never stored (:class:`_MaskedLinear`)."""
    return _MaskedLinear.apply(x.contiguous(), weight.contiguous(), p, seeds)
