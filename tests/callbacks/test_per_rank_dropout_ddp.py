"""PerRankDropout under DDP: two CPU processes (gloo).

Starting processes that import torch and Lightning is what costs (10-30 s on a loaded
2-core machine), so two processes are started once, as torchrun or SLURM would start them
(rank variables in the environment), and each runs several fits with strategy "ddp" or
"ddp_find_unused_parameters_true" on the same process group: an uninterrupted run, the
same seed stopped half way, its resume, a run with shared masks, and a monitored run
(CoActivationMonitor and DropRateMonitor writing TensorBoard, a synced CoActivation over
uneven validation).
"ddp_spawn" and Lightning's own "ddp" launcher differ only in who starts the processes;
two more fits (each starting its own processes) check the masks under both too.
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
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dropout import Dropout, DropoutMixin
from lightning_dropout.callbacks import CoActivationMonitor, DropoutScheduler, DropRateMonitor, PerRankDropout
from lightning_dropout.metrics import CoActivation
from lightning_dropout.schedules import Linear
from tests._distributed import free_port, torchrun_environment

PROBE = 1024  # elements per probe mask
EPOCHS = 4
BATCHES_PER_EPOCH = 2  # per rank: 16 samples, batch 4, two ranks
SCHEDULE = Linear(0.1, 0.5, steps=6)
VAL_BATCHES = (3, 1)  # per rank: validation deliberately uneven


class ProbeModel(DropoutMixin, pl.LightningModule):
    """A tiny regression net that records, per step, masks drawn on identical inputs.

    The mixin adds PerRankDropout unless the trainer has one.
    """

    def __init__(self, out_dir: str, tag: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.tag = tag
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), Dropout(0.5), nn.Dropout(0.5), nn.Linear(32, 1))
        self.probe_ours = Dropout(0.5)
        self.probe_torch = nn.Dropout(0.5)
        self.records: dict[str, Any] = {"ours": [], "torch": [], "loss": [], "step": [], "p": []}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        ones = torch.ones(PROBE)
        self.records["ours"].append(self.probe_ours(ones) != 0)
        self.records["torch"].append(self.probe_torch(ones) != 0)
        self.records["loss"].append(loss.detach().clone())
        self.records["step"].append(self.global_step)
        self.records["p"].append([self.net[2].p, self.net[3].p])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(16, 8, generator=generator)
        y = x.sum(1, keepdim=True)
        return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)

    def on_fit_end(self) -> None:
        weights = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        torch.save(
            {"records": self.records, "weights": weights},
            Path(self.out_dir) / f"{self.tag}_rank{self.global_rank}.pt",
        )


class MonitoredModel(ProbeModel):
    """Also records the units the monitors watch and a synced validation CoActivation."""

    def __init__(self, out_dir: str, tag: str) -> None:
        super().__init__(out_dir, tag)
        self.val_coactivation = CoActivation(32)
        self.records.update(acts=[], val_acts=[], val_stats=[], pid=os.getpid())
        self.net[1].register_forward_hook(self._record_acts)

    def _record_acts(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        if self.training:
            self.records["acts"].append(out.detach().clone())

    def val_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(10 + self.global_rank)
        x = torch.randn(4 * VAL_BATCHES[self.global_rank], 8, generator=generator)
        return DataLoader(TensorDataset(x), batch_size=4)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        units = self.net[1](self.net[0](batch[0]))
        self.val_coactivation.update(units)
        self.records["val_acts"].append(units)

    def on_validation_epoch_end(self) -> None:
        stats = self.val_coactivation.compute()  # every rank: a collective
        self.records["val_stats"].append({k: stats[k] for k in ("mean_abs_corr", "decov", "sparsity")})
        self.val_coactivation.reset()


def _fit(
    tmp_path: Path,
    tag: str,
    max_epochs: int,
    strategy: str = "ddp",
    enabled: bool = True,
    ckpt_path: str | None = None,
    monitored: bool = False,
) -> None:
    pl.seed_everything(0, verbose=False)
    callbacks: list[Callback] = [
        DropoutScheduler({"net": SCHEDULE}),
        ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True),
    ]
    if not enabled:
        callbacks.append(PerRankDropout(enabled=False))
    if monitored:
        callbacks.append(CoActivationMonitor(modules=["net.1"], every_n_steps=1, log_images=False))
        callbacks.append(DropRateMonitor(every_n_steps=1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=max_epochs,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        logger=TensorBoardLogger(tmp_path, name="tb", version=0) if monitored else False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        use_distributed_sampler=not monitored,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = (MonitoredModel if monitored else ProbeModel)(str(tmp_path), tag)
    trainer.fit(model, ckpt_path=ckpt_path)


def _same(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def _load(tmp_path: Path, tag: str) -> list[dict[str, Any]]:
    return [torch.load(tmp_path / f"{tag}_rank{rank}.pt", weights_only=True) for rank in range(2)]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torchrun_environment(rank, 2, port)
    torch.set_num_threads(1)
    out = Path(out_dir)
    _fit(out / "full", "full", EPOCHS)
    _fit(out / "half", "half", EPOCHS // 2)
    _fit(out / "half", "resumed", EPOCHS, ckpt_path=str(out / "half" / "ckpt" / "last.ckpt"))
    _fit(out / "shared", "shared", 1, strategy="ddp_find_unused_parameters_true", enabled=False)
    _fit(out / "monitored", "monitored", 1, monitored=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    tmp_path = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.start_processes(
        _worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    tags = {"full": "full", "half": "half", "resumed": "half", "shared": "shared", "monitored": "monitored"}
    loaded = {tag: _load(tmp_path / folder, tag) for tag, folder in tags.items()}
    loaded["tensorboard"] = [{"dir": tmp_path / "monitored" / "tb" / "version_0"}]
    return loaded


def test_ranks_draw_independent_masks_on_identical_inputs(runs: dict[str, list[dict[str, Any]]]) -> None:
    rank0, rank1 = (run["records"] for run in runs["full"])
    assert len(rank0["ours"]) == EPOCHS * BATCHES_PER_EPOCH
    for layer in ("ours", "torch"):
        masks0, masks1 = torch.stack(rank0[layer]), torch.stack(rank1[layer])
        # Independent p = 0.5 masks agree on each element with probability 1/2: the
        # agreement fraction over n elements has standard deviation 0.5 / sqrt(n).
        n = masks0.numel()
        agreement = (masks0 == masks1).float().mean().item()
        assert abs(agreement - 0.5) < 5 * 0.5 / math.sqrt(n), (layer, agreement)
        assert abs(masks0.float().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(n)


def test_shared_masks_when_disabled(runs: dict[str, list[dict[str, Any]]]) -> None:
    rank0, rank1 = (run["records"] for run in runs["shared"])
    for layer in ("ours", "torch"):
        assert _same(rank0[layer], rank1[layer])


def test_same_seed_reproduces_masks(runs: dict[str, list[dict[str, Any]]]) -> None:
    for full, half in zip(runs["full"], runs["half"], strict=True):
        done = len(half["records"]["ours"])
        assert done == EPOCHS // 2 * BATCHES_PER_EPOCH
        for key in ("ours", "torch", "loss"):
            assert _same(full["records"][key][:done], half["records"][key])


def test_resume_reproduces_the_trajectory(runs: dict[str, list[dict[str, Any]]]) -> None:
    for full, resumed in zip(runs["full"], runs["resumed"], strict=True):
        done = EPOCHS // 2 * BATCHES_PER_EPOCH
        assert resumed["records"]["step"] == full["records"]["step"][done:]
        for key in ("ours", "torch", "loss"):
            assert _same(full["records"][key][done:], resumed["records"][key])
        for name, value in full["weights"].items():
            torch.testing.assert_close(resumed["weights"][name], value, rtol=0, atol=0)


def test_scheduled_p_is_equal_on_both_ranks_and_resumes(runs: dict[str, list[dict[str, Any]]]) -> None:
    rank0, rank1 = (run["records"] for run in runs["full"])
    assert rank0["p"] == rank1["p"]
    assert rank0["p"] == [[SCHEDULE(step)] * 2 for step in rank0["step"]]
    assert len(set(map(tuple, rank0["p"]))) > 3  # the schedule moved
    done = EPOCHS // 2 * BATCHES_PER_EPOCH
    for full, resumed in zip(runs["full"], runs["resumed"], strict=True):
        assert resumed["records"]["p"] == full["records"]["p"][done:]


def _coactivation(*batches: torch.Tensor) -> dict[str, torch.Tensor]:
    metric = CoActivation(batches[0].shape[1])
    for batch in batches:
        metric.update(batch)
    return metric.compute()


def test_coactivation_under_ddp_equals_one_process_on_union(runs: dict[str, list[dict[str, Any]]]) -> None:
    rank0, rank1 = (run["records"] for run in runs["monitored"])
    # Validation: rank 0 had 3 batches, rank 1 one; compute() synced without deadlock.
    assert [len(rank0["val_acts"]), len(rank1["val_acts"])] == list(VAL_BATCHES)
    union = _coactivation(*rank0["val_acts"], *rank1["val_acts"])
    for stats in (rank0["val_stats"][0], rank1["val_stats"][0]):
        for key, value in stats.items():
            torch.testing.assert_close(value, union[key], rtol=1e-9, atol=1e-12)
    # The monitor: every training step, the logged statistics are those of both ranks' units.
    events = EventAccumulator(str(runs["tensorboard"][0]["dir"]), size_guidance={"scalars": 0})
    events.Reload()
    steps = len(rank0["acts"])
    assert steps == 4 and len(rank1["acts"]) == steps
    for key in ("mean_abs_corr", "decov", "sparsity"):
        logged = events.Scalars(f"coactivation/net.1/{key}")
        assert [event.step for event in logged] == list(range(steps))
        for event, acts0, acts1 in zip(logged, rank0["acts"], rank1["acts"], strict=True):
            expected = _coactivation(acts0, acts1)[key].item()
            assert event.value == pytest.approx(expected, rel=1e-5, abs=1e-7), key


def test_realised_drop_rate_is_reduced_over_both_ranks(runs: dict[str, list[dict[str, Any]]]) -> None:
    rank0, rank1 = (run["records"] for run in runs["monitored"])
    events = EventAccumulator(str(runs["tensorboard"][0]["dir"]), size_guidance={"scalars": 0})
    events.Reload()
    for layer in ("ours", "torch"):
        logged = events.Scalars(f"dropout/probe_{layer}/realised")
        assert len(logged) == len(rank0[layer]) == 4
        for event, kept0, kept1 in zip(logged, rank0[layer], rank1[layer], strict=True):
            dropped = (~kept0).sum().item() + (~kept1).sum().item()
            assert event.value == pytest.approx(dropped / (2 * PROBE), abs=1e-6)


def test_only_rank_zero_writes_tensorboard(runs: dict[str, list[dict[str, Any]]]) -> None:
    event_files = list(runs["tensorboard"][0]["dir"].glob("events.out.tfevents.*"))
    assert event_files
    rank0_pid = runs["monitored"][0]["records"]["pid"]
    # TensorBoard names event files events.out.tfevents.<time>.<host>.<pid>.<n>.
    assert {path.name.split(".")[-2] for path in event_files} == {str(rank0_pid)}


@pytest.mark.skipif(
    bool(os.environ.get("LIGHTNING_DROPOUT_SKIP_DDP_TESTS")),
    reason="LIGHTNING_DROPOUT_SKIP_DDP_TESTS is set",
)
def test_ddp_spawn_ranks_draw_independent_masks(tmp_path: Path) -> None:
    _fit(tmp_path, "spawn", 1, strategy="ddp_spawn")
    rank0, rank1 = (run["records"] for run in _load(tmp_path, "spawn"))
    for layer in ("ours", "torch"):
        masks0, masks1 = torch.stack(rank0[layer]), torch.stack(rank1[layer])
        agreement = (masks0 == masks1).float().mean().item()
        assert abs(agreement - 0.5) < 5 * 0.5 / math.sqrt(masks0.numel()), (layer, agreement)


@pytest.mark.skipif(
    bool(os.environ.get("LIGHTNING_DROPOUT_SKIP_DDP_TESTS")),
    reason="LIGHTNING_DROPOUT_SKIP_DDP_TESTS is set",
)
def test_ddp_launched_by_lightning_draws_independent_masks(tmp_path: Path) -> None:
    # Lightning's subprocess launcher re-runs the command line for rank 1, so the fit runs
    # from this module's __main__ below rather than inside pytest.
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "tests.callbacks.test_per_rank_dropout_ddp", str(tmp_path)]
    subprocess.run(command, cwd=root, check=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    rank0, rank1 = (run["records"] for run in _load(tmp_path, "launched"))
    masks0, masks1 = torch.stack(rank0["ours"]), torch.stack(rank1["ours"])
    agreement = (masks0 == masks1).float().mean().item()
    assert abs(agreement - 0.5) < 5 * 0.5 / math.sqrt(masks0.numel())
    assert rank0["p"] == rank1["p"]


if __name__ == "__main__":
    _fit(Path(sys.argv[1]), "launched", 1, strategy="ddp")
    # Rank 0 must not exit (ending the test's subprocess) before rank 1 has saved its file.
    torch.distributed.barrier()
