"""Temperature scaling and conformal sets against brute-force references and their guarantees."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_dropout.calibration import (
    conformal_scores,
    conformal_threshold,
    fit_temperature,
    prediction_sets,
    set_coverage,
    set_size,
    temperature_nll,
)
from lightning_dropout.metrics import SetCoverage, SetSize


def overconfident(n: int, classes: int, passes: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits twice as sharp as the distribution the labels are drawn from (the fitted
    temperature should come out near 2), as ``[N, C]`` or ``[S, N, C]`` with pass noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, classes, generator=g) * 1.5
    labels = torch.multinomial(base.softmax(-1), 1, generator=g).squeeze(-1)
    logits = 2.0 * base
    if passes is not None:
        logits = logits + 0.8 * torch.randn(passes, n, classes, generator=g)
    return logits, labels


def nll_on_grid(logits: torch.Tensor, labels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The NLL of the pass-averaged tempered probabilities at every temperature of ``grid``."""
    logits = logits.double() if logits.dim() == 3 else logits.double().unsqueeze(0)
    probs = (logits.unsqueeze(0) / grid.view(-1, 1, 1, 1)).softmax(-1).mean(1)
    return -probs[:, torch.arange(len(labels)), labels].log().mean(-1)


def brute_force_minimum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The grid minimum of the NLL over T: a coarse grid (step 0.01 on [0.05, 10]), then a
    grid of step 1e-5 around its best point."""
    coarse = torch.arange(0.05, 10.0, 0.01, dtype=torch.float64)
    best = float(coarse[nll_on_grid(logits, labels, coarse).argmin()])
    fine = torch.arange(best - 0.011, best + 0.011, 1e-5, dtype=torch.float64)
    values = torch.cat([nll_on_grid(logits, labels, part) for part in fine.split(200)])
    index = int(values.argmin())
    return float(fine[index]), float(values[index])


@pytest.mark.parametrize("passes", [None, 6])
def test_fitted_temperature_is_the_grid_minimum_of_the_nll(passes: int | None) -> None:
    logits, labels = overconfident(300, 5, passes, seed=1)
    fitted = fit_temperature(logits, labels)
    grid_t, grid_nll = brute_force_minimum(logits, labels)
    assert abs(fitted - grid_t) < 1e-3
    assert temperature_nll(logits, labels, fitted) <= grid_nll + 1e-9
    assert 1.4 < fitted < 2.8  # the logits were made twice as sharp as the labels' distribution


def test_temperature_of_mc_logits_averages_probabilities_not_logits() -> None:
    # Two passes that disagree completely: the mean of their logits is uninformative, the
    # mean of their probabilities is not; the NLL is that of the averaged probabilities.
    logits = torch.tensor([[[4.0, 0.0]], [[0.0, 4.0]]])
    labels = torch.tensor([0])
    first, second = torch.tensor([4.0, 0.0]).softmax(0)[0], torch.tensor([0.0, 4.0]).softmax(0)[0]
    expected = -math.log(0.5 * (first + second))
    assert temperature_nll(logits, labels, 1.0) == pytest.approx(expected)


def test_finite_sample_quantile_and_sets_match_the_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(9, 4, generator=g).softmax(-1)
    labels = torch.randint(0, 4, (9,), generator=g)
    true_scores = 1.0 - probs[torch.arange(9), labels]
    # n = 9, alpha = 0.1: ceil(10 * 0.9) = 9, the largest score; alpha = 0.3: ceil(7) = 7th.
    assert conformal_threshold(probs, labels, 0.1, "lac") == pytest.approx(float(true_scores.max()))
    seventh = float(true_scores.sort().values[6])
    assert conformal_threshold(probs, labels, 0.3, "lac") == pytest.approx(seventh)
    # n = 5, alpha = 0.1: ceil(5.4) = 6 > 5, so no finite threshold covers.
    assert conformal_threshold(probs[:5], labels[:5], 0.1, "lac") == math.inf
    for method in ("aps", "raps", "lac"):
        threshold = conformal_threshold(probs, labels, 0.3, method, torch.Generator().manual_seed(3))
        sets = prediction_sets(probs, threshold, method, torch.Generator().manual_seed(4))
        scores = conformal_scores(probs, method, torch.Generator().manual_seed(4))
        assert torch.equal(sets, scores <= threshold)


def test_aps_and_raps_scores_follow_the_papers() -> None:
    probs = torch.tensor([[0.1, 0.6, 0.3]])
    u = torch.rand(1, 1, generator=torch.Generator().manual_seed(5)).item()
    aps = conformal_scores(probs, "aps", torch.Generator().manual_seed(5))
    # ranks: class 1 (0.6), class 2 (0.3), class 0 (0.1); mass above plus u times its own
    assert aps.tolist()[0] == pytest.approx([0.9 + u * 0.1, u * 0.6, 0.6 + u * 0.3])
    raps = conformal_scores(probs, "raps", torch.Generator().manual_seed(5), lam=0.5, k_reg=1)
    assert raps.tolist()[0] == pytest.approx([0.9 + u * 0.1 + 1.0, u * 0.6, 0.6 + u * 0.3 + 0.5])


def exchangeable(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities of an overconfident classifier and labels drawn from a softer truth."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g)
    logits[torch.arange(n), labels] += 4.0
    return (1.3 * logits).softmax(-1), labels


SPLITS, N_CAL, N_TEST = 60, 500, 500


@pytest.mark.parametrize("method", ["aps", "raps", "lac"])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_coverage_is_at_least_one_minus_alpha_within_three_sigmas(method: str, alpha: float) -> None:
    probs, labels = exchangeable(20_000, 20, seed=7)
    g = torch.Generator().manual_seed(11)
    coverage = []
    for split in range(SPLITS):
        chosen = torch.randperm(len(labels), generator=g)[: N_CAL + N_TEST]
        cal, test = chosen[:N_CAL], chosen[N_CAL:]
        u = torch.Generator().manual_seed(split)
        threshold = conformal_threshold(probs[cal], labels[cal], alpha, method, u)
        coverage.append(float(set_coverage(prediction_sets(probs[test], threshold, method, u), labels[test])))
    mean = sum(coverage) / SPLITS
    # The average of SPLITS resplits: a split's coverage varies with its calibration set
    # (Beta, variance ~ alpha(1 - alpha) / N_CAL) and its test set (binomial, / N_TEST).
    sigma = math.sqrt(alpha * (1 - alpha) * (1 / N_CAL + 1 / N_TEST) / SPLITS)
    assert mean >= 1 - alpha - 3 * sigma
    # Continuous (randomised) scores make the coverage exact: at most 1 - alpha + 1 / (n + 1).
    assert mean <= 1 - alpha + 1 / (N_CAL + 1) + 3 * sigma


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_raps_sets_are_not_larger_than_aps_sets_on_average(alpha: float) -> None:
    # Many classes with a long tail of small probabilities: the regime RAPS was made for.
    probs, labels = exchangeable(4_000, 100, seed=3)
    g = torch.Generator().manual_seed(5)
    sizes = {"aps": 0.0, "raps": 0.0}
    for split in range(8):
        chosen = torch.randperm(len(labels), generator=g)[:2000]
        cal, test = chosen[:1000], chosen[1000:]
        for method in sizes:
            u = torch.Generator().manual_seed(split)
            threshold = conformal_threshold(probs[cal], labels[cal], alpha, method, u)
            sizes[method] += float(set_size(prediction_sets(probs[test], threshold, method, u)))
    assert sizes["raps"] <= sizes["aps"]


def test_set_metrics_accumulate_like_the_functions() -> None:
    g = torch.Generator().manual_seed(0)
    sets = torch.rand(30, 5, generator=g) > 0.5
    labels = torch.randint(0, 5, (30,), generator=g)
    coverage, size = SetCoverage(), SetSize()
    for rows in (slice(0, 7), slice(7, 7), slice(7, 30)):
        coverage.update(sets[rows], labels[rows])
        size.update(sets[rows])
    assert coverage.compute().item() == pytest.approx(set_coverage(sets, labels).item())
    assert size.compute().item() == pytest.approx(set_size(sets).item())


def test_bad_arguments_name_themselves() -> None:
    probs, labels = torch.full((4, 3), 1 / 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="alpha"):
        conformal_threshold(probs, labels, 1.0)
    with pytest.raises(ValueError, match="method"):
        conformal_threshold(probs, labels, 0.1, method="naive")
    with pytest.raises(ValueError, match="targets"):
        conformal_threshold(probs, torch.tensor([0, 1, 5, 0]), 0.1)
    with pytest.raises(ValueError, match="probs"):
        prediction_sets(torch.ones(3), 0.5)
    with pytest.raises(TypeError, match="threshold"):
        prediction_sets(probs, "0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(torch.ones(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="targets"):
        fit_temperature(torch.ones(3, 2), torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="k_reg"):
        conformal_scores(probs, "raps", k_reg=-1)
    with pytest.raises(ValueError, match="lam"):
        conformal_scores(probs, "raps", lam=-0.1)
    with pytest.raises(ValueError, match="sets"):
        set_size(torch.ones(2, 2))
