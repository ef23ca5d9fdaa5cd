"""Fast paths for the layers' training-mode work, chosen per tensor.

The layers call only the functions below; each picks the fastest implementation that
exists for the input's device and falls back to :mod:`.reference`, the exact PyTorch
definition. Every implementation draws from torch's generators, so ``torch.manual_seed``
reproduces masks whichever path runs. Nothing here validates arguments: the layers do.

CUDA tensors (fp32, bf16, fp16) go to the Triton kernels of :mod:`.triton_dropout` when
Triton imports: they keep no mask for backward. In-place calls and other dtypes take the
reference path. Compiled layers pass p as a 0-d device tensor (the ``*_with_p_tensor``
functions): the Triton kernels take it as it is; where they do not apply, those functions
return None and the layer writes the rule in torch ops.
"""

from __future__ import annotations

import math
import os
from types import ModuleType

import torch
from torch import Tensor

from lightning_dropout.kernels import cpu, reference

__all__ = [
    "channel_dropout",
    "dropout",
    "dropout_with_p_tensor",
    "fits_group_masked_linear",
    "fast_drop_connect_linear",
    "gaussian_dropout",
    "gaussian_dropout_with_p_tensor",
    "group_masked_linear",
    "group_masked_weights",
]

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tests running the kernels in Triton's interpreter add "cpu".
TRITON_DEVICES = ("cuda",)


# Set to 0 to keep CUDA tensors on the PyTorch path (e.g. to compare with torch's masks).
TRITON_SWITCH = "LIGHTNING_DROPOUT_TRITON"


def _import_triton_kernels() -> tuple[ModuleType | None, ModuleType | None]:
    if os.environ.get(TRITON_SWITCH, "1") == "0" or not torch.cuda.is_available():
        return None, None
    try:
        from lightning_dropout.kernels import triton_dropconnect, triton_dropout
    except ImportError:  # Triton is an optional dependency
        return None, None
    return triton_dropout, triton_dropconnect


triton_kernels, triton_drop_connect = _import_triton_kernels()


def _fits_triton(x: Tensor) -> bool:
    return x.device.type in TRITON_DEVICES and x.dtype in TRITON_DTYPES


def _on_triton(x: Tensor, p: float, scale: float, inplace: bool) -> bool:
    # The kernels derive the scale from p on the device: 1 / (1 - p) or 1.
    return (
        triton_kernels is not None
        and _fits_triton(x)
        and not inplace
        and p < 1.0
        and (scale == 1.0 or scale == 1.0 / (1.0 - p))
    )


# Below these many elements the CPU path's fixed cost (about 20 us a call, forward and
# backward, for masks, threads and an autograd Function in Python) exceeds what it saves
# over the reference path; measured on 2 cores (docs/performance.md).
CPU_MIN_NUMEL = 4096
CPU_MIN_NUMEL_CHANNELS = 32768
CPU_MIN_NUMEL_GAUSSIAN = 131072


def _cpu_fast(x: Tensor, min_numel: int | None = None) -> bool:
    return x.device.type == "cpu" and x.numel() >= (CPU_MIN_NUMEL if min_numel is None else min_numel)


def dropout(x: Tensor, p: float, scale: float, inplace: bool = False) -> Tensor:
    """Keep each element with probability ``1 - p`` and multiply kept ones by ``scale``."""
    if triton_kernels is not None and _on_triton(x, p, scale, inplace):
        return triton_kernels.dropout(x, p, inverted=scale != 1.0)
    if _cpu_fast(x):
        return cpu.dropout(x, p, scale, inplace)
    return reference.dropout(x, p, scale, inplace)


def channel_dropout(x: Tensor, p: float, scale: float, inplace: bool = False) -> Tensor:
    """Keep each (sample, channel) of a batched (N, C, *spatial) input w.p. ``1 - p``."""
    if triton_kernels is not None and _on_triton(x, p, scale, inplace):
        return triton_kernels.channel_dropout(x, p, inverted=scale != 1.0)
    if _cpu_fast(x, CPU_MIN_NUMEL_CHANNELS):
        return cpu.channel_dropout(x, p, scale, inplace)
    return reference.channel_dropout(x, p, scale, inplace)


def gaussian_dropout(x: Tensor, sigma: float) -> Tensor:
    """Multiply ``x`` elementwise by independent N(1, sigma^2) noise."""
    if triton_kernels is not None and _on_triton(x, 0.0, 1.0, False):
        return triton_kernels.gaussian_dropout(x, sigma)
    if _cpu_fast(x, CPU_MIN_NUMEL_GAUSSIAN):
        return cpu.gaussian_dropout(x, sigma)
    return reference.gaussian_dropout(x, sigma)


