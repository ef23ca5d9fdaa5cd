"""What the layers' functions share: ``p`` as a float or a 0-d tensor, and the exact outputs.

Every function of this package's layers takes ``p`` as a float (eager calls) or as a 0-d
tensor: compiled layers pass :attr:`~lightning_dropout.layers.base.DropProbability.p_tensor`,
so that p is a graph input rather than a constant, and a p that changes every step (as
under :class:`~lightning_dropout.callbacks.DropoutScheduler`) compiles once. A tensor p is
never read on the host: its rules are written without a branch on its value (``p = 0`` is an
exact identity and ``p = 1`` gives exact zeros with zero gradients all the same). A float p
is validated, and its exact cases return early: ``p = 0`` gives the input itself and
``p = 1`` zeros that never come from ``0 * inf``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_dropout._validation import check_probability
from lightning_dropout.kernels.reference import keep_scale


def check_floating(x: Tensor, name: str = "input") -> None:
    """Raise a TypeError unless ``x`` is a floating-point tensor.

    Raises:
        TypeError: ``x`` is not a tensor, or its dtype is not floating point.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_p(p: float | Tensor, name: str = "p") -> float | Tensor:
    """``p`` validated: a float in [0, 1], or a 0-d floating-point tensor (its value unread).

    Raises:
        TypeError: ``p`` is neither a real number nor a floating-point tensor.
        ValueError: a float ``p`` is NaN or outside [0, 1], or a tensor ``p`` is not 0-d.

    Example:
        >>> check_p(1), check_p(torch.tensor(0.5))
        (1.0, tensor(0.5000))
    """
    if isinstance(p, Tensor):
        if not p.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {p.dtype}")
        if p.dim() != 0:
            raise ValueError(f"{name} must be a 0-d tensor, got shape {tuple(p.shape)}")
        return p
    return check_probability(name, p)


def p_equals(p: float | Tensor, value: float) -> bool:
    """Whether ``p`` is the float ``value`` (a tensor p is never compared on the host).

    Example:
        >>> p_equals(0.0, 0.0), p_equals(torch.tensor(0.0), 0.0)
        (True, False)
    """
    return not isinstance(p, Tensor) and p == value


def zeros_like_connected(x: Tensor, inplace: bool = False) -> Tensor:
    """Exact zeros shaped like ``x`` that stay in the autograd graph with a 0 gradient.

    ``x * 0`` would give NaN for infinite entries; ``torch.where`` does not.
    """
    if inplace:
        return x.zero_()
    return torch.where(torch.zeros((), dtype=torch.bool, device=x.device), x, 0.0)


def exact_output(x: Tensor, p: float | Tensor, inplace: bool = False) -> Tensor | None:
    """The training output of a float ``p`` of 0 or 1: ``x`` itself, or connected zeros;
    None otherwise (and for a tensor p)."""
    if p_equals(p, 0.0):
        return x
    if p_equals(p, 1.0):
        return zeros_like_connected(x, inplace)
    return None


def evaluation_output(x: Tensor, p: float | Tensor, inverted: bool, inplace: bool = False) -> Tensor:
    """The evaluation rule: ``x`` for inverted dropout, ``x * (1 - p)`` for the original one."""
    if inverted or p_equals(p, 0.0):
        return x
    return x.mul_(1.0 - p) if inplace else x * (1.0 - p)


def in_memory_order(x: Tensor) -> tuple[Tensor, list[int]] | None:
    """``x`` permuted into a contiguous view of its memory (a channels_last input, say) and
    the permutation that undoes it; None when ``x`` is contiguous or has gaps.

    An elementwise op on the view and the permutation back give an output laid out as
    ``x``, as torch's elementwise ops do.

    Example:
        >>> x = torch.ones(2, 3, 4, 5).to(memory_format=torch.channels_last)
        >>> view, back = in_memory_order(x)
        >>> view.is_contiguous(), view.permute(back).stride() == x.stride()
        (True, True)
    """
    if transforms_active() or x.is_contiguous():  # vmap hides the batched layout
        return None
    strides = x.stride()
    order = sorted(range(x.dim()), key=lambda d: -strides[d])
    view = x.permute(order)
    if not view.is_contiguous():
        return None
    return view, sorted(range(x.dim()), key=lambda d: order[d])


def transforms_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, ...) is running.

    Inside one, tensors are wrapped: a host read (``.item()``) of a batched draw fails, and
    saved-tensor hooks (activation checkpointing) are refused, so the layers draw with
    torch's random ops, which follow vmap's ``randomness`` contract, and keep what backward
    needs.
    """
    return bool(torch._C._are_functorch_transforms_active())


def keep_mask(shape: tuple[int, ...], p: float | Tensor, like: Tensor) -> Tensor:
    """A bool tensor of ``shape`` on ``like``'s device, True independently w.p. ``1 - p``.

    Drawn with ``torch.rand`` (in float32, or float64 for a float64 ``like``), so it is
    right in every mode: under vmap it follows the ``randomness`` contract ("error" raises,
    "different" draws per element, "same" once), it reads a tensor ``p`` without a host
    sync (compiled graphs), and nothing of it depends on the grad mode.

    Example:
        >>> keep = keep_mask((2, 3), 0.0, torch.empty(0))
        >>> keep.dtype, bool(keep.all())
        (torch.bool, True)
    """
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    # rand is in [0, 1): p = 0 keeps everything, p = 1 nothing.
    return torch.rand(shape, dtype=dtype, device=like.device) >= p


def scaled_keep_mask(
    shape: tuple[int, ...], p: float | Tensor, like: Tensor, inverted: bool = True
) -> Tensor:
    """A mask of ``shape`` in ``like``'s dtype and device: ``1 / (1 - p)`` (1 when not
    ``inverted``) with probability ``1 - p``, else 0, each entry independent.

    For layers that draw a mask and broadcast it over their input (or multiply a weight by
    it): drawn by :func:`keep_mask`, so right in every mode; a tensor ``p`` may be anything
    in [0, 1].

    Example:
        >>> mask = scaled_keep_mask((2, 3), 0.5, torch.empty(0))
        >>> bool(((mask == 0) | (mask == 2)).all())
        True
    """
    scale = torch.as_tensor(keep_scale(p, inverted), dtype=like.dtype, device=like.device)
    return torch.where(
        keep_mask(shape, p, like), scale, torch.zeros((), dtype=like.dtype, device=like.device)
    )
