"""RankStreams and ShardedSites under FSDP2 and tensor parallelism: two CPU processes (gloo).

torch's ``fully_shard`` and DTensor tensor parallelism run on CPU with gloo. Two processes
are started once and run every check; the tests read what they saved:

* FSDP2 (a 2-rank mesh): a model with DropConnectLinear, a DropConnect-wrapped Linear and
  Dropout trains under ``RankStreams(seed, global rank)``; each step, beside it, an
  unsharded copy replays both ranks' steps with the same streams (so the same masks), and
  its averaged gradients must equal FSDP2's; a resume from saved shards and stream state
  continues the masks; MC prediction and a synced CoActivation run on the sharded model.
* Tensor parallelism (a 2-rank "tp" mesh): column- then row-parallel Linear pairs, a
  dropout site on each sharded activation (marked with ShardedSites) and on each
  replicated one; the first pair under activation checkpointing. The outputs and
  gradients must equal a single-process forward given the ranks' masks.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.functional import mse_loss
from torch.utils.checkpoint import checkpoint

from lightning_dropout import DropConnect, DropConnectLinear, Dropout
from lightning_dropout.mc import mc_predict
from lightning_dropout.metrics import CoActivation
from lightning_dropout.random_streams import RankStreams, ShardedSites, mesh_ranks
from tests._distributed import free_port

SEED = 7
PROBE = 2048  # elements of each step's probe mask
STEPS = 8
RESUME_AT = 4
TP_STEPS = 2
WIDTH = 32  # hidden units; each tensor-parallel rank holds half


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(16, 8, generator=generator)
    return x, x.sum(1, keepdim=True)


def _fsdp_net() -> nn.Sequential:
    torch.manual_seed(0)  # the same initial weights on both ranks and for the reference
    return nn.Sequential(
        DropConnectLinear(8, WIDTH, p=0.3),
        nn.Tanh(),
        Dropout(0.2),
        DropConnect(nn.Linear(WIDTH, WIDTH), p=0.3),
        nn.Tanh(),
        nn.Linear(WIDTH, 1),
    )


def _shard(net: nn.Sequential, mesh: DeviceMesh) -> nn.Sequential:
    fully_shard(net[0], mesh=mesh)
    fully_shard(net[3], mesh=mesh)  # the wrapper, not the Linear inside it (see docs/multi-gpu.md)
    fully_shard(net, mesh=mesh)
    return net


def _train_steps(
    net: nn.Module, streams: RankStreams, rank: int, steps: range, records: dict[str, list[Any]]
) -> None:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    for step in steps:
        with streams.step_scope():
            x, y = _batch(rank, step)
            loss = mse_loss(net(x), y)
            loss.backward()
            records["probe"].append(Dropout(0.5)(torch.ones(PROBE)) != 0)
        records["loss"].append(loss.detach())
        records["grads"].append({n: p.grad.full_tensor() for n, p in net.named_parameters()})
        optimizer.step()
        optimizer.zero_grad()
        if step + 1 == RESUME_AT:
            records["saved"] = {
                "streams": streams.state_dict(),
                "shards": {n: p.to_local().clone() for n, p in net.named_parameters()},
            }


def _fsdp_checks(rank: int) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    net = _shard(_fsdp_net(), mesh)
    eval_x, eval_y = _batch(99, 0)
    net.eval()
    start_loss = mse_loss(net(eval_x), eval_y).detach()
    # After a forward without backward the root keeps its parameters gathered; an
    # optimizer built then would hold the gathered copies.
    net.reshard()
    net.train()
    records: dict[str, Any] = {"probe": [], "loss": [], "grads": []}
    _train_steps(net, RankStreams(SEED, rank), rank, range(STEPS), records)

    # The unsharded reference replays both ranks' steps with their streams (hence their
    # masks) and averages the gradients, as FSDP2's reduce-scatter does.
    reference = _fsdp_net()
    reference_streams = [RankStreams(SEED, r) for r in range(2)]
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    grad_errors = []
    for step in range(STEPS):
        for r in range(2):
            with reference_streams[r].step_scope():
                x, y = _batch(r, step)
                (mse_loss(reference(x), y) / 2).backward()
        grad_errors.append(
            max(
                (p.grad - records["grads"][step][n]).abs().max().item()
                for n, p in reference.named_parameters()
            )
        )
        reference_optimizer.step()
        reference_optimizer.zero_grad()

    net.eval()
    end_loss = mse_loss(net(eval_x), eval_y).detach()
    torch.manual_seed(3)
    mc_sharded = mc_predict(net, eval_x[:4], n_samples=8, output="regression").mean
    torch.manual_seed(3)
    mc_reference = mc_predict(reference.eval(), eval_x[:4], n_samples=8, output="regression").mean
    net.train()
    net.reshard()

    # Resume: fresh shards loaded with the saved ones, streams from their state.
    resumed = _shard(_fsdp_net(), mesh)
    with torch.no_grad():
        for name, param in resumed.named_parameters():
            param.to_local().copy_(records["saved"]["shards"][name])
    streams = RankStreams(0, rank)
    streams.load_state_dict(records["saved"]["streams"])
    resumed_records: dict[str, Any] = {"probe": [], "loss": [], "grads": []}
    _train_steps(resumed, streams, rank, range(RESUME_AT, STEPS), resumed_records)

    # The monitors' metric on the sharded model's units: compute() syncs both ranks.
    acts = net[1](net[0](_batch(rank, 50)[0])).detach()
    metric = CoActivation(WIDTH)
    metric.update(acts)
    stats = metric.compute()
    return {
        "probe": records["probe"],
        "loss": records["loss"],
        "grad_errors": grad_errors,
        "eval_loss": (start_loss, end_loss),
        "mc": (mc_sharded, mc_reference),
        "resumed": {"probe": resumed_records["probe"], "loss": resumed_records["loss"]},
        "weights": {n: p.full_tensor() for n, p in net.named_parameters()},
        "resumed_weights": {n: p.full_tensor() for n, p in resumed.named_parameters()},
        "acts": acts,
        "stats": {k: stats[k] for k in ("mean_abs_corr", "decov", "sparsity")},
    }


class TensorParallelNet(nn.Module):
    """Two column-then-row-parallel pairs; each pair's sharded and replicated activation drop."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.up1, self.down1 = nn.Linear(8, WIDTH), nn.Linear(WIDTH, 8)
        self.up2, self.down2 = nn.Linear(8, WIDTH), nn.Linear(WIDTH, 8)
        self.sharded1, self.replicated1 = Dropout(0.5), nn.Dropout(0.5)
        self.sharded2, self.replicated2 = nn.Dropout(0.5), Dropout(0.5)
        self.head = nn.Linear(8, 1)

    def first(self, x: torch.Tensor) -> torch.Tensor:
        return self.replicated1(self.down1(self.sharded1(self.up1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self.first, x, use_reentrant=False)
        return self.head(self.replicated2(self.down2(self.sharded2(self.up2(h)))))


DROPOUT_SITES = ("sharded1", "replicated1", "sharded2", "replicated2")


def _tensor_parallel_checks(rank: int) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    data_rank, tensor_rank = mesh_ranks(mesh, "tp")
    net = TensorParallelNet()
    initial = copy.deepcopy(net.state_dict())
    plan = {
        "up1": ColwiseParallel(),
        "down1": RowwiseParallel(),
        "up2": ColwiseParallel(),
        "down2": RowwiseParallel(),
    }
    parallelize_module(net, mesh, plan)
    masks: dict[str, list[torch.Tensor]] = {site: [] for site in DROPOUT_SITES}
    recording = {"on": False}

    def record(site: str) -> Any:
        # Inputs come from a Linear, never exactly zero: a zero output is a dropped unit.
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            if recording["on"]:
                masks[site].append(torch.as_tensor(out.detach() != 0).clone())

        return hook

    for site in DROPOUT_SITES:
        net.get_submodule(site).register_forward_hook(record(site))
    streams = RankStreams(SEED, data_rank)
    steps = []
    with ShardedSites(net, ["sharded*"], rank=tensor_rank):
        for step in range(TP_STEPS):
            x, y = _batch(0, 10 + step)  # the same input on both ranks
            net.zero_grad()
            with streams.step_scope():
                recording["on"] = True
                out = net(x)
                recording["on"] = False  # the recomputation in backward records nothing
                mse_loss(out, y).backward()
            grads = {
                n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                for n, p in net.named_parameters()
            }
            steps.append({"x": x, "y": y, "out": out.detach(), "grads": grads})
    # Unmarked, the default: the sharded activations draw the same masks on both ranks.
    unmarked: dict[str, torch.Tensor] = {}
    with streams.step_scope():
        recording["on"] = True
        net(_batch(0, 20)[0])
        recording["on"] = False
    for site in DROPOUT_SITES:
        unmarked[site] = masks[site].pop()
    return {
        "ranks": (data_rank, tensor_rank),
        "initial": initial,
        "masks": masks,
        "steps": steps,
        "unmarked": unmarked,
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {"fsdp": _fsdp_checks(rank), "tp": _tensor_parallel_checks(rank)}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp_path = tmp_path_factory.mktemp("parallel")
    torch.multiprocessing.start_processes(
        _worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def _agreement(first: list[torch.Tensor], second: list[torch.Tensor]) -> tuple[float, float]:
    """The fraction of equal elements, and 5 sigma of it for independent p = 0.5 masks."""
    a, b = torch.cat([m.flatten() for m in first]), torch.cat([m.flatten() for m in second])
    return (a == b).float().mean().item(), 5 * 0.5 / math.sqrt(a.numel())


def test_fsdp2_masks_differ_across_ranks_and_reproduce(runs: list[dict[str, Any]]) -> None:
    rank0, rank1 = (run["fsdp"] for run in runs)
    agreement, tolerance = _agreement(rank0["probe"], rank1["probe"])
    assert abs(agreement - 0.5) < tolerance
    # The unsharded replay used the same streams and matched every gradient (next test):
    # the masks are a function of (seed, rank, step). A resume continues them exactly.
    for run in (rank0, rank1):
        resumed = run["resumed"]
        assert all(torch.equal(a, b) for a, b in zip(run["probe"][RESUME_AT:], resumed["probe"], strict=True))
        assert all(torch.equal(a, b) for a, b in zip(run["loss"][RESUME_AT:], resumed["loss"], strict=True))
        for name, value in run["weights"].items():
            assert torch.equal(run["resumed_weights"][name], value), name


def test_fsdp2_dropconnect_gradients_match_an_unsharded_run_and_it_trains(runs: list[dict[str, Any]]) -> None:
    for run in runs:
        fsdp = run["fsdp"]
        assert len(fsdp["grad_errors"]) == STEPS
        assert max(fsdp["grad_errors"]) < 1e-5, fsdp["grad_errors"]
        start, end = fsdp["eval_loss"]
        assert end < 0.5 * start, (start, end)
    assert torch.equal(runs[0]["fsdp"]["weights"]["0.weight"], runs[1]["fsdp"]["weights"]["0.weight"])


def test_fsdp2_mc_predict_and_metric_sync(runs: list[dict[str, Any]]) -> None:
    for run in runs:
        sharded, reference = run["fsdp"]["mc"]
        torch.testing.assert_close(sharded, reference, rtol=1e-4, atol=1e-5)
    union = CoActivation(WIDTH)
    union.update(runs[0]["fsdp"]["acts"])
    union.update(runs[1]["fsdp"]["acts"])
    expected = union.compute()
    for run in runs:
        for key, value in run["fsdp"]["stats"].items():
            torch.testing.assert_close(value, expected[key], rtol=1e-9, atol=1e-12)


def test_tensor_parallel_replicated_masks_are_shared_and_sharded_ones_differ(
    runs: list[dict[str, Any]],
) -> None:
    rank0, rank1 = (run["tp"] for run in runs)
    assert rank0["ranks"] == (0, 0) and rank1["ranks"] == (0, 1)
    for site in ("replicated1", "replicated2"):
        assert len(rank0["masks"][site]) == TP_STEPS
        assert all(torch.equal(a, b) for a, b in zip(rank0["masks"][site], rank1["masks"][site], strict=True))
    sharded0 = rank0["masks"]["sharded1"] + rank0["masks"]["sharded2"]
    sharded1 = rank1["masks"]["sharded1"] + rank1["masks"]["sharded2"]
    agreement, tolerance = _agreement(sharded0, sharded1)
    assert abs(agreement - 0.5) < tolerance
    # Unmarked (the default), the shards would repeat one pattern.
    for site in DROPOUT_SITES:
        assert torch.equal(rank0["unmarked"][site], rank1["unmarked"][site])


def _single_process_step(
    initial: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params = {name: value.clone().requires_grad_() for name, value in initial.items()}

    def linear(name: str, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h, params[f"{name}.weight"], params[f"{name}.bias"])

    h = x
    for pair in ("1", "2"):
        h = linear(f"up{pair}", h) * masks[f"sharded{pair}"] * 2
        h = linear(f"down{pair}", h) * masks[f"replicated{pair}"] * 2
    out = linear("head", h)
    mse_loss(out, y).backward()
    return out.detach(), {name: p.grad for name, p in params.items() if p.grad is not None}


def test_tensor_parallel_matches_one_process_given_the_same_masks(runs: list[dict[str, Any]]) -> None:
    rank0, rank1 = (run["tp"] for run in runs)
    for step in range(TP_STEPS):
        # Column-parallel outputs are split along features: rank 0 holds the first half.
        masks = {
            site: torch.cat([rank0["masks"][site][step], rank1["masks"][site][step]], dim=-1)
            if site.startswith("sharded")
            else rank0["masks"][site][step]
            for site in DROPOUT_SITES
        }
        recorded = rank0["steps"][step]
        out, grads = _single_process_step(rank0["initial"], masks, recorded["x"], recorded["y"])
        for run in (rank0, rank1):
            torch.testing.assert_close(run["steps"][step]["out"], out, rtol=1e-5, atol=1e-6)
            for name, grad in grads.items():
                torch.testing.assert_close(run["steps"][step]["grads"][name], grad, rtol=1e-5, atol=1e-6)
