"""RankStreams: per-rank, per-step streams swapped into torch's global generators."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_dropout import DropConnectLinear, Dropout, Dropout2d, GaussianDropout
from lightning_dropout.random_streams import RankStreams, stream_seed

N = 20_000


def _mask(streams: RankStreams) -> torch.Tensor:
    with streams.step_scope():
        return Dropout(0.5)(torch.ones(N)) != 0


def test_stream_seed_depends_on_seed_rank_and_step() -> None:
    seeds = {stream_seed(seed, rank, step) for seed in range(3) for rank in range(4) for step in range(50)}
    assert len(seeds) == 3 * 4 * 50
    assert stream_seed(2**64 + 5, 1, 2) == stream_seed(5, 1, 2)  # only the low 64 bits count
    with pytest.raises(ValueError, match="rank"):
        stream_seed(0, -1, 0)
    with pytest.raises(ValueError, match="step"):
        stream_seed(0, 0, -1)


def test_ranks_differ_and_the_same_seed_reproduces() -> None:
    rank0, rank1 = RankStreams(seed=7, rank=0), RankStreams(seed=7, rank=1)
    first0, first1 = _mask(rank0), _mask(rank1)
    # Independent p = 0.5 masks agree on each element with probability 1/2.
    agreement = (first0 == first1).float().mean().item()
    assert abs(agreement - 0.5) < 5 * 0.5 / math.sqrt(N)
    second0 = _mask(rank0)
    assert abs((first0 == second0).float().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(N)
    again = RankStreams(seed=7, rank=0)
    assert torch.equal(_mask(again), first0) and torch.equal(_mask(again), second0)
    assert torch.equal(_mask(RankStreams(seed=7, rank=0, step=1)), second0)
    assert not torch.equal(_mask(RankStreams(seed=8, rank=0)), first0)


@pytest.mark.parametrize(
    "make_layer",
    [
        lambda: Dropout2d(0.5),
        lambda: GaussianDropout(0.5),
        lambda: DropConnectLinear(8, 8, per_sample=True),
        lambda: nn.Dropout2d(0.5),
        lambda: nn.AlphaDropout(0.5),
    ],
    ids=["Dropout2d", "GaussianDropout", "DropConnectLinear", "nn.Dropout2d", "nn.AlphaDropout"],
)
def test_every_dropout_layer_draws_from_the_rank_stream(make_layer: Callable[[], nn.Module]) -> None:
    layer = make_layer()
    x = torch.ones(16, 8, 4, 4) if "2d" in type(layer).__name__ else torch.ones(16, 8)

    def output(rank: int) -> torch.Tensor:
        with RankStreams(seed=0, rank=rank).step_scope():
            return layer(x)

    assert torch.equal(output(0), output(0))
    assert not torch.equal(output(0), output(1))


def test_global_stream_is_untouched_by_steps() -> None:
    torch.manual_seed(3)
    expected = torch.rand(5)
    torch.manual_seed(3)
    streams = RankStreams(seed=3, rank=0)
    for _ in range(3):
        _mask(streams)
    assert torch.equal(torch.rand(5), expected)
    assert streams.step == 3 and not streams.active


def test_scope_is_restored_on_error_and_guards_nesting() -> None:
    streams = RankStreams(seed=0, rank=0)
    before = torch.get_rng_state()
    with pytest.raises(KeyError), streams.step_scope():
        torch.rand(3)
        raise KeyError("boom")
    assert torch.equal(torch.get_rng_state(), before) and not streams.active
    streams.activate()
    with pytest.raises(RuntimeError, match="twice"):
        streams.activate()
    streams.deactivate()
    streams.deactivate()  # idempotent
    assert torch.equal(torch.get_rng_state(), before)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="seed"):
        RankStreams(seed=1.5, rank=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="rank"):
        RankStreams(seed=0, rank=True)
    with pytest.raises(ValueError, match="rank"):
        RankStreams(seed=0, rank=-1)
    with pytest.raises(ValueError, match="devices"):
        RankStreams(seed=0, rank=0, devices=["meta"])


def test_activation_checkpoint_recomputes_the_same_masks() -> None:
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.5), Dropout(0.5), nn.Linear(64, 1))
    x = torch.randn(32, 16)

    def grads(use_checkpoint: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        net.zero_grad()
        with RankStreams(seed=0, rank=1).step_scope():
            out = checkpoint(net, x, use_reentrant=False) if use_checkpoint else net(x)
            out.sum().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]

    plain_out, plain_grads = grads(False)
    ckpt_out, ckpt_grads = grads(True)
    assert torch.equal(plain_out, ckpt_out)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, ckpt_grads, strict=True))


def test_state_dict_resumes_and_loads_weights_only() -> None:
    streams = RankStreams(seed=11, rank=1)
    _mask(streams)
    buffer = io.BytesIO()
    torch.save(streams.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state == {"seed": 11, "step": 1}
    resumed = RankStreams(seed=0, rank=1)
    resumed.load_state_dict(state)
    assert torch.equal(_mask(resumed), _mask(streams))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generator_is_covered() -> None:
    def cuda_mask(rank: int) -> torch.Tensor:
        with RankStreams(seed=0, rank=rank, devices=["cuda"]).step_scope():
            return torch.rand(N, device="cuda") < 0.5

    before = torch.cuda.get_rng_state()
    assert torch.equal(cuda_mask(0), cuda_mask(0))
    assert not torch.equal(cuda_mask(0), cuda_mask(1))
    assert torch.equal(torch.cuda.get_rng_state(), before)
