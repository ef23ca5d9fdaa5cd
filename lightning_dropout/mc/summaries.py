"""The summaries of Monte-Carlo passes: :class:`MCOutput` and the streaming :func:`summarize`.

For class logits the summaries are computed on the softmax probabilities: ``mean`` is the
predictive distribution, ``entropy`` its entropy (total uncertainty) and
``mutual_information`` the entropy minus the mean entropy of the passes (BALD, the
epistemic part; Houlsby et al. 2011). For a model that predicts a Gaussian (a mean and a
log-variance, ``output="gaussian"``) the predictive variance splits into the mean of the
predicted variances (aleatoric) and the variance of the predicted means (epistemic;
Kendall & Gal, NeurIPS 2017). ``standard_error`` is the Monte-Carlo standard error of
``mean``: whether the number of passes suffices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_dropout._validation import check_choice, check_int

OUTPUT_KINDS = ("logits", "probs", "regression", "gaussian")


@dataclass
class MCOutput:
    """The summary of ``n_samples`` stochastic forward passes.

    For ``output="regression"`` the statistics are over the raw outputs; for ``"logits"``
    and ``"probs"`` over the class probabilities (softmax of the logits along the class
    dimension), so ``mean`` is the predictive distribution. For ``"gaussian"`` each pass
    predicts a mean and a log-variance (a last dimension of size 2); the statistics are
    over the predicted means and variances, shaped like one output without that last
    dimension.

    Attributes:
        mean: mean over the passes, shaped like one output.
        variance: variance over the passes (the 1/n Monte-Carlo estimate), same shape; for
            ``"gaussian"`` the predictive variance, ``aleatoric + epistemic``.
        entropy: predictive entropy of ``mean`` in nats, the output's shape without the
            class dimension; None for regression.
        mutual_information: ``entropy`` minus the mean entropy of the passes (BALD), same
            shape; None for regression.
        samples: every pass's output (probabilities for classification; the raw mean and
            log-variance for ``"gaussian"``), shaped ``(n_samples, *output.shape)``, if
            requested; else None.
        n_samples: the number of passes.
        aleatoric: the part of the uncertainty the passes agree on. ``"gaussian"``: the
            mean of the predicted variances; classification: the mean entropy of the passes
            (so ``entropy = aleatoric + epistemic``); None for ``"regression"``.
        epistemic: the part the passes disagree on. ``"gaussian"``: the variance of the
            predicted means; classification: ``mutual_information``; ``"regression"``:
            ``variance``.
        standard_error: the Monte-Carlo standard error of ``mean``,
            ``sqrt(s^2 / n_samples)`` with ``s^2`` the unbiased variance of the passes
            (of the predicted means for ``"gaussian"``), shaped like ``mean``; infinite for
            a single pass. Small against the differences that matter: enough passes.
        temperature: the temperature the logits were divided by before the softmax
            (:func:`lightning_dropout.calibration.fit_temperature`), or None.
        sets: conformal prediction sets, a boolean ``[N, C]`` mask of the classes in each
            input's set (:func:`lightning_dropout.calibration.prediction_sets`), or None.

    Example:
        >>> out = MCOutput.from_samples(torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]]))
        >>> out.mean
        tensor([[0.5000, 0.5000]])
        >>> round(out.entropy.item(), 4), out.mutual_information.item() > 0
        (0.6931, True)
    """

    mean: Tensor
    variance: Tensor
    entropy: Tensor | None = None
    mutual_information: Tensor | None = None
    samples: Tensor | None = None
    n_samples: int = 0
    aleatoric: Tensor | None = None
    epistemic: Tensor | None = None
    standard_error: Tensor | None = None
    temperature: float | None = None
    sets: Tensor | None = None

    @classmethod
    def from_samples(
        cls, samples: Tensor, output: str = "logits", class_dim: int = -1, return_samples: bool = False
    ) -> MCOutput:
        """Summarise ``samples`` of shape ``(n_samples, *output_shape)``.

        Args:
            samples: the passes' outputs stacked along dimension 0.
            output: ``"logits"``, ``"probs"``, ``"regression"`` or ``"gaussian"``.
            class_dim: the class dimension of one output (not counting the sample one).
            return_samples: keep the (probability) samples in the result.

        Raises:
            ValueError: an unknown ``output``, a class dimension of size 1, or a
                ``"gaussian"`` output whose last dimension is not 2.
        """
        return summarize([samples], output, class_dim, return_samples)

    def log_mean(self) -> Tensor:
        """The MC prediction as one tensor a loss or metric can take like a plain output.

        The log of the predictive distribution for classification (valid logits:
        ``argmax`` and ``cross_entropy`` see the MC prediction); for ``"gaussian"`` the
        predictive mean and the log of the predictive variance stacked along a last
        dimension (the model's own output format); ``mean`` for regression.
        """
        if self.entropy is not None:
            return self.mean.clamp_min(torch.finfo(self.mean.dtype).tiny).log()
        if self.aleatoric is not None:
            return torch.stack([self.mean, self.variance.log()], -1)
        return self.mean


def summarize(
    chunks: Iterable[Tensor], output: str = "logits", class_dim: int = -1, return_samples: bool = False
) -> MCOutput:
    """Summarise chunks of samples, each shaped ``(k, *output_shape)``, into an :class:`MCOutput`.

    Streaming: only the running statistics (and the samples, if kept) are held.

    Args:
        chunks: the passes' outputs, chunk by chunk (as :func:`mc_samples` yields them).
        output: ``"logits"``, ``"probs"``, ``"regression"`` or ``"gaussian"``.
        class_dim: the class dimension of one output.
        return_samples: keep the (probability) samples in the result.

    Raises:
        TypeError: ``class_dim`` is not an int.
        ValueError: an unknown ``output``, a class dimension of size 1, a ``"gaussian"``
            output whose last dimension is not 2, or no samples.

    Example:
        >>> out = summarize([torch.ones(2, 3, 1), torch.zeros(2, 3, 1)], output="regression")
        >>> out.mean.flatten().tolist(), out.variance.flatten().tolist(), out.n_samples
        ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25], 4)
        >>> means_and_log_variances = torch.tensor([[[1.0, 0.0]], [[3.0, 0.0]]])
        >>> g = summarize([means_and_log_variances], output="gaussian")
        >>> g.mean.item(), g.aleatoric.item(), g.epistemic.item(), g.variance.item()
        (2.0, 1.0, 1.0, 2.0)
    """
    summary = RunningSummary(check_choice("output", output, OUTPUT_KINDS), class_dim, return_samples)
    for samples in chunks:
        summary.update(samples)
    return summary.result()


class RunningSummary:
    """Streaming mean, variance and entropies over chunks of samples (Chan et al.'s merge),
    so that only the requested samples are ever kept."""

    def __init__(self, output: str, class_dim: int, return_samples: bool) -> None:
        self.output = output
        self.class_dim = check_int("class_dim", class_dim)
        self.return_samples = return_samples
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.entropy_sum: Tensor | None = None
        self.variance_sum: Tensor | None = None
        self.kept: list[Tensor] = []

    def update(self, samples: Tensor) -> None:
        if self.return_samples and self.output == "gaussian":
            self.kept.append(samples)
        if self.output == "gaussian":
            if samples.dim() < 2 or samples.shape[-1] != 2:
                raise ValueError(
                    "output='gaussian' needs a mean and a log-variance per output (a last dimension "
                    f"of size 2, or a pair of tensors), got passes of shape {tuple(samples.shape[1:])}"
                )
            variances = samples[..., 1].exp().sum(0)
            self.variance_sum = variances if self.variance_sum is None else self.variance_sum + variances
            samples = samples[..., 0]
        elif self.output != "regression":
            dim = self.class_dim if self.class_dim < 0 else self.class_dim + 1
            if samples.shape[dim] == 1:
                raise ValueError(
                    f"class_dim {self.class_dim} has size 1: a single output cannot be class "
                    "probabilities; use output='regression'"
                )
            if self.output == "logits":
                samples = samples.softmax(dim)
            entropies = _entropy(samples, dim).sum(0)
            self.entropy_sum = entropies if self.entropy_sum is None else self.entropy_sum + entropies
        k = samples.shape[0]
        chunk_mean = samples.mean(0)
        chunk_m2 = ((samples - chunk_mean) ** 2).sum(0)
        if self.mean is None or self.m2 is None:
            self.mean, self.m2 = chunk_mean, chunk_m2
        else:
            total = self.count + k
            delta = chunk_mean - self.mean
            self.mean = self.mean + delta * (k / total)
            self.m2 = self.m2 + chunk_m2 + delta**2 * (self.count * k / total)
        self.count += k
        if self.return_samples and self.output != "gaussian":
            self.kept.append(samples)

    def max_standard_error(self) -> float:
        """The largest Monte-Carlo standard error of the mean so far (infinite below 2 passes)."""
        if self.m2 is None or self.count < 2:
            return math.inf
        return float((self.m2.max() / (self.count * (self.count - 1))).sqrt())

    def result(self) -> MCOutput:
        if self.mean is None or self.m2 is None:
            raise ValueError("no samples to summarise")
        spread = self.m2 / self.count
        if self.count > 1:
            standard_error = (self.m2 / (self.count * (self.count - 1))).sqrt()
        else:
            standard_error = torch.full_like(self.mean, math.inf)
        out = MCOutput(self.mean, spread, n_samples=self.count, standard_error=standard_error)
        if self.entropy_sum is not None:
            out.entropy = _entropy(self.mean, self.class_dim)
            out.aleatoric = self.entropy_sum / self.count
            out.mutual_information = (out.entropy - out.aleatoric).clamp_min(0.0)
            out.epistemic = out.mutual_information
        elif self.variance_sum is not None:
            out.aleatoric = self.variance_sum / self.count
            out.epistemic = spread
            out.variance = out.aleatoric + spread
        else:
            out.epistemic = spread
        if self.return_samples:
            out.samples = torch.cat(self.kept)
        return out


def _entropy(probs: Tensor, dim: int) -> Tensor:
    # xlogy gives 0 * log 0 = 0.
    return -torch.special.xlogy(probs, probs).sum(dim)


__all__ = ["OUTPUT_KINDS", "MCOutput", "RunningSummary", "summarize"]
