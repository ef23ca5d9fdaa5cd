"""PerRankDropout under Lightning's GPU-only strategy: FSDPStrategy, and ModelParallelStrategy on CUDA.

Lightning refuses ``FSDPStrategy`` without a GPU accelerator, so these tests need two CUDA
devices and are skipped otherwise (the CPU tests cover FSDP2 through ``fully_shard`` and
ModelParallelStrategy with gloo). Lightning's launcher re-runs the command line for rank
1, so each fit runs from this module's ``__main__``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.data import DataLoader, TensorDataset

from lightning_dropout import DropConnectLinear, Dropout, DropoutMixin
from lightning_dropout.callbacks import PerRankDropout

PROBE = 4096
STEPS = 4

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


class GpuProbeModel(DropoutMixin, pl.LightningModule):
    """Records, each step, the masks of a probe drawn in training_step (a replicated site)
    and of a sharded site (the tensor-parallel run marks it)."""

    def __init__(self, out_dir: str, tag: str, tensor_parallel: bool) -> None:
        super().__init__()
        self.out_dir, self.tag, self.tensor_parallel = out_dir, tag, tensor_parallel
        self.up = nn.Linear(8, 64) if tensor_parallel else DropConnectLinear(8, 64, p=0.3)
        self.sharded, self.down = Dropout(0.5), nn.Linear(64, 1)
        self.records: dict[str, list[Any]] = {"probe": [], "sharded": [], "loss": []}

    def configure_model(self) -> None:
        if self.tensor_parallel:
            plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}
            parallelize_module(self, self.device_mesh["tensor_parallel"], plan)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        hidden = self.sharded(self.up(x))
        self.records["sharded"].append((hidden.detach() != 0).cpu())
        self.records["probe"].append(
            (nn.functional.dropout(torch.ones(PROBE, device=x.device), 0.5) != 0).cpu()
        )
        loss = nn.functional.mse_loss(self.down(hidden), y)
        self.records["loss"].append(loss.detach().cpu())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)

    def on_fit_end(self) -> None:
        torch.save(self.records, Path(self.out_dir) / f"{self.tag}_rank{self.global_rank}.pt")


def _fit(out: Path, tag: str) -> None:
    pl.seed_everything(0, verbose=False)
    tensor_parallel = tag.startswith("model_parallel")
    strategy: Any = (
        ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
        if tensor_parallel
        else FSDPStrategy()
    )
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=2,
        strategy=strategy,
        max_steps=STEPS,
        callbacks=[PerRankDropout(sharded_modules=["sharded"])] if tensor_parallel else [],
        default_root_dir=out,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(GpuProbeModel(str(out), tag, tensor_parallel))
    torch.distributed.barrier()  # rank 0 must not exit before rank 1 has saved its file


def _launch(tmp_path: Path, tag: str) -> list[dict[str, Any]]:
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "tests.callbacks.test_per_rank_dropout_gpu", str(tmp_path), tag]
    subprocess.run(command, cwd=root, check=True, timeout=600, env={**os.environ, "PYTHONPATH": str(root)})
    return [torch.load(tmp_path / f"{tag}_rank{rank}.pt", weights_only=True) for rank in range(2)]


def _agreement(first: list[torch.Tensor], second: list[torch.Tensor]) -> tuple[float, float]:
    a, b = torch.cat([m.flatten() for m in first]), torch.cat([m.flatten() for m in second])
    return (a == b).float().mean().item(), 5 * 0.5 / math.sqrt(a.numel())


def test_fsdp_strategy_masks_differ_across_ranks_and_reproduce(tmp_path: Path) -> None:
    first = _launch(tmp_path, "fsdp")
    again = _launch(tmp_path, "fsdp_again")
    agreement, tolerance = _agreement(first[0]["probe"], first[1]["probe"])
    assert abs(agreement - 0.5) < tolerance
    for run, repeat in zip(first, again, strict=True):
        assert len(run["probe"]) == STEPS
        assert all(torch.equal(a, b) for a, b in zip(run["probe"], repeat["probe"], strict=True))
        assert all(torch.isfinite(loss) for loss in run["loss"])


def test_model_parallel_strategy_on_cuda_shares_replicated_masks(tmp_path: Path) -> None:
    rank0, rank1 = _launch(tmp_path, "model_parallel")
    assert all(torch.equal(a, b) for a, b in zip(rank0["probe"], rank1["probe"], strict=True))
    agreement, tolerance = _agreement(rank0["sharded"], rank1["sharded"])
    assert abs(agreement - 0.5) < tolerance


if __name__ == "__main__":
    _fit(Path(sys.argv[1]), sys.argv[2])
