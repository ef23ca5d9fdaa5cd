"""The layers that drop weights as one family: one mask per call, for groups of the batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_dropout import DropConnect, DropConnectConv2d, DropConnectLinear, EmbeddingDropout
from lightning_dropout.layers import (
    ConcreteDropout,
    DropCounter,
    Dropout,
    Dropout2d,
    WeightMaskLayer,
)


def test_dropconnect_layers_wrapper_and_embedding_dropout_are_one_family() -> None:
    family = [
        DropConnectLinear(2, 2),
        DropConnectConv2d(1, 1, 1),
        DropConnect(nn.Linear(2, 2)),
        EmbeddingDropout(nn.Embedding(4, 2), 0.5),
    ]
    assert all(isinstance(m, WeightMaskLayer) and m.mask_groups == 1 for m in family)
    assert not isinstance(Dropout(), WeightMaskLayer)
    assert [m.site_kind for m in family] == ["dropconnect", "dropconnect", "dropconnect", "dropout"]


def test_independent_groups_and_one_mask_per_call_set_and_restore() -> None:
    shared, per_sample = DropConnectLinear(2, 2), DropConnectLinear(2, 2, per_sample=True)
    with shared.independent_groups(3), per_sample.independent_groups(3):
        assert (shared.mask_groups, per_sample.mask_groups) == (3, 1)  # per sample already
    assert shared.mask_groups == 1
    per_sample.mask_groups = 2
    with pytest.raises(RuntimeError), per_sample.one_mask_per_call():
        assert (per_sample.mask_groups, per_sample.per_sample) == (1, False)
        raise RuntimeError
    assert (per_sample.mask_groups, per_sample.per_sample) == (2, True)
    with pytest.raises(ValueError, match="groups"), shared.independent_groups(0):
        pass


def test_one_mask_per_call_gives_every_row_the_same_mask() -> None:
    layer = DropConnectLinear(64, 32, bias=False, per_sample=True)
    x = torch.ones(1, 64).expand(6, 64)
    y = layer(x)
    assert not torch.allclose(y[0], y[1], rtol=1e-3)  # per sample: rows differ
    with layer.one_mask_per_call():
        y = layer(x)
    # equal rows up to rounding: BLAS may compute some rows of a matmul with other kernels
    assert torch.allclose(y, y[:1].expand_as(y), rtol=1e-5, atol=1e-6)


def test_layers_that_count_their_own_drops() -> None:
    assert isinstance(ConcreteDropout(0.2), DropCounter)
    assert isinstance(EmbeddingDropout(nn.Embedding(4, 2), 0.5), DropCounter)
    assert not isinstance(Dropout(), DropCounter) and not isinstance(nn.Dropout(), DropCounter)


def test_channel_layers_say_how_they_read_an_input() -> None:
    assert Dropout2d().as_batched(torch.ones(2, 3, 4, 4)).shape == (2, 3, 4, 4)
    assert Dropout2d(batched=False).as_batched(torch.ones(3, 4, 4)).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="ambiguous"):
        Dropout2d().as_batched(torch.ones(3, 4, 4))
