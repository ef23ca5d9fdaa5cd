"""Locked (variational) dropout for sequences: one mask per sequence, shared by every time
step (Gal and Ghahramani, "A Theoretically Grounded Application of Dropout in Recurrent
Neural Networks", NeurIPS 2016; the ``LockedDropout`` of AWD-LSTM, Merity et al.,
"Regularizing and Optimizing LSTM Language Models", ICLR 2018; fastai's ``RNNDropout``).

For a ``(B, T, F)`` input the mask has shape ``(B, 1, F)``: feature ``f`` of sequence ``b``
is either kept (scaled by ``1 / (1 - p)``) at every step or zero at every step, which is
what the variational reading of dropout in an RNN asks for; independent masks per step
would inject fresh noise at every step. The small mask is drawn on the element fast path
and broadcast over time by one multiplication.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from lightning_dropout._validation import check_bool
from lightning_dropout.layers.base import DropoutBase
from lightning_dropout.layers.common import (
    check_floating,
    check_p,
    p_equals,
    scaled_keep_mask,
    zeros_like_connected,
)

Sequences = Tensor | PackedSequence


def _packed_sequence_index(batch_sizes: Tensor, device: torch.device) -> Tensor:
    """For each row of a PackedSequence's data, the (sorted) sequence it belongs to."""
    rows = int(batch_sizes.sum())
    starts = torch.cumsum(batch_sizes, 0) - batch_sizes
    return (torch.arange(rows) - torch.repeat_interleave(starts, batch_sizes)).to(device)


def _locked(x: Sequences, p: float | Tensor, batch_first: bool) -> Sequences:
    """Training-mode locked dropout at ``p`` (a float in (0, 1), or a 0-d tensor)."""
    if isinstance(x, PackedSequence):
        sequences = int(x.batch_sizes[0])
        mask = scaled_keep_mask((sequences, *x.data.shape[1:]), p, x.data)
        data = x.data * mask[_packed_sequence_index(x.batch_sizes, x.data.device)]
        return x._replace(data=data)
    shape = (x.shape[0], 1, x.shape[2]) if batch_first else (1, x.shape[1], x.shape[2])
    return x * scaled_keep_mask(shape, p, x)


def _check_input(x: Sequences) -> Tensor:
    data = x.data if isinstance(x, PackedSequence) else x
    check_floating(data)
    if not isinstance(x, PackedSequence) and x.dim() != 3:
        raise ValueError(
            "LockedDropout expects a 3-D input (batch, time, features), or (time, batch, features) "
            f"with batch_first=False, or a PackedSequence; got shape {tuple(x.shape)}"
        )
    return data


def locked_dropout(
    x: Sequences, p: float | Tensor, training: bool = True, batch_first: bool = True
) -> Sequences:
    """Drop features of whole sequences: one mask per sequence, shared across time steps.

    The identity when not training or when ``p = 0``; exact zeros at ``p = 1``. Kept
    features are scaled by ``1 / (1 - p)``.

    Args:
        x: ``(batch, time, features)``, ``(time, batch, features)`` with
            ``batch_first=False``, or a ``PackedSequence`` (one mask per packed sequence).
        p: probability of dropping a feature of a sequence, in [0, 1]: a float or a 0-d
            tensor (see :mod:`lightning_dropout.layers.common`).
        training: drop (True) or return ``x`` (False).
        batch_first: whether dim 0 of a tensor input is the batch (True) or time (False).

    Raises:
        TypeError: ``x`` is not floating point, or ``p`` / ``batch_first`` wrongly typed.
        ValueError: ``p`` outside [0, 1] or a tensor input that is not 3-D.

    Example:
        >>> y = locked_dropout(torch.ones(4, 10, 6), p=0.5)
        >>> bool((y == y[:, :1]).all())  # the same mask at every step
        True
        >>> bool(((y == 0) | (y == 2)).all())
        True
    """
    data = _check_input(x)
    p = check_p(p)
    check_bool("batch_first", batch_first)
    if not training or p_equals(p, 0.0):
        return x
    if p_equals(p, 1.0):
        zeros = zeros_like_connected(data)
        return x._replace(data=zeros) if isinstance(x, PackedSequence) else zeros
    return _locked(x, p, batch_first)


class LockedDropout(DropoutBase):
    """Locked (variational) dropout: the same feature mask at every time step of a sequence.

    Gal and Ghahramani, "A Theoretically Grounded Application of Dropout in Recurrent
    Neural Networks", NeurIPS 2016; AWD-LSTM's ``LockedDropout`` (Merity et al., ICLR
    2018). Put it on an RNN's inputs and outputs (between stacked layers); for the
    recurrent weights use :class:`~lightning_dropout.DropConnect` (AWD-LSTM's weight drop).

    Args:
        p: probability of dropping a feature of a sequence, in [0, 1]; may be reassigned
            between steps.
        batch_first: inputs are ``(batch, time, features)`` (True) or
            ``(time, batch, features)`` (False). ``PackedSequence`` inputs work either way.

    Raises:
        TypeError: ``p`` is not a number or ``batch_first`` not a bool.
        ValueError: ``p`` outside [0, 1]; in forward, a tensor input that is not 3-D.

    Example:
        >>> layer = LockedDropout(0.3, batch_first=False)
        >>> layer
        LockedDropout(p=0.3, batch_first=False)
        >>> y = layer(torch.ones(7, 2, 5))  # (time, batch, features)
        >>> bool((y == y[:1]).all())
        True
    """

    def __init__(self, p: float, batch_first: bool = True) -> None:
        super().__init__(p)
        self.batch_first = check_bool("batch_first", batch_first)

    def forward(self, x: Sequences) -> Sequences:
        return locked_dropout(x, self.forward_p, self.training, self.batch_first)

    def extra_repr(self) -> str:
        return f"p={self.p}, batch_first={self.batch_first}"
