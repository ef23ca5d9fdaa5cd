"""The one place Monte-Carlo passes run: :class:`MCPasses`, used by :func:`mc_predict` and
by the ``MCDropout`` callback.

It puts the chosen sites in training mode, enters consistent masks, says what cannot be
sampled, draws the passes (a fixed number, or ``n_samples="auto"``: until the Monte-Carlo
standard error of the mean is below ``tolerance`` for every output), applies a fitted
temperature and summarises.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dropout._validation import (
    check_bool,
    check_choice,
    check_int,
    check_positive,
    check_positive_int,
    check_seed,
)
from lightning_dropout.consistent_masks import ConsistentMasks
from lightning_dropout.mc.modes import (
    STRAY_DRAWS_MESSAGE,
    deterministic_prefix,
    deterministic_reason,
    inconsistent_message,
)
from lightning_dropout.mc.sampling import device_of, gaussian_step, mc_samples, seeded
from lightning_dropout.mc.summaries import OUTPUT_KINDS, MCOutput, RunningSummary
from lightning_dropout.sites import DropoutSite, find_sites, select_sites, sites_training

AUTO = "auto"
DEFAULT_TOLERANCE = 0.01
DEFAULT_MAX_SAMPLES = 1000
#: Passes drawn before ``n_samples="auto"`` first trusts the standard error: below that the
#: sample variance itself is too noisy to stop on.
MIN_AUTO_SAMPLES = 8
#: ``"auto"`` aims its next chunk at the passes the current standard error predicts, plus
#: this margin, so that it rarely needs a third look.
AUTO_MARGIN = 1.1

#: ``warn(key, message)``: the key lets a caller say each kind of problem once.
Warn = Callable[[str, str], None]


def check_n_samples(value: Any) -> int | str:
    """``value`` if it is a positive int or ``"auto"``, else raise naming ``n_samples``.

    Raises:
        TypeError: neither an int nor a string.
        ValueError: below 1, or a string other than ``"auto"``.

    Example:
        >>> check_n_samples("auto"), check_n_samples(8)
        ('auto', 8)
    """
    if isinstance(value, str):
        return check_choice("n_samples", value, (AUTO,))
    return check_positive_int("n_samples", value)


@dataclass
class PassResult:
    """What :meth:`MCPasses.run` returns.

    Attributes:
        outputs: one summary per requested temperature, in order.
        raw: every pass's raw output, ``(passes, *output_shape)``, when asked for.
    """

    outputs: list[MCOutput]
    raw: Tensor | None = None


class MCPasses:
    """Monte-Carlo passes over ``model`` with the ``chosen`` sites dropping.

    Created once for a model and its chosen sites (it warns at once when every pass would
    be equal), then :meth:`run` once per batch. The caller chooses the grad mode.

    Args:
        model: the model whose sites drop.
        chosen: the sites that drop (:func:`~lightning_dropout.sites.select_sites`).
        n_samples: passes per batch, or ``"auto"``: passes until the Monte-Carlo standard
            error of the mean (of the probabilities for classification) is at most
            ``tolerance`` for every output of the batch, or ``max_samples`` passes.
        tolerance: the standard error ``"auto"`` stops at.
        max_samples: the most passes ``"auto"`` draws (at least 2).
        batched: replicate the batch and run several passes per forward call.
        chunk_size: replicas per batched call; None keeps a call at 1024 rows or fewer.
        output: ``"logits"``, ``"probs"``, ``"regression"`` or ``"gaussian"``.
        class_dim: the class dimension of one output.
        consistent_seed: the seed of consistent masks (one fixed sub-network per pass), or
            None for independent masks.
        warn: how to say a problem, ``warn(key, message)``; None: ``warnings.warn``.

    Raises:
        TypeError: a wrongly typed argument.
        ValueError: a value out of range or an unknown ``output``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5)).eval()
        >>> passes = MCPasses(net, select_sites(net), n_samples="auto", tolerance=0.05)
        >>> with torch.no_grad():
        ...     out = passes.run(torch.randn(5, 4)).outputs[0]
        >>> bool(out.standard_error.max() <= 0.05), out.n_samples >= 8
        (True, True)
    """

    def __init__(
        self,
        model: nn.Module,
        chosen: Mapping[str, DropoutSite],
        *,
        n_samples: int | str = 30,
        tolerance: float = DEFAULT_TOLERANCE,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        batched: bool = True,
        chunk_size: int | None = None,
        output: str = "logits",
        class_dim: int = -1,
        consistent_seed: int | None = None,
        warn: Warn | None = None,
    ) -> None:
        self.model = model
        self.chosen = dict(chosen)
        self.n_samples = check_n_samples(n_samples)
        self.tolerance = check_positive("tolerance", tolerance)
        self.max_samples = check_int("max_samples", max_samples, minimum=2)
        self.batched = check_bool("batched", batched)
        self.chunk_size = None if chunk_size is None else check_positive_int("chunk_size", chunk_size)
        self.output = check_choice("output", output, OUTPUT_KINDS)
        self.class_dim = check_int("class_dim", class_dim)
        self.consistent_seed = check_seed("consistent_seed", consistent_seed)
        self.warn: Warn = warn if warn is not None else _warn_now
        problem = deterministic_reason(self.chosen)
        if problem:
            name = type(model).__name__
            self.warn("deterministic", f"{name} {problem}: every Monte-Carlo pass is identical")

    def run(
        self,
        batch: Any,
        step: Callable[[Any], Any] | None = None,
        *,
        temperatures: Sequence[float | None] = (None,),
        return_samples: bool = False,
        keep_raw: bool = False,
    ) -> PassResult:
        """Draw the passes over ``batch`` and summarise them once per temperature.

        Args:
            batch: the input, with the batch along dimension 0.
            step: maps a batch to the output; None calls the model, and runs the children
                of an ``nn.Sequential`` before its first dropping site once, not per pass.
            temperatures: the summaries to return: None for the raw output, a float for
                the logits divided by it before the softmax (classification only). The first
                decides when ``n_samples="auto"`` stops.
            return_samples: keep every pass's (probability) output in each summary.
            keep_raw: return the raw outputs too (logits for ``"logits"``).

        Raises:
            ValueError: a temperature for a regression output, or a non-positive one.
        """
        scales = [None if t is None else check_positive("temperature", t) for t in temperatures]
        if any(t is not None for t in scales) and self.output not in ("logits", "probs"):
            raise ValueError(f"a temperature scales class logits, not output={self.output!r}")
        if not scales:
            raise ValueError("temperatures must name at least one summary")
        summaries = [
            RunningSummary(self.output if t is None else "logits", self.class_dim, return_samples)
            for t in scales
        ]
        kept: list[Tensor] = []
        with sites_training(self.model, self.chosen):
            call: Callable[[Any], Any] = self.model if step is None else step
            if step is None:
                prefix = deterministic_prefix(self.model, find_sites(self.model))
                if prefix is not None:
                    head, call = prefix
                    batch = head(batch)
            if self.output == "gaussian":
                call = gaussian_step(call)
            masks = (
                ConsistentMasks(self.model, self.chosen, self.consistent_seed)
                if self.consistent_seed is not None
                else None
            )
            with masks if masks is not None else nullcontext():
                if masks is not None and masks.inconsistent:
                    self.warn("inconsistent", inconsistent_message(masks.inconsistent))
                for chunk in self._chunks(call, batch, masks, summaries[0]):
                    for summary, t in zip(summaries, scales, strict=True):
                        summary.update(chunk if t is None else self._scaled_logits(chunk, t))
                    if keep_raw:
                        kept.append(chunk)
            if masks is not None and masks.stray_draws:
                self.warn("stray", STRAY_DRAWS_MESSAGE)
        if self.n_samples == AUTO and summaries[0].max_standard_error() > self.tolerance:
            self.warn(
                "max_samples",
                f"n_samples='auto' stopped at max_samples={self.max_samples} passes with a Monte-Carlo "
                f"standard error of {summaries[0].max_standard_error():.3g} > tolerance={self.tolerance:g}",
            )
        outputs = []
        for summary, t in zip(summaries, scales, strict=True):
            out = summary.result()
            out.temperature = t
            outputs.append(out)
        return PassResult(outputs, torch.cat(kept) if keep_raw else None)

    def _scaled_logits(self, chunk: Tensor, temperature: float) -> Tensor:
        if self.output == "probs":
            # softmax(log p / T) is the tempered distribution, as for the logits behind p.
            chunk = chunk.clamp_min(torch.finfo(chunk.dtype).tiny).log()
        return chunk / temperature

    def _chunks(
        self, call: Callable[[Any], Tensor], batch: Any, masks: ConsistentMasks | None, lead: RunningSummary
    ) -> Iterator[Tensor]:
        def draw(count: int, first: int) -> Iterator[Tensor]:
            return mc_samples(call, batch, count, self.model, self.batched, self.chunk_size, masks, first)

        if self.n_samples != AUTO:
            yield from draw(int(self.n_samples), 0)
            return
        done, target = 0, min(MIN_AUTO_SAMPLES, self.max_samples)
        while True:
            # The caller folds each chunk into ``lead`` before asking for the next one.
            yield from draw(target - done, done)
            done = target
            error = lead.max_standard_error()
            if error <= self.tolerance or done >= self.max_samples:
                return
            # The standard error falls as 1 / sqrt(passes).
            needed = math.ceil(done * (error / self.tolerance) ** 2 * AUTO_MARGIN)
            target = min(self.max_samples, max(done + 1, needed))


def _warn_now(key: str, message: str) -> None:
    warnings.warn(message, stacklevel=4)


def mc_predict(
    model: nn.Module,
    x: Any,
    n_samples: int | str = 30,
    batched: bool = True,
    chunk_size: int | None = None,
    output: str = "logits",
    class_dim: int = -1,
    return_samples: bool = False,
    consistent: bool = False,
    seed: int | None = None,
    sites: str | Sequence[str] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    temperature: float | None = None,
) -> MCOutput:
    """Monte-Carlo dropout prediction: ``n_samples`` stochastic passes of ``model(x)``.

    Runs under ``torch.no_grad`` and :func:`~lightning_dropout.mc.mc_dropout` (every
    dropout site stochastic, attention dropout included; BatchNorm and the rest keep their
    mode; every mode restored afterwards). Warns when the passes would all be equal (no
    site, or p = 0 everywhere).

    When ``model`` is an ``nn.Sequential`` whose first children hold no site that drops
    (``sites`` restricted to a head, say), those children run once on ``x`` and only the
    rest runs once per pass: the same samples, for a fraction of the work.

    Args:
        model: the model; called as ``model(x)``.
        x: its input: a tensor (or nested tuple, list or mapping of tensors) with the
            batch along dimension 0.
        n_samples: number of stochastic passes, or ``"auto"``: passes until the
            Monte-Carlo standard error of the mean (of the probabilities for
            classification) is at most ``tolerance`` for every output, ``max_samples`` at
            most (a warning says when that was not enough).
        batched: replicate the input and run the passes in few forward calls (chunks of
            ``chunk_size`` replicas) rather than one call per pass. Needs a model that maps
            samples along dim 0 independently (no seq-first RNN over dim 0).
        chunk_size: replicas per batched call, to bound memory; None keeps a call at
            1024 rows or fewer.
        output: ``"logits"`` (softmax along ``class_dim`` first), ``"probs"``,
            ``"regression"``, or ``"gaussian"`` for a model returning a mean and a
            log-variance (a last dimension of size 2, or a pair of tensors).
        class_dim: the class dimension of the output.
        return_samples: keep every pass's output in :attr:`MCOutput.samples`.
        consistent: pass ``r`` applies the same masks to every input (one fixed
            sub-network per pass, derived from ``(seed, r)``), in batched and looped mode
            alike; see :mod:`lightning_dropout.consistent_masks` (sites that cannot be are
            named in a warning).
        seed: the passes' seed: the same seed gives the same samples, and torch's global
            random stream is left untouched. None draws from torch's global generator.
        sites: only the sites matching these globs drop (see
            :mod:`lightning_dropout.selection`); None for all.
        tolerance: the standard error ``n_samples="auto"`` stops at.
        max_samples: the most passes ``n_samples="auto"`` draws.
        temperature: divide the logits by it before the softmax (classification; see
            :func:`lightning_dropout.calibration.fit_temperature`); None for none.

    Raises:
        TypeError: a wrongly typed argument, or a model output that is not a tensor.
        ValueError: ``n_samples`` or ``chunk_size`` below 1, an unknown ``output``, a class
            dimension of size 1, a batched output that is not replicas x batch along dim 0,
            a pattern in ``sites`` that matches no site, or a temperature for regression.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5)).eval()
        >>> out = mc_predict(net, torch.randn(5, 4), n_samples=8)
        >>> out.mean.shape, out.entropy.shape, net.training
        (torch.Size([5, 3]), torch.Size([5]), False)
        >>> a, b = (mc_predict(net, torch.ones(2, 4), 4, consistent=True, seed=1) for _ in range(2))
        >>> torch.equal(a.mean, b.mean)
        True
    """
    return_samples = check_bool("return_samples", return_samples)
    consistent = check_bool("consistent", consistent)
    seed = check_seed("seed", seed)
    chosen = select_sites(model, sites, find_sites(model))
    if seed is None and consistent:
        seed = int(torch.randint(0, 2**62, ()).item())
    passes = MCPasses(
        model,
        chosen,
        n_samples=n_samples,
        tolerance=tolerance,
        max_samples=max_samples,
        batched=batched,
        chunk_size=chunk_size,
        output=output,
        class_dim=class_dim,
        consistent_seed=seed if consistent else None,
    )
    with torch.no_grad(), seeded(seed, device_of(x)) if seed is not None else nullcontext():
        result = passes.run(x, temperatures=(temperature,), return_samples=return_samples)
    return result.outputs[0]


__all__ = [
    "AUTO",
    "DEFAULT_MAX_SAMPLES",
    "DEFAULT_TOLERANCE",
    "MCPasses",
    "PassResult",
    "check_n_samples",
    "mc_predict",
]
