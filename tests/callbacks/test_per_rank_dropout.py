"""PerRankDropout in one process: arguments, strategies, what it leaves untouched."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dropout import Dropout, DropoutMixin
from lightning_dropout.callbacks import PerRankDropout
from lightning_dropout.callbacks.per_rank_dropout import check_supported_strategy


class OrderModel(pl.LightningModule):
    """Records the sample indices of every batch and the initial weights."""

    def __init__(self, p: float, stop_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), Dropout(p), nn.Dropout(p), nn.Linear(16, 1))
        self.initial = [w.detach().clone() for w in self.parameters()]
        self.stop_at = stop_at
        self.order: list[list[int]] = []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        return -1 if batch_idx == self.stop_at else None

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        index, x = batch
        self.order.append(index.tolist())
        return self.net(x).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(12), torch.ones(12, 4)), batch_size=3, shuffle=True)


def _fit(tmp_path: Path, model: OrderModel, callbacks: list[Any], epochs: int = 3) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    return trainer


def test_arguments_are_validated() -> None:
    with pytest.raises(TypeError, match="enabled"):
        PerRankDropout(enabled="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed"):
        PerRankDropout(seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sharded_modules"):
        PerRankDropout(sharded_modules=[1])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="sharded_modules"):
        PerRankDropout(sharded_modules=[""])
    assert PerRankDropout(sharded_modules="blocks.*").sharded_modules == ["blocks.*"]


def _fake_trainer(strategy_class: type) -> Any:
    return SimpleNamespace(strategy=strategy_class.__new__(strategy_class))


def test_deepspeed_is_refused_at_setup_saying_why_and_what_to_use() -> None:
    with pytest.raises(RuntimeError) as error:
        PerRankDropout().setup(_fake_trainer(DeepSpeedStrategy), None, "fit")  # type: ignore[arg-type]
    message = str(error.value)
    for expected in (
        "DeepSpeedStrategy",
        "RNG tracker",
        "strategy='fsdp'",
        "ModelParallelStrategy",
        "enabled=False",
    ):
        assert expected in message
    PerRankDropout(enabled=False).setup(_fake_trainer(DeepSpeedStrategy), None, "fit")  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy_class", [FSDPStrategy, ModelParallelStrategy])
def test_sharded_strategies_are_accepted(strategy_class: type) -> None:
    check_supported_strategy(_fake_trainer(strategy_class), "PerRankDropout")


def test_initialisation_and_data_order_do_not_depend_on_dropout(tmp_path: Path) -> None:
    # Under the callback the steps draw nothing from torch's global stream, so shuffling
    # sees the same numbers whatever the model's dropout draws.
    runs = {}
    for p in (0.0, 0.5):
        torch.manual_seed(0)
        model = OrderModel(p)
        _fit(tmp_path / str(p), model, [PerRankDropout()])
        runs[p] = (model.initial, model.order, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(runs[0.0][0], runs[0.5][0], strict=True))
    assert runs[0.0][1] == runs[0.5][1]
    assert torch.equal(runs[0.0][2], runs[0.5][2])
    # Without it the second epoch's order already depends on the dropout draws.
    torch.manual_seed(0)
    model = OrderModel(0.5)
    _fit(tmp_path / "off", model, [])
    assert model.order[:4] == runs[0.0][1][:4] and model.order != runs[0.0][1]


def test_checkpoint_state_is_plain_and_scope_closes_on_early_epoch_end(tmp_path: Path) -> None:
    torch.manual_seed(5)
    callback = PerRankDropout()
    # Returning -1 from on_train_batch_start ends each epoch at batch 2 without
    # on_train_batch_end: the epoch-end hook must close the scope that batch opened.
    before = torch.get_rng_state()
    _fit(
        tmp_path, OrderModel(0.5, stop_at=2), [callback, ModelCheckpoint(dirpath=tmp_path, save_last=True)], 2
    )
    assert callback.streams is not None and not callback.streams.active
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert checkpoint["callbacks"]["PerRankDropout"] == {"seed": 5, "step": 2 * 3}
    assert not torch.equal(torch.get_rng_state(), before)  # shuffling drew from it, as usual


def test_mid_epoch_checkpoints_hold_the_steps_done(tmp_path: Path) -> None:
    # ModelCheckpoint saves in on_train_batch_end: the batch that just ran is counted, so a
    # resume from it starts at the next step's masks.
    every_step = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    _fit(tmp_path, OrderModel(0.5), [PerRankDropout(), every_step], epochs=1)
    for step in range(1, 5):
        state = torch.load(tmp_path / f"step={step}.ckpt", weights_only=True)["callbacks"]["PerRankDropout"]
        assert state["step"] == step


class FailingModel(OrderModel):
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if batch_idx == 1:
            raise KeyError("boom")
        return super().training_step(batch, batch_idx)


def test_an_exception_in_a_step_restores_the_global_stream(tmp_path: Path) -> None:
    callback = PerRankDropout()
    with pytest.raises(KeyError, match="boom"):
        _fit(tmp_path, FailingModel(0.5), [callback], epochs=1)
    assert callback.streams is not None and not callback.streams.active


def test_disabled_leaves_torch_generators_alone(tmp_path: Path) -> None:
    callback = PerRankDropout(enabled=False)
    _fit(tmp_path, OrderModel(0.5), [callback], 1)
    assert callback.streams is None and callback.state_dict() == {}


class MixinModel(DropoutMixin, OrderModel):
    pass


class ExtendingModel(MixinModel):
    def configure_callbacks(self) -> list[Callback]:
        return [*super().configure_callbacks(), ModelCheckpoint()]


def test_mixin_adds_per_rank_dropout_unless_the_trainer_has_one(tmp_path: Path) -> None:
    trainer = _fit(tmp_path / "default", MixinModel(0.5), [], epochs=1)
    added = [c for c in trainer.callbacks if isinstance(c, PerRankDropout)]
    assert len(added) == 1 and added[0].enabled and added[0].streams is not None
    assert added[0].streams.step == 4
    shared = PerRankDropout(enabled=False)
    trainer = _fit(tmp_path / "shared", MixinModel(0.5), [shared], epochs=1)
    assert [c for c in trainer.callbacks if isinstance(c, PerRankDropout)] == [shared]
    trainer = _fit(tmp_path / "extended", ExtendingModel(0.5), [], epochs=1)
    assert sum(isinstance(c, PerRankDropout) for c in trainer.callbacks) == 1


def test_mixin_default_refuses_deepspeed_naming_the_option(tmp_path: Path) -> None:
    model = MixinModel(0.5)
    model.trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    (added,) = model.configure_callbacks()
    with pytest.raises(RuntimeError, match=r"DeepSpeedStrategy.*PerRankDropout\(enabled=False\)"):
        added.setup(_fake_trainer(DeepSpeedStrategy), model, "fit")


class ShardedSiteModel(OrderModel):
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.hooked = bool(self.net[1]._forward_pre_hooks)
        return super().training_step(batch, batch_idx)


def test_sharded_sites_are_hooked_during_fit_only(tmp_path: Path) -> None:
    model = ShardedSiteModel(0.5)
    callback = PerRankDropout(sharded_modules=["net.1"])
    _fit(tmp_path, model, [callback], epochs=1)
    assert model.hooked and not model.net[1]._forward_pre_hooks and callback.sharded is None
    with pytest.raises(ValueError, match="'net.9' matches no module"):
        _fit(tmp_path / "typo", ShardedSiteModel(0.5), [PerRankDropout(sharded_modules=["net.9"])], epochs=1)
