"""The uncertainty metrics against direct computations on small known cases."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from lightning_dropout.metrics import (
    BrierScore,
    GaussianNLL,
    IntervalCoverage,
    NegativeLogLikelihood,
    ReliabilityDiagram,
)

PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.05, 0.05, 0.9]])
TARGET = torch.tensor([0, 2, 2, 1])


def test_nll_and_brier_by_hand_and_streamed() -> None:
    nll, brier = NegativeLogLikelihood(), BrierScore()
    for rows in (slice(0, 1), slice(1, 4)):  # two updates give the one-batch value
        nll.update(PROBS[rows], TARGET[rows])
        brier.update(PROBS[rows], TARGET[rows])
    expected_nll = -(math.log(0.7) + math.log(0.3) + math.log(0.4) + math.log(0.05)) / 4
    assert nll.compute().item() == pytest.approx(expected_nll)
    rows = [
        0.3**2 + 0.2**2 + 0.1**2,
        0.1**2 + 0.6**2 + 0.7**2,
        0.3**2 + 0.3**2 + 0.6**2,
        0.05**2 + 0.95**2 + 0.9**2,
    ]
    assert brier.compute().item() == pytest.approx(sum(rows) / 4)
    # A probability of zero costs a large but finite NLL.
    zero = NegativeLogLikelihood()
    zero.update(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert math.isfinite(zero.compute().item()) and zero.compute().item() > 80


def test_gaussian_nll_equals_torchs_full_gaussian_nll() -> None:
    g = torch.Generator().manual_seed(0)
    mean, target = torch.randn(50, generator=g), torch.randn(50, generator=g)
    variance = torch.rand(50, generator=g) + 0.1
    metric = GaussianNLL()
    metric.update(mean, variance, target)
    expected = torch.nn.functional.gaussian_nll_loss(mean, target, variance, full=True, eps=0.0)
    assert metric.compute().item() == pytest.approx(expected.item(), rel=1e-6)


def test_interval_coverage_by_hand_and_on_calibrated_gaussians() -> None:
    metric = IntervalCoverage(0.9)
    # The 90% half-width of N(0, 1) is 1.6449.
    metric.update(torch.zeros(4), torch.ones(4), torch.tensor([1.64, -1.65, 0.0, 3.0]))
    assert metric.compute().item() == 0.5
    calibrated = IntervalCoverage(0.9)
    n = 20000
    std = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 3 + 0.1
    target = std * torch.randn(n, generator=torch.Generator().manual_seed(2))
    calibrated.update(torch.zeros(n), std**2, target)
    # Binomial sd sqrt(0.9 * 0.1 / n) = 0.0021; 5 sigma.
    assert abs(calibrated.compute().item() - 0.9) < 5 * math.sqrt(0.09 / n)
    with pytest.raises(ValueError, match="level"):
        IntervalCoverage(1.0)


def test_reliability_bins_by_hand() -> None:
    diagram = ReliabilityDiagram(n_bins=4)
    diagram.update(PROBS, TARGET)
    result = diagram.compute()
    # Confidences 0.7, 0.6, 0.4, 0.9 -> bins 2, 2, 1, 3; correct: yes, no, yes, no.
    assert result["count"].tolist() == [0, 1, 2, 1]
    assert result["accuracy"].tolist() == [0, 1, 0.5, 0]
    torch.testing.assert_close(result["confidence"], torch.tensor([0, 0.4, 0.65, 0.9], dtype=torch.float64))
    expected_ece = (1 * 0.6 + 2 * 0.15 + 1 * 0.9) / 4
    assert ReliabilityDiagram.calibration_error(result).item() == pytest.approx(expected_ece)


def test_the_diagram_gives_torchmetrics_calibration_error() -> None:
    g = torch.Generator().manual_seed(3)
    probs = (torch.randn(500, 10, generator=g) * 2).softmax(-1)
    target = torch.randint(0, 10, (500,), generator=g)
    diagram, ece = ReliabilityDiagram(15), MulticlassCalibrationError(10, n_bins=15)
    for chunk in range(0, 500, 128):
        diagram.update(probs[chunk : chunk + 128], target[chunk : chunk + 128])
        ece.update(probs[chunk : chunk + 128], target[chunk : chunk + 128])
    ours = ReliabilityDiagram.calibration_error(diagram.compute()).item()
    assert ours == pytest.approx(ece.compute().item(), abs=1e-6)
