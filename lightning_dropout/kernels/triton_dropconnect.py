# mypy: disable-error-code="no-untyped-def"
"""Per-sample DropConnect for a linear layer in Triton, with no mask in memory.

``y[r] = bias + x[r] (W * M[g(r)] / (1 - p))^T``, where row ``r`` of the flattened input
belongs to mask group ``g(r) = r // rows_per_mask`` (``rows_per_mask = 1`` is per-sample
DropConnect, Wan et al., ICML 2013). The mask entry ``M[g, o, i]`` is regenerated where it
is needed, in the forward product and in both backward products, from (seed, g, o, i):
Philox counter ``((g * O + o) * tiles + i // K_TILE) * QUARTER + i % QUARTER`` (within
the tile), lane ``(i % K_TILE) // QUARTER``; a 32-bit draw below ``p * 2**32`` drops the
weight. Nothing of size ``groups * O * I`` is ever allocated, so memory stays that of a
plain linear layer; the cost moves to the random-number generation (one Philox call per
four weights per group, in each of the three products).

The seed and ``p`` are tensors (see :mod:`.triton_dropout`), so torch.compile keeps the
op in its graph and a changing ``p`` recompiles nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_dropout.kernels.triton_dropout import _keep_rule, as_rate, draw_seed

__all__ = ["drop_connect_linear", "materialize_masks"]

K_TILE = 64
OUT_TILE = 32
_OP_NAMESPACE = "lightning_dropout"


@triton.jit
def _mask_draws(seed, group, out, tile, out_features, tiles, QUARTER: tl.constexpr):
    # The four draws of the (out, QUARTER) block of input tile `tile` for `group`: lane k
    # is the mask of the k-th quarter of the tile.
    lanes = tl.arange(0, QUARTER)
    counter = ((group * out_features + out)[:, None] * tiles + tile) * QUARTER + lanes[None, :]
    return tl.randint4x(seed, counter)


@triton.jit
def _forward_quarter(w_ptr, x_row_ptr, out, inp, out_features, in_features, draw, limit, any_kept):
    inside = (out < out_features)[:, None] & (inp < in_features)[None, :]
    w = tl.load(w_ptr + out[:, None] * in_features + inp[None, :], mask=inside, other=0.0)
    x = tl.load(x_row_ptr + inp, mask=inp < in_features, other=0.0)
    kept = tl.where(any_kept, draw >= limit, False)
    return tl.sum(tl.where(kept, w.to(tl.float32), 0.0) * x.to(tl.float32)[None, :], axis=1)


@triton.jit
def _forward_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    seed_ptr,
    p_ptr,
    out_features,
    in_features,
    rows_per_mask,
    HAS_BIAS: tl.constexpr,
    OUT_TILE: tl.constexpr,
    K_TILE: tl.constexpr,
):
    QUARTER: tl.constexpr = K_TILE // 4
    limit, any_kept, scale = _keep_rule(p_ptr, True)
    seed = tl.load(seed_ptr)
    row = tl.program_id(0).to(tl.int64)
    group = row // rows_per_mask
    out = tl.program_id(1).to(tl.int64) * OUT_TILE + tl.arange(0, OUT_TILE)
    tiles = tl.cdiv(in_features, K_TILE)
    x_row_ptr = x_ptr + row * in_features
    lanes = tl.arange(0, QUARTER)
    acc = tl.zeros((OUT_TILE,), dtype=tl.float32)
    for tile in range(0, tiles):
        r0, r1, r2, r3 = _mask_draws(seed, group, out, tile, out_features, tiles, QUARTER)
        start = tile * K_TILE + lanes
        acc += _forward_quarter(w_ptr, x_row_ptr, out, start, out_features, in_features, r0, limit, any_kept)
        acc += _forward_quarter(
            w_ptr, x_row_ptr, out, start + QUARTER, out_features, in_features, r1, limit, any_kept
        )
        acc += _forward_quarter(
            w_ptr, x_row_ptr, out, start + 2 * QUARTER, out_features, in_features, r2, limit, any_kept
        )
        acc += _forward_quarter(
            w_ptr, x_row_ptr, out, start + 3 * QUARTER, out_features, in_features, r3, limit, any_kept
        )
    y = acc * scale
    if HAS_BIAS:
        y += tl.load(b_ptr + out, mask=out < out_features, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * out_features + out, y.to(y_ptr.dtype.element_ty), mask=out < out_features)


@triton.jit
def _grad_input_quarter(w_ptr, g, out, inp, out_features, in_features, draw, limit, any_kept):
    inside = (out < out_features)[:, None] & (inp < in_features)[None, :]
    w = tl.load(w_ptr + out[:, None] * in_features + inp[None, :], mask=inside, other=0.0)
    kept = tl.where(any_kept, draw >= limit, False)
    return tl.sum(tl.where(kept, w.to(tl.float32), 0.0) * g[:, None], axis=0)


@triton.jit
def _grad_input_kernel(
    g_ptr,
    w_ptr,
    dx_ptr,
    seed_ptr,
    p_ptr,
    out_features,
    in_features,
    rows_per_mask,
    OUT_TILE: tl.constexpr,
    K_TILE: tl.constexpr,
):
    QUARTER: tl.constexpr = K_TILE // 4
    limit, any_kept, scale = _keep_rule(p_ptr, True)
    seed = tl.load(seed_ptr)
    row = tl.program_id(0).to(tl.int64)
    group = row // rows_per_mask
    tile = tl.program_id(1).to(tl.int64)
    tiles = tl.cdiv(in_features, K_TILE)
    start = tile * K_TILE + tl.arange(0, QUARTER)
    acc0 = tl.zeros((QUARTER,), dtype=tl.float32)
    acc1 = tl.zeros((QUARTER,), dtype=tl.float32)
    acc2 = tl.zeros((QUARTER,), dtype=tl.float32)
    acc3 = tl.zeros((QUARTER,), dtype=tl.float32)
    for out_start in range(0, out_features, OUT_TILE):
        out = out_start + tl.arange(0, OUT_TILE).to(tl.int64)
        g = tl.load(g_ptr + row * out_features + out, mask=out < out_features, other=0.0).to(tl.float32)
        r0, r1, r2, r3 = _mask_draws(seed, group, out, tile, out_features, tiles, QUARTER)
        acc0 += _grad_input_quarter(w_ptr, g, out, start, out_features, in_features, r0, limit, any_kept)
        acc1 += _grad_input_quarter(
            w_ptr, g, out, start + QUARTER, out_features, in_features, r1, limit, any_kept
        )
        acc2 += _grad_input_quarter(
            w_ptr, g, out, start + 2 * QUARTER, out_features, in_features, r2, limit, any_kept
        )
        acc3 += _grad_input_quarter(
            w_ptr, g, out, start + 3 * QUARTER, out_features, in_features, r3, limit, any_kept
        )
    dx_row = dx_ptr + row * in_features
    element = dx_ptr.dtype.element_ty
    tl.store(dx_row + start, (acc0 * scale).to(element), mask=start < in_features)
    tl.store(dx_row + start + QUARTER, (acc1 * scale).to(element), mask=start + QUARTER < in_features)
    tl.store(dx_row + start + 2 * QUARTER, (acc2 * scale).to(element), mask=start + 2 * QUARTER < in_features)
    tl.store(dx_row + start + 3 * QUARTER, (acc3 * scale).to(element), mask=start + 3 * QUARTER < in_features)


@triton.jit
def _grad_weight_quarter(x_row_ptr, g, inp, in_features, draw, limit, any_kept):
    x = tl.load(x_row_ptr + inp, mask=inp < in_features, other=0.0).to(tl.float32)
    kept = tl.where(any_kept, draw >= limit, False)
    return tl.where(kept, g[:, None] * x[None, :], 0.0)


@triton.jit
def _grad_weight_kernel(
    g_ptr,
    x_ptr,
    dw_ptr,
    seed_ptr,
    p_ptr,
    rows,
    out_features,
    in_features,
    rows_per_mask,
    OUT_TILE: tl.constexpr,
    K_TILE: tl.constexpr,
):
    QUARTER: tl.constexpr = K_TILE // 4
    limit, any_kept, scale = _keep_rule(p_ptr, True)
    seed = tl.load(seed_ptr)
    out = tl.program_id(0).to(tl.int64) * OUT_TILE + tl.arange(0, OUT_TILE)
    tile = tl.program_id(1).to(tl.int64)
    tiles = tl.cdiv(in_features, K_TILE)
    start = tile * K_TILE + tl.arange(0, QUARTER)
    acc0 = tl.zeros((OUT_TILE, QUARTER), dtype=tl.float32)
    acc1 = tl.zeros((OUT_TILE, QUARTER), dtype=tl.float32)
    acc2 = tl.zeros((OUT_TILE, QUARTER), dtype=tl.float32)
    acc3 = tl.zeros((OUT_TILE, QUARTER), dtype=tl.float32)
    for row_index in range(0, rows):
        row = tl.cast(row_index, tl.int64)
        group = row // rows_per_mask
        g = tl.load(g_ptr + row * out_features + out, mask=out < out_features, other=0.0).to(tl.float32)
        x_row_ptr = x_ptr + row * in_features
        r0, r1, r2, r3 = _mask_draws(seed, group, out, tile, out_features, tiles, QUARTER)
        acc0 += _grad_weight_quarter(x_row_ptr, g, start, in_features, r0, limit, any_kept)
        acc1 += _grad_weight_quarter(x_row_ptr, g, start + QUARTER, in_features, r1, limit, any_kept)
        acc2 += _grad_weight_quarter(x_row_ptr, g, start + 2 * QUARTER, in_features, r2, limit, any_kept)
        acc3 += _grad_weight_quarter(x_row_ptr, g, start + 3 * QUARTER, in_features, r3, limit, any_kept)
    element = dw_ptr.dtype.element_ty
    rows_ok = (out < out_features)[:, None]
    base = dw_ptr + out[:, None] * in_features
    inp = start[None, :]
    tl.store(base + inp, (acc0 * scale).to(element), mask=rows_ok & (inp < in_features))
    inp = inp + QUARTER
    tl.store(base + inp, (acc1 * scale).to(element), mask=rows_ok & (inp < in_features))
    inp = inp + QUARTER
    tl.store(base + inp, (acc2 * scale).to(element), mask=rows_ok & (inp < in_features))
    inp = inp + QUARTER
    tl.store(base + inp, (acc3 * scale).to(element), mask=rows_ok & (inp < in_features))


@triton.jit
def _store_mask_quarter(base, inp, inside, draw, limit, any_kept, scale):
    kept = tl.where(any_kept, draw >= limit, False)
    tl.store(base + inp, tl.where(kept, scale, 0.0).to(base.dtype.element_ty), mask=inside)


@triton.jit
def _mask_kernel(
    m_ptr, seed_ptr, p_ptr, out_features, in_features, OUT_TILE: tl.constexpr, K_TILE: tl.constexpr
):
    QUARTER: tl.constexpr = K_TILE // 4
    limit, any_kept, scale = _keep_rule(p_ptr, True)
    group = tl.program_id(0).to(tl.int64)
    out = tl.program_id(1).to(tl.int64) * OUT_TILE + tl.arange(0, OUT_TILE)
    tile = tl.program_id(2).to(tl.int64)
    tiles = tl.cdiv(in_features, K_TILE)
    r0, r1, r2, r3 = _mask_draws(tl.load(seed_ptr), group, out, tile, out_features, tiles, QUARTER)
    inp = tile * K_TILE + tl.arange(0, QUARTER)[None, :]
    base = m_ptr + (group * out_features + out)[:, None] * in_features
    rows_ok = (out < out_features)[:, None]
    _store_mask_quarter(base, inp, rows_ok & (inp < in_features), r0, limit, any_kept, scale)
    inp += QUARTER
    _store_mask_quarter(base, inp, rows_ok & (inp < in_features), r1, limit, any_kept, scale)
    inp += QUARTER
    _store_mask_quarter(base, inp, rows_ok & (inp < in_features), r2, limit, any_kept, scale)
    inp += QUARTER
    _store_mask_quarter(base, inp, rows_ok & (inp < in_features), r3, limit, any_kept, scale)


def _launch_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, seed: Tensor, p: Tensor, rows_per_mask: int
) -> Tensor:
    rows, in_features = x.shape
    out_features = weight.shape[0]
    y = x.new_empty((rows, out_features))
    if rows and out_features:
        grid = (rows, triton.cdiv(out_features, OUT_TILE))
        _forward_kernel[grid](
            x,
            weight,
            weight if bias is None else bias,
            y,
            seed,
            p,
            out_features,
            in_features,
            rows_per_mask,
            HAS_BIAS=bias is not None,
            OUT_TILE=OUT_TILE,
            K_TILE=K_TILE,
        )
    return y


@torch.library.custom_op(f"{_OP_NAMESPACE}::triton_drop_connect_linear", mutates_args=())
def _linear_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, seed: Tensor, p: Tensor, rows_per_mask: int
) -> Tensor:
    bias = None if bias is None else bias.contiguous()
    return _launch_forward(x.contiguous(), weight.contiguous(), bias, seed, p, rows_per_mask)


@torch.library.custom_op(f"{_OP_NAMESPACE}::triton_drop_connect_linear_grad_input", mutates_args=())
def _grad_input_op(grad: Tensor, weight: Tensor, seed: Tensor, p: Tensor, rows_per_mask: int) -> Tensor:
    grad, weight = grad.contiguous(), weight.contiguous()
    rows, out_features = grad.shape
    in_features = weight.shape[1]
    dx = grad.new_zeros((rows, in_features))
    if rows and in_features:
        grid = (rows, triton.cdiv(in_features, K_TILE))
        _grad_input_kernel[grid](
            grad,
            weight,
            dx,
            seed,
            p,
            out_features,
            in_features,
            rows_per_mask,
            OUT_TILE=OUT_TILE,
            K_TILE=K_TILE,
        )
    return dx


@torch.library.custom_op(f"{_OP_NAMESPACE}::triton_drop_connect_linear_grad_weight", mutates_args=())
def _grad_weight_op(
    grad: Tensor, x: Tensor, weight: Tensor, seed: Tensor, p: Tensor, rows_per_mask: int
) -> Tensor:
    grad, x = grad.contiguous(), x.contiguous()
    rows, out_features = grad.shape
    in_features = x.shape[1]
    dw = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    if out_features and in_features:
        grid = (triton.cdiv(out_features, OUT_TILE), triton.cdiv(in_features, K_TILE))
        _grad_weight_kernel[grid](
            grad,
            x,
            dw,
            seed,
            p,
            rows,
            out_features,
            in_features,
            rows_per_mask,
            OUT_TILE=OUT_TILE,
            K_TILE=K_TILE,
        )
    return dw


@_linear_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, seed: Tensor, p: Tensor, rows_per_mask: int) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


@_grad_input_op.register_fake
def _(grad: Tensor, weight: Tensor, seed: Tensor, p: Tensor, rows_per_mask: int) -> Tensor:
    return grad.new_empty((grad.shape[0], weight.shape[1]))


@_grad_weight_op.register_fake
def _(grad: Tensor, x: Tensor, weight: Tensor, seed: Tensor, p: Tensor, rows_per_mask: int) -> Tensor:
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _save_inputs(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, bias, seed, p, rows_per_mask = inputs
    ctx.save_for_backward(x, weight, seed, p)
    ctx.rows_per_mask = rows_per_mask
    ctx.has_bias = bias is not None


def _linear_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, weight, seed, p = ctx.saved_tensors
    needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    grad_x = _grad_input_op(grad, weight, seed, p, ctx.rows_per_mask) if needs_x else None
    grad_weight = _grad_weight_op(grad, x, weight, seed, p, ctx.rows_per_mask) if needs_weight else None
    grad_bias = grad.sum(0) if ctx.has_bias and needs_bias else None
    return grad_x, grad_weight, grad_bias, None, None, None


_linear_op.register_autograd(_linear_backward, setup_context=_save_inputs)


def drop_connect_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    p: float | Tensor,
    groups: int | None = None,
    seed: Tensor | None = None,
) -> Tensor:
    """``F.linear`` with an independent DropConnect weight mask per group of the batch.

    The batch (dimension 0 of ``x``) is split into ``groups`` equal contiguous groups,
    each with its own mask; ``groups=None`` means one group per sample (the paper's
    per-sample DropConnect). Kept weights are scaled by ``1 / (1 - p)``. The masks are
    generated inside the three products and never stored.

    Args:
        x: input of shape (B, ..., in_features), fp32, bf16 or fp16.
        weight: (out_features, in_features), same dtype.
        bias: (out_features,) or None; never dropped.
        p: drop probability in [0, 1], a float or a 0-d tensor.
        groups: number of mask groups, dividing B; None for B (per sample).
        seed: a 0-d int64 tensor on ``x``'s device; drawn from torch's generator if None.

    Raises:
        ValueError: the batch size is not a multiple of ``groups``.

    Example:
        >>> x, w = torch.ones(2, 3), torch.ones(4, 3)
        >>> y = drop_connect_linear(x, w, None, p=0.5)
        >>> y.shape, bool(((y % 2) == 0).all())
        (torch.Size([2, 4]), True)
    """
    batch = x.shape[0]
    groups = batch if groups is None else groups
    if batch % groups:
        raise ValueError(f"batch size {batch} is not a multiple of mask groups {groups}")
    rows_per_mask = x[0].numel() // x.shape[-1] * (batch // groups) if x.numel() else 1
    seed = draw_seed(x.device) if seed is None else seed
    flat = x.reshape(-1, x.shape[-1])
    out = _linear_op(flat, weight, bias, seed, as_rate(p, x.device), max(rows_per_mask, 1))
    return out.reshape(*x.shape[:-1], weight.shape[0])


def materialize_masks(
    groups: int,
    out_features: int,
    in_features: int,
    p: float | Tensor,
    seed: Tensor,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The scaled masks the products use, as a (groups, out, in) tensor of 0 and 1/(1-p).

    For tests and inspection only: the products themselves never store them.

    Args:
        groups: number of mask groups (the batch size for per-sample masks).
        out_features: rows of the weight.
        in_features: columns of the weight.
        p: drop probability, a float or a 0-d tensor.
        seed: the 0-d int64 seed the products were given.
        dtype: dtype of the result.

    Example:
        >>> m = materialize_masks(2, 3, 5, 0.5, torch.tensor(1))
        >>> m.shape, bool(((m == 0) | (m == 2)).all())
        (torch.Size([2, 3, 5]), True)
    """
    masks = torch.empty((groups, out_features, in_features), dtype=dtype, device=seed.device)
    if masks.numel():
        grid = (groups, triton.cdiv(out_features, OUT_TILE), triton.cdiv(in_features, K_TILE))
        rate = as_rate(p, seed.device)
        _mask_kernel[grid](masks, seed, rate, out_features, in_features, OUT_TILE=OUT_TILE, K_TILE=K_TILE)
    return masks
