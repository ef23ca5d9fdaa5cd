"""What the demo measures: per-epoch error and NLL of the classifiers, the autoencoders'
feature shapes, and differences paired by seed with their confidence interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_dropout._validation import check_probability


def lag1_autocorrelation(filters: Tensor) -> Tensor:
    """Lag-1 spatial autocorrelation of each 2-D filter, its mean removed: "strokes, not noise".

    The mean product of horizontally and vertically adjacent values over the mean square,
    both after subtracting the filter's own mean. Independent pixel noise gives about 0, a
    smooth stroke close to 1, a checkerboard -1. Scaling a filter leaves it unchanged.

    Args:
        filters: ``[U, H, W]`` filters (H and W at least 2).

    Raises:
        ValueError: ``filters`` is not 3-D with both spatial sides at least 2.

    Example:
        >>> board = ((torch.arange(6).view(6, 1) + torch.arange(6)) % 2).float().unsqueeze(0)
        >>> lag1_autocorrelation(board)
        tensor([-1.])
        >>> ramp = torch.arange(6.0).view(1, 6).expand(6, 6).unsqueeze(0)
        >>> round(float(lag1_autocorrelation(ramp)), 3)
        0.8
    """
    if filters.dim() != 3 or filters.shape[1] < 2 or filters.shape[2] < 2:
        raise ValueError(f"filters must be [U, H, W] with H, W >= 2, got shape {tuple(filters.shape)}")
    centred = filters.double() - filters.double().mean((1, 2), keepdim=True)
    across = (centred[:, :, 1:] * centred[:, :, :-1]).sum((1, 2))
    down = (centred[:, 1:, :] * centred[:, :-1, :]).sum((1, 2))
    _, height, width = filters.shape
    pairs = height * (width - 1) + (height - 1) * width
    mean_square = centred.square().mean((1, 2)).clamp_min(1e-300)
    return ((across + down) / pairs / mean_square).to(filters.dtype)


def top_energy_share(filters: Tensor, fraction: float = 0.05) -> Tensor:
    """The share of each filter's energy (sum of squared weights) in its strongest pixels.

    Localisation: 1 when a few pixels hold everything, ``fraction`` when the energy is
    spread evenly. The strongest ``round(fraction * pixels)`` pixels count (at least one).

    Args:
        filters: ``[U, ...]`` filters, one per row.
        fraction: the share of pixels that counts as "top", in (0, 1].

    Raises:
        ValueError: ``fraction`` outside (0, 1].

    Example:
        >>> top_energy_share(torch.ones(1, 20)), top_energy_share(torch.eye(20)[:1])
        (tensor([0.0500]), tensor([1.]))
    """
    if not check_probability("fraction", fraction) > 0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    energy = filters.flatten(1).square()
    top = max(1, round(fraction * energy.shape[1]))
    return energy.topk(top, dim=1).values.sum(1) / energy.sum(1).clamp_min(1e-30)


def dead_units(acts: Tensor) -> int:
    """Units (columns of ``[N, U]`` activations) that are zero on every example.

    Example:
        >>> dead_units(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]))
        1
    """
    return int((acts.amax(0) <= 0).sum())


@dataclass(frozen=True)
class PairedDifference:
    """The mean of paired differences, its 95% t-interval and how many are below zero."""

    mean: float
    low: float
    high: float
    negative: int
    count: int

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}], {self.negative}/{self.count} lower"


def paired_difference(
    values: Sequence[float], baseline: Sequence[float], confidence: float = 0.95
) -> PairedDifference:
    """``values - baseline`` paired by position: mean, Student-t confidence interval, count below 0.

    With one pair the interval is the single difference itself (no spread to estimate).

    Args:
        values: one number per seed.
        baseline: the same seeds' numbers of the model compared with.
        confidence: the interval's coverage, in (0, 1).

    Raises:
        ValueError: empty or unequal lengths, or ``confidence`` outside (0, 1).

    Example:
        >>> str(paired_difference([1.0, 2.0, 3.0], [2.0, 2.5, 4.0]))
        '-0.833 [-1.550, -0.116], 3/3 lower'
    """
    if not values or len(values) != len(baseline):
        raise ValueError(
            f"values and baseline must be non-empty and paired, got {len(values)} and {len(baseline)}"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diffs = [a - b for a, b in zip(values, baseline, strict=True)]
    mean = statistics.fmean(diffs)
    half = 0.0
    if len(diffs) > 1:
        from scipy.stats import t

        half = (
            float(t.ppf((1 + confidence) / 2, len(diffs) - 1))
            * statistics.stdev(diffs)
            / math.sqrt(len(diffs))
        )
    return PairedDifference(mean, mean - half, mean + half, sum(d < 0 for d in diffs), len(diffs))


@dataclass
class ClassifierRun:
    """One trained classifier: per-epoch test error and NLL, the last epoch's training NLL
    (all in evaluation mode)."""

    model: str
    seed: int
    test_error_curve: list[float] = field(default_factory=list)
    test_nll_curve: list[float] = field(default_factory=list)
    train_nll_last: float = math.nan

    @property
    def test_error(self) -> float:
        """Test error after the last epoch."""
        return self.test_error_curve[-1]

    @property
    def test_nll_last(self) -> float:
        """Test NLL after the last epoch."""
        return self.test_nll_curve[-1]

    @property
    def test_nll_best(self) -> float:
        """The lowest test NLL over the epochs: what an oracle stopping on the test set gets."""
        return min(self.test_nll_curve)

    @property
    def best_epoch(self) -> int:
        """The epoch (from 1) of the lowest test NLL."""
        return self.test_nll_curve.index(self.test_nll_best) + 1

    @property
    def nll_gap_last(self) -> float:
        """Test NLL minus training NLL after the last epoch: the fit that does not generalise."""
        return self.test_nll_curve[-1] - self.train_nll_last

    def metrics(self) -> dict[str, float | list[float]]:
        """The numbers ``results.json`` keeps for this run."""
        return {
            "test_error": self.test_error,
            "test_nll_last": self.test_nll_last,
            "test_nll_best": self.test_nll_best,
            "nll_gap_last": self.nll_gap_last,
            "test_nll_curve": list(self.test_nll_curve),
        }


@torch.no_grad()
def error_and_nll(model: torch.nn.Module, inputs: Tensor, targets: Tensor) -> tuple[float, float]:
    """Error rate and mean NLL (nats) of ``model`` on ``inputs``, in evaluation mode; the
    model's mode is restored afterwards.

    Example:
        >>> error_and_nll(torch.nn.Linear(2, 3), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))[0] <= 1
        True
    """
    was_training = model.training
    model.eval()
    try:
        logits = model(inputs)
    finally:
        model.train(was_training)
    return float((logits.argmax(1) != targets).float().mean()), float(F.cross_entropy(logits, targets))


class EpochCurves(pl.Callback):
    """After every training epoch, measure the whole test split in evaluation mode, append
    to ``run``'s curves and log ``test/nll`` and ``test/error`` (step: the epoch, from 1) to
    every logger; when training ends, the training split's NLL too (``train/nll``).

    Args:
        run: where the curves are kept.
        train: training ``(inputs, targets)``.
        test: test ``(inputs, targets)``.
    """

    def __init__(self, run: ClassifierRun, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]) -> None:
        self.run = run
        self.train = train
        self.test = test

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=len(self.run.test_nll_curve))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        error, nll = error_and_nll(pl_module, *(t.to(pl_module.device) for t in self.test))
        self.run.test_error_curve.append(error)
        self.run.test_nll_curve.append(nll)
        self._log(trainer, {"test/nll": nll, "test/error": error})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Once: measuring the training split every epoch would cost as much as its training.
        self.run.train_nll_last = error_and_nll(pl_module, *(t.to(pl_module.device) for t in self.train))[1]
        self._log(trainer, {"train/nll": self.run.train_nll_last})
