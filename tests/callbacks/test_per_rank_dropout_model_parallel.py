"""PerRankDropout under Lightning's ModelParallelStrategy: a 2 x 2 mesh on four CPU processes.

Lightning's ModelParallelStrategy (FSDP2 over the "data_parallel" mesh dimension, tensor
parallelism over "tensor_parallel") runs on CPU with gloo. Four processes are started
once, as torchrun would start them, and each runs the fits: two epochs with the sites of
sharded activations named in ``sharded_modules``, the same run stopped after one epoch of
two and resumed from its checkpoint, and one epoch with the mixin's default callback. Both rules
hold at once: masks are shared within a tensor-parallel pair for replicated activations,
differ across the pair for sharded ones, and differ across data-parallel ranks for both.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.data import DataLoader, TensorDataset

from lightning_dropout import Dropout, DropoutMixin
from lightning_dropout.callbacks import PerRankDropout
from tests._distributed import free_port, torchrun_environment

PROBE = 1024
EPOCHS = 2
STEPS = 2 * EPOCHS  # per data-parallel rank: 16 samples, batch 8
SITES = ("sharded", "replicated", "sharded_probe", "replicated_probe")


class ModelParallelNet(DropoutMixin, pl.LightningModule):
    """A column- then row-parallel pair with a dropout site on each activation, plus probes."""

    def __init__(self, out_dir: str, tag: str) -> None:
        super().__init__()
        self.out_dir, self.tag = out_dir, tag
        self.up, self.down, self.head = nn.Linear(8, 32), nn.Linear(32, 8), nn.Linear(8, 1)
        self.sharded, self.replicated = Dropout(0.5), nn.Dropout(0.5)
        self.sharded_probe, self.replicated_probe = Dropout(0.5), nn.Dropout(0.5)
        self.records: dict[str, Any] = {site: [] for site in SITES} | {"loss": []}

    def configure_model(self) -> None:
        plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}
        parallelize_module(self, self.device_mesh["tensor_parallel"], plan)
        for layer in (self.up, self.down, self.head):
            fully_shard(layer, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        # Linear outputs are never exactly zero: a zero after dropout is a dropped unit.
        hidden = self.sharded(self.up(x))
        self.records["sharded"].append(hidden.detach() != 0)
        out = self.replicated(self.down(hidden))
        self.records["replicated"].append(out.detach() != 0)
        for probe in ("sharded_probe", "replicated_probe"):
            self.records[probe].append(getattr(self, probe)(torch.ones(PROBE)) != 0)
        loss = nn.functional.mse_loss(self.head(out), y)
        self.records["loss"].append(loss.detach())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(32, 8, generator=generator)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)

    def on_fit_end(self) -> None:
        records = {"records": self.records, "ranks": self.device_mesh.get_coordinate()}
        torch.save(records, Path(self.out_dir) / f"{self.tag}_rank{self.global_rank}.pt")


def _fit(
    out: Path, tag: str, max_epochs: int, callbacks: list[Callback], ckpt_path: str | None = None
) -> None:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=4,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2),
        max_epochs=max_epochs,
        callbacks=[*callbacks, ModelCheckpoint(dirpath=out / "ckpt", save_last=True)],
        default_root_dir=out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ModelParallelNet(str(out), tag), ckpt_path=ckpt_path)


def _worker(rank: int, port: int, out_dir: str) -> None:
    torchrun_environment(rank, 4, port)
    torch.set_num_threads(1)
    out = Path(out_dir)
    marked = ["sharded*"]
    _fit(out / "full", "full", EPOCHS, [PerRankDropout(sharded_modules=marked)])
    _fit(out / "half", "half", EPOCHS // 2, [PerRankDropout(sharded_modules=marked)])
    last = str(out / "half" / "ckpt" / "last.ckpt")
    _fit(out / "half", "resumed", EPOCHS, [PerRankDropout(sharded_modules=marked)], ckpt_path=last)
    _fit(out / "default", "default", 1, [])  # the mixin adds PerRankDropout()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[tuple[int, int], dict[str, Any]]]:
    tmp_path = tmp_path_factory.mktemp("model_parallel")
    torch.multiprocessing.start_processes(
        _worker, args=(free_port(), str(tmp_path)), nprocs=4, start_method="spawn"
    )
    folders = {"full": "full", "half": "half", "resumed": "half", "default": "default"}
    loaded = {}
    for tag, folder in folders.items():
        by_coordinate = {}
        for rank in range(4):
            saved = torch.load(tmp_path / folder / f"{tag}_rank{rank}.pt", weights_only=True)
            by_coordinate[tuple(saved["ranks"])] = saved["records"]
        loaded[tag] = by_coordinate
    return loaded


def _equal(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def _independent(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    # Independent p = 0.5 masks agree on each element with probability 1/2 (5 sigma).
    a, b = torch.cat([m.flatten() for m in first]), torch.cat([m.flatten() for m in second])
    return abs((a == b).float().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(a.numel())


def test_both_rules_hold_on_a_2x2_mesh(runs: dict[str, dict[tuple[int, int], dict[str, Any]]]) -> None:
    full = runs["full"]
    assert sorted(full) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # (data-parallel, tensor-parallel)
    for dp in (0, 1):
        pair = full[(dp, 0)], full[(dp, 1)]
        assert len(pair[0]["replicated"]) == STEPS
        for site in ("replicated", "replicated_probe"):
            assert _equal(pair[0][site], pair[1][site]), (dp, site)
        for site in ("sharded", "sharded_probe"):
            assert _independent(pair[0][site], pair[1][site]), (dp, site)
        assert _equal(pair[0]["loss"], pair[1]["loss"])  # one replicated model per pair
    for tp in (0, 1):
        for site in ("replicated_probe", "sharded_probe"):
            assert _independent(full[(0, tp)][site], full[(1, tp)][site]), (tp, site)


def test_resume_reproduces_the_masks(runs: dict[str, dict[tuple[int, int], dict[str, Any]]]) -> None:
    for coordinate, full in runs["full"].items():
        half, resumed = runs["half"][coordinate], runs["resumed"][coordinate]
        for key in (*SITES, "loss"):
            assert _equal(full[key][: STEPS // 2], half[key]), (coordinate, key)
            assert _equal(full[key][STEPS // 2 :], resumed[key]), (coordinate, key)


def test_mixin_default_shares_masks_across_the_tensor_parallel_group(
    runs: dict[str, dict[tuple[int, int], dict[str, Any]]],
) -> None:
    default = runs["default"]
    for dp in (0, 1):
        for site in SITES:
            assert _equal(default[(dp, 0)][site], default[(dp, 1)][site]), (dp, site)
    assert _independent(default[(0, 0)]["sharded_probe"], default[(1, 0)]["sharded_probe"])
