"""The family layers under torch.compile (layers/common.py): p read from a tensor (or a
parameter), so a p that changes between steps compiles once, with exact identity at p = 0
and zeros at p = 1."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from lightning_dropout import ConcreteDropout, DropBlock2d, DropPath, EmbeddingDropout, LockedDropout

SIGMAS = 5.0


def per_sample(y: torch.Tensor) -> torch.Tensor:
    return y[:, 0, 0]


CASES: list[
    tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], int]
] = [
    # (layer, input, one entry per independent draw, number of draws)
    (lambda: DropPath(0.0), lambda: torch.ones(4000, 3, 2), per_sample, 4000),
    (lambda: LockedDropout(0.0), lambda: torch.ones(200, 5, 20), lambda y: y[:, 0], 4000),
    (
        lambda: DropBlock2d(0.0, block_size=2),
        lambda: torch.ones(1, 4000, 3, 3),
        lambda y: y[0, :, 1, 1],
        4000,
    ),
    (
        lambda: EmbeddingDropout(nn.Embedding(4000, 2, _weight=torch.ones(4000, 2)), 0.0),
        lambda: torch.arange(4000),
        lambda y: y[:, 0],
        4000,
    ),
]


@pytest.mark.parametrize(
    ("build", "make_input", "draws", "count"),
    CASES,
    ids=["DropPath", "LockedDropout", "DropBlock2d", "EmbeddingDropout"],
)
def test_compiled_layers_follow_p_without_recompiling(
    build: Callable[[], nn.Module],
    make_input: Callable[[], torch.Tensor],
    draws: Callable[[torch.Tensor], torch.Tensor],
    count: int,
) -> None:
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")
    layer, x = build(), make_input()
    compiled = torch.compile(layer, backend=backend)
    for p in (0.0, 0.3, 1.0):
        layer.p = p
        y = compiled(x)
        if p == 0.0:
            assert torch.equal(y, layer.embedding(x) if isinstance(layer, EmbeddingDropout) else x)
        elif p == 1.0:
            assert not y.any()
        else:
            dropped = (draws(y) == 0).double().mean().item()
            assert abs(dropped - p) <= SIGMAS * math.sqrt(p * (1 - p) / count)
    layer.eval()
    compiled(x)
    assert backend.frame_count <= 2  # once for training, once for eval; never per p


def test_compiled_concrete_dropout_trains_its_p() -> None:
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")
    layer = ConcreteDropout(0.3)
    compiled = torch.compile(layer, backend=backend)
    for p in (0.3, 0.6):
        layer.p = p
        y = compiled(torch.ones(20_000))
        y.square().mean().backward()
        assert layer.p_logit.grad is not None and layer.p_logit.grad.isfinite()
        assert abs(((y * (1 - p)) < 0.5).double().mean().item() - p) <= SIGMAS * math.sqrt(
            p * (1 - p) / 20_000
        )
    assert backend.frame_count == 1
