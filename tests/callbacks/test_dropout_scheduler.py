"""DropoutScheduler: the p seen inside training_step, groups, logging, resume, validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.data import DataLoader, TensorDataset

import lightning_dropout as ld
from lightning_dropout.callbacks import DropoutScheduler
from lightning_dropout.schedules import Chain, Constant, Cosine, Curriculum, Linear, Schedule, Step
from tests._loggers import MemoryLogger
from tests._models import StochasticDepth

BATCHES_PER_EPOCH = 4


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    if not training or drop_prob == 0.0:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - drop_prob)
    return x * keep / (1 - drop_prob)


class DropPath(nn.Module):
    """Drop-path as the many copies of timm's write it: a float ``drop_prob``, dropped
    through a function."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


class RandomMask(nn.Module):
    """Drops with a float ``p`` in a form no rule recognises: needs ``extra_modules`` to be scheduled."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (torch.rand_like(x) >= self.p) if self.training else x


class Net(pl.LightningModule):
    """Records, inside every training_step, the global step, epoch and every rate."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), ld.Dropout(0.5), nn.Dropout(0.5), ld.Dropout1d(0.5))
        self.head = nn.Sequential(DropPath(0.0), nn.Linear(8, 1))
        self.depth = StochasticDepth(0.0, "row")
        self.mask = RandomMask(0.0)
        self.loss_fn = nn.TripletMarginLoss(p=2.0)  # a float p that is not a drop rate
        self.seen: list[tuple[int, int, dict[str, float]]] = []

    def rates(self) -> dict[str, float]:
        names = ["encoder.1", "encoder.2", "encoder.3", "head.0", "depth", "mask"]
        modules = dict(self.named_modules())
        return {
            name: getattr(modules[name], "drop_prob", getattr(modules[name], "p", None)) for name in names
        }

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append((self.global_step, self.current_epoch, self.rates()))
        (x,) = batch
        linear, dropout, torch_dropout, channel_dropout = self.encoder
        h = channel_dropout(torch_dropout(dropout(linear(x))).unsqueeze(1)).squeeze(1)
        loss = self.head(h).pow(2).mean()
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.seen.append((-1, -1, self.rates()))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append((-2, -2, self.rates()))
        return batch[0]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(2 * BATCHES_PER_EPOCH, 4)), batch_size=2)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(2, 4)), batch_size=2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def make_trainer(tmp_path: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "accelerator": "cpu",
        "max_steps": 10,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


DEFAULT_SITES = ("encoder.1", "encoder.2", "encoder.3", "head.0", "depth")


def test_p_inside_training_step_is_the_schedule_at_the_global_step(tmp_path: Path) -> None:
    schedule = Chain([Linear(0.0, 0.4, steps=0.5), Cosine(0.4, 0.1, steps=3)], milestones=[0.5])
    model = Net()
    make_trainer(tmp_path, [DropoutScheduler(schedule)], max_steps=10).fit(model)
    resolved = schedule.resolve(10)  # estimated_stepping_batches = max_steps
    assert [step for step, _, _ in model.seen] == list(range(10))
    for step, _, rates in model.seen:
        for name in DEFAULT_SITES:
            assert rates[name] == resolved(step), (name, step)
        assert rates["mask"] == 0.0  # a float p alone is driven only when extra_modules name it
    assert model.loss_fn.p == 2.0
    assert {rates["encoder.1"] for _, _, rates in model.seen} >= {0.0, 0.4, 0.1}


class LateBuiltNet(Net):
    def configure_model(self) -> None:
        self.late = ld.Dropout(0.5)

    def rates(self) -> dict[str, float]:
        return {**super().rates(), "late": self.late.p}


def test_layers_built_in_configure_model_are_driven(tmp_path: Path) -> None:
    model = LateBuiltNet()
    make_trainer(tmp_path, [DropoutScheduler(Linear(0.1, 0.3, steps=2))], max_steps=3).fit(model)
    assert [rates["late"] for _, _, rates in model.seen] == pytest.approx([0.1, 0.2, 0.3])


def test_gradient_accumulation_indexes_by_optimizer_step(tmp_path: Path) -> None:
    model = Net()
    schedule = Step([0.1, 0.2, 0.3], milestones=[1, 2])
    make_trainer(tmp_path, [DropoutScheduler(schedule)], max_steps=3, accumulate_grad_batches=2).fit(model)
    assert [(step, rates["encoder.1"]) for step, _, rates in model.seen] == [
        (0, 0.1),
        (0, 0.1),
        (1, 0.2),
        (1, 0.2),
        (2, 0.3),
        (2, 0.3),
    ]


def test_groups_extra_modules_and_logging(tmp_path: Path) -> None:
    logger, second_logger = MemoryLogger(), MemoryLogger()
    scheduler = DropoutScheduler(
        {
            "encoder": Linear(0.1, 0.3, steps=4),
            "head": Constant(0.05),
            "dep*": Curriculum(0.2, gamma=0.5),
            "mask": Constant(0.01),
        },
        extra_modules=["encoder.*", DropPath, "RandomMask"],
    )
    model = Net()
    trainer = make_trainer(
        tmp_path, [scheduler], max_steps=9, logger=[logger, second_logger], log_every_n_steps=2
    )
    trainer.fit(model)
    encoder, head, depth = Linear(0.1, 0.3, steps=4), Constant(0.05), Curriculum(0.2, gamma=0.5)
    for step, _, rates in model.seen:
        assert rates["encoder.1"] == rates["encoder.2"] == rates["encoder.3"] == encoder(step)
        assert rates["head.0"] == head(step)
        assert rates["depth"] == depth(step)
        assert rates["mask"] == 0.01  # added by extra_modules
    # Logged whenever the trainer logs its own metrics, at the same steps, to every logger.
    loss_steps = set(logger.steps_of("loss"))
    assert loss_steps == {1, 3, 5, 7}
    for tag, schedule in [
        ("dropout/encoder/p", encoder),
        ("dropout/head/p", head),
        ("dropout/dep*/p", depth),
    ]:
        for memory in (logger, second_logger):
            logged = memory.steps_of(tag)
            assert set(logged) == loss_steps
            # The step a value is logged at is the global step it was scheduled for.
            assert logged == {step: schedule(step) for step in loss_steps}


def test_single_schedule_logs_under_all(tmp_path: Path) -> None:
    logger = MemoryLogger()
    make_trainer(
        tmp_path, [DropoutScheduler(Constant(0.2))], max_steps=2, logger=logger, log_every_n_steps=1
    ).fit(Net())
    assert logger.steps_of("dropout/all/p") == {0: 0.2, 1: 0.2}


def test_epoch_interval_and_fractions_of_max_epochs(tmp_path: Path) -> None:
    schedule = Step([0.3, 0.2, 0.0], milestones=[0.25, 0.5])  # max_epochs=4: epochs 1 and 2
    model = Net()
    make_trainer(tmp_path, [DropoutScheduler(schedule, interval="epoch")], max_steps=-1, max_epochs=4).fit(
        model
    )
    by_epoch = {epoch: rates["encoder.1"] for _, epoch, rates in model.seen}
    assert by_epoch == {0: 0.3, 1: 0.2, 2: 0.0, 3: 0.0}
    assert len(model.seen) == 4 * BATCHES_PER_EPOCH


def test_nothing_changes_outside_training(tmp_path: Path) -> None:
    model = Net()
    scheduler = DropoutScheduler(Constant(0.1))
    trainer = make_trainer(tmp_path, [scheduler], max_steps=2, limit_val_batches=1, val_check_interval=1)
    trainer.validate(model, verbose=False)
    trainer.predict(model, dataloaders=model.val_dataloader(), return_predictions=False)
    assert [step for step, _, _ in model.seen] == [-1, -2]
    assert all(rates["encoder.1"] == 0.5 for _, _, rates in model.seen)
    model.seen.clear()
    trainer.fit(model)
    # Validation inside fit sees the last training value, never a value set for it.
    assert [step for step, _, _ in model.seen].count(-1) == 2
    assert all(rates["encoder.1"] == 0.1 for _, _, rates in model.seen)


class Killed(Exception):
    """The process dying (KeyboardInterrupt would make Lightning call sys.exit)."""


class Kill(pl.Callback):
    """Checkpoint after optimizer step ``at`` (mid-epoch), then die."""

    def __init__(self, at: int, path: Path) -> None:
        self.at, self.path = at, path

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            trainer.save_checkpoint(self.path)
            raise Killed


@pytest.mark.filterwarnings("ignore:.*dataloader is not resumable")
@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_resume_from_a_mid_epoch_checkpoint_replays_the_trajectory(tmp_path: Path, interval: str) -> None:
    def scheduler() -> DropoutScheduler:
        schedules: dict[str, Schedule] = {
            "encoder": Chain([Constant(0.0), Cosine(0.3, 0.05, steps=0.5)], milestones=[0.25]),
            "head": Linear(0.2, 0.0, steps=0.75),
        }
        return DropoutScheduler(schedules, interval=interval)

    total = {"max_steps": 14} if interval == "step" else {"max_steps": -1, "max_epochs": 4}
    whole = Net()
    make_trainer(tmp_path / "whole", [scheduler()], **total).fit(whole)

    torch.manual_seed(0)
    ckpt = tmp_path / "mid.ckpt"
    killed = Net()
    with pytest.raises(Killed):
        make_trainer(tmp_path / "killed", [scheduler(), Kill(6, ckpt)], **total).fit(killed)
    assert killed.seen[-1][0] == 5 and ckpt.exists()  # died mid-epoch 1, after step 6

    state = torch.load(ckpt, weights_only=True)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("DropoutScheduler"))
    assert saved["total"] == (14 if interval == "step" else 4)

    # The resumed run is given a longer run length: the saved length keeps the schedule.
    longer = {**total, "max_steps": 20} if interval == "step" else total
    resumed = Net()
    trainer = make_trainer(tmp_path / "resumed", [scheduler()], **longer)
    trainer.fit(resumed, ckpt_path=ckpt)
    assert resumed.seen[0][0] == 6
    trajectory = killed.seen + resumed.seen[: len(whole.seen) - len(killed.seen)]
    assert [(s, e) for s, e, _ in trajectory] == [(s, e) for s, e, _ in whole.seen]
    assert [r for _, _, r in trajectory] == [r for _, _, r in whole.seen]
    assert len({r["encoder.1"] for _, _, r in whole.seen}) >= 3


