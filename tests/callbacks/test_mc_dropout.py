"""MCDropout: stochastic dropout in predict / test / validate without touching BatchNorm."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dropout import DropConnect, DropConnectLinear, MCOutput
from lightning_dropout.callbacks import MCDropout


class Plain(L.LightningModule):
    """No DropoutMixin: the callback must work on any LightningModule."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Dropout(0.3),
            DropConnectLinear(16, 16, p=0.3, activation="relu"),
            DropConnect(nn.Linear(16, 3), p=0.2),
        )
        self.seen: list[torch.Tensor] = []
        self.bn_training_in_step: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.seen.append(logits)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.seen.append(logits)
        self.bn_training_in_step.append(self.net[1].training)
        self.log("test_loss", nn.functional.cross_entropy(logits, y))

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        self.bn_training_in_step.append(self.net[1].training)
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 6, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def trainer(tmp_path: Path, callbacks: list[L.Callback] | None = None, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks or [],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        **kwargs,
    )


def fitted(tmp_path: Path) -> Plain:
    model = Plain()
    trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(model, loader())
    return model


def state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    return buffers, {name: m.training for name, m in model.named_modules()}


def assert_unchanged(model: nn.Module, before: tuple[dict[str, torch.Tensor], dict[str, bool]]) -> None:
    buffers, flags = before
    for key, value in model.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert all(m.mask_groups == 1 for m in model.modules() if hasattr(m, "mask_groups"))
    assert "forward" not in vars(model) and "predict_step" not in vars(model)


def test_predict_is_deterministic_without_the_callback_and_stochastic_with_it(tmp_path: Path) -> None:
    model = fitted(tmp_path)
    before = state(model)
    plain = [trainer(tmp_path).predict(model, loader()) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*plain, strict=True))
    for batched in (True, False):
        runs = [
            trainer(tmp_path, [MCDropout(n_samples=10, batched=batched)]).predict(model, loader())
            for _ in range(2)
        ]
        for first, second in zip(*runs, strict=True):
            assert isinstance(first, MCOutput) and first.n_samples == 10
            assert first.mean.shape == (8, 3) and first.entropy is not None and first.entropy.shape == (8,)
            assert (first.variance > 0).any()
            assert not torch.equal(first.mean, second.mean)
        assert_unchanged(model, before)
    assert not any(model.bn_training_in_step)


def test_predict_keeps_samples_on_request(tmp_path: Path) -> None:
    model = fitted(tmp_path)
    out = trainer(tmp_path, [MCDropout(n_samples=4, return_samples=True, chunk_size=3)]).predict(
        model, loader()
    )
    assert out is not None and out[0].samples is not None and out[0].samples.shape == (4, 8, 3)
    torch.testing.assert_close(out[0].samples.mean(0), out[0].mean)


def test_test_metrics_come_from_the_mc_mean(tmp_path: Path) -> None:
    model = fitted(tmp_path)
    before = state(model)
    deterministic = trainer(tmp_path).test(model, loader(), verbose=False)[0]["test_loss"]
    plain_logits = torch.cat(model.seen)
    model.seen.clear()
    mc = trainer(tmp_path, [MCDropout(n_samples=50, stages=("test",))]).test(model, loader(), verbose=False)
    mc_logits = torch.cat(model.seen)
    # The step saw log predictive probabilities, not one deterministic pass.
    torch.testing.assert_close(mc_logits.exp().sum(-1), torch.ones(len(mc_logits)))
    assert not torch.allclose(mc_logits, plain_logits.log_softmax(-1))
    assert mc[0]["test_loss"] != deterministic
    assert not any(model.bn_training_in_step)
    assert_unchanged(model, before)


def test_validate_stage_covers_trainer_validate_and_restores_forward(tmp_path: Path) -> None:
    model = fitted(tmp_path)
    before = state(model)
    losses = [
        trainer(tmp_path, [MCDropout(n_samples=5, stages="validate", output="logits")]).validate(
            model, loader(), verbose=False
        )[0]["val_loss"]
        for _ in range(2)
    ]
    assert losses[0] != losses[1]
    assert_unchanged(model, before)
    # Predict is not among the stages: plain tensors come back.
    out = trainer(tmp_path, [MCDropout(stages=("validate",))]).predict(model, loader())
    assert out is not None and isinstance(out[0], torch.Tensor)


