"""The three monitors in real fits: tags, layout, hooks, loggers, warnings."""

from __future__ import annotations

import csv
import math
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dropout import Dropout, Dropout2d, schedules
from lightning_dropout.callbacks import (
    ChannelDropMonitor,
    CoActivationMonitor,
    DropoutScheduler,
    DropRateMonitor,
)

SIGMAS = 4.0


class SmallNet(pl.LightningModule):
    """A CNN on 8x8 inputs with our and torch's dropout layers; records hook counts."""

    def __init__(self, dropout: bool = True) -> None:
        super().__init__()
        drop2d = Dropout2d(0.3) if dropout else nn.Identity()
        drop = Dropout(0.5) if dropout else nn.Identity()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), drop2d)
        self.torch_drop = nn.Dropout2d(0.25) if dropout else nn.Identity()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 64, 40), nn.ReLU(), drop, nn.Linear(40, 10))
        self.hooks_seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.torch_drop(self.features(x)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.hooks_seen.append(sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in self.modules()))
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader(n: int = 96, batch_size: int = 32) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=generator) + 1.0
    return DataLoader(
        TensorDataset(x, torch.randint(0, 10, (n,), generator=generator)), batch_size=batch_size
    )


def fit(tmp_path: Path, callbacks: list[pl.Callback], model: pl.LightningModule | None = None, **kwargs):
    kwargs.setdefault("max_steps", 4)
    kwargs.setdefault("log_every_n_steps", 2)
    model = model or SmallNet()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(model, loader())
    return trainer, model


