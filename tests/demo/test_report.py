"""The demo's tables and results.json: mean ± sd over seeds and differences paired by seed."""

from __future__ import annotations

import pytest
import torch

from lightning_dropout.demo import AutoencoderResult, ClassifierRun, DemoConfig, DemoResult
from lightning_dropout.demo.report import (
    autoencoder_table,
    classifier_table,
    mean_sd,
    paired_table,
    results_json,
)


def _run(model: str, seed: int, error: float, nll: list[float], train_nll: float = 0.0) -> ClassifierRun:
    return ClassifierRun(model, seed, [0.5] * (len(nll) - 1) + [error], nll, train_nll)


def _cells(table: str, row: int) -> list[str]:
    return [cell.strip() for cell in table.splitlines()[2 + row].split("|")[1:-1]]


def test_mean_sd_uses_the_sample_standard_deviation() -> None:
    assert mean_sd([1.0, 2.0, 3.0, 4.0]) == "2.500 ± 1.291"
    assert mean_sd([0.25], digits=2) == "0.25"


RUNS = [
    # The baseline varies a lot between seeds (splits differ); dropout is always 0.01 better.
    _run("mlp_no_dropout", 0, 0.10, [0.5, 1.0], train_nll=0.2),
    _run("mlp_no_dropout", 1, 0.30, [1.5, 2.0], train_nll=0.4),
    _run("mlp_dropout", 1, 0.29, [1.6, 1.5], train_nll=0.5),
    _run("mlp_dropout", 0, 0.09, [0.6, 0.5], train_nll=0.1),
]


def test_classifier_table_gives_last_best_and_gap_per_model() -> None:
    table = classifier_table(RUNS)
    assert _cells(table, 0) == [
        "mlp_no_dropout",
        "0.200 ± 0.141",
        "1.500 ± 0.707",
        "1.000 ± 0.707",
        "1.200 ± 0.566",
    ]
    assert _cells(table, 1) == [
        "mlp_dropout",
        "0.190 ± 0.141",
        "1.000 ± 0.707",
        "1.000 ± 0.707",
        "0.700 ± 0.424",
    ]


def test_paired_table_pairs_by_seed_and_counts_the_seeds_where_dropout_is_lower() -> None:
    (row,) = [_cells(paired_table(RUNS), 0)]
    assert row[0] == "mlp_dropout - mlp_no_dropout"
    assert row[1] == "-0.010 [-0.010, -0.010], 2/2 lower"
    assert row[2] == "-0.500 [-0.500, -0.500], 2/2 lower"
    assert row[3] == "+0.000 [+0.000, +0.000], 0/2 lower"
    assert row[5] == f"{1.2 / 0.7:.2f}"  # the baseline's mean gap over the model's
    assert len(paired_table(RUNS).splitlines()) == 3  # the baseline has no row of its own
    assert len(paired_table([_run("cnn_element_dropout", 0, 0.1, [0.2])]).splitlines()) == 2


def _autoencoder() -> AutoencoderResult:
    return AutoencoderResult(
        "autoencoder_dropout",
        seed=0,
        p=0.5,
        test_bce=72.46,
        features=torch.zeros(3, 784),
        live=torch.tensor([True, True, False]),
        mean_activations=torch.tensor([0.5, 0.1, 0.0]),
        activations=torch.rand(30),
        zero_fraction=0.56,
        decoder_smoothness=0.781,
        top5_energy=0.4,
    )


def test_autoencoder_table_and_its_dead_units() -> None:
    result = _autoencoder()
    assert result.dead_units == 1 and result.mean_activation == pytest.approx(0.2)
    assert _cells(autoencoder_table([result]), 0) == [
        "autoencoder_dropout",
        "0.5",
        "72.5",
        "0.20",
        "0.56",
        "1",
        "0.781",
        "0.400",
    ]


def test_results_json_holds_every_model_per_seed_with_the_issue_s_keys() -> None:
    result = DemoResult(DemoConfig(seeds=2), [_autoencoder()], RUNS, 1.0)
    data = results_json(result)
    assert list(data) == ["mlp_no_dropout", "mlp_dropout", "autoencoder_dropout"]
    assert list(data["mlp_dropout"]) == ["1", "0"]
    assert data["mlp_dropout"]["0"] == {
        "test_error": 0.09,
        "test_nll_last": 0.5,
        "test_nll_best": 0.5,
        "nll_gap_last": 0.4,
        "test_nll_curve": [0.6, 0.5],
    }
    assert set(data["autoencoder_dropout"]["0"]) == {
        "decoder_smoothness",
        "top5_energy",
        "mean_activation",
        "zero_fraction",
        "dead_units",
        "test_bce",
    }