def dropout_with_p_tensor(x: Tensor, p: Tensor, inverted: bool, channel_dims: int = 0) -> Tensor | None:
    """Training-mode dropout of ``x`` with ``p`` a 0-d tensor, on a kernel that keeps no mask.

    For compiled layers: p stays on the device (any value in [0, 1], never read on the
    host), so a new p recompiles nothing. None where no such kernel exists for ``x``: the
    caller then computes it itself.

    Args:
        x: the input.
        p: 0-d tensor, the drop probability.
        inverted: scale kept entries by ``1 / (1 - p)``.
        channel_dims: 0 for element dropout, 2 for channels of a batched ``(N, C, *)``
            input, 1 for channels of an unbatched ``(C, *)`` one.

    Example:
        >>> dropout_with_p_tensor(torch.ones(3), torch.tensor(0.5), True) is None  # CPU
        True
    """
    if triton_kernels is None or not _fits_triton(x):
        return None
    if channel_dims == 0:
        return triton_kernels.dropout(x, p, inverted)
    if channel_dims == 1:
        return triton_kernels.channel_dropout(x.unsqueeze(0), p, inverted).squeeze(0)
    return triton_kernels.channel_dropout(x, p, inverted)


def gaussian_dropout_with_p_tensor(x: Tensor, p: Tensor) -> Tensor | None:
    """N(1, p / (1 - p)) noise with ``p`` a 0-d tensor (zeros at p = 1), or None.

    The counterpart of :func:`dropout_with_p_tensor` for Gaussian dropout.

    Example:
        >>> gaussian_dropout_with_p_tensor(torch.ones(3), torch.tensor(0.5)) is None  # CPU
        True
    """
    if triton_kernels is None or not _fits_triton(x):
        return None
    # An infinite noise level at p = 1, which the kernel turns into exact zeros.
    sigma = torch.where(p < 1.0, p / (1.0 - p), math.inf).sqrt()
    return triton_kernels.gaussian_dropout(x, sigma)


def group_masked_weights(weight: Tensor, groups: int, p: float, generator: torch.Generator) -> Tensor:
    """``groups`` independent DropConnect copies of ``weight`` (inverted scaling, ``0 < p < 1``),
    masks drawn from ``generator`` so that a checkpointed chunk can regenerate them."""
    if weight.device.type == "cpu":
        return cpu.group_masked_weights(weight, groups, p, generator)
    return reference.group_masked_weights(weight, groups, p, generator)


def fits_group_masked_linear(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`group_masked_linear` has a kernel for these tensors (it keeps one
    byte of mask a weight and group where :func:`group_masked_weights` keeps a weight)."""
    return weight.device.type == "cpu" and cpu.fits_masked_linear(x, weight)


def group_masked_linear(x: Tensor, weight: Tensor, p: float, seeds: list[int]) -> Tensor | None:
    """``x[g] @ (weight * mask_g).T / (1 - p)`` for each group ``g`` of ``x`` (G, R, in)
    without materialising the masked weights, or None where no such kernel exists (the
    caller then multiplies :func:`group_masked_weights`). The groups form ``len(seeds)``
    chunks, each masked as :func:`group_masked_weights` does from a generator seeded with
    the chunk's seed; backward draws the masks again."""
    if fits_group_masked_linear(x, weight):
        return cpu.group_masked_linear(x, weight, p, seeds)
    return None


# The Triton DropConnect op regenerates a group's mask for every row of the group, on CUDA
# cores; the layers' own path materialises each group's masked weight once (in chunks) and
# multiplies on tensor cores. By instruction counts (benchmarks/NOTES.md) the op does less
# work only with one row per mask, i.e. per-sample masks of a 2-D input. To be measured:
# benchmarks/gpu_check.py times both at 1 and 16 rows per mask.
TRITON_MAX_ROWS_PER_MASK = 1


def fast_drop_connect_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, p: float | Tensor, groups: int
) -> Tensor | None:
    """``F.linear`` with one DropConnect mask per group of the batch on a fast path, or None.

    None means no fast path exists for these tensors: the caller computes it itself. The
    Triton path (CUDA, fp32 / bf16 / fp16, one input row per mask) regenerates each mask
    inside the forward and both backward products instead of storing it.

    Args:
        x: input (B, ..., in_features).
        weight: (out_features, in_features).
        bias: (out_features,) or None.
        p: drop probability, a float in (0, 1) or a 0-d tensor in [0, 1] (compiled
            layers: a new value recompiles nothing).
        groups: number of equal groups of the batch with independent masks (B: per sample).

    Raises:
        ValueError: on the fast path, a batch size that is not a multiple of ``groups``.

    Example:
        >>> fast_drop_connect_linear(torch.ones(2, 3), torch.ones(4, 3), None, 0.5, 2) is None  # CPU
        True
    """
    if (
        triton_drop_connect is None
        or x.device.type not in TRITON_DEVICES
        or x.dtype not in TRITON_DTYPES
        or weight.dtype != x.dtype
        or x.dim() < 2
        or x.numel() > groups * x.shape[-1] * TRITON_MAX_ROWS_PER_MASK
    ):
        return None
    return triton_drop_connect.drop_connect_linear(x, weight, bias, p, groups)
