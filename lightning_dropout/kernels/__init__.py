"""The layers' fast paths, chosen per tensor: internal to the package, one dispatch per rule.

Users call the functional forms of :mod:`lightning_dropout.layers`; those call the
functions below, and each picks the fastest implementation that exists for the input,
falling back to :mod:`.reference`, the exact PyTorch definition. Every implementation
draws from torch's generators, so ``torch.manual_seed`` reproduces masks whichever path
runs. Nothing here validates arguments: the layers do.

``p`` is a float in (0, 1) (eager layers; 0 and 1 have exact outputs that the layers
return themselves) or a 0-d tensor in [0, 1] (compiled layers: never read on the host, so
a new value recompiles nothing). CUDA tensors (fp32, bf16, fp16) go to the Triton kernels
of :mod:`.triton_dropout` when Triton imports, with either kind of p, unless the call is
in place: they keep no mask for backward. CPU float32 / float64 tensors with a float p go
to the numba kernels of :mod:`._cpu` for element dropout and Gaussian noise from the sizes
at which they beat torch ops (``CPU_MIN_NUMEL*``, measured by ``python -m
benchmarks.sizes``). The rest takes the reference path, torch ops only: channel dropout
always, since torch's one broadcast multiply over two threads beats a serial pass.
"""

from __future__ import annotations

import math
import os
from types import ModuleType

import torch
from torch import Tensor

from lightning_dropout.kernels import _cpu, reference

__all__ = [
    "drop_channels",
    "drop_elements",
    "fast_drop_connect_linear",
    "fits_group_masked_linear",
    "gaussian_noise",
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


# From these many elements the numba kernels beat torch ops, forward + backward (by
# ``python -m benchmarks.sizes``; benchmarks/results/sizes.md): below them a kernel call's
# fixed cost (an autograd Function, a key, array views: some 50 us on 2 cores) exceeds what
# it saves. The Gaussian pass saves only the arithmetic passes after torch's ``randn``: it
# lost to torch ops at 1M elements (8.0 against 6.3 ms) and won at 4M (1.06x the formula).
CPU_MIN_NUMEL = 1 << 14
CPU_MIN_NUMEL_GAUSSIAN = 1 << 22


def _cpu_fast(x: Tensor, p: float | Tensor, min_numel: int) -> bool:
    return not isinstance(p, Tensor) and x.numel() >= min_numel and _cpu.fits(x)


def drop_elements(x: Tensor, p: float | Tensor, inverted: bool = True, inplace: bool = False) -> Tensor:
    """Keep each element with probability ``1 - p``; kept ones are scaled by ``1 / (1 - p)``
    (``inverted``) or left as they are.

    Example:
        >>> y = drop_elements(torch.ones(3, 5), torch.tensor(0.75))
        >>> bool(((y == 0) | (y == 4)).all())
        True
    """
    return _bernoulli(x, p, inverted, inplace, channels=False)


def drop_channels(x: Tensor, p: float | Tensor, inverted: bool = True, inplace: bool = False) -> Tensor:
    """Keep each (sample, channel) of a batched (N, C, *spatial) input w.p. ``1 - p``.

    Example:
        >>> y = drop_channels(torch.ones(2, 3, 4), 0.5)
        >>> bool((y.amax(dim=2) == y.amin(dim=2)).all())
        True
    """
    return _bernoulli(x, p, inverted, inplace, channels=True)


def _bernoulli(x: Tensor, p: float | Tensor, inverted: bool, inplace: bool, channels: bool) -> Tensor:
    if triton_kernels is not None and not inplace and _fits_triton(x):
        on_triton = triton_kernels.channel_dropout if channels else triton_kernels.dropout
        return on_triton(x, p, inverted)
    if channels:
        return reference.channel_dropout(x, p, inverted, inplace)
    if _cpu_fast(x, p, CPU_MIN_NUMEL):
        assert not isinstance(p, Tensor)
        return _cpu.dropout(x, p, reference.keep_scale(p, inverted), inplace)
    return reference.dropout(x, p, inverted, inplace)


def gaussian_noise(x: Tensor, p: float | Tensor) -> Tensor:
    """Multiply ``x`` elementwise by independent N(1, p / (1 - p)) noise; zeros at a tensor p = 1.

    Example:
        >>> gaussian_noise(torch.ones(3), torch.tensor(1.0)).tolist()
        [0.0, 0.0, 0.0]
    """
    if isinstance(p, Tensor):
        # An infinite noise level at p = 1, which the kernels turn into exact zeros.
        sigma: float | Tensor = torch.where(p < 1.0, p / (1.0 - p), math.inf).sqrt()
    else:
        sigma = math.sqrt(p / (1.0 - p))
    if triton_kernels is not None and _fits_triton(x):
        return triton_kernels.gaussian_dropout(x, sigma)
    if _cpu_fast(x, sigma, CPU_MIN_NUMEL_GAUSSIAN):
        assert not isinstance(sigma, Tensor)
        return _cpu.gaussian_dropout(x, sigma)
    return reference.gaussian_dropout(x, sigma)


def group_masked_weights(weight: Tensor, groups: int, p: float, generator: torch.Generator) -> Tensor:
    """``groups`` independent DropConnect copies of ``weight`` (inverted scaling, ``0 < p < 1``),
    masks drawn from ``generator`` so that a checkpointed chunk can regenerate them."""
    if _cpu.fits(weight):
        return _cpu.group_masked_weights(weight, groups, p, generator)
    return reference.group_masked_weights(weight, groups, p, generator)


def fits_group_masked_linear(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`group_masked_linear` has a kernel for these tensors (it keeps one
    byte of mask a weight and group where :func:`group_masked_weights` keeps a weight)."""
    return _cpu.fits(x) and weight.dtype == x.dtype


def group_masked_linear(x: Tensor, weight: Tensor, p: float, seeds: list[int]) -> Tensor | None:
    """``x[g] @ (weight * mask_g).T / (1 - p)`` for each group ``g`` of ``x`` (G, R, in)
    without materialising the masked weights, or None where no such kernel exists (the
    caller then multiplies :func:`group_masked_weights`). The groups form ``len(seeds)``
    chunks, each masked as :func:`group_masked_weights` does from a generator seeded with
    the chunk's seed; backward draws the masks again."""
    if fits_group_masked_linear(x, weight):
        return _cpu.group_masked_linear(x, weight, p, seeds)
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
