"""MCDropout's calibration: fitted on validation, kept in the state, applied in test and predict."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dropout import MCOutput
from lightning_dropout.calibration import fit_temperature
from lightning_dropout.callbacks import MCDropout

WEIGHT = torch.tensor([[1.0, -0.5, 0.3, 0.0], [-0.4, 1.0, 0.0, 0.5], [0.2, 0.1, -1.0, 0.7]])


class Overconfident(pl.LightningModule):
    """Logits three times as sharp as the distribution the labels are drawn from."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.linear = nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(3.0 * WEIGHT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(x))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.multinomial((x @ WEIGHT.T).softmax(-1), 1, generator=g).squeeze(-1)
    return TensorDataset(x, y)


def trainer(tmp_path: Path, callback: MCDropout, devices: int = 1, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=devices,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        **kwargs,
    )


N_CAL, N_TEST, ALPHA = 800, 800, 0.1


def test_fitted_on_validation_applied_in_test_and_kept_through_a_weights_only_checkpoint(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = Overconfident()
    callback = MCDropout(
        n_samples=8,
        stages=("validate", "test", "predict"),
        calibration=("temperature", "conformal"),
        alpha=ALPHA,
    )
    calibration, test = data(N_CAL, 1), data(N_TEST, 2)
    run = trainer(tmp_path, callback)
    run.validate(model, DataLoader(calibration, batch_size=100))
    # The deterministic baseline's temperature: exactly the fit on the eval-mode logits.
    x, y = calibration.tensors
    with torch.no_grad():
        det_logits = model.eval()(x)
    assert callback.state_dict()["fitted"]["det_temperature"] == pytest.approx(fit_temperature(det_logits, y))
    assert callback.temperature is not None and callback.temperature > 1.8  # about 3 by construction

    results = run.test(model, DataLoader(test, batch_size=100))[0]
    assert results["test/mc_ts/nll"] < results["test/mc/nll"]
    assert results["test/det_ts/nll"] < results["test/det/nll"]
    assert results["test/mc_ts/ece"] < results["test/mc/ece"]
    sigma = math.sqrt(ALPHA * (1 - ALPHA) * (1 / N_CAL + 1 / N_TEST))
    assert results["test/mc/coverage"] >= 1 - ALPHA - 3 * sigma
    assert 1.0 <= results["test/mc/set_size"] < 3.0

    path = tmp_path / "callback.pt"
    torch.save(callback.state_dict(), path)
    restored = MCDropout(
        n_samples=8, stages=("validate", "predict"), calibration=("temperature", "conformal"), alpha=ALPHA
    )
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.temperature == callback.temperature and restored.threshold == callback.threshold
    outputs = trainer(tmp_path, restored).predict(model, DataLoader(test, batch_size=50))
    assert outputs is not None
    first = outputs[0]
    assert isinstance(first, MCOutput) and first.temperature == callback.temperature
    assert first.sets is not None and first.sets.shape == (50, 3) and first.sets.dtype == torch.bool


def test_a_checkpoint_without_calibration_loads_and_a_different_alpha_drops_the_threshold(
    tmp_path: Path,
) -> None:
    callback = MCDropout(stages=("validate", "predict"), calibration="conformal", alpha=0.2)
    callback.load_state_dict({})  # a checkpoint from before calibration existed
    assert callback.threshold is None
    with pytest.warns(UserWarning, match="alpha"):
        callback.load_state_dict({"fitted": {"threshold": 0.7}, "alpha": 0.1, "conformal_method": "aps"})
    assert callback.threshold is None
    with pytest.warns(UserWarning, match="not fitted yet"):
        outputs = trainer(tmp_path, callback).predict(Overconfident(), DataLoader(data(20, 3), batch_size=10))
    assert outputs is not None and outputs[0].sets is None


def test_auto_passes_are_logged(tmp_path: Path) -> None:
    callback = MCDropout(n_samples="auto", tolerance=0.05, max_samples=64, stages="test")
    results = trainer(tmp_path, callback).test(Overconfident(), DataLoader(data(60, 4), batch_size=30))[0]
    assert 8 <= results["test/mc/n_samples"] <= 64


def test_calibration_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="calibration"):
        MCDropout(stages="validate", calibration="histogram")
    with pytest.raises(ValueError, match="'validate'"):
        MCDropout(stages="test", calibration="temperature")
    with pytest.raises(ValueError, match="output"):
        MCDropout(stages="validate", calibration="temperature", output="regression")
    with pytest.raises(ValueError, match="alpha"):
        MCDropout(stages="validate", calibration="conformal", alpha=0.0)
    with pytest.raises(ValueError, match="conformal_method"):
        MCDropout(stages="validate", calibration="conformal", conformal_method="thr")
    with pytest.raises(ValueError, match="n_samples"):
        MCDropout(n_samples="many")
    with pytest.raises(ValueError, match="tolerance"):
        MCDropout(n_samples="auto", tolerance=0.0)


def test_two_gloo_processes_fit_what_one_process_fits_on_the_union(tmp_path: Path) -> None:
    # Consistent masks make each input's passes independent of its rank; LAC has no
    # randomisation, so the fit depends on the union of the rows only.
    loader = DataLoader(data(64, 5), batch_size=8)

    def run(**kwargs: Any) -> dict[str, float]:
        callback = MCDropout(
            6,
            stages="validate",
            consistent=True,
            seed=7,
            calibration=("temperature", "conformal"),
            conformal_method="lac",
        )
        return trainer(tmp_path, callback, **kwargs).validate(Overconfident(), loader, verbose=False)[0]

    single = run()
    ddp = run(devices=2, strategy="ddp_spawn")
    tags = ("val/mc_ts/temperature", "val/det_ts/temperature", "val/mc/conformal_threshold")
    for tag in tags:
        assert ddp[tag] == pytest.approx(single[tag], rel=1e-4), tag