def test_an_exception_in_a_step_leaves_no_patch_behind(tmp_path: Path) -> None:
    class Failing(Plain):
        def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
            raise RuntimeError("step failed")

    model = Failing().eval()
    before = state(model)
    with pytest.raises(RuntimeError, match="step failed"):
        trainer(tmp_path, [MCDropout(n_samples=3)]).predict(model, loader())
    assert_unchanged(model, before)


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="n_samples"):
        MCDropout(n_samples=0)
    with pytest.raises(ValueError, match="stages must be one of"):
        MCDropout(stages=("predict", "fit"))
    with pytest.raises(ValueError, match="at least one"):
        MCDropout(stages=())
    with pytest.raises(ValueError, match="output"):
        MCDropout(output="scores")
    with pytest.raises(TypeError, match="batched"):
        MCDropout(batched="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        MCDropout(chunk_size=0)
    with pytest.raises(TypeError, match="class_dim"):
        MCDropout(class_dim=1.0)  # type: ignore[arg-type]
    assert MCDropout(stages=["test", "test", "predict"]).stages == ("test", "predict")


def test_a_model_without_dropout_gets_a_warning(tmp_path: Path) -> None:
    class NoDropout(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(6, 3)

        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layer(batch[0])

    with pytest.warns(UserWarning, match="no dropout site"):
        trainer(tmp_path, [MCDropout(n_samples=2)]).predict(NoDropout(), loader())


def test_validation_inside_fit_is_mc_and_training_forward_is_restored(tmp_path: Path) -> None:
    model = Plain()
    callback = MCDropout(n_samples=3, stages=("validate",))
    trainer(tmp_path, [callback], max_steps=2, num_sanity_val_steps=1).fit(model, loader(), loader())
    assert model.seen and torch.allclose(model.seen[-1].exp().sum(-1), torch.ones(8))
    assert "forward" not in vars(model)
    # Training steps ran the plain forward: raw logits, not log-probabilities.
    logits = model(torch.randn(4, 6))
    assert not torch.allclose(logits.exp().sum(-1), torch.ones(4))


class RecordPerRank(L.Callback):
    """Saves what each spawned rank saw, for the main process to check."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.outputs: list[MCOutput] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any
    ) -> None:
        self.outputs.append(outputs)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = {
            "types": [type(o).__name__ for o in self.outputs],
            "variances": [float(o.variance.sum()) for o in self.outputs],
            "buffers_unchanged": all(
                torch.equal(v, self.before[k]) for k, v in pl_module.state_dict().items()
            ),
            "patched": sorted({"forward", "predict_step"} & set(vars(pl_module))),
        }
        torch.save(record, self.out_dir / f"rank{trainer.global_rank}.pt")


@pytest.mark.skipif(
    bool(os.environ.get("LIGHTNING_DROPOUT_SKIP_DDP_TESTS")),
    reason="LIGHTNING_DROPOUT_SKIP_DDP_TESTS is set",
)
def test_ddp_spawn_predict_returns_mc_outputs_on_every_rank(tmp_path: Path) -> None:
    model = fitted(tmp_path).eval()
    ddp = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        callbacks=[MCDropout(n_samples=6), RecordPerRank(tmp_path)],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    ddp.predict(model, loader())
    for rank in (0, 1):
        record = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # 3 batches over 2 ranks: the distributed sampler pads to 2 batches per rank.
        assert record["types"] == ["MCOutput", "MCOutput"]
        assert all(v > 0 for v in record["variances"])
        assert record["buffers_unchanged"] and record["patched"] == []


def test_a_test_step_that_bypasses_forward_gets_a_warning(tmp_path: Path) -> None:
    class Bypass(Plain):
        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.log("test_loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

    with pytest.warns(UserWarning, match="test_step never called the module's forward"):
        trainer(tmp_path, [MCDropout(n_samples=2, stages="test")]).test(
            Bypass().eval(), loader(), verbose=False
        )
