"""ActiveDataModule and ActiveLearningLoop: rounds, logging, checkpoint resume and DDP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_dropout.active import ActiveDataModule, ActiveLearningLoop


def blobs(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centres = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    return TensorDataset(centres[labels] + torch.randn(n, 4, generator=generator), labels)


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def data(test: bool = True) -> ActiveDataModule:
    return ActiveDataModule(
        blobs(120, 0), blobs(60, 1) if test else None, initial_labelled=9, batch_size=8, batches_per_epoch=3
    )


def trainer(tmp_path: Path, max_epochs: int, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    return pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        reload_dataloaders_every_n_epochs=1,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_rounds_label_the_pool_and_log_every_round(tmp_path: Path) -> None:
    datamodule = data()
    first = datamodule.labelled.tolist()
    loop = ActiveLearningLoop(acquire=5, pool_subsample=40, n_samples=4, network="net")
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer(tmp_path, 3, [loop], logger=logger, enable_checkpointing=False).fit(
        Classifier(), datamodule=datamodule
    )
    labelled = datamodule.labelled.tolist()
    assert labelled[:9] == first and len(labelled) == len(set(labelled)) == 19  # two rounds of 5
    assert [record["labelled"] for record in loop.history] == [9.0, 14.0, 19.0]
    assert all(0.0 <= record["test_accuracy"] <= 1.0 and record["test_nll"] > 0 for record in loop.history)
    events = EventAccumulator(
        str(tmp_path / "tb" / "version_0"), size_guidance={"scalars": 0, "histograms": 0}
    )
    events.Reload()
    assert [e.step for e in events.Scalars("active/test_accuracy")] == [9, 14, 19]
    assert {"active/labelled", "active/test_nll"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Histograms("active/scores")] == [9, 14]


def test_fresh_start_restores_the_initial_weights_each_round(tmp_path: Path) -> None:
    seen: list[Tensor] = []

    class Watch(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen.append(pl_module.net[0].weight.detach().clone())

    model = Classifier()
    start = model.net[0].weight.detach().clone()
    loop = ActiveLearningLoop(acquire=3, n_samples=2, network="net")
    trainer(tmp_path, 3, [loop, Watch()], enable_checkpointing=False).fit(model, datamodule=data(test=False))
    assert all(torch.equal(weights, start) for weights in seen)
    warm = ActiveLearningLoop(acquire=3, n_samples=2, network="net", warm_start=True)
    seen.clear()
    trainer(tmp_path, 2, [warm, Watch()], enable_checkpointing=False).fit(
        Classifier(), datamodule=data(test=False)
    )
    assert not torch.equal(seen[0], seen[1])


def test_labelled_set_survives_a_checkpoint_resume(tmp_path: Path) -> None:
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    loop = ActiveLearningLoop(acquire=4, pool_subsample=30, n_samples=3, network="net")
    uninterrupted = data()
    trainer(tmp_path, 4, [loop, checkpoints]).fit(Classifier(), datamodule=uninterrupted)
    path = tmp_path / "ckpt" / "epoch=1-step=6.ckpt"
    saved = torch.load(path, weights_only=True)
    saved_labelled = saved["ActiveDataModule"]["labelled"]
    assert len(saved_labelled) == 9 + 2 * 4 and saved_labelled == uninterrupted.labelled.tolist()[:17]

    at_start: list[list[int]] = []

    class Watch(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            at_start.append(trainer.datamodule.labelled.tolist())

    resumed_loop = ActiveLearningLoop(acquire=4, pool_subsample=30, n_samples=3, network="net")
    resumed = data()
    assert resumed.labelled.tolist() == saved_labelled[:9]
    trainer(tmp_path, 4, [resumed_loop, Watch()], enable_checkpointing=False).fit(
        Classifier(), datamodule=resumed, ckpt_path=path
    )
    assert at_start[0] == saved_labelled  # the resumed round trains on the checkpoint's labels
    assert len(resumed.labelled) == 9 + 3 * 4 and resumed.labelled.tolist()[:17] == saved_labelled
    assert [r["labelled"] for r in resumed_loop.history] == [9.0, 13.0, 17.0, 21.0]
    assert all(
        torch.equal(a, b) for a, b in zip(resumed_loop._initial.values(), loop._initial.values(), strict=True)
    )


class CountScoredRows(pl.Callback):
    """Counts the rows the network's first layer sees outside training (the pool scoring)
    and writes them, with the labelled set, per rank and epoch; placed after the loop."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def count(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if not torch.is_grad_enabled():
                self.rows += args[0].shape[0]

        pl_module.net[0].register_forward_pre_hook(count)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = {"rows": self.rows, "labelled": trainer.datamodule.labelled.tolist()}
        (self.folder / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.json").write_text(
            json.dumps(record)
        )
        self.rows = 0


def test_ddp_scores_the_pool_once_and_ranks_agree(tmp_path: Path) -> None:
    # power_bald draws at random: the ranks must still label the same examples
    loop = ActiveLearningLoop(
        acquire=5, acquisition="power_bald", pool_subsample=50, n_samples=4, network="net"
    )
    ddp = trainer(
        tmp_path,
        3,
        [loop, CountScoredRows(tmp_path)],
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        enable_checkpointing=False,
    )
    ddp.fit(Classifier(), datamodule=data(test=False))
    for epoch in (0, 1):
        ranks = [json.loads((tmp_path / f"rank{r}_epoch{epoch}.json").read_text()) for r in (0, 1)]
        assert ranks[0]["rows"] + ranks[1]["rows"] == 50  # each rank its share, not the whole pool
        assert ranks[0]["labelled"] == ranks[1]["labelled"]
        assert len(set(ranks[0]["labelled"])) == 9 + 5 * (epoch + 1)
    last = [json.loads((tmp_path / f"rank{r}_epoch2.json").read_text()) for r in (0, 1)]
    assert last[0]["rows"] == last[1]["rows"] == 0  # nothing is scored after the last round


def test_bad_configurations_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="acquisition"):
        ActiveLearningLoop(acquisition="entropy")
    with pytest.raises(TypeError, match="acquire"):
        ActiveLearningLoop(acquire=2.0)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        pl.Trainer(max_epochs=1, callbacks=[ActiveLearningLoop()], logger=False).fit(
            Classifier(), datamodule=data()
        )
    with pytest.raises(ValueError, match="distinct pool examples"):
        data().label([int(data().labelled[0])])
    with pytest.raises(ValueError, match="dataset of 5 examples"):
        data().load_state_dict({"labelled": [0], "dataset_size": 5})
