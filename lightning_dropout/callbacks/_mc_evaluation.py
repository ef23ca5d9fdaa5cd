"""What MCDropout measures in the test and validation loops, and the reliability diagram.

One :class:`MCEvaluation` per loop gathers torchmetrics Metrics (DDP-synced when they
compute) for the Monte-Carlo prediction and for the deterministic (eval-mode) forward of
the same batch, so the two can be compared:

- classification: accuracy, NLL, Brier score, ECE (torchmetrics' calibration error) and
  a reliability diagram of each; histograms of the MC entropy and BALD;
- ``"gaussian"`` and ``"regression"``: Gaussian NLL, coverage of the central 90%
  interval and mean squared error (the deterministic forward of a plain regressor has
  no variance: only its error); histograms of the aleatoric and epistemic parts;
- the mean Monte-Carlo standard error of the MC mean (and, for ``n_samples="auto"``, the
  mean number of passes);
- with calibration fitted: NLL, Brier score and ECE of the tempered MC prediction
  (``mc_ts``) and of the tempered deterministic forward (``det_ts``), and the coverage and
  mean size of the conformal sets;
- out-of-distribution detection (test dataloader ``ood_dataloader_idx`` against the
  others): AUROC of the entropy and of BALD (of the predictive and epistemic variance
  for regression), and the false-positive rate at 95% true positives (FPR95) of the
  entropy (variance), torchmetrics' ``BinaryAUROC`` and ``BinarySpecificityAtSensitivity``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchmetrics import CatMetric, MeanMetric, MeanSquaredError, Metric, SumMetric
from torchmetrics.classification import (
    BinaryAUROC,
    BinarySpecificityAtSensitivity,
    MulticlassAccuracy,
    MulticlassCalibrationError,
)

from lightning_dropout.mc import MCOutput
from lightning_dropout.metrics.sets import SetCoverage, SetSize
from lightning_dropout.metrics.uncertainty import (
    BrierScore,
    GaussianNLL,
    IntervalCoverage,
    NegativeLogLikelihood,
    ReliabilityDiagram,
)

COVERAGE_LEVEL = 0.9
OOD_RECALL = 0.95


@dataclass
class Results:
    """One loop's measurements: scalars by tag suffix (``"mc/accuracy"``), reliability
    diagrams by prediction (``"mc"``, ``"det"``), histogram values by tag suffix."""

    scalars: dict[str, float] = field(default_factory=dict)
    diagrams: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    histograms: dict[str, Tensor] = field(default_factory=dict)


class MCEvaluation:
    """The metrics of one loop, created on first use on the batch's device.

    Args:
        output: the MC output kind (``"logits"``, ``"probs"``, ``"regression"``, ``"gaussian"``).
        class_dim: the class dimension of one output.
        n_bins: calibration bins.
        count_passes: measure the mean number of passes per batch (``mc/n_samples``).
    """

    def __init__(self, output: str, class_dim: int, n_bins: int, count_passes: bool = False) -> None:
        self.output = output
        self.class_dim = class_dim
        self.n_bins = n_bins
        self.count_passes = count_passes
        self.metrics: dict[str, Metric] = {}

    @property
    def classification(self) -> bool:
        return self.output in ("logits", "probs")

    def _metric(self, name: str, make: Callable[[], Metric], device: torch.device) -> Metric:
        metric = self.metrics.get(name)
        if metric is None:
            metric = self.metrics[name] = make().to(device)
        return metric

    def update(
        self,
        mc: MCOutput,
        det: Tensor | None,
        target: Tensor | None,
        ood: bool | None,
        calibrated: MCOutput | None = None,
        det_temperature: float | None = None,
        sets: Tensor | None = None,
    ) -> None:
        """Add one batch.

        Args:
            mc: the batch's Monte-Carlo summary.
            det: the deterministic forward's output (logits, probabilities, a mean and a
                log-variance stacked along the last dimension, or the regression output),
                or None.
            target: the batch's targets, checked against the output (see :meth:`targets`),
                or None when the batch is out of distribution or has none.
            ood: whether the batch is out of distribution; None when no OOD set is given.
            calibrated: the tempered MC summary (``mc_ts``), or None.
            det_temperature: the deterministic forward's temperature (``det_ts``), or None.
            sets: the conformal sets of the batch, the class dimension last, or None.
        """
        device = mc.mean.device
        scores = self._scores(mc)
        names = self.score_names
        if ood is not None:
            # torchmetrics reads scores outside [0, 1] as logits and applies a sigmoid, batch by
            # batch; s / (1 + s) maps the non-negative scores into [0, 1) in the same order, in
            # float64 so that large variances stay apart.
            ranked = [(score.double() / (1.0 + score.double())).clamp_min(0.0) for score in scores]
            label = torch.full_like(scores[0], float(ood)).long()
            self._metric(f"count/{'out' if ood else 'in'}", SumMetric, device).update(label.numel())
            for name, score in zip(names, ranked, strict=True):
                self._metric(f"mc/ood_auroc_{name}", BinaryAUROC, device).update(score, label)
            recall = OOD_RECALL
            fpr = self._metric(
                f"mc/ood_fpr95_{names[0]}", lambda: BinarySpecificityAtSensitivity(recall), device
            )
            fpr.update(ranked[0], label)
        prefix = "mc/ood_" if ood else "mc/"
        for name, score in zip(names, scores, strict=True):
            self._metric(f"histogram/{prefix}{name}", CatMetric, device).update(score)
        if ood:
            return
        if self.count_passes:
            self._metric("mc/n_samples", MeanMetric, device).update(float(mc.n_samples))
        if mc.standard_error is not None:
            finite = mc.standard_error[torch.isfinite(mc.standard_error)]
            if finite.numel():
                self._metric("mc/standard_error", MeanMetric, device).update(finite)
        if target is None:
            return
        if self.classification:
            self._update_classification("mc", self._rows(mc.mean), target, device)
            if det is not None:
                probs = det.softmax(self.class_dim) if self.output == "logits" else det
                self._update_classification("det", self._rows(probs), target, device)
            if calibrated is not None:
                self._update_classification("mc_ts", self._rows(calibrated.mean), target, device, full=False)
            if det is not None and det_temperature is not None:
                logits = det if self.output == "logits" else det.clamp_min(torch.finfo(det.dtype).tiny).log()
                probs = (logits / det_temperature).softmax(self.class_dim)
                self._update_classification("det_ts", self._rows(probs), target, device, full=False)
            if sets is not None:
                rows = sets.reshape(-1, sets.shape[-1])
                self._metric("mc/coverage", SetCoverage, device).update(rows, target.to(device))
                self._metric("mc/set_size", SetSize, device).update(rows)
        else:
            self._update_regression("mc", mc.mean, mc.variance, target, device)
            if det is not None:
                if self.output == "gaussian":
                    self._update_regression("det", det[..., 0], det[..., 1].exp(), target, device)
                else:
                    self._metric("det/mse", MeanSquaredError, device).update(
                        det.reshape(target.shape), target
                    )

    @property
    def score_names(self) -> tuple[str, str]:
        """The names of the two uncertainty scores: total, then epistemic."""
        return ("entropy", "bald") if self.classification else ("variance", "epistemic")

    def _scores(self, mc: MCOutput) -> tuple[Tensor, Tensor]:
        if self.classification:
            assert mc.entropy is not None and mc.mutual_information is not None
            return mc.entropy.flatten().float(), mc.mutual_information.flatten().float()
        epistemic = mc.epistemic if mc.epistemic is not None else mc.variance
        return mc.variance.flatten().float(), epistemic.flatten().float()

    def _rows(self, probs: Tensor) -> Tensor:
        return class_rows(probs, self.class_dim).float()

    def targets(self, mc: MCOutput, target: object) -> tuple[Tensor | None, str | None]:
        """``target`` shaped for :meth:`update`, or None with the reason it does not fit."""
        return shaped_targets(self.output, self.class_dim, mc, target)

    def _update_classification(
        self, which: str, probs: Tensor, target: Tensor, device: torch.device, full: bool = True
    ) -> None:
        # ``full=False`` (a tempered prediction): the scores temperature changes, no diagram.
        classes, bins = probs.shape[-1], self.n_bins
        target = target.to(device)
        metrics: dict[str, Callable[[], Metric]] = {
            "nll": NegativeLogLikelihood,
            "brier": BrierScore,
            "ece": lambda: MulticlassCalibrationError(classes, n_bins=bins),
        }
        if full:
            metrics["accuracy"] = lambda: MulticlassAccuracy(classes, average="micro")
        for name, make in metrics.items():
            self._metric(f"{which}/{name}", make, device).update(probs, target)
        if full:
            self._metric(f"diagram/{which}", lambda: ReliabilityDiagram(bins), device).update(probs, target)

    def _update_regression(
        self, which: str, mean: Tensor, variance: Tensor, target: Tensor, device: torch.device
    ) -> None:
        self._metric(f"{which}/nll", GaussianNLL, device).update(mean, variance, target)
        coverage = self._metric(f"{which}/coverage90", lambda: IntervalCoverage(COVERAGE_LEVEL), device)
        coverage.update(mean, variance, target)
        self._metric(f"{which}/mse", MeanSquaredError, device).update(mean, target)

    def compute(self) -> Results:
        """Every metric's value (a collective under DDP: every rank calls it), then reset.

        The OOD scores are left out unless both in- and out-of-distribution inputs came
        (``Results.scalars`` then has no ``mc/ood_*`` entry).
        """
        results = Results()
        counts = [
            self.metrics[f"count/{side}"].compute() if f"count/{side}" in self.metrics else 0
            for side in ("in", "out")
        ]
        both_sides = all(count > 0 for count in counts)
        for name in sorted(self.metrics):
            if name.startswith("count/") or (name.startswith("mc/ood_") and not both_sides):
                continue
            value = self.metrics[name].compute()
            if name.startswith("diagram/"):
                results.diagrams[name.removeprefix("diagram/")] = value
            elif name.startswith("histogram/"):
                results.histograms[name.removeprefix("histogram/")] = value
            elif "fpr95" in name:
                results.scalars[name] = 1.0 - float(value[0])  # (specificity, threshold)
            else:
                results.scalars[name] = float(value)
        for metric in self.metrics.values():
            metric.reset()
        return results


def class_rows(values: Tensor, class_dim: int) -> Tensor:
    """``[N, C]``: the class dimension last, every other position a row.

    Example:
        >>> class_rows(torch.zeros(2, 3, 4), 1).shape
        torch.Size([8, 3])
    """
    return values.movedim(class_dim, -1).reshape(-1, values.shape[class_dim])


def shaped_targets(
    output: str, class_dim: int, mc: MCOutput, target: object
) -> tuple[Tensor | None, str | None]:
    """``target`` shaped for :meth:`MCEvaluation.update`, or None with the reason it does not fit.

    Example:
        >>> mc = MCOutput(torch.full((2, 3), 1 / 3), torch.zeros(2, 3))
        >>> shaped_targets("logits", -1, mc, torch.tensor([[0], [2]]))
        (tensor([0, 2]), None)
    """
    if not isinstance(target, Tensor):
        return None, f"the target is a {type(target).__name__}, not a tensor"
    if output in ("logits", "probs"):
        expected = mc.mean.movedim(class_dim, -1).shape[:-1]
        if target.is_floating_point() or target.is_complex():
            return None, f"classification targets must be class indices, got dtype {target.dtype}"
        if target.numel() != expected.numel():
            return (
                None,
                f"target of shape {tuple(target.shape)} for outputs of shape {tuple(mc.mean.shape)}",
            )
        return target.reshape(-1), None
    if target.numel() != mc.mean.numel():
        return (
            None,
            f"target of shape {tuple(target.shape)} for predictions of shape {tuple(mc.mean.shape)}",
        )
    return target.reshape(mc.mean.shape).to(mc.mean.device, mc.mean.dtype), None


# -- the reliability diagram -----------------------------------------------------------

# Small enough that TensorBoard's image cards show it near its own size.
WIDTH, HEIGHT = 420, 380
LEFT, RIGHT, TOP, BOTTOM = 44, 14, 62, 46
COLOURS = {"mc": (31, 119, 180), "det": (255, 127, 14)}
LABELS = {"mc": "MC", "det": "deterministic"}


def reliability_png(
    diagrams: dict[str, dict[str, Tensor]], errors: dict[str, float]
) -> tuple[bytes, int, int]:
    """A reliability diagram of each prediction side by side per bin, as PNG bytes, height, width.

    Bars: the accuracy of the predictions whose top-label confidence falls in the bin; a
    dot: their mean confidence; the diagonal: perfect calibration. The legend gives each
    prediction's ECE.

    Example:
        >>> bins = {"count": torch.tensor([0.0, 4.0]), "confidence": torch.tensor([0.0, 0.8]),
        ...         "accuracy": torch.tensor([0.0, 0.5])}
        >>> png, height, width = reliability_png({"mc": bins}, {"mc": 0.3})
        >>> png[1:4], height, width
        (b'PNG', 380, 420)
    """
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def point(x: float, y: float) -> tuple[float, float]:
        return LEFT + x * plot_w, TOP + (1.0 - y) * plot_h

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.line([point(0, tick), point(1, tick)], fill=(232, 232, 232))
        draw.text((LEFT - 6, point(0, tick)[1]), f"{tick:g}", fill="black", font=small, anchor="rm")
        draw.text((point(tick, 0)[0], TOP + plot_h + 6), f"{tick:g}", fill="black", font=small, anchor="mt")
    order = [name for name in ("mc", "det") if name in diagrams]
    share = 1.0 / max(1, len(order))
    for slot, name in enumerate(order):
        bins = diagrams[name]
        n_bins = bins["count"].numel()
        width = 1.0 / n_bins
        for index in range(n_bins):
            if bins["count"][index] <= 0:
                continue
            left = index * width + slot * width * share
            accuracy = float(bins["accuracy"][index])
            x0, y0 = point(left + 0.08 * width * share, accuracy)
            x1, y1 = point(left + 0.92 * width * share, 0.0)
            draw.rectangle([x0, y0, x1, y1], fill=COLOURS.get(name, (120, 120, 120)))
            cx, cy = point(left + 0.5 * width * share, float(bins["confidence"][index]))
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill="black")
    draw.line([point(0, 0), point(1, 1)], fill=(90, 90, 90), width=2)
    draw.rectangle([point(0, 1), point(1, 0)], outline="black")
    draw.text(
        (WIDTH / 2, 8), "Reliability: accuracy per confidence bin", fill="black", font=font, anchor="mt"
    )
    draw.text(
        (LEFT + plot_w / 2, HEIGHT - 26),
        "confidence (top-label probability)",
        fill="black",
        font=small,
        anchor="mt",
    )
    # The legend: one line under the title, outside the plot.
    x: float = LEFT
    for name in order:
        draw.rectangle([x, 28, x + 12, 40], fill=COLOURS.get(name, (120, 120, 120)))
        label = LABELS.get(name, name) + (f" ECE {errors[name]:.3f}" if name in errors else "")
        draw.text((x + 16, 27), label, fill="black", font=small)
        x += 22 + draw.textlength(label, font=small)
    draw.ellipse([x, 31, x + 6, 37], fill="black")
    draw.text((x + 10, 27), "mean confidence", fill="black", font=small)
    draw.text((6, TOP - 15), "accuracy", fill="black", font=small)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue(), HEIGHT, WIDTH


__all__ = ["MCEvaluation", "Results", "class_rows", "reliability_png", "shaped_targets"]
