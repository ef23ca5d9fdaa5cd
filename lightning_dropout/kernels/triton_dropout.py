# mypy: disable-error-code="no-untyped-def"
"""Seeded Triton kernels for element, channel and Gaussian dropout that save no mask.

Each call draws one int64 seed from torch's generator of the input's device (so
``torch.manual_seed`` reproduces runs, per-rank seeding applies, and
``torch.utils.checkpoint``'s RNG-state restore makes recomputation draw the same seed). The
mask is a pure function of (seed, position): counter-based Philox, ``tl.randint4x``, one
Philox call per four elements, each 32-bit draw compared with an integer threshold. The
backward regenerates the mask from the saved seed, so nothing per element is kept between
forward and backward, and data moves twice per pass: the floor of a memory-bound op.

Layout: element ``i`` in memory order uses lane ``i % 4`` of Philox counter ``i // 4``, so
the mask does not depend on the block size and each thread's contiguous elements come from
its own Philox calls (128-bit loads and stores, no shuffle through shared memory). Positions
are positions in memory: an input that is dense (contiguous, channels-last, any
permutation) is processed in its storage order and the output keeps its strides; any other
input is first copied into the dense layout ``torch.empty_like`` gives it. Channel dropout
draws lane 0 of counter ``n * C + c`` for channel ``c`` of sample ``n``, whether the input
is contiguous or channels-last (kept as it is); other layouts are made contiguous.

Each function is a ``torch.library.custom_op`` with ``register_autograd``: torch.compile
keeps it in the graph. ``p`` reaches the kernel as a 0-d float64 tensor, turned into the
32-bit threshold and the scale on the device, so a ``p`` that changes value between calls
recompiles nothing (torch.compile specialises on Python floats, not on tensor values).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["as_device_scalar", "channel_dropout", "draw_seed", "dropout", "gaussian_dropout"]

BLOCK = 4096
CHANNEL_TILE = 4096
_OP_NAMESPACE = "lightning_dropout"


def draw_seed(device: torch.device) -> Tensor:
    """A 0-d int64 seed drawn on ``device`` from torch's generator (no host sync on CUDA).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> a = draw_seed(torch.device("cpu"))
        >>> _ = torch.manual_seed(0)
        >>> bool(a == draw_seed(torch.device("cpu")))
        True
    """
    return torch.randint(2**62, (), dtype=torch.int64, device=device)


def as_device_scalar(value: float | Tensor, device: torch.device) -> Tensor:
    """``value`` (p, or the noise level sigma) as the 0-d float64 device tensor the ops take.

    A tensor is moved, not copied, when it already fits; a float becomes a device-side
    tensor without a host-to-device copy or a sync.

    Example:
        >>> as_device_scalar(0.25, torch.device("cpu"))
        tensor(0.2500, dtype=torch.float64)
    """
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=torch.float64).reshape(())
    # A product with the float rather than torch.full(value): torch.compile then turns a
    # float that changes into a graph input after one recompile instead of one per value.
    return torch.ones((), dtype=torch.float64, device=device) * value


@triton.jit
def keep_rule(p_ptr, INVERTED: tl.constexpr):
    # Drop a 32-bit draw r when r < p * 2**32 (float64: exact to 2**-32 for any p); p = 1
    # drops everything, which no 32-bit threshold can express. The DropConnect kernels
    # apply the same rule.
    p = tl.load(p_ptr).to(tl.float64)
    limit = tl.minimum(p * 4294967296.0, 4294967295.0).to(tl.uint32)
    if INVERTED:  # noqa: SIM108 (a static branch of the compiled kernel)
        scale = (1.0 / tl.where(p < 1.0, 1.0 - p, 1.0)).to(tl.float32)
    else:
        scale = 1.0
    return limit, p < 1.0, scale


@triton.jit
def _interleave(r0, r1, r2, r3, BLOCK: tl.constexpr):
    # Element 4 * j + k takes lane k of counter j: each thread's contiguous elements come
    # from its own Philox calls, so the draws already sit in the load's register layout.
    return tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK,))


@triton.jit
def _dropout_kernel(x_ptr, y_ptr, seed_ptr, p_ptr, n, INVERTED: tl.constexpr, BLOCK: tl.constexpr):
    limit, any_kept, scale = keep_rule(p_ptr, INVERTED)
    program = tl.program_id(0).to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), program * (BLOCK // 4) + tl.arange(0, BLOCK // 4))
    keep = tl.where(any_kept, _interleave(r0, r1, r2, r3, BLOCK) >= limit, False)
    index = program * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    x = tl.load(x_ptr + index, mask=inside)
    y = tl.where(keep, x.to(tl.float32) * scale, 0.0)
    tl.store(y_ptr + index, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _gaussian_kernel(x_ptr, y_ptr, seed_ptr, sigma_ptr, n, BLOCK: tl.constexpr):
    # An infinite sigma (p = 1 of the matching Bernoulli dropout) drops everything.
    sigma = tl.load(sigma_ptr).to(tl.float32)
    finite = sigma < float("inf")
    sigma = tl.where(finite, sigma, 0.0)
    program = tl.program_id(0).to(tl.int64)
    n0, n1, n2, n3 = tl.randn4x(tl.load(seed_ptr), program * (BLOCK // 4) + tl.arange(0, BLOCK // 4))
    # The factor is formed first, so the output for x = 1 is exactly the factor.
    factor = 1.0 + sigma * _interleave(n0, n1, n2, n3, BLOCK)
    index = program * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    x = tl.load(x_ptr + index, mask=inside)
    y = tl.where(finite, x.to(tl.float32) * factor, 0.0)
    tl.store(y_ptr + index, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _channel_kernel(
    x_ptr,
    y_ptr,
    seed_ptr,
    p_ptr,
    rows,
    row_size,
    INVERTED: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    # x is (N * C, spatial) in memory. One Philox call per row of the tile, not per
    # element: the mask of row n * C + c is lane 0 of counter n * C + c.
    limit, any_kept, scale = keep_rule(p_ptr, INVERTED)
    program = tl.program_id(0).to(tl.int64)
    col_blocks = tl.cdiv(row_size, COLS)
    row = (program // col_blocks) * ROWS + tl.arange(0, ROWS)
    col = (program % col_blocks) * COLS + tl.arange(0, COLS)
    keep = tl.where(any_kept, tl.randint(tl.load(seed_ptr), row) >= limit, False)
    inside = (row < rows)[:, None] & (col < row_size)[None, :]
    index = row[:, None] * row_size + col[None, :]
    x = tl.load(x_ptr + index, mask=inside)
    y = tl.where(keep[:, None], x.to(tl.float32) * scale, 0.0)
    tl.store(y_ptr + index, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _channel_last_kernel(
    x_ptr,
    y_ptr,
    seed_ptr,
    p_ptr,
    channels,
    pixels,
    INVERTED: tl.constexpr,
    PIXELS: tl.constexpr,
    CHANNELS: tl.constexpr,
):
    # x is (N, spatial, C) in memory (channels-last); the same mask as _channel_kernel.
    # A tile stays within one sample, so it needs one Philox call per channel.
    limit, any_kept, scale = keep_rule(p_ptr, INVERTED)
    program = tl.program_id(0).to(tl.int64)
    channel_blocks = tl.cdiv(channels, CHANNELS)
    pixel_blocks = tl.cdiv(pixels, PIXELS)
    channel = (program % channel_blocks) * CHANNELS + tl.arange(0, CHANNELS)
    sample = program // channel_blocks // pixel_blocks
    pixel = (program // channel_blocks % pixel_blocks) * PIXELS + tl.arange(0, PIXELS)
    draw = tl.randint(tl.load(seed_ptr), sample * channels + channel)
    keep = tl.where(any_kept, draw >= limit, False)
    inside = (pixel < pixels)[:, None] & (channel < channels)[None, :]
    index = (sample * pixels + pixel)[:, None] * channels + channel[None, :]
    x = tl.load(x_ptr + index, mask=inside)
    y = tl.where(keep[None, :], x.to(tl.float32) * scale, 0.0)
    tl.store(y_ptr + index, y.to(y_ptr.dtype.element_ty), mask=inside)


def _dense_pair(x: Tensor) -> tuple[Tensor, Tensor]:
    """(input, output) with identical strides covering their storage without gaps.

    ``empty_like`` keeps the strides of a dense input and gives a non-dense one dense
    strides in the same dimension order; the input is copied into that layout then.
    """
    out = torch.empty_like(x)
    if out.stride() != x.stride():
        x = torch.empty_like(out).copy_(x)
    return x, out


def _flat(x: Tensor) -> Tensor:
    return x.as_strided((x.numel(),), (1,))


def _restride(grad: Tensor, stride: tuple[int, ...]) -> Tensor:
    """``grad`` laid out with the output's strides: positions in memory index the mask."""
    if grad.stride() == stride:
        return grad
    return torch.empty_strided(grad.shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)


