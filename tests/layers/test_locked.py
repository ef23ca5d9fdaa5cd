"""LockedDropout: one mask per sequence, equal across time, independent across sequences;
batch-first, time-first and packed inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lightning_dropout import LockedDropout
from lightning_dropout.layers import locked_dropout

SIGMAS = 5.0


def test_the_mask_is_locked_across_time_in_both_layouts() -> None:
    torch.manual_seed(0)
    x = torch.rand(6, 20, 16) + 0.5  # no zeros
    y = locked_dropout(x, 0.4)
    mask = y != 0
    assert torch.equal(mask, mask[:, :1].expand_as(mask))
    torch.testing.assert_close(y[mask], x[mask] / 0.6)
    y = LockedDropout(0.4, batch_first=False)(x.transpose(0, 1))  # (time, batch, features)
    mask = y != 0
    assert torch.equal(mask, mask[:1].expand_as(mask))


def test_masks_are_independent_across_sequences_and_features() -> None:
    """Drop rate p over (sequence, feature) pairs, and P(two sequences both drop a feature)
    = p^2: binomial fractions within SIGMAS."""
    torch.manual_seed(1)
    batch, features, p = 4000, 32, 0.3
    dropped = locked_dropout(torch.ones(batch, 3, features), p)[:, 0] == 0
    n = batch * features
    assert abs(dropped.double().mean().item() - p) <= SIGMAS * math.sqrt(p * (1 - p) / n)
    both = (dropped[0::2] & dropped[1::2]).double().mean().item()
    assert abs(both - p * p) <= SIGMAS * math.sqrt(p * p * (1 - p * p) / (n / 2))


def test_unbiased() -> None:
    torch.manual_seed(2)
    p, n = 0.5, 2000 * 64
    y = locked_dropout(torch.ones(2000, 5, 64), p)[:, 0]
    assert abs(y.double().mean().item() - 1.0) <= SIGMAS * math.sqrt(p / (1 - p) / n)


def test_packed_sequences_get_one_mask_per_sequence() -> None:
    torch.manual_seed(3)
    lengths = torch.tensor([7, 3, 5, 1])
    padded = torch.rand(4, 7, 10) + 0.5
    packed = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=False)
    out, out_lengths = pad_packed_sequence(LockedDropout(0.5)(packed), batch_first=True)
    assert torch.equal(out_lengths, lengths)
    for b, length in enumerate(lengths.tolist()):
        mask = out[b, :length] != 0
        assert torch.equal(mask, mask[:1].expand_as(mask))
        torch.testing.assert_close(out[b, :length][mask], padded[b, :length][mask] * 2)
    zeros, _ = pad_packed_sequence(locked_dropout(packed, 1.0), batch_first=True)
    assert not zeros.any()


def test_ends_of_p_evaluation_and_validation() -> None:
    x = torch.randn(2, 4, 3, requires_grad=True)
    assert locked_dropout(x, 0.0) is x and locked_dropout(x, 0.5, training=False) is x
    zeros = locked_dropout(x, 1.0)
    zeros.sum().backward()
    assert not zeros.any() and not x.grad.any()  # type: ignore[union-attr]
    assert torch.equal(LockedDropout(0.5).eval()(x), x)
    with pytest.raises(ValueError, match="3-D input"):
        LockedDropout(0.5)(torch.ones(4, 8))
    with pytest.raises(TypeError, match="batch_first"):
        LockedDropout(0.5, batch_first=None)  # type: ignore[arg-type]
    assert repr(LockedDropout(0.25)) == "LockedDropout(p=0.25, batch_first=True)"