@pytest.mark.filterwarnings("ignore:.*dataloader is not resumable")
def test_two_schedulers_fit_and_resume_from_a_mid_epoch_checkpoint(tmp_path: Path) -> None:
    def schedulers() -> list[pl.Callback]:
        return [
            DropoutScheduler({"encoder": Linear(0.0, 0.4, steps=0.5)}),
            DropoutScheduler({"head": Step([0.3, 0.1, 0.0], milestones=[1, 2])}, interval="epoch"),
        ]

    total = {"max_steps": 12}
    whole = Net()
    make_trainer(tmp_path / "whole", schedulers(), **total).fit(whole)
    ckpt = tmp_path / "mid.ckpt"
    killed = Net()
    with pytest.raises(Killed):
        make_trainer(tmp_path / "killed", [*schedulers(), Kill(6, ckpt)], **total).fit(killed)
    state = torch.load(ckpt, weights_only=True)
    keys = [k for k in state["callbacks"] if k.startswith("DropoutScheduler")]
    assert len(keys) == 2
    resumed = Net()
    make_trainer(tmp_path / "resumed", schedulers(), **total).fit(resumed, ckpt_path=ckpt)
    trajectory = killed.seen + resumed.seen
    assert [r for _, _, r in trajectory] == [r for _, _, r in whole.seen]
    assert {r["head.0"] for _, _, r in whole.seen} == {0.3, 0.1, 0.0}
    assert len({r["encoder.1"] for _, _, r in whole.seen}) > 3


