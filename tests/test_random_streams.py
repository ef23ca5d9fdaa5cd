"""RankStreams: per-rank, per-step streams swapped into torch's global generators."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_dropout import DropConnectLinear, Dropout, Dropout2d, GaussianDropout
from lightning_dropout.random_streams import RankStreams, ShardedSites, mesh_ranks, stream_seed

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


def test_mesh_ranks_split_data_and_tensor_parallel_coordinates() -> None:
    def mesh(
        names: tuple[str, ...] | None, shape: tuple[int, ...], coordinate: list[int] | None
    ) -> SimpleNamespace:
        return SimpleNamespace(mesh_dim_names=names, shape=shape, get_coordinate=lambda: coordinate)

    assert mesh_ranks(mesh(("dp", "tp"), (2, 4), [1, 3]), "tp") == (1, 3)
    assert mesh_ranks(mesh(("tp",), (2,), [1]), "tp") == (0, 1)
    # Row-major over the remaining dimensions: replicate x shard x tp.
    assert mesh_ranks(mesh(("rep", "shard", "tp"), (2, 3, 2), [1, 2, 0]), ["tp"]) == (1 * 3 + 2, 0)
    assert mesh_ranks(mesh(("dp", "tp", "cp"), (2, 2, 2), [1, 1, 0]), ["tp", "cp"]) == (1, 2)
    with pytest.raises(ValueError, match="tensor_parallel"):
        mesh_ranks(mesh(("dp", "model"), (2, 2), [0, 0]), "tp")
    with pytest.raises(ValueError, match="tensor_parallel"):
        mesh_ranks(mesh(None, (2,), [0]), "tp")
    with pytest.raises(ValueError, match="does not hold"):
        mesh_ranks(mesh(("dp", "tp"), (2, 2), None), "tp")


class Attention(nn.Module):
    """A site whose rate is read in forward (as scaled_dot_product_attention's dropout_p)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_dropout = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, self.attention_dropout, self.training)


def _sites_net() -> nn.Sequential:
    return nn.Sequential(Attention(), Dropout(0.5), nn.Sequential(nn.Dropout(0.5)))


def _site_masks(net: nn.Module, patterns: list[str], rank: int, seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.ones(8, N // 8)
    with ShardedSites(net, patterns, rank=rank):
        return [
            nn.functional.dropout(x, 0.5) != 0,
            net[0](x) != 0,
            net[1](x) != 0,
            net[2](x) != 0,
            nn.functional.dropout(x, 0.5) != 0,
        ]


def test_sharded_sites_differ_per_rank_and_the_rest_is_shared() -> None:
    net = _sites_net()
    rank0, rank1 = _site_masks(net, ["0", "2"], 0), _site_masks(net, ["0", "2"], 1)
    assert torch.equal(rank0[0], rank1[0]) and torch.equal(rank0[2], rank1[2])
    for marked in (1, 3):  # a module's own draws and a dropout module below a pattern
        agreement = (rank0[marked] == rank1[marked]).float().mean().item()
        assert abs(agreement - 0.5) < 5 * 0.5 / math.sqrt(N), marked
    # The group's stream moves by one draw per marked forward, the same on every rank,
    # so what follows the marked sites is shared too.
    assert torch.equal(rank0[4], rank1[4])
    assert all(torch.equal(a, b) for a, b in zip(rank0, _site_masks(net, ["0", "2"], 0), strict=True))
    assert not torch.equal(rank0[1], _site_masks(net, ["0", "2"], 0, seed=1)[1])
    # Hooks are gone after the with block: every rank draws the same masks again.
    torch.manual_seed(0)
    first = net[0](torch.ones(8, N // 8))
    torch.manual_seed(0)
    assert torch.equal(first, net[0](torch.ones(8, N // 8)))


def test_sharded_sites_hook_the_topmost_matches_only() -> None:
    net = _sites_net()
    net[0].drop = nn.Dropout()
    sites = ShardedSites(net, ["0", "0.drop", "2.*", "*drop"], rank=0)
    assert list(sites.modules) == ["0", "2.0"]
    sites.remove()
    assert not net[0]._forward_pre_hooks and not net[2][0]._forward_hooks


def test_sharded_sites_in_eval_draw_nothing_and_errors_restore_the_stream() -> None:
    net = _sites_net().eval()
    with ShardedSites(net, ["0"], rank=1):
        torch.manual_seed(0)
        net[0](torch.ones(2, N // 8))
        assert torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state())
        net.train()
        torch.manual_seed(0)
        with pytest.raises(TypeError):
            net[0]("not a tensor")  # the forward fails after the hook reseeded
        torch.manual_seed(0)
        net[0](torch.ones(2, N // 8))
        after_forward = torch.get_rng_state()
    torch.manual_seed(0)
    torch.randint(1 << 62, ())  # the one draw a marked forward takes from the group's stream
    assert torch.equal(torch.get_rng_state(), after_forward)


class CheckpointedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(16, 64), Dropout(0.5), nn.Dropout(0.5), nn.Linear(64, 1))
        self.use_checkpoint = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint:
            return checkpoint(self.layers, x, use_reentrant=False)
        return self.layers(x)


@pytest.mark.parametrize("pattern", ["0.layers.1", "0"], ids=["hook-inside-region", "region-inside-hook"])
def test_checkpoint_recomputes_the_sharded_masks(pattern: str) -> None:
    # "0" marks the block, whose hook runs once, before the checkpoint region saves the
    # state it replays; the dropout layers below it are covered without hooks of their own.
    net = nn.Sequential(CheckpointedBlock())
    x = torch.randn(32, 16)

    def grads(use_checkpoint: bool) -> list[torch.Tensor]:
        net.zero_grad()
        net[0].use_checkpoint = use_checkpoint
        with ShardedSites(net, [pattern], rank=1):
            torch.manual_seed(0)
            net(x).sum().backward()
        return [p.grad.clone() for p in net.parameters() if p.grad is not None]

    assert all(torch.equal(a, b) for a, b in zip(grads(False), grads(True), strict=True))


def test_sharded_sites_bad_arguments() -> None:
    net = _sites_net()
    with pytest.raises(ValueError, match="'enc\\*' matches no module"):
        ShardedSites(net, ["enc*"], rank=0)
    with pytest.raises(TypeError, match="patterns"):
        ShardedSites(net, [0], rank=0)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="rank"):
        ShardedSites(net, ["0"], rank=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank"):
        ShardedSites(net, ["0"], rank=-1)
    assert not net[0]._forward_pre_hooks
