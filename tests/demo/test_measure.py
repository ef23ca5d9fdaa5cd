"""The demo's measures: smoothness and localisation of features, dead units, paired intervals,
per-epoch curves."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_dropout.demo.measure import (
    ClassifierRun,
    EpochCurves,
    dead_units,
    error_and_nll,
    lag1_autocorrelation,
    paired_difference,
    top_energy_share,
)


def test_autocorrelation_is_minus_one_on_a_checkerboard_and_near_one_on_a_smooth_blob() -> None:
    board = ((torch.arange(28).view(28, 1) + torch.arange(28)) % 2).float().unsqueeze(0)
    assert lag1_autocorrelation(board).item() == pytest.approx(-1.0)
    grid = torch.arange(28.0) - 13.5
    blob = torch.exp(-(grid.view(28, 1) ** 2 + grid.view(1, 28) ** 2) / 50).unsqueeze(0)
    assert lag1_autocorrelation(blob).item() > 0.9
    # Scale and offset do not matter: the mean is removed and the ratio is scale-free.
    assert lag1_autocorrelation(3 * blob + 7).item() == pytest.approx(
        lag1_autocorrelation(blob).item(), abs=1e-6
    )


def test_autocorrelation_of_pixel_noise_is_zero_within_its_standard_error() -> None:
    noise = torch.randn(400, 28, 28, generator=torch.Generator().manual_seed(0))
    values = lag1_autocorrelation(noise)
    # Per filter the estimate has sd about 1 / sqrt(2 * 28 * 27) = 0.027; over 400 filters
    # the mean's standard error is 0.0014: 5 sigma is 0.007 (the -1/N bias is 0.001).
    assert abs(float(values.mean())) < 0.007
    assert 0.02 < float(values.std()) < 0.035


def test_autocorrelation_refuses_filters_that_are_not_2d_maps() -> None:
    with pytest.raises(ValueError, match=r"filters must be \[U, H, W\]"):
        lag1_autocorrelation(torch.zeros(3, 784))
    with pytest.raises(ValueError, match="H, W >= 2"):
        lag1_autocorrelation(torch.zeros(3, 1, 28))


def test_top_energy_share_counts_the_strongest_5_percent_of_pixels() -> None:
    filters = torch.zeros(4, 784)
    filters[0] = 1.0  # even: 39 of 784 pixels hold 39/784 of the energy
    filters[1, 100] = -5.0  # one pixel: all of it
    filters[2, :39] = 2.0  # exactly 39 pixels: all of it
    filters[3, :78] = 1.0  # 78 equal pixels: half of it in the top 39
    shares = top_energy_share(filters)
    torch.testing.assert_close(shares, torch.tensor([39 / 784, 1.0, 1.0, 0.5]))
    assert top_energy_share(filters[:1], fraction=1.0).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="fraction"):
        top_energy_share(filters, fraction=0.0)


def test_dead_units_are_the_columns_that_never_fire() -> None:
    acts = torch.relu(torch.randn(50, 8, generator=torch.Generator().manual_seed(1)))
    acts[:, [2, 5]] = 0.0
    assert dead_units(acts) == 2
    assert dead_units(torch.zeros(3, 4)) == 4


def test_paired_difference_uses_the_t_interval_of_the_differences() -> None:
    diffs = [-0.01, -0.02, -0.015, -0.012, -0.018]
    baseline = [0.08, 0.07, 0.09, 0.075, 0.085]
    result = paired_difference([b + d for b, d in zip(baseline, diffs, strict=True)], baseline)
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t quantile 0.975 with 4 degrees of freedom
    assert result.mean == pytest.approx(mean)
    assert (result.low, result.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert (result.negative, result.count) == (5, 5)
    assert str(result) == "-0.015 [-0.020, -0.010], 5/5 lower"


def test_paired_difference_pairs_by_position_not_by_sorting() -> None:
    # Unpaired, these two samples overlap entirely; paired, every difference is +1.
    result = paired_difference([11.0, 1.0, 6.0], [10.0, 0.0, 5.0])
    assert result.mean == result.low == result.high == pytest.approx(1.0)
    assert result.negative == 0


def test_paired_difference_refuses_unpaired_input() -> None:
    with pytest.raises(ValueError, match="paired"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1.0], [1.0], confidence=1.0)


def test_classifier_run_derives_last_best_and_gap_from_its_curves() -> None:
    run = ClassifierRun("m", 0, [0.2, 0.1, 0.12], [0.9, 0.3, 0.5], train_nll_last=0.1)
    assert (run.test_error, run.test_nll_last, run.test_nll_best, run.best_epoch) == (0.12, 0.5, 0.3, 2)
    assert run.nll_gap_last == pytest.approx(0.4)
    assert set(run.metrics()) == {
        "test_error",
        "test_nll_last",
        "test_nll_best",
        "nll_gap_last",
        "test_nll_curve",
    }


def test_error_and_nll_measure_in_evaluation_mode_and_restore_the_mode() -> None:
    model = nn.Sequential(nn.Dropout(0.9), nn.Linear(3, 2))
    model.train()
    inputs, targets = torch.randn(64, 3), torch.randint(0, 2, (64,))
    first = error_and_nll(model, inputs, targets)
    assert first == error_and_nll(model, inputs, targets)  # deterministic: dropout is off
    assert model.training and model[0].training


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_epoch_curves_record_one_value_per_epoch_and_train_nll_once(tmp_path) -> None:
    inputs, targets = torch.randn(32, 4), torch.randint(0, 3, (32,))
    run = ClassifierRun("tiny", 0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=8)
    trainer = pl.Trainer(
        max_epochs=3,
        logger=False,
        callbacks=[EpochCurves(run, (inputs, targets), (inputs[:16], targets[:16]))],
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    model = _Tiny()
    trainer.fit(model, loader)
    assert len(run.test_nll_curve) == len(run.test_error_curve) == 3
    assert run.test_nll_curve[-1] == pytest.approx(error_and_nll(model, inputs[:16], targets[:16])[1])
    assert run.train_nll_last == pytest.approx(error_and_nll(model, inputs, targets)[1])
