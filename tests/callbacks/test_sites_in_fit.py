"""The callbacks on the dropout sites of real models, in real fits: schedules on attention
and float rates, drop-path profiles, realised rates of functional dropout, sequence
activations with dynamic padding, MC predict on attention-only models, the site table and
the eval-mode warning."""

from __future__ import annotations

import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_dropout.callbacks import CoActivationMonitor, DropoutScheduler, DropRateMonitor, MCDropout
from lightning_dropout.schedules import Constant, Linear
from lightning_dropout.sites import find_sites
from tests import _models
from tests._loggers import MemoryLogger

SIGMAS = 5.0
LENGTHS = (12, 7, 10, 5)  # dynamic padding: every batch its own length


class Wrapped(pl.LightningModule):
    """Any model mapping a tensor to a tensor, trained on the squared output; records the
    p of every site inside each training step."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seen: list[dict[str, float | None]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append({name: site.p for name, site in find_sites(self).items()})
        return self(batch).float().pow(2).mean()

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def token_batches(kind: str, lengths: tuple[int, ...] = LENGTHS, batch: int = 4) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [_models.hf_input(kind, batch, length) for length in lengths]


def image_batches(count: int = 4, batch: int = 4) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(batch, *_models.IMAGE) for _ in range(count)]


def fit(
    tmp_path: Path,
    model: pl.LightningModule,
    batches: list[torch.Tensor],
    callbacks: list[pl.Callback],
    **kw: Any,
) -> pl.Trainer:
    options: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "max_steps": len(batches),
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    options.update(kw)
    trainer = pl.Trainer(callbacks=callbacks, **options)
    trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


def hf(kind: str, attention: str = "sdpa", **rates: float) -> Wrapped:
    torch.manual_seed(0)
    return Wrapped(_models.Logits(_models.hf_model(kind, attention, **rates)))


def test_a_catch_all_group_and_an_attention_group_on_bert(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = hf("bert")
    scheduler = DropoutScheduler({"*attention*": Constant(0.05), "*": Linear(0.0, 0.3, steps=3)})
    with caplog.at_level(logging.INFO):
        fit(tmp_path, model, token_batches("bert"), [scheduler], enable_model_summary=True)
    attention = [n for n, s in find_sites(model).items() if s.kind == "attention"]
    assert len(attention) == 2
    for step, rates in enumerate(model.seen):
        for name, p in rates.items():
            expected = 0.05 if "attention" in name else Linear(0.0, 0.3, steps=3)(step)
            assert p == pytest.approx(expected), (step, name)
    # The site table, printed once at train start beside the model summary.
    table = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Dropout sites")]
    assert len(table) == 1
    row = r"layer\.0\.attention\.self\.dropout +\| attention \| 0\.1 +\| schedule '\*attention\*'"
    assert re.search(row, table[0]), table[0]
    assert re.search(r"layer\.0\.output\.dropout +\| dropout +\| 0\.1 +\| schedule '\*'", table[0])


def test_llama_attention_dropout_is_scheduled(tmp_path: Path) -> None:
    model = hf("llama", attention_dropout=0.0)
    fit(tmp_path, model, token_batches("llama"), [DropoutScheduler(Linear(0.0, 0.3, steps=3))])
    assert [rates["net.model.model.layers.1.self_attn.attention_dropout"] for rates in model.seen] == (
        pytest.approx([0.0, 0.1, 0.2, 0.3])
    )


def drop_path_rates(model: nn.Module) -> dict[str, float]:
    return {n: s.p or 0.0 for n, s in find_sites(model).items() if s.kind == "drop_path"}


def test_a_schedule_keeps_the_built_drop_path_profile(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Wrapped(_models.timm_model("test_resnet", drop_rate=0.2, drop_path_rate=0.1))
    built = drop_path_rates(model)
    assert sorted(built.values()) == pytest.approx([1 / 30, 2 / 30, 3 / 30])  # by depth
    scheduler = DropoutScheduler(Linear(0.4, 0.0, steps=2))
    fit(tmp_path / "a", model, image_batches(3), [scheduler])
    top = max(built.values())
    for step, rates in enumerate(model.seen):
        p = Linear(0.4, 0.0, steps=2)(step)
        assert rates["net.drop_rate"] == pytest.approx(p)  # not drop-path: the schedule itself
        assert {n: rates[n] for n in built} == pytest.approx({n: p * b / top for n, b in built.items()})
    # The model now shows p = 0 everywhere; the profile survives in the scheduler's state.
    assert set(drop_path_rates(model).values()) == {0.0}
    resumed = DropoutScheduler(Constant(0.3))
    resumed.load_state_dict(scheduler.state_dict())
    fit(tmp_path / "b", model, image_batches(1), [resumed])
    assert drop_path_rates(model) == pytest.approx({n: 0.3 * b / top for n, b in built.items()})
    flat = DropoutScheduler(Constant(0.3), depth_profile=False)
    fit(tmp_path / "c", model, image_batches(1), [flat])
    assert set(drop_path_rates(model).values()) == {0.3}


def realised(logger: MemoryLogger, site: str) -> list[float]:
    return list(logger.steps_of(f"dropout/{site}/realised").values())


def assert_near(values: list[float], p: float, count: int) -> None:
    """Each value a binomial fraction of ``count`` draws at rate ``p``, within SIGMAS."""
    assert values
    for value in values:
        assert abs(value - p) <= SIGMAS * math.sqrt(p * (1 - p) / count), (value, p)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_realised_rates_of_attention_dropout_eager_and_inside_sdpa(tmp_path: Path, attention: str) -> None:
    batches = token_batches("bert", (12, 12))
    logger = MemoryLogger()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*logs only p")
        fit(tmp_path, hf("bert", attention), batches, [DropRateMonitor(every_n_steps=1)], logger=logger)
    site = "net.model.bert.encoder.layer.0.attention.self.dropout"
    # Eager attention drops its probabilities with F.dropout inside the attention's code;
    # scaled_dot_product_attention is evaluated in math form on the measured steps:
    # 4 sequences x 2 heads x 12 x 12 probabilities per step either way.
    assert_near(realised(logger, site), 0.1, 4 * 2 * 12 * 12)
    assert len(realised(logger, site)) == 2
    assert list(logger.steps_of(f"dropout/{site}/p").values()) == [0.1, 0.1]
    assert_near(realised(logger, "net.model.bert.encoder.layer.1.output.dropout"), 0.1, 4 * 12 * 32)


def test_sites_dropping_inside_fused_kernels_are_named_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Wrapped(nn.LSTM(8, 8, num_layers=2, dropout=0.3, batch_first=True))
    model.forward = lambda x: model.net(x)[0]  # type: ignore[method-assign]
    batches = [torch.randn(4, 6, 8) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"logs only p for these dropout sites.*net\.dropout") as record:
        fit(tmp_path, model, batches, [DropRateMonitor(every_n_steps=1)], logger=MemoryLogger())
    assert sum("logs only p" in str(w.message) for w in record) == 1


def test_realised_rates_of_float_rates_read_in_forward(tmp_path: Path) -> None:
    logger = MemoryLogger()
    model = hf("bart", "sdpa", dropout=0.2, attention_dropout=0.0, activation_dropout=0.3)
    fit(tmp_path, model, token_batches("bart", (12,)), [DropRateMonitor(every_n_steps=1)], logger=logger)
    layer = "net.model.model.encoder.layers.0"
    assert_near(realised(logger, f"{layer}.dropout"), 0.2, 2 * 4 * 12 * 32)  # two F.dropout calls
    assert_near(realised(logger, f"{layer}.activation_dropout"), 0.3, 4 * 12 * 64)

    torch.manual_seed(0)
    resnet = Wrapped(_models.timm_model("test_resnet", drop_rate=0.5))  # F.dropout in forward_head
    logger = MemoryLogger()
    fit(tmp_path / "r", resnet, image_batches(1, batch=16), [DropRateMonitor(every_n_steps=1)], logger=logger)
    features = resnet.net.num_features
    assert_near(realised(logger, "net.drop_rate"), 0.5, 16 * features)


def test_coactivation_reads_hidden_units_of_sequences_of_varying_length(tmp_path: Path) -> None:
    monitor = CoActivationMonitor(every_n_steps=1, sites="*layer.0.output.dropout")
    logger = MemoryLogger()
    fit(tmp_path, hf("bert"), token_batches("bert"), [monitor], logger=logger)
    name = "net.model.bert.encoder.layer.0.output.dropout"
    assert monitor._metrics[name].num_units == 32  # hidden features, not the 12 tokens
    assert len(logger.steps_of(f"coactivation/{name}/mean_abs_corr")) == len(LENGTHS)


def test_mc_dropout_predicts_stochastically_on_attention_only_models(tmp_path: Path) -> None:
    torch.manual_seed(0)
    for net in (
        _models.Logits(_models.hf_model("llama", "sdpa", attention_dropout=0.2)),
        _models.timm_vit(attn_drop_rate=0.2),
    ):
        model = Wrapped(net)
        trainer = pl.Trainer(
            default_root_dir=tmp_path,
            logger=False,
            enable_progress_bar=False,
            callbacks=[MCDropout(n_samples=6, output="regression")],
        )
        batches: list[torch.Tensor] = (
            token_batches("llama", (8,)) if isinstance(net, _models.Logits) else image_batches(1)
        )
        (out,) = trainer.predict(model, torch.utils.data.DataLoader(batches, batch_size=None))
        assert out.variance.amax() > 0


def test_sites_stuck_in_eval_mode_are_named_once(tmp_path: Path) -> None:
    model = hf("bert")
    model.net.model.bert.encoder.layer[1].eval()  # user code froze a block
    with pytest.warns(UserWarning, match=r"eval mode.*encoder\.layer\.1\.attention\.self\.dropout") as record:
        fit(tmp_path, model, token_batches("bert"), [DropoutScheduler(Constant(0.1)), DropRateMonitor()])
    assert sum("gates them is in eval mode" in str(w.message) for w in record) == 1
    assert "layer.0" not in next(str(w.message) for w in record if "eval mode" in str(w.message))
