"""Embedding dropout: drop whole words, i.e. rows of an embedding matrix (Gal and
Ghahramani, "A Theoretically Grounded Application of Dropout in Recurrent Neural
Networks", NeurIPS 2016, section 4; the ``embedded_dropout`` of AWD-LSTM, Merity et al.,
ICLR 2018).

For one forward, each row of the weight (each token of the vocabulary) is kept with
probability ``1 - p`` and scaled by ``1 / (1 - p)``, or zeroed: every occurrence of a
dropped token embeds to zeros. AWD-LSTM masks a copy of the whole weight; masking the
looked-up vectors by the row mask of their tokens gives the same values and the same
gradients without that copy (``F.embedding(i, W * m) == F.embedding(i, W) * m[i]``), and
lets ``F.embedding`` keep its own options: ``padding_idx`` (no gradient to that row),
``sparse`` gradients, ``max_norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dropout._validation import check_positive_int
from lightning_dropout.layers.base import WeightMaskLayer, keep_wrapped_state_dict_keys
from lightning_dropout.layers.common import check_p, exact_output, scaled_keep_mask


def _row_scales(input: Tensor, rows: Tensor) -> Tensor:
    """Each token's row scale, the row mask of its group (dim 0 of ``input`` split evenly)."""
    groups = rows.shape[0]
    if groups == 1:
        return rows[0][input]
    if input.dim() == 0 or input.shape[0] % groups:
        raise ValueError(f"input of shape {tuple(input.shape)}: dim 0 is not a multiple of groups={groups}")
    group = torch.arange(groups, device=input.device).repeat_interleave(input.shape[0] // groups)
    return rows[group.view(-1, *[1] * (input.dim() - 1)), input]


def embedding_dropout(
    input: Tensor,
    weight: Tensor,
    p: float | Tensor,
    training: bool = True,
    *,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
    groups: int = 1,
) -> Tensor:
    """``F.embedding(input, weight, ...)`` with whole rows of ``weight`` dropped at rate ``p``.

    The plain lookup when not training or when ``p = 0``; exact zeros at ``p = 1``.

    Args:
        input: integer token indices of any shape.
        weight: the embedding matrix ``(num_embeddings, embedding_dim)``.
        p: probability of dropping a row (a token of the vocabulary), in [0, 1]: a float
            or a 0-d tensor (see :mod:`lightning_dropout.layers.common`).
        training: drop (True) or look up plainly (False).
        padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse: as in ``F.embedding``.
        groups: independent row masks for that many equal groups of dim 0 of ``input``
            (Monte-Carlo replicas stacked along the batch); 1 for one mask per call.

    Raises:
        TypeError: ``p`` is not a number or ``groups`` not an int.
        ValueError: ``p`` outside [0, 1], ``groups`` < 1, or dim 0 of ``input`` not a
            multiple of ``groups``.

    Example:
        >>> weight = torch.ones(10, 3)
        >>> y = embedding_dropout(torch.tensor([[1, 2, 1, 1, 2]]), weight, p=0.5)
        >>> bool((y[0, 0] == y[0, 2]).all() and (y[0, 0] == y[0, 3]).all())  # token 1, each time
        True
        >>> bool(((y == 0) | (y == 2)).all())
        True
    """
    p = check_p(p)
    groups = check_positive_int("groups", groups)
    out = F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    if not training:
        return out
    if (exact := exact_output(out, p)) is not None:
        return exact
    rows = scaled_keep_mask((groups, weight.shape[0]), p, weight.detach())
    return out * _row_scales(input, rows).unsqueeze(-1)


class EmbeddingDropout(WeightMaskLayer, nn.Module):
    """Wrap an ``nn.Embedding`` so that whole rows of its weight are dropped in training.

    Gal and Ghahramani, NeurIPS 2016 (section 4: dropping words); AWD-LSTM's
    ``embedded_dropout`` (Merity et al., ICLR 2018). One row mask per forward call: every
    occurrence of a dropped token in the batch embeds to zeros; kept rows are scaled by
    ``1 / (1 - p)``. The embedding keeps its options (``padding_idx``, ``sparse``,
    ``max_norm``), its parameter and its ``state_dict`` keys, so weights saved from the
    plain embedding load into the wrapped one and back; :attr:`weight` is the embedding's
    (for tying a decoder to it).

    ``mask_groups`` splits dim 0 of the input into that many groups with independent row
    masks (for Monte-Carlo replicas stacked along the batch, as DropConnect's: see
    :class:`~lightning_dropout.layers.WeightMaskLayer`).

    Args:
        embedding: the ``nn.Embedding`` to wrap.
        p: probability of dropping a row, in [0, 1]; may be reassigned between steps.

    Raises:
        TypeError: ``embedding`` is not an ``nn.Embedding`` or ``p`` is not a number.
        ValueError: ``p`` outside [0, 1].

    Example:
        >>> layer = EmbeddingDropout(torch.nn.Embedding(100, 8, padding_idx=0), p=0.1)
        >>> layer
        EmbeddingDropout(
          p=0.1
          (module): Embedding(100, 8, padding_idx=0)
        )
        >>> layer(torch.tensor([[3, 4, 0]])).shape, list(layer.state_dict())
        (torch.Size([1, 3, 8]), ['weight'])
    """

    def __init__(self, embedding: nn.Embedding, p: float) -> None:
        super().__init__()
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        self.module = embedding
        self._init_weight_mask(p)
        keep_wrapped_state_dict_keys(self)

    @property
    def embedding(self) -> nn.Embedding:
        """The wrapped embedding."""
        return self.module

    @property
    def weight(self) -> Tensor:
        """The wrapped embedding's weight parameter."""
        return self.embedding.weight

    def forward(self, input: Tensor) -> Tensor:
        e = self.embedding
        return embedding_dropout(
            input,
            e.weight,
            self.forward_p,
            self.training,
            padding_idx=e.padding_idx,
            max_norm=e.max_norm,
            norm_type=e.norm_type,
            scale_grad_by_freq=e.scale_grad_by_freq,
            sparse=e.sparse,
            groups=self.mask_groups,
        )

    def drop_counts(self, input: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
        """``(dropped, observed)`` rows of one forward, for the realised drop rate: the
        distinct tokens of ``input`` (padding excluded) whose every occurrence embeds to
        zeros, out of the distinct tokens. (Counting occurrences instead would weigh each
        draw by its token's frequency: one frequent token would decide a step's rate.)"""
        tokens, zero = input.flatten(), output.eq(0).all(-1).flatten()
        if self.embedding.padding_idx is not None:
            keep = tokens != self.embedding.padding_idx
            tokens, zero = tokens[keep], zero[keep]
        distinct, which = torch.unique(tokens, return_inverse=True)
        dropped = torch.ones(distinct.numel(), dtype=torch.bool, device=zero.device)
        dropped.scatter_reduce_(0, which, zero, "amin")
        return dropped.sum(), torch.tensor(distinct.numel())

    def extra_repr(self) -> str:
        return f"p={self.p}"
