# mypy: disable-error-code="no-untyped-def"
"""Per-sample DropConnect for a linear layer in Triton, with no mask in memory.

``y[r] = bias + x[r] (W * M[g(r)] / (1 - p))^T``, where row ``r`` of the flattened input
belongs to mask group ``g(r) = r // rows_per_mask`` (``rows_per_mask = 1`` is per-sample
DropConnect, Wan et al., ICML 2013). The mask entry ``M[g, o, i]`` is regenerated where it
is needed, in the forward product and in both backward products, from (seed, g, o, i).
Nothing of size ``groups * O * I`` is ever allocated, so memory stays that of a plain
linear layer; the cost moves to the random-number generation, done three times.

The mask function. Input tile ``t = i // K_TILE`` of row ``o`` of group ``g`` uses Philox
counters ``((g * O + o) * tiles + t) * K_TILE / 8 + c``; entry ``i = t * K_TILE + 8 c + k``
takes the 16-bit half ``k % 2`` (low first) of lane ``k // 2``: eight entries per Philox
call. The weight is dropped when the 32-bit number whose high half is that draw and whose
low half is the same half of the same counter in a second Philox stream is below
``p * 2**32``, the threshold of the element kernels: weights are dropped at p to 2**-32. The second
stream is computed only for a tile where some draw equals the threshold's high half (a
2**-16 chance per entry), so the mask costs half the Philox calls of one 32-bit draw per
entry.

The seed and ``p`` are tensors (see :mod:`.triton_dropout`), so torch.compile keeps the
op in its graph and a changing ``p`` recompiles nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_dropout.kernels.triton_dropout import as_device_scalar, draw_seed, keep_rule

__all__ = ["drop_connect_linear", "materialize_masks"]

K_TILE = 64
OUT_TILE = 32
_OP_NAMESPACE = "lightning_dropout"


@triton.jit
def _philox(seed, counter, stream):
    # Philox's third counter word separates the main draws (stream 0) from the
    # tie-breaking ones (stream 1).
    zero = counter.to(tl.uint32) * 0
    return tl.philox(seed, counter.to(tl.uint32), (counter >> 32).to(tl.uint32), zero + stream, zero)


@triton.jit
def _in_order(r0, r1, r2, r3, OUT_TILE: tl.constexpr, K_TILE: tl.constexpr):
    # Eight 16-bit draws per counter: entry (o, 8 * c + k) of the tile takes half k % 2
    # (low half first) of lane k // 2 of counter c of row o. The nested joins put half k
    # at position k of each group of eight.
    p0, p1, p2, p3 = r0 & 0xFFFF, r0 >> 16, r1 & 0xFFFF, r1 >> 16
    p4, p5, p6, p7 = r2 & 0xFFFF, r2 >> 16, r3 & 0xFFFF, r3 >> 16
    joined = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7)))
    return tl.reshape(joined, (OUT_TILE, K_TILE))


@triton.jit
def _holds(r, limit_hi):
    return ((r & 0xFFFF) == limit_hi) | ((r >> 16) == limit_hi)


@triton.jit
def _kept(seed, group, out, tile, out_features, tiles, rule, OUT_TILE, K_TILE):
    # The (OUT_TILE, K_TILE) keep mask of input tile `tile` for mask group `group` (the
    # mask function of the module docstring). The tie-breaking stream is generated only
    # for a tile holding a tie: about 3% of 32 x 64 tiles.
    limit_hi, limit_lo, any_kept = rule
    EIGHTH: tl.constexpr = K_TILE // 8
    counter = ((group * out_features + out)[:, None] * tiles + tile) * EIGHTH + tl.arange(0, EIGHTH)[None, :]
    r0, r1, r2, r3 = _philox(seed, counter, 0)
    draw = _in_order(r0, r1, r2, r3, OUT_TILE, K_TILE)
    keep = draw > limit_hi
    # Looked for in the counters' own layout, before the draws are spread over the tile.
    ties = _holds(r0, limit_hi) | _holds(r1, limit_hi) | _holds(r2, limit_hi) | _holds(r3, limit_hi)
    if tl.max(tl.max(ties.to(tl.int32), axis=1), axis=0) > 0:
        s0, s1, s2, s3 = _philox(seed, counter, 1)
        low = _in_order(s0, s1, s2, s3, OUT_TILE, K_TILE)
        keep = keep | ((draw == limit_hi) & (low >= limit_lo))
    return tl.where(any_kept, keep, False)


@triton.jit
def _keep_rule_halves(p_ptr):
    # The element kernels' 32-bit threshold as (high half, low half, anything kept), and
    # the scale of kept weights.
    limit, any_kept, scale = keep_rule(p_ptr, True)
    return (limit >> 16, limit & 0xFFFF, any_kept), scale


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
    EVEN: tl.constexpr,
    OUT_TILE: tl.constexpr,
    K_TILE: tl.constexpr,
):
    rule, scale = _keep_rule_halves(p_ptr)
    seed = tl.load(seed_ptr)
    row = tl.program_id(0).to(tl.int64)
    group = row // rows_per_mask
    out = tl.program_id(1).to(tl.int64) * OUT_TILE + tl.arange(0, OUT_TILE)
    tiles = tl.cdiv(in_features, K_TILE)
    inp = tl.arange(0, K_TILE)
    w_ptrs = w_ptr + out[:, None] * in_features + inp[None, :]
    x_ptrs = x_ptr + row * in_features + inp
    # Products accumulate per entry and are summed once at the end: no cross-thread
    # reduction inside the loop.
    acc = tl.zeros((OUT_TILE, K_TILE), dtype=tl.float32)
    for tile in range(0, tiles):
        if EVEN:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        else:
            inside = inp < in_features - tile * K_TILE
            w = tl.load(w_ptrs, mask=(out < out_features)[:, None] & inside[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=inside, other=0.0)
        kept = _kept(seed, group, out, tile, out_features, tiles, rule, OUT_TILE, K_TILE)
        acc += tl.where(kept, w.to(tl.float32), 0.0) * x.to(tl.float32)[None, :]
        w_ptrs += K_TILE
        x_ptrs += K_TILE
    y = tl.sum(acc, axis=1) * scale
    if HAS_BIAS:
        y += tl.load(b_ptr + out, mask=out < out_features, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * out_features + out, y.to(y_ptr.dtype.element_ty), mask=out < out_features)


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
    EVEN: tl.constexpr,
    OUT_TILE: tl.constexpr,
    K_TILE: tl.constexpr,
):
    rule, scale = _keep_rule_halves(p_ptr)
    seed = tl.load(seed_ptr)
    row = tl.program_id(0).to(tl.int64)
    group = row // rows_per_mask
    tile = tl.program_id(1).to(tl.int64)
    tiles = tl.cdiv(in_features, K_TILE)
    inp = tile * K_TILE + tl.arange(0, K_TILE)
    out = tl.arange(0, OUT_TILE).to(tl.int64)
    w_ptrs = w_ptr + out[:, None] * in_features + inp[None, :]
    g_ptrs = g_ptr + row * out_features + out
    acc = tl.zeros((OUT_TILE, K_TILE), dtype=tl.float32)
    for out_start in range(0, out_features, OUT_TILE):
        if EVEN:
            w = tl.load(w_ptrs)
            g = tl.load(g_ptrs)
        else:
            inside = out < out_features - out_start
            w = tl.load(w_ptrs, mask=inside[:, None] & (inp < in_features)[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=inside, other=0.0)
        kept = _kept(seed, group, out + out_start, tile, out_features, tiles, rule, OUT_TILE, K_TILE)
        acc += tl.where(kept, w.to(tl.float32), 0.0) * g.to(tl.float32)[:, None]
        w_ptrs += OUT_TILE * in_features
        g_ptrs += OUT_TILE
    dx = tl.sum(acc, axis=0) * scale
    tl.store(dx_ptr + row * in_features + inp, dx.to(dx_ptr.dtype.element_ty), mask=inp < in_features)


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
    rule, scale = _keep_rule_halves(p_ptr)
    seed = tl.load(seed_ptr)
    out = tl.program_id(0).to(tl.int64) * OUT_TILE + tl.arange(0, OUT_TILE)
    tile = tl.program_id(1).to(tl.int64)
    tiles = tl.cdiv(in_features, K_TILE)
    inp = tile * K_TILE + tl.arange(0, K_TILE)
    zero_rows = tl.zeros((OUT_TILE, 1), dtype=tl.int64)
    in_tile = (zero_rows + inp[None, :]) < in_features
    acc = tl.zeros((OUT_TILE, K_TILE), dtype=tl.float32)
    for row_index in range(0, rows):
        row = tl.cast(row_index, tl.int64)
        group = row // rows_per_mask
        # x is loaded as a whole tile (each row of it the same; 128-bit loads, hits in L1)
        # because that gives the tile the layout the draws come in: loaded as one row,
        # every draw would be re-laid out through shared memory on every row.
        g = tl.load(g_ptr + row * out_features + out[:, None], mask=(out < out_features)[:, None], other=0.0)
        x = tl.load(x_ptr + row * in_features + zero_rows + inp[None, :], mask=in_tile, other=0.0)
        kept = _kept(seed, group, out, tile, out_features, tiles, rule, OUT_TILE, K_TILE)
        acc += tl.where(kept, g.to(tl.float32), 0.0) * x.to(tl.float32)
    inside = (out < out_features)[:, None] & (inp < in_features)[None, :]
    index = out[:, None] * in_features + inp[None, :]
    tl.store(dw_ptr + index, (acc * scale).to(dw_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _mask_kernel(
    m_ptr, seed_ptr, p_ptr, out_features, in_features, OUT_TILE: tl.constexpr, K_TILE: tl.constexpr
):
    rule, scale = _keep_rule_halves(p_ptr)
    group = tl.program_id(0).to(tl.int64)
    out = tl.program_id(1).to(tl.int64) * OUT_TILE + tl.arange(0, OUT_TILE)
    tile = tl.program_id(2).to(tl.int64)
    tiles = tl.cdiv(in_features, K_TILE)
    inp = tile * K_TILE + tl.arange(0, K_TILE)
    seed = tl.load(seed_ptr)
    kept = _kept(seed, group, out, tile, out_features, tiles, rule, OUT_TILE, K_TILE)
    inside = (out < out_features)[:, None] & (inp < in_features)[None, :]
    index = (group * out_features + out)[:, None] * in_features + inp[None, :]
    tl.store(m_ptr + index, tl.where(kept, scale, 0.0).to(m_ptr.dtype.element_ty), mask=inside)


def _even(out_features: int, in_features: int) -> bool:
    """Whether the tiles cover the weight exactly, so the kernels load without bounds masks."""
    return out_features % OUT_TILE == 0 and in_features % K_TILE == 0


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
            EVEN=_even(out_features, in_features),
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
    dx = grad.new_empty((rows, in_features))  # every entry is stored, zero rows included
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
            EVEN=_even(out_features, in_features),
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
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format)  # every entry is stored
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
    if batch == 0:
        groups = 1  # an empty batch (per sample: zero groups) is one group of no rows
    if batch % groups:
        raise ValueError(f"batch size {batch} is not a multiple of mask groups {groups}")
    rows_per_mask = x[0].numel() // x.shape[-1] * (batch // groups) if x.numel() else 1
    seed = draw_seed(x.device) if seed is None else seed
    flat = x.reshape(-1, x.shape[-1])
    out = _linear_op(flat, weight, bias, seed, as_device_scalar(p, x.device), max(rows_per_mask, 1))
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
        p_scalar = as_device_scalar(p, seed.device)
        _mask_kernel[grid](masks, seed, p_scalar, out_features, in_features, OUT_TILE=OUT_TILE, K_TILE=K_TILE)
    return masks
