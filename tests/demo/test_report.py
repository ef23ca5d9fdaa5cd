"""The demo's tables: mean ± sd over seeds and differences paired by seed."""

from __future__ import annotations

import torch

from lightning_dropout.demo import AutoencoderResult, LayerStats, RunResult
from lightning_dropout.demo.report import autoencoder_table, classifier_table, mean_sd, units_table


def _run(model: str, seed: int, error: float, nll: float, train_nll: float = 0.0) -> RunResult:
    layers = [
        LayerStats("relu1", 0.2 + seed / 100, 0.5, 1.0, p=None if model.endswith("no_dropout") else 0.5)
    ]
    if layers[0].p is not None:
        layers[0].realised = 0.49 + seed / 100
    return RunResult(model, seed, error, nll, 0.0, train_nll, layers)


def _cells(table: str, row: int) -> list[str]:
    return [cell.strip() for cell in table.splitlines()[2 + row].split("|")[1:-1]]


def test_mean_sd_uses_the_sample_standard_deviation() -> None:
    assert mean_sd([1.0, 2.0, 3.0, 4.0]) == "2.500 ± 1.291"
    assert mean_sd([0.25], digits=2) == "0.25"


def test_differences_are_paired_by_seed() -> None:
    # The baseline varies a lot between seeds (splits differ); dropout is always 0.01 better.
    runs = [
        _run("mlp_no_dropout", 0, 0.10, 1.0),
        _run("mlp_no_dropout", 1, 0.30, 2.0),
        _run("mlp_dropout", 1, 0.29, 1.5),
        _run("mlp_dropout", 0, 0.09, 0.5),
    ]
    table = classifier_table(runs)
    assert _cells(table, 0) == ["mlp_no_dropout", "0.200 ± 0.141", "-", "1.500 ± 0.707", "-", "1.500 ± 0.707"]
    assert _cells(table, 1) == [
        "mlp_dropout",
        "0.190 ± 0.141",
        "-0.010 ± 0.000",
        "1.000 ± 0.707",
        "-0.500 ± 0.000",
        "1.000 ± 0.707",
    ]


def test_a_model_without_its_baseline_has_no_difference() -> None:
    table = classifier_table([_run("cnn_element_dropout", 0, 0.1, 0.2)])
    assert _cells(table, 0)[2] == "-" and _cells(table, 0)[4] == "-"


def test_units_table_lists_p_beside_the_mean_realised_rate() -> None:
    table = units_table(
        [
            _run("mlp_no_dropout", 0, 0.1, 0.2),
            _run("mlp_dropout", 0, 0.1, 0.2),
            _run("mlp_dropout", 2, 0.1, 0.2),
        ]
    )
    assert _cells(table, 0) == ["mlp_no_dropout", "relu1", "0.200", "0.500", "1.000", "-"]
    assert _cells(table, 1) == [
        "mlp_dropout",
        "relu1",
        "0.210 ± 0.014",
        "0.500 ± 0.000",
        "1.000 ± 0.000",
        "0.50 / 0.500",
    ]


def test_autoencoder_table_counts_dead_units_and_measures_locality() -> None:
    features = torch.zeros(3, 64)
    features[0, 5] = 2.0  # a single pixel: peak share 1
    features[1] = 1.0  # spread evenly: 1/64
    features[2, :4] = 1.0  # four pixels: 1/4, but the unit never fires
    result = AutoencoderResult(
        "autoencoder_dropout",
        seed=0,
        p=0.5,
        test_loss=0.25,
        features=features,
        mean_activation=torch.tensor([0.5, 0.1, 0.0]),
        activations=torch.rand(30),
        sparsity=0.4,
        mean_abs_corr=0.1,
    )
    assert result.dead_units == 1
    assert result.peak_share == 1 / 64  # median of the live units' {1, 1/64}: torch takes the lower
    assert _cells(autoencoder_table([result]), 0) == [
        "autoencoder_dropout",
        "0.5",
        "0.2500",
        "0.200",
        "0.400",
        "0.100",
        "0.02",
        "1",
    ]