@torch.library.custom_op(f"{_OP_NAMESPACE}::triton_dropout", mutates_args=())
def _dropout_op(x: Tensor, seed: Tensor, p: Tensor, inverted: bool) -> Tensor:
    x, out = _dense_pair(x)
    n = x.numel()
    if n:
        grid = (triton.cdiv(n, BLOCK),)
        _dropout_kernel[grid](_flat(x), _flat(out), seed, p, n, INVERTED=inverted, BLOCK=BLOCK)
    return out


def _is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` (N, C, *spatial) is laid out as (N, *spatial, C) and not contiguous."""
    return x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


@torch.library.custom_op(f"{_OP_NAMESPACE}::triton_channel_dropout", mutates_args=())
def _channel_dropout_op(x: Tensor, seed: Tensor, p: Tensor, inverted: bool) -> Tensor:
    samples, channels = x.shape[:2]
    if not _is_channels_last(x):
        x = x.contiguous()
    out = torch.empty_like(x)
    if not x.numel():
        return out
    pixels = x.numel() // (samples * channels)
    if _is_channels_last(x):
        tile_channels = min(triton.next_power_of_2(channels), CHANNEL_TILE)
        tile_pixels = CHANNEL_TILE // tile_channels
        blocks = samples * triton.cdiv(pixels, tile_pixels) * triton.cdiv(channels, tile_channels)
        _channel_last_kernel[(blocks,)](
            x, out, seed, p, channels, pixels, INVERTED=inverted, PIXELS=tile_pixels, CHANNELS=tile_channels
        )
        return out
    rows = samples * channels
    cols = min(triton.next_power_of_2(pixels), CHANNEL_TILE)
    tile_rows = CHANNEL_TILE // cols
    blocks = triton.cdiv(rows, tile_rows) * triton.cdiv(pixels, cols)
    _channel_kernel[(blocks,)](x, out, seed, p, rows, pixels, INVERTED=inverted, ROWS=tile_rows, COLS=cols)
    return out


@torch.library.custom_op(f"{_OP_NAMESPACE}::triton_gaussian_dropout", mutates_args=())
def _gaussian_op(x: Tensor, seed: Tensor, sigma: Tensor) -> Tensor:
    x, out = _dense_pair(x)
    n = x.numel()
    if n:
        _gaussian_kernel[(triton.cdiv(n, BLOCK),)](_flat(x), _flat(out), seed, sigma, n, BLOCK=BLOCK)
    return out


@_dropout_op.register_fake
def _(x: Tensor, seed: Tensor, p: Tensor, inverted: bool) -> Tensor:
    return torch.empty_like(x)


@_channel_dropout_op.register_fake
def _(x: Tensor, seed: Tensor, p: Tensor, inverted: bool) -> Tensor:
    if _is_channels_last(x):
        return torch.empty_like(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_gaussian_op.register_fake
def _(x: Tensor, seed: Tensor, sigma: Tensor) -> Tensor:
    return torch.empty_like(x)


def _save_seed(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    # The seed and p (or sigma), nothing per element; the output's strides say how the
    # incoming gradient must be laid out to meet the same mask.
    ctx.save_for_backward(*inputs[1:3])
    ctx.stride = output.stride()
    ctx.flags = inputs[3:]


def _dropout_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    seed, p = ctx.saved_tensors
    grad = _restride(grad, ctx.stride)
    return _dropout_op(grad, seed, p, *ctx.flags), None, None, None


def _channel_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    seed, p = ctx.saved_tensors
    return _channel_dropout_op(grad, seed, p, *ctx.flags), None, None, None


def _gaussian_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    seed, sigma = ctx.saved_tensors
    return _gaussian_op(_restride(grad, ctx.stride), seed, sigma), None, None


_dropout_op.register_autograd(_dropout_backward, setup_context=_save_seed)
_channel_dropout_op.register_autograd(_channel_backward, setup_context=_save_seed)
_gaussian_op.register_autograd(_gaussian_backward, setup_context=_save_seed)


def dropout(x: Tensor, p: float | Tensor, inverted: bool = True, seed: Tensor | None = None) -> Tensor:
    """Element dropout: keep each element w.p. ``1 - p``, kept ones scaled by ``1 / (1 - p)``.

    Args:
        x: fp32, bf16 or fp16 input of any shape and layout (CUDA, or CPU under
            ``TRITON_INTERPRET=1``).
        p: drop probability in [0, 1], a float or a 0-d tensor (a tensor that changes
            value never makes torch.compile recompile).
        inverted: scale kept elements by ``1 / (1 - p)`` (True) or leave them (False).
        seed: a 0-d int64 tensor on ``x``'s device; drawn from torch's generator if None.
            The same seed gives the same mask.

    Example:
        >>> y = dropout(torch.ones(2, 8), p=0.5)
        >>> bool(((y == 0) | (y == 2)).all())
        True
    """
    seed = draw_seed(x.device) if seed is None else seed
    return _dropout_op(x, seed, as_device_scalar(p, x.device), inverted)


def channel_dropout(
    x: Tensor, p: float | Tensor, inverted: bool = True, seed: Tensor | None = None
) -> Tensor:
    """Channel dropout of a batched (N, C, *spatial) input: one draw per (n, c).

    Args:
        x: fp32, bf16 or fp16 input with at least two dimensions.
        p: drop probability, as in :func:`dropout`.
        inverted: scale kept channels by ``1 / (1 - p)``.
        seed: as in :func:`dropout`.

    Example:
        >>> y = channel_dropout(torch.ones(2, 3, 4), p=0.5)
        >>> bool((y == y[:, :, :1]).all())
        True
    """
    seed = draw_seed(x.device) if seed is None else seed
    return _channel_dropout_op(x, seed, as_device_scalar(p, x.device), inverted)


def gaussian_dropout(x: Tensor, sigma: float | Tensor, seed: Tensor | None = None) -> Tensor:
    """Multiply ``x`` by independent N(1, sigma^2) noise (Philox and Box-Muller).

    Args:
        x: fp32, bf16 or fp16 input of any shape and layout.
        sigma: standard deviation of the noise, a float or a 0-d tensor; ``inf`` gives
            exact zeros (the limit p = 1 of the matching Bernoulli dropout).
        seed: as in :func:`dropout`.

    Example:
        >>> gaussian_dropout(torch.ones(3), sigma=0.0).tolist()
        [1.0, 1.0, 1.0]
    """
    seed = draw_seed(x.device) if seed is None else seed
    return _gaussian_op(x, seed, as_device_scalar(sigma, x.device))
