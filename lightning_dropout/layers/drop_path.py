"""Drop path, a.k.a. stochastic depth (Huang et al., "Deep Networks with Stochastic Depth",
ECCV 2016): a residual block's branch is dropped for whole samples, so the sample passes
through the block's identity shortcut only.

Applied to the branch's output, before it is added to the shortcut: for a batch ``x`` of
``B`` samples, sample ``b`` of the output is ``x[b] / (1 - p)`` with probability ``1 - p``
and ``x[b] * 0`` otherwise. The ``B`` draws are made on the element path of
:mod:`lightning_dropout.kernels` and the mask is applied by one broadcast multiplication.

The name clash: timm's ``drop_connect_rate`` means this layer; in this package
DropConnect always means weight masking.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_dropout._validation import check_bool, check_positive_int, check_probability
from lightning_dropout.layers.base import DropoutBase
from lightning_dropout.layers.common import (
    check_floating,
    check_p,
    evaluation_output,
    exact_output,
    scaled_keep_mask,
    transforms_active,
)


def _per_sample_shape(x: Tensor) -> tuple[int, ...]:
    """The shape of a per-sample mask of ``x``: ``(B, 1, ..., 1)``."""
    if x.dim() == 0:
        raise ValueError("drop path needs a batch dimension (dim 0); got a 0-d tensor")
    return (x.shape[0], *[1] * (x.dim() - 1))


def drop_path(x: Tensor, p: float | Tensor, training: bool = True, inverted: bool = True) -> Tensor:
    """Zero whole samples (dim 0) of ``x`` independently with probability ``p``.

    Inverted (default): kept samples are scaled by ``1 / (1 - p)`` in training and the
    function is the identity otherwise. ``inverted=False`` leaves kept samples unscaled and
    multiplies by ``1 - p`` outside training (the stochastic-depth paper's test-time rule).
    ``p = 1`` gives exact zeros (and zero gradients), never NaN.

    Args:
        x: floating-point input whose dim 0 is the batch (a residual branch's output).
        p: probability of dropping a sample, in [0, 1]: a float or a 0-d tensor (see
            :mod:`lightning_dropout.layers.common`).
        training: draw a mask (True) or apply the evaluation rule (False).
        inverted: scale at training time (True) or at evaluation time (False).

    Raises:
        TypeError: ``x`` is not a floating-point tensor or ``p`` is not a number.
        ValueError: ``p`` outside [0, 1], or ``x`` has no dimension.

    Example:
        >>> y = drop_path(torch.ones(6, 3, 2), p=0.5)
        >>> bool(((y == 0) | (y == 2)).all()), bool((y.amax((1, 2)) == y.amin((1, 2))).all())
        (True, True)
    """
    check_floating(x)
    p = check_p(p)
    shape = _per_sample_shape(x)
    if not training:
        return evaluation_output(x, p, inverted)
    if (exact := exact_output(x, p)) is not None:
        return exact
    return x * scaled_keep_mask(shape, p, x, inverted)


def drop_path_residual(
    x: Tensor, branch: Callable[[Tensor], Tensor], p: float, training: bool = True, inverted: bool = True
) -> Tensor:
    """``x + drop_path(branch(x), p)``, computing ``branch`` only on the samples it keeps.

    In distribution the same as ``x + drop_path(branch(x), p, training, inverted)`` when
    ``branch`` treats samples independently (no BatchNorm in training mode, no attention
    across the batch): a dropped sample's branch output is multiplied by zero anyway, so
    the branch runs on ``x[kept]`` and its scaled output is added back with ``index_add``.
    That saves about a fraction ``p`` of the branch's forward and backward, at the price
    of a gather and a scatter, and of reading the number of kept samples on the host (one
    synchronisation on a GPU; a data-dependent shape, so no graph under torch.compile).
    Inside a torch.func transform, which cannot batch that shape, it computes
    ``x + drop_path(branch(x), p)``.

    Args:
        x: the block's input, dim 0 the batch; ``branch(x)`` must have its shape.
        branch: the residual branch.
        p: probability of dropping a sample's branch, in [0, 1].
        training: drop (True) or add the branch for every sample (False).
        inverted: as in :func:`drop_path`.

    Raises:
        TypeError: ``x`` is not a floating-point tensor or ``p`` is not a number.
        ValueError: ``p`` outside [0, 1], or ``x`` has no dimension.

    Example:
        >>> calls = []
        >>> def branch(h):
        ...     calls.append(h.shape[0])
        ...     return 2 * h
        >>> _ = torch.manual_seed(0)
        >>> y = drop_path_residual(torch.ones(8, 3), branch, p=0.5)
        >>> calls[0] < 8, sorted(set(y[:, 0].tolist()))
        (True, [1.0, 5.0])
    """
    check_floating(x)
    p = check_probability("p", p)
    _per_sample_shape(x)
    if not training:
        return x + (branch(x) if inverted or p == 0.0 else branch(x) * (1.0 - p))
    if p == 0.0:
        return x + branch(x)
    if p == 1.0:
        return x
    if transforms_active():  # a vmap cannot batch the kept samples' data-dependent count
        return x + drop_path(branch(x), p, training, inverted)
    scale = 1.0 / (1.0 - p) if inverted else 1.0
    kept = torch.nonzero(torch.rand(x.shape[0], device=x.device) >= p).squeeze(1)
    if kept.numel() == x.shape[0]:
        return x + branch(x) * scale
    return x.index_add(0, kept, branch(x.index_select(0, kept)), alpha=scale)


def drop_path_rates(p_max: float, depth: int, from_zero: bool = False) -> list[float]:
    """Drop-path rates growing linearly with depth, for ``depth`` residual blocks.

    Huang et al.'s linear decay rule (the default): block ``l`` of ``L`` (counting from 1)
    drops with ``p_max * l / L``, so the last block drops with ``p_max``.
    ``from_zero=True`` gives the profile of timm's ViT, DeiT and ConvNeXt instead,
    ``torch.linspace(0, p_max, depth)``: the first block never drops.

    Args:
        p_max: the rate of the deepest block, in [0, 1].
        depth: the number of residual blocks, >= 1.
        from_zero: start the profile at 0 (True) or at ``p_max / depth`` (False).

    Raises:
        TypeError: ``p_max`` is not a number, ``depth`` not an int or ``from_zero`` not a bool.
        ValueError: ``p_max`` outside [0, 1] or ``depth`` < 1.

    Example:
        >>> [round(p, 6) for p in drop_path_rates(0.3, 3)]
        [0.1, 0.2, 0.3]
        >>> [round(p, 6) for p in drop_path_rates(0.3, 4, from_zero=True)]
        [0.0, 0.1, 0.2, 0.3]
    """
    p_max = check_probability("p_max", p_max)
    depth = check_positive_int("depth", depth)
    if check_bool("from_zero", from_zero):
        return [p_max * block / max(depth - 1, 1) for block in range(depth)]
    return [p_max * block / depth for block in range(1, depth + 1)]


class DropPath(DropoutBase):
    """Stochastic depth: drop a residual branch for whole samples (dim 0) in training.

    Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016. Put it on the branch,
    before the addition: ``x + drop_path(branch(x))``; :meth:`residual` does that and
    computes the branch only for the samples it keeps. Its site kind is ``drop_path``, so
    :class:`~lightning_dropout.callbacks.DropoutScheduler` keeps the depth profile that
    :func:`drop_path_rates` builds.

    Args:
        p: probability of dropping a sample's branch, in [0, 1]; may be reassigned between
            steps.
        inverted: scale kept samples by ``1 / (1 - p)`` in training (True) or all samples
            by ``1 - p`` in evaluation (False).

    Raises:
        TypeError: ``p`` is not a number or ``inverted`` not a bool.
        ValueError: ``p`` outside [0, 1].

    Example:
        >>> blocks = [DropPath(p) for p in drop_path_rates(0.2, 2)]
        >>> blocks[1]
        DropPath(p=0.2)
        >>> y = blocks[1](torch.ones(4, 5))
        >>> bool((y.amax(1) == y.amin(1)).all())  # whole samples
        True
        >>> torch.equal(blocks[1].eval()(torch.ones(4, 5)), torch.ones(4, 5))
        True
    """

    site_kind = "drop_path"

    def __init__(self, p: float, inverted: bool = True) -> None:
        super().__init__(p)
        self.inverted = check_bool("inverted", inverted)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.forward_p, self.training, self.inverted)

    def residual(self, x: Tensor, branch: Callable[[Tensor], Tensor]) -> Tensor:
        """``x + self(branch(x))`` with ``branch`` computed only for the kept samples.

        See :func:`drop_path_residual` (same distribution for a branch that treats samples
        independently). The dropout monitors watch :meth:`forward`: they see ``p`` here but
        not the realised rate.
        """
        return drop_path_residual(x, branch, self.p, self.training, self.inverted)

    def extra_repr(self) -> str:
        return f"p={self.p}" + ("" if self.inverted else ", inverted=False")
