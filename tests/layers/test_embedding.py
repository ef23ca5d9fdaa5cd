"""EmbeddingDropout: whole rows drop together at rate p, unbiased; padding_idx, sparse
gradients, max_norm, groups, state_dict keys and weight tying."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dropout import EmbeddingDropout
from lightning_dropout.layers import embedding_dropout

SIGMAS = 5.0


def test_every_occurrence_of_a_token_drops_together() -> None:
    torch.manual_seed(0)
    weight = torch.randn(50, 4)
    tokens = torch.randint(0, 50, (8, 30))
    y = embedding_dropout(tokens, weight, 0.5)
    rows = torch.where((y != 0).any(-1, keepdim=True), y, float("nan"))
    for token in tokens.unique().tolist():
        at = rows[tokens == token]
        if at[0].isnan().all():
            assert at.isnan().all()  # dropped everywhere
        else:
            torch.testing.assert_close(at, (weight[token] * 2).expand_as(at))  # kept everywhere


def test_rows_drop_at_rate_p_and_the_output_is_unbiased() -> None:
    torch.manual_seed(1)
    vocabulary, p = 20_000, 0.3
    y = embedding_dropout(torch.arange(vocabulary), torch.ones(vocabulary, 2), p)
    dropped = (y[:, 0] == 0).double().mean().item()
    assert abs(dropped - p) <= SIGMAS * math.sqrt(p * (1 - p) / vocabulary)
    assert abs(y[:, 0].double().mean().item() - 1.0) <= SIGMAS * math.sqrt(p / (1 - p) / vocabulary)
    # A large vocabulary draws its row mask on the fast path, with the same law.
    y = embedding_dropout(torch.arange(200_000), torch.ones(200_000, 1), p)
    assert abs((y == 0).double().mean().item() - p) <= SIGMAS * math.sqrt(p * (1 - p) / 200_000)


def test_same_values_and_gradients_as_masking_the_weight() -> None:
    """AWD-LSTM's definition: look up in the weight with dropped rows zeroed and kept rows scaled."""
    torch.manual_seed(2)
    weight = torch.randn(30, 5, requires_grad=True)
    tokens = torch.randint(0, 30, (4, 12))
    y = embedding_dropout(tokens, weight, 0.4)
    kept_rows = torch.ones(30, dtype=torch.bool)
    kept_rows[tokens[(y == 0).all(-1)]] = False
    reference = F.embedding(tokens, weight * kept_rows[:, None] / 0.6)
    torch.testing.assert_close(y, reference)
    (grad,) = torch.autograd.grad(y.square().sum(), weight)
    (expected,) = torch.autograd.grad(reference.square().sum(), weight)
    torch.testing.assert_close(grad, expected)


def test_embedding_options_are_respected() -> None:
    torch.manual_seed(3)
    embedding = nn.Embedding(40, 6, padding_idx=0, sparse=True)
    layer = EmbeddingDropout(embedding, 0.5)
    tokens = torch.randint(0, 40, (5, 9))
    tokens[:, -2:] = 0
    layer(tokens).sum().backward()
    grad = embedding.weight.grad
    assert grad is not None and grad.is_sparse
    assert not grad.to_dense()[0].any()  # no gradient to the padding row
    clipped = EmbeddingDropout(nn.Embedding(40, 6, max_norm=1.0), 0.5)
    clipped(tokens)
    assert (clipped.weight[tokens.unique()].norm(dim=1) <= 1.0 + 1e-6).all()


def test_groups_draw_independent_masks() -> None:
    torch.manual_seed(4)
    tokens = torch.arange(500).repeat(4, 1)  # four identical rows of 500 tokens
    y = embedding_dropout(tokens, torch.ones(500, 1), 0.5, groups=2)[..., 0] == 0
    assert torch.equal(y[0], y[1]) and torch.equal(y[2], y[3])  # within a group: one mask
    assert not torch.equal(y[0], y[2])  # across groups: independent
    layer = EmbeddingDropout(nn.Embedding(500, 1), 0.5)
    layer.mask_groups = 2
    with pytest.raises(ValueError, match="multiple of groups=2"):
        layer(torch.arange(3)[:, None])


def test_wrapper_keeps_the_embedding_state_dict_and_weight() -> None:
    embedding = nn.Embedding(10, 3)
    layer = EmbeddingDropout(nn.Embedding(10, 3), 0.1)
    layer.load_state_dict(embedding.state_dict())
    assert torch.equal(layer.weight, embedding.weight) and layer.weight is layer.embedding.weight
    embedding.load_state_dict(layer.state_dict())
    decoder = nn.Linear(3, 10, bias=False)
    decoder.weight = layer.weight  # weight tying, as AWD-LSTM does
    assert decoder.weight is layer.embedding.weight


def test_ends_of_p_evaluation_and_validation() -> None:
    layer = EmbeddingDropout(nn.Embedding(10, 3), 0.0)
    tokens = torch.tensor([[1, 2, 3]])
    plain = layer.embedding(tokens)
    torch.testing.assert_close(layer(tokens), plain)
    layer.p = 1.0
    zeros = layer(tokens)
    zeros.sum().backward()
    assert not zeros.any() and not layer.weight.grad.any()  # type: ignore[union-attr]
    layer.p = 0.5
    torch.testing.assert_close(layer.eval()(tokens), plain)
    with pytest.raises(TypeError, match="nn.Embedding"):
        EmbeddingDropout(nn.Linear(2, 2), 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="p must be in"):
        EmbeddingDropout(nn.Embedding(3, 2), 2.0)
