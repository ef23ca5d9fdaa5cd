"""Every callback over a run's whole life, beyond one clean ``trainer.fit``: copies and
pickles at every point (fresh, inside a training step, after fit, inside predict, after
predict) that drag nothing of the run and work in a new Trainer (``ddp_spawn`` included),
MC predict / validate / test then fit in one process, fit then predict then fit, resume
with changed scheduler groups, and runs that train on no batch.

Every dropout call here holds fewer than 1024 elements: the layers' CPU fast path starts
above that size.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_dropout as ld
from lightning_dropout.callbacks import (
    ChannelDropMonitor,
    CoActivationMonitor,
    ConcreteDropoutRegularizer,
    DropoutScheduler,
    DropRateMonitor,
    MCDropout,
    PerRankDropout,
)
from lightning_dropout.callbacks._run import DropoutCallback
from lightning_dropout.schedules import Constant, Linear
from tests._loggers import MemoryLogger

BATCH = 4


class Net(pl.LightningModule):
    """A classifier with every kind of site the callbacks watch: element dropout, channel
    dropout, ConcreteDropout. Records, inside every training step, the rates and modes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2))
        self.channels = ld.Dropout1d(0.25)
        self.concrete = ld.ConcreteDropout(0.1)
        self.head = nn.Linear(16, 3)
        self.seen: list[tuple[int, float, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.channels(self.body(x).unsqueeze(-1)).squeeze(-1)
        return self.head(self.concrete(h))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append((self.global_step, float(self.body[2].p), self.body[2].training))
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(batches: int = 3) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * BATCH, 6, generator=generator)
    y = torch.randint(0, 3, (batches * BATCH,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


RAMP = Linear(0.0, 0.4, steps=0.5)  # the scheduler's: its length is a fraction of the run


def ramp(total: int, steps: range) -> list[float]:
    """The scheduled p over ``steps`` of a run ``total`` steps long."""
    return [RAMP.resolve(total)(step) for step in steps]


#: One of each callback of the package, by name (fractional schedule lengths on purpose).
FACTORIES: dict[str, Callable[[], DropoutCallback]] = {
    "DropoutScheduler": lambda: DropoutScheduler({"body": RAMP}),
    "MCDropout": lambda: MCDropout(n_samples=3, stages=("predict", "test", "validate")),
    "DropRateMonitor": lambda: DropRateMonitor(every_n_steps=1),
    "CoActivationMonitor": lambda: CoActivationMonitor(every_n_steps=1),
    "ChannelDropMonitor": lambda: ChannelDropMonitor(every_n_steps=1),
    "ConcreteDropoutRegularizer": lambda: ConcreteDropoutRegularizer(100, {"concrete": "head"}),
    "PerRankDropout": lambda: PerRankDropout(seed=3),
}


def every_callback() -> list[DropoutCallback]:
    return [make() for make in FACTORIES.values()]


def trainer(tmp_path: Path, callbacks: list[Any], **kw: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "max_steps": 3,
        "logger": MemoryLogger(),
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "accelerator": "cpu",
    }
    options.update(kw)
    return pl.Trainer(callbacks=callbacks, **options)


class _RunTies(pickle.Pickler):
    """Pickles to nowhere, recording every module, trainer or tensor it meets."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO())
        self.met: list[str] = []

    def persistent_id(self, obj: Any) -> str | None:
        if isinstance(obj, (nn.Module, pl.Trainer, torch.Tensor)):
            self.met.append(type(obj).__name__)
        return None


def run_ties(callback: DropoutCallback) -> list[str]:
    pickler = _RunTies()
    pickler.dump(callback)
    return pickler.met


class CopyAt(pl.Callback):
    """Copies and pickles the package's callbacks inside the first training step and the
    first predict step."""

    def __init__(self) -> None:
        self.copies: dict[str, list[DropoutCallback]] = {}

    def _copy(self, point: str, trainer: pl.Trainer) -> None:
        if point not in self.copies:
            self.copies[point] = copies_of([c for c in trainer.callbacks if isinstance(c, DropoutCallback)])

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        self._copy("in a training step", trainer)  # the monitors' hooks are attached now

    def on_predict_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._copy("in predict", trainer)


def copies_of(callbacks: list[DropoutCallback]) -> list[DropoutCallback]:
    """A deep copy of each callback, checked to drag nothing of its run, and its pickle."""
    copies = []
    for callback in callbacks:
        assert run_ties(callback) == [], type(callback).__name__
        copies.append(copy.deepcopy(callback))
        copies.append(pickle.loads(pickle.dumps(callback)))
    return copies


def test_every_callback_copies_at_every_point_of_its_life_and_the_copies_run(tmp_path: Path) -> None:
    originals, spy = every_callback(), CopyAt()
    copies = {"fresh": copies_of(originals)}
    first = trainer(tmp_path / "first", [*originals, spy])
    first.fit(Net(), loader(), loader(1))
    copies["after fit"] = copies_of(originals)
    first.predict(Net(), loader(1))
    copies["after predict"] = copies_of(originals)
    copies.update(spy.copies)
    assert set(copies) == {"fresh", "in a training step", "after fit", "in predict", "after predict"}
    for point, made in copies.items():
        for variant in (made[0::2], made[1::2]):  # deep copies, then unpickled ones
            logger, model = MemoryLogger(), Net()
            second = trainer(tmp_path / "second", variant, logger=logger)
            second.fit(model, loader(), loader(1))
            assert [p for _, p, _ in model.seen] == pytest.approx(ramp(3, range(3))), point
            logged = set().union(*(metrics for _, metrics in logger.logged))
            assert {"dropout/body.2/realised", "coactivation/body.2/mean_abs_corr"} <= logged, point
            assert "channel_drop/channels/fraction" in logged, point
            (out,) = second.predict(model, loader(1))
            assert isinstance(out, ld.MCOutput) and out.variance.amax() > 0, point


@pytest.mark.skipif(
    bool(os.environ.get("LIGHTNING_DROPOUT_SKIP_DDP_TESTS")),
    reason="LIGHTNING_DROPOUT_SKIP_DDP_TESTS is set",
)
def test_callbacks_used_in_a_single_device_fit_run_again_under_ddp_spawn(tmp_path: Path) -> None:
    callbacks = every_callback()
    trainer(tmp_path / "single", callbacks).fit(Net(), loader(), loader(1))
    model = Net()
    before = [p.detach().clone() for p in model.parameters()]
    # ddp_spawn pickles the trainer, these used callbacks with it, to start its processes.
    ddp = trainer(tmp_path / "ddp", callbacks, strategy="ddp_spawn", devices=2, logger=False)
    ddp.fit(model, loader(4), loader(2))
    assert ddp.state.finished
    # ddp_spawn brings rank 0's trained weights back to this process.
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_mc_predict_validate_and_test_then_fit_in_one_process(tmp_path: Path) -> None:
    callbacks, model = every_callback(), Net()
    first = trainer(tmp_path, callbacks)
    (out,) = first.predict(model, loader(1))
    assert out.variance.amax() > 0
    first.validate(model, loader(1), verbose=False)
    first.test(model, loader(1), verbose=False)
    assert "test/mc/nll" in first.callback_metrics
    # Lightning restored the modes after each loop: nothing of MC dropout stays.
    assert all(module.training for module in model.modules())
    logger = MemoryLogger()
    trainer(tmp_path, callbacks, logger=logger).fit(model, loader(), loader(1))
    assert [(step, training) for step, _, training in model.seen] == [(0, True), (1, True), (2, True)]
    assert [p for _, p, _ in model.seen] == pytest.approx(ramp(3, range(3)))
    assert len(logger.steps_of("dropout/body.2/realised")) == 3


def test_fit_then_predict_then_fit_with_the_same_callbacks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    callbacks, model = every_callback(), Net()
    with caplog.at_level("INFO"):
        trainer(tmp_path, callbacks, enable_model_summary=True).fit(model, loader(), loader(1))
        (out,) = trainer(tmp_path, callbacks).predict(model, loader(1))
        logger = MemoryLogger()
        second = trainer(tmp_path, callbacks, logger=logger, max_steps=6, enable_model_summary=True)
        second.fit(model, loader(), loader(1))
    assert out.variance.amax() > 0
    # The second run resolves the fractions against its own length (6 steps: 3 to the top).
    assert [p for _, p, _ in model.seen[3:]] == pytest.approx(ramp(6, range(6)))
    assert len(logger.steps_of("coactivation/body.2/mean_abs_corr")) == 6
    tables = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Dropout sites")]
    assert len(tables) == 2  # once per run


def checkpointed(tmp_path: Path, scheduler: DropoutScheduler) -> str:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [scheduler, checkpoint], enable_checkpointing=True).fit(Net(), loader())
    return str(tmp_path / "ckpt" / "last.ckpt")


def test_resuming_with_other_groups_is_an_error_naming_both_unless_restarted(tmp_path: Path) -> None:
    def groups() -> dict[str, Linear | Constant]:
        return {"body": Linear(0.0, 0.4, steps=1.0), "channels": Constant(0.1)}

    ckpt = checkpointed(tmp_path, DropoutScheduler(groups()))  # 3 steps: the ramp is 3 long
    changed = DropoutScheduler({"body": Linear(0.0, 0.4, steps=1.0)})
    message = r"groups \['body', 'channels'\].*this one has groups \['body'\].*restart=True"
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, [changed], max_steps=6).fit(Net(), loader(), ckpt_path=ckpt)
    with pytest.raises(ValueError, match=r"interval 'step'.*interval 'epoch'"):
        other_interval = DropoutScheduler(groups(), interval="epoch")
        trainer(tmp_path, [other_interval], max_epochs=4).fit(Net(), loader(), ckpt_path=ckpt)
    # On purpose: restart=True takes nothing from the checkpoint, so the fraction resolves
    # against the resumed run (6 steps), read at the global step.
    model = Net()
    restarted = DropoutScheduler({"body": Linear(0.0, 0.4, steps=1.0)}, restart=True)
    with pytest.warns(UserWarning, match="Please add the following callbacks"):  # Lightning's own
        trainer(tmp_path, [restarted], max_steps=6).fit(model, loader(), ckpt_path=ckpt)
    assert [(step, p) for step, p, _ in model.seen] == [
        (3, pytest.approx(0.2)),
        (4, pytest.approx(0.8 / 3)),
        (5, pytest.approx(1 / 3)),
    ]
    # The same groups continue the checkpoint's schedule, its 3-step ramp included.
    model = Net()
    trainer(tmp_path, [DropoutScheduler(groups())], max_steps=6).fit(model, loader(), ckpt_path=ckpt)
    assert [p for _, p, _ in model.seen] == pytest.approx([0.4, 0.4, 0.4])


ZERO_RUNS: dict[str, dict[str, Any]] = {
    "limit_train_batches=0": {"limit_train_batches": 0, "max_epochs": 2},
    "max_steps=0": {"max_steps": 0},
    "max_epochs=0": {"max_epochs": 0, "max_steps": -1},
    "fast_dev_run": {"fast_dev_run": True},
}


@pytest.mark.parametrize("run", list(ZERO_RUNS))
@pytest.mark.parametrize("name", list(FACTORIES))
def test_runs_that_train_on_no_batch_or_one_work_with_every_callback(
    tmp_path: Path, name: str, run: str
) -> None:
    callback, model = FACTORIES[name](), Net()
    with_steps = trainer(tmp_path, [callback], **ZERO_RUNS[run])
    with_steps.fit(model, loader(), loader(1))
    assert with_steps.global_step == (1 if run == "fast_dev_run" else 0)
    assert len(model.seen) == with_steps.global_step
    if name == "DropoutScheduler":
        epochs = DropoutScheduler({"body": RAMP}, interval="epoch")
        trainer(tmp_path, [epochs], **ZERO_RUNS[run]).fit(Net(), loader())


class Endless(torch.utils.data.IterableDataset):
    def __iter__(self) -> Any:
        return iter(loader().dataset)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("interval", "options", "data", "says"),
    [
        (
            "step",
            {"max_steps": -1, "max_epochs": -1, "max_time": {"seconds": 1}},
            loader(),
            "max_steps=-1 and max_epochs=-1; set max_steps or max_epochs",
        ),
        (
            "step",
            {"max_steps": -1, "max_epochs": 2},
            DataLoader(Endless(), batch_size=BATCH),
            "train dataloader has no length; set max_steps",
        ),
        (
            "epoch",
            {"max_steps": 3},
            loader(),
            "max_epochs=-1 \\(max_steps counts steps, not epochs\\); set max_epochs",
        ),
    ],
)
def test_a_run_length_is_unknown_only_when_it_is_and_the_message_says_what_to_set(
    tmp_path: Path, interval: str, options: dict[str, Any], data: DataLoader, says: str
) -> None:
    scheduler = DropoutScheduler({"body": RAMP}, interval=interval)
    with pytest.raises(ValueError, match=re.compile(f"length in {interval}s is unknown: the .*{says}")):
        trainer(tmp_path, [scheduler], **options).fit(Net(), data)