def test_two_schedulers_may_not_share_a_site(tmp_path: Path) -> None:
    overlapping = [
        DropoutScheduler({"encoder": Constant(0.1)}),
        DropoutScheduler({"encoder.1": Constant(0.2)}),
    ]
    with pytest.raises(ValueError, match=r"both schedule the dropout sites \['encoder.1'\]"):
        make_trainer(tmp_path, overlapping, max_steps=1).fit(Net())


def test_old_checkpoint_state_without_keys_loads() -> None:
    scheduler = DropoutScheduler(Constant(0.1))
    scheduler.load_state_dict({})
    assert scheduler.state_dict()["total"] is None


@pytest.mark.filterwarnings("ignore:.*dataloader is not resumable")
def test_resuming_with_a_changed_schedule_warns(tmp_path: Path) -> None:
    ckpt = tmp_path / "end.ckpt"
    trainer = make_trainer(tmp_path, [DropoutScheduler(Linear(0.0, 0.2, steps=0.5))], max_steps=2)
    trainer.fit(Net())
    trainer.save_checkpoint(ckpt)
    model = Net()
    resumed = make_trainer(tmp_path, [DropoutScheduler(Constant(0.3))], max_steps=4)
    with pytest.warns(UserWarning, match="new configuration applies"):
        resumed.fit(model, ckpt_path=ckpt)
    assert [rates["encoder.1"] for _, _, rates in model.seen] == [0.3, 0.3]


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: DropoutScheduler(Constant(0.1), interval="batch"), ValueError, "interval"),
        (lambda: DropoutScheduler({}), ValueError, "schedule"),
        (lambda: DropoutScheduler({"": Constant(0.1)}), ValueError, "schedule patterns"),
        (lambda: DropoutScheduler({"encoder": 0.1}), TypeError, r"schedule\['encoder'\]"),
        (lambda: DropoutScheduler(0.1), TypeError, "schedule"),
        (lambda: DropoutScheduler(Constant(0.1), extra_modules=[]), ValueError, "extra_modules"),
        (lambda: DropoutScheduler(Constant(0.1), extra_modules=[3]), TypeError, "extra_modules"),
        (lambda: DropoutScheduler(Constant(0.1), extra_modules=int), TypeError, "extra_modules"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(build, error, match) -> None:
    with pytest.raises(error, match=match):
        build()


def test_group_checks() -> None:
    net = Net()
    encoder = net.encoder
    with pytest.raises(ValueError, match="pattern 'decoder' matches no dropout site"):
        DropoutScheduler({"encoder": Constant(0.1), "decoder": Constant(0.1)}).find_groups(net)
    with pytest.raises(
        ValueError, match="extra_modules entry 'decoder\\*' matches no module with a drop rate"
    ):
        DropoutScheduler(Constant(0.1), extra_modules="decoder*").find_groups(net)
    with pytest.raises(ValueError, match="no dropout site"):
        DropoutScheduler(Constant(0.1)).find_groups(nn.Linear(2, 2))
    # Equally specific for encoder.1: both match it at depth 2 with 5 literal characters.
    with pytest.raises(ValueError, match=r"'enc\*\.1' and '\*der\.1' are equally specific for dropout site"):
        DropoutScheduler({"enc*.1": Constant(0.1), "*der.1": Constant(0.2)}).find_groups(net)

    def modules(groups: dict) -> dict:
        return {group: [site.module for site in sites] for group, sites in groups.items()}

    # The most specific pattern wins; "*" is the catch-all.
    nested = DropoutScheduler({"encoder": Constant(0.1), "encoder.1": Constant(0.2), "*": Constant(0.3)})
    assert modules(nested.find_groups(net)) == {
        "encoder": [encoder[2], encoder[3]],
        "encoder.1": [encoder[1]],
        "*": [net.head[0], net.depth],
    }
    # extra_modules add to the default sites, by type or by class name (bases included).
    by_type = DropoutScheduler(Constant(0.1), extra_modules=RandomMask).find_groups(net)
    assert modules(by_type)["all"] == [encoder[1], encoder[2], encoder[3], net.head[0], net.depth, net.mask]
    by_class_name = DropoutScheduler({"mask": Constant(0.1)}, extra_modules="RandomMask").find_groups(net)
    assert modules(by_class_name) == {"mask": [net.mask]}
    by_base_class_name = DropoutScheduler({"mask": Constant(0.1)}, extra_modules="Module").find_groups(net)
    assert modules(by_base_class_name) == {"mask": [net.mask]}


def test_fractions_need_a_known_run_length(tmp_path: Path) -> None:
    trainer = make_trainer(
        tmp_path, [DropoutScheduler(Linear(0.0, 0.1, steps=0.5))], max_steps=-1, max_epochs=-1
    )
    with pytest.raises(ValueError, match="run's length"):
        trainer.fit(Net())


class CompiledNet(pl.LightningModule):
    """A network compiled by dynamo with a compile-counting aot_eager backend."""

    def __init__(self, dropouts: list[nn.Module], backend: CompileCounterWithBackend) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(2, 4, 1), *dropouts, nn.Flatten(), nn.Linear(12, 1))
        self.net = torch.compile(self.body, backend=backend)
        self.rates: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.rates.append(self.body[1].p)
        return self.net(batch[0]).pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(8, 2, 3)), batch_size=4)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def compiles_over_a_ramp(tmp_path: Path, dropouts: list[nn.Module], steps: int) -> tuple[int, list[float]]:
    """Frames dynamo compiled while a scheduler changed p at every one of ``steps`` steps."""
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")  # counts dynamo compiles, no inductor cost
    model = CompiledNet(dropouts, backend)
    schedule = Linear(0.0, 0.5, steps=steps)
    make_trainer(tmp_path, [DropoutScheduler(schedule)], max_steps=steps).fit(model)
    assert model.rates == [schedule(t) for t in range(steps)]
    assert len(set(model.rates)) == steps  # a new p at every step
    return backend.frame_count, model.rates


def test_compiled_layers_do_not_recompile_when_p_changes(tmp_path: Path) -> None:
    ours = [ld.Dropout1d(0.0), ld.Dropout(0.0), ld.GaussianDropout(0.0)]
    frames, _ = compiles_over_a_ramp(tmp_path, ours, steps=200)
    assert frames == 1