def events(log_dir: str) -> EventAccumulator:
    accumulator = EventAccumulator(
        log_dir, size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator


def all_monitors() -> list[pl.Callback]:
    return [CoActivationMonitor(), ChannelDropMonitor(), DropRateMonitor()]


def test_documented_tags_and_layout_are_in_the_event_files(tmp_path: Path) -> None:
    trainer, _ = fit(tmp_path, all_monitors())
    acc = events(trainer.logger.log_dir)
    tags = acc.Tags()
    layers = ["features.2", "torch_drop", "head.3"]
    for layer in layers:
        for leaf in ("mean_abs_corr", "decov", "sparsity"):
            assert f"coactivation/{layer}/{leaf}" in tags["scalars"]
        assert f"coactivation/{layer}/corr" in tags["images"]
        assert f"coactivation/{layer}/mean_activation" in tags["histograms"]
        assert f"dropout/{layer}/p" in tags["scalars"]
        assert f"dropout/{layer}/realised" in tags["scalars"]
    for layer in ["features.2", "torch_drop"]:
        assert f"channel_drop/{layer}/fraction" in tags["scalars"]
        assert f"channel_drop/{layer}/expected" in tags["scalars"]
        assert f"channel_drop/{layer}/per_channel" in tags["histograms"]
    assert "channel_drop/head.3/fraction" not in tags["scalars"]
    # every_n_steps defaults to log_every_n_steps=2: steps 0 and 2 of 4
    assert [e.step for e in acc.Scalars("dropout/head.3/p")] == [0, 2]

    # one layout, and each of its charts' regexes matches tags that were logged
    (config,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    titles = [category.title for category in layout.category]
    assert len(titles) == len(set(titles)) == 3
    for category in layout.category:
        for chart in category.chart:
            for regex in chart.multiline.tag:
                assert any(re.match(regex, tag) for tag in tags["scalars"]), regex
    regexes = [tag for c in layout.category for chart in c.chart for tag in chart.multiline.tag]
    assert any(re.match(regex, "dropout/encoder/p") for regex in regexes)  # the scheduler's group tags


def test_scalars_have_the_expected_values(tmp_path: Path) -> None:
    trainer, _ = fit(tmp_path, all_monitors(), max_steps=1, log_every_n_steps=1)
    acc = events(trainer.logger.log_dir)

    def value(tag: str) -> float:
        return acc.Scalars(tag)[0].value

    assert value("dropout/head.3/p") == pytest.approx(0.5)
    assert value("channel_drop/torch_drop/expected") == pytest.approx(0.25)
    # one batch of 32 samples x 4 channels: a binomial fraction, within SIGMAS sd
    sd = math.sqrt(0.25 * 0.75 / (32 * 4))
    assert abs(value("channel_drop/torch_drop/fraction") - 0.25) <= SIGMAS * sd
    # the 40-unit ReLU layer: sparsity is its fraction of exact zeros, so within (0, 1)
    assert 0.0 < value("coactivation/head.3/sparsity") < 1.0
    assert 0.0 <= value("coactivation/head.3/mean_abs_corr") <= 1.0


def test_hooks_exist_only_during_measured_steps_and_are_gone_after_fit(tmp_path: Path) -> None:
    _, model = fit(tmp_path, [*all_monitors()], max_steps=6, log_every_n_steps=3)
    measured = [count > 0 for count in model.hooks_seen]
    assert measured == [True, False, False, True, False, False]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_monitors_leave_the_training_unchanged(tmp_path: Path) -> None:
    # The unit subset comes from a private generator: the dropout masks are the same.
    pl.seed_everything(3)
    _, watched = fit(tmp_path / "a", [CoActivationMonitor(max_units=8), *all_monitors()[1:]])
    pl.seed_everything(3)
    _, plain = fit(tmp_path / "b", [])
    for a, b in zip(watched.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_csv_logger_receives_the_scalars_and_one_warning(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    with pytest.warns(UserWarning, match="only to TensorBoardLogger; skipped for CSVLogger") as record:
        fit(tmp_path, all_monitors(), logger=logger)
    assert sum("TensorBoardLogger" in str(w.message) for w in record) == 1
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        columns = next(csv.reader(handle))
    for tag in ("coactivation/head.3/decov", "channel_drop/features.2/fraction", "dropout/head.3/realised"):
        assert tag in columns


def test_no_logger_warns_once_and_does_nothing(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="no logger") as record:
        _, model = fit(tmp_path, all_monitors(), logger=False)
    assert sum("no logger" in str(w.message) for w in record) == 1
    assert not any(model.hooks_seen)


def test_model_without_dropout_warns_once_and_trains(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="no dropout sites") as record:
        fit(tmp_path, all_monitors(), model=SmallNet(dropout=False), logger=TensorBoardLogger(tmp_path))
    assert sum("dropout" in str(w.message) and "monitor" in str(w.message) for w in record) == 1


def test_named_layers_measure_outputs_with_a_fixed_unit_subset(tmp_path: Path) -> None:
    monitor = CoActivationMonitor(modules=["head.1", "features"], max_units=3, every_n_steps=1)
    trainer, _ = fit(tmp_path, [monitor], max_steps=2)
    acc = events(trainer.logger.log_dir)
    assert {"coactivation/head.1/decov", "coactivation/features/decov"} <= set(acc.Tags()["scalars"])
    assert len(acc.Histograms("coactivation/head.1/mean_activation")) == 2
    subset = monitor._subsets["head.1"]
    assert len(subset) == 3 and subset.tolist() == sorted(subset.tolist())
    image = acc.Images("coactivation/head.1/corr")[0]
    assert image.width == image.height == 255  # 3 units, upscaled 85x


def test_unknown_layer_names_raise_listing_what_exists(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown modules \['head.9'\].*'head.3'"):
        fit(tmp_path, [CoActivationMonitor(modules=["head.9"])])
    with pytest.raises(ValueError, match=r"'head.3' matches no channel-dropping module.*'features.2'"):
        fit(tmp_path, [ChannelDropMonitor(sites=["head.3"])])


def test_no_warning_in_a_plain_tensorboard_run(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(tmp_path, all_monitors())
    assert not [w for w in record if "monitor" in str(w.message).lower()]


class RaiseP(pl.Callback):
    """Changes p at batch end, before the monitor reports (as a scheduler may)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        pl_module.head[3].p = 0.9


def test_logged_p_is_the_p_the_measured_forward_used(tmp_path: Path) -> None:
    trainer, _ = fit(tmp_path, [RaiseP(), DropRateMonitor()], max_steps=1, log_every_n_steps=1)
    acc = events(trainer.logger.log_dir)
    assert acc.Scalars("dropout/head.3/p")[0].value == pytest.approx(0.5)
    realised = acc.Scalars("dropout/head.3/realised")[0].value
    # 32 x 40 ReLU outputs, at least 200 of them nonzero: binomial sd <= sqrt(0.25 / 200)
    assert abs(realised - 0.5) <= SIGMAS * math.sqrt(0.25 / 200)


def test_the_layout_charts_the_schedulers_p_beside_the_realised_rate(tmp_path: Path) -> None:
    scheduler = DropoutScheduler({"head.*": schedules.Linear(0.1, 0.5, 4)})
    trainer, _ = fit(tmp_path, [scheduler, DropRateMonitor()], max_steps=4, log_every_n_steps=1)
    acc = events(trainer.logger.log_dir)
    (config,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for c in layout.category for chart in c.chart}
    scheduler_tags = [tag for tag in acc.Tags()["scalars"] if tag.startswith("dropout/head.*")]
    assert scheduler_tags == ["dropout/head.*/p"]
    together = charts["p and realised, all layers"]
    for tag in ("dropout/head.*/p", "dropout/head.3/realised", "dropout/head.3/p"):
        assert any(re.match(regex, tag) for regex in together), tag
    # the monitor's p is the scheduled p the measured forward used
    scheduled = {e.step: e.value for e in acc.Scalars("dropout/head.*/p")}
    monitored = {e.step: e.value for e in acc.Scalars("dropout/head.3/p")}
    assert scheduled and all(monitored[step] == pytest.approx(p) for step, p in scheduled.items())


def test_heatmap_every_image_interval_measured_steps(tmp_path: Path) -> None:
    monitor = CoActivationMonitor(every_n_steps=2, image_interval=3)
    trainer, _ = fit(tmp_path, [monitor], max_steps=13)
    accumulator = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    image_tag = next(t for t in accumulator.Tags()["images"] if t.endswith("/corr"))
    assert [e.step for e in accumulator.Images(image_tag)] == [0, 6, 12]
    scalar_tag = next(t for t in accumulator.Tags()["scalars"] if t.endswith("/mean_abs_corr"))
    assert [e.step for e in accumulator.Scalars(scalar_tag)] == [0, 2, 4, 6, 8, 10, 12]
    with pytest.raises(ValueError, match="image_interval"):
        CoActivationMonitor(image_interval=0)


@pytest.mark.parametrize(
    ("monitor", "size_attribute"),
    [(CoActivationMonitor(), "num_units"), (ChannelDropMonitor(), "num_channels")],
)
def test_ranks_agree_on_lazily_sized_metrics(
    monitor: CoActivationMonitor | ChannelDropMonitor, size_attribute: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rank 0 saw layer "a" (5 units); the other rank also saw "b" (7 units) on its first
    # measured step. After agreement both ranks hold both metrics, so their compute()
    # collectives run in the same order.
    monitor._create_metric("a", 5, torch.device("cpu"))

    def all_gather_object(out: list, local: dict) -> None:
        out[0], out[1] = local, {"a": 5, "b": 7}

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    monitor._agree_on_metrics(trainer)  # type: ignore[arg-type]
    assert sorted(monitor._metrics) == ["a", "b"]
    assert getattr(monitor._metrics["b"], size_attribute) == 7
