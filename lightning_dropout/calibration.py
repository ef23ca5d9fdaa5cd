"""Calibration of (Monte-Carlo) classifiers: temperature scaling and conformal prediction sets.

Pure PyTorch. Two post-hoc fixes fitted on held-out data (a calibration split):

- Temperature scaling (Guo et al., ICML 2017): divide the logits by one temperature ``T``
  before the softmax, ``T`` minimising the negative log-likelihood. For MC dropout logits
  ``[S, N, C]`` the temperature is shared by every pass and the NLL is that of the
  averaged probabilities, the MC prediction (Laves et al., 2019): accuracy is unchanged
  for deterministic logits, and the calibration error usually falls.
- Split conformal prediction: a score per (input, class), its finite-sample quantile on
  the calibration split, and the set of classes whose score is at most that threshold.
  On exchangeable data the set holds the true class with probability at least
  ``1 - alpha`` (Vovk et al. 2005), whatever the model. Scores:

  - ``"lac"``: ``1 - p_y`` (least ambiguous set-valued classifier; Sadinle et al., 2019);
  - ``"aps"``: the mass of the classes ranked above ``y`` plus ``u * p_y`` with
    ``u ~ U(0, 1)``, adaptive prediction sets (Romano, Sesia & Candès, NeurIPS 2020);
  - ``"raps"``: APS plus ``lam * max(0, rank(y) - k_reg)``, which discourages long tails of
    unlikely classes (Angelopoulos, Bates, Malik & Jordan, ICLR 2021; their ImageNet
    defaults ``lam=0.01``, ``k_reg=5``).

  The randomisation ``u`` (one per input, drawn from ``generator``) makes the coverage
  exact rather than conservative, as in the papers; pass a seeded generator to reproduce.

:func:`set_coverage` and :func:`set_size` measure sets; their torchmetrics twins are
:class:`lightning_dropout.metrics.SetCoverage` and :class:`~lightning_dropout.metrics.SetSize`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_dropout._validation import check_choice, check_int, check_positive, check_probability

METHODS = ("aps", "raps", "lac")
DEFAULT_LAMBDA = 0.01
DEFAULT_K_REG = 5
#: The temperatures searched: wide enough for any trained classifier's logits.
TEMPERATURE_BOUNDS = (0.01, 100.0)
_GRID_POINTS = 81
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _check_logits(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(logits, Tensor) or logits.dim() not in (2, 3):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be [N, C] or MC logits [S, N, C], got {shape}")
    return logits, _check_targets("targets", targets, logits.shape[-2], logits.shape[-1])


def _check_targets(name: str, targets: Tensor, rows: int, classes: int) -> Tensor:
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of class indices, got {targets!r:.80}")
    if targets.numel() != rows:
        raise ValueError(f"{name} has {targets.numel()} entries for {rows} rows")
    if rows and (int(targets.min()) < 0 or int(targets.max()) >= classes):
        low, high = int(targets.min()), int(targets.max())
        raise ValueError(f"{name} must lie in [0, {classes}), got values in [{low}, {high}]")
    return targets.long()


def _check_probs(probs: Tensor) -> Tensor:
    if not isinstance(probs, Tensor) or probs.dim() != 2 or not probs.is_floating_point():
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"probs must be a floating [N, C] tensor of class probabilities, got {shape}")
    return probs


def temperature_nll(logits: Tensor, targets: Tensor, temperature: float) -> float:
    """The mean NLL of ``targets`` under ``softmax(logits / temperature)`` (averaged over the
    passes first for MC logits ``[S, N, C]``), in float64.

    Raises:
        ValueError: badly shaped logits or targets, or a temperature that is not positive.

    Example:
        >>> round(temperature_nll(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), 1.0), 4)
        0.1269
    """
    logits, targets = _check_logits(logits, targets)
    return float(_nll(logits.double(), targets, check_positive("temperature", temperature)))


def _nll(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    log_probs = (logits / temperature).log_softmax(-1)
    if logits.dim() == 3:
        # log of the mean probability over the passes, stably.
        log_probs = log_probs.logsumexp(0) - math.log(logits.shape[0])
    return -log_probs.gather(-1, targets.unsqueeze(-1)).mean()


def fit_temperature(logits: Tensor, targets: Tensor) -> float:
    """The temperature that minimises the NLL of the (averaged) tempered probabilities.

    ``T`` divides every pass's logits before the softmax; for MC logits ``[S, N, C]`` the
    probabilities of the passes are averaged before the log, so ``T`` calibrates the MC
    prediction itself. A grid of 81 log-spaced temperatures on [0.01, 100] brackets the
    minimum, a golden-section search on ``log T`` refines it (float64) to a relative
    precision of about 1e-6; a minimum outside the range returns its bound.

    Args:
        logits: ``[N, C]`` logits, or ``[S, N, C]`` logits of ``S`` passes.
        targets: ``[N]`` class indices.

    Raises:
        ValueError: badly shaped logits, targets out of range, or no rows.

    Example:
        >>> logits = torch.tensor([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
        >>> t = fit_temperature(logits, torch.tensor([0, 1, 1, 0]))
        >>> 1.0 < t < 10.0
        True
    """
    logits, targets = _check_logits(logits, targets)
    if targets.numel() == 0:
        raise ValueError("fit_temperature needs at least one row")
    with torch.no_grad():
        logits = logits.detach().double()
        low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
        grid = torch.linspace(low, high, _GRID_POINTS, dtype=torch.float64).tolist()

        def loss(log_t: float) -> float:
            return float(_nll(logits, targets, math.exp(log_t)))

        values = [loss(g) for g in grid]
        best = min(range(len(grid)), key=values.__getitem__)
        a, b = grid[max(0, best - 1)], grid[min(len(grid) - 1, best + 1)]
        # Golden-section on the bracket around the grid's best point.
        c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
        fc, fd = loss(c), loss(d)
        while b - a > 1e-6:
            if fc < fd:
                b, d, fd = d, c, fc
                c = b - _GOLDEN * (b - a)
                fc = loss(c)
            else:
                a, c, fc = c, d, fd
                d = a + _GOLDEN * (b - a)
                fd = loss(d)
        candidates = [(values[best], grid[best]), (fc, c), (fd, d)]
        return math.exp(min(candidates)[1])


def _check_raps(lam: float, k_reg: int) -> tuple[float, int]:
    if lam != 0:
        lam = check_positive("lam", lam)
    return float(lam), check_int("k_reg", k_reg, minimum=0)


def conformal_scores(
    probs: Tensor,
    method: str = "aps",
    generator: torch.Generator | None = None,
    lam: float = DEFAULT_LAMBDA,
    k_reg: int = DEFAULT_K_REG,
) -> Tensor:
    """The nonconformity score of every class of every input, ``[N, C]`` (lower: more plausible).

    Args:
        probs: ``[N, C]`` class probabilities.
        method: ``"aps"``, ``"raps"`` or ``"lac"`` (see the module's docstring).
        generator: the source of the randomisation ``u`` (one per input) of APS and RAPS;
            None uses torch's global generator.
        lam: RAPS's penalty per rank beyond ``k_reg``.
        k_reg: the ranks RAPS does not penalise.

    Raises:
        ValueError: an unknown method, badly shaped probabilities, or a negative ``lam`` or
            ``k_reg``.

    Example:
        >>> conformal_scores(torch.tensor([[0.7, 0.2, 0.1]]), "lac")
        tensor([[0.3000, 0.8000, 0.9000]])
    """
    method = check_choice("method", method, METHODS)
    probs = _check_probs(probs)
    lam, k_reg = _check_raps(lam, k_reg)
    if method == "lac":
        return 1.0 - probs
    ordered, order = probs.sort(-1, descending=True)
    above = ordered.cumsum(-1) - ordered
    device = generator.device if generator is not None else probs.device
    u = torch.rand(probs.shape[0], 1, generator=generator, device=device).to(probs)
    scores = above + u * ordered
    if method == "raps":
        rank = torch.arange(1, probs.shape[-1] + 1, device=probs.device, dtype=probs.dtype)
        scores = scores + lam * (rank - k_reg).clamp_min(0.0)
    return torch.empty_like(scores).scatter_(-1, order, scores)


def conformal_threshold(
    probs: Tensor,
    targets: Tensor,
    alpha: float,
    method: str = "aps",
    generator: torch.Generator | None = None,
    lam: float = DEFAULT_LAMBDA,
    k_reg: int = DEFAULT_K_REG,
) -> float:
    """The split-conformal threshold of a calibration split: the ``ceil((n + 1)(1 - alpha))``-th
    smallest score of the true classes (the finite-sample ``(1 - alpha)`` quantile).

    Sets :func:`prediction_sets` builds with it (same method and RAPS parameters) hold the
    true class of an exchangeable new input with probability at least ``1 - alpha``; the
    threshold is infinite (every class) when ``n`` is too small for that.

    Args:
        probs: ``[N, C]`` class probabilities of the calibration inputs (the MC mean for MC
            passes).
        targets: ``[N]`` their classes.
        alpha: the allowed miscoverage, in (0, 1).
        method: ``"aps"``, ``"raps"`` or ``"lac"``.
        generator: the randomisation's source (APS, RAPS); None: torch's global one.
        lam: RAPS's penalty per rank beyond ``k_reg``.
        k_reg: the ranks RAPS does not penalise.

    Raises:
        ValueError: ``alpha`` outside (0, 1), an unknown method, badly shaped inputs.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
        >>> conformal_threshold(probs, torch.tensor([0, 1, 1, 0]), alpha=0.5, method="lac")
        0.30000001192092896
    """
    alpha = check_probability("alpha", alpha)
    if alpha in (0.0, 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    scores = conformal_scores(probs, method, generator, lam, k_reg)
    targets = _check_targets("targets", targets, scores.shape[0], scores.shape[1])
    n = targets.numel()
    rank = math.ceil((n + 1) * (1.0 - alpha))
    if rank > n:
        return math.inf
    true_scores = scores.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(true_scores.kthvalue(rank).values)


def prediction_sets(
    probs: Tensor,
    threshold: float,
    method: str = "aps",
    generator: torch.Generator | None = None,
    lam: float = DEFAULT_LAMBDA,
    k_reg: int = DEFAULT_K_REG,
) -> Tensor:
    """The conformal set of each input: a boolean ``[N, C]``, true for the classes whose score
    is at most ``threshold``.

    Args:
        probs: ``[N, C]`` class probabilities (the MC mean for MC passes).
        threshold: from :func:`conformal_threshold` with the same method and parameters.
        method: ``"aps"``, ``"raps"`` or ``"lac"``.
        generator: the randomisation's source (APS, RAPS); None: torch's global one.
        lam: RAPS's penalty per rank beyond ``k_reg``.
        k_reg: the ranks RAPS does not penalise.

    Raises:
        TypeError: ``threshold`` is not a number.
        ValueError: an unknown method or badly shaped probabilities.

    Example:
        >>> prediction_sets(torch.tensor([[0.7, 0.2, 0.1]]), 0.85, method="lac").tolist()
        [[True, True, False]]
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__} {threshold!r}")
    return conformal_scores(probs, method, generator, lam, k_reg) <= threshold


def _check_sets(sets: Tensor) -> Tensor:
    if not isinstance(sets, Tensor) or sets.dtype != torch.bool or sets.dim() != 2:
        raise ValueError(f"sets must be a boolean [N, C] tensor, got {sets!r:.80}")
    return sets


def set_coverage(sets: Tensor, targets: Tensor) -> Tensor:
    """The fraction of inputs whose set holds their class.

    Raises:
        ValueError: ``sets`` is not a boolean ``[N, C]`` tensor or ``targets`` does not fit.

    Example:
        >>> set_coverage(torch.tensor([[True, False], [True, True]]), torch.tensor([1, 1]))
        tensor(0.5000)
    """
    sets = _check_sets(sets)
    targets = _check_targets("targets", targets, sets.shape[0], sets.shape[1])
    return sets.gather(-1, targets.unsqueeze(-1)).float().mean()


def set_size(sets: Tensor) -> Tensor:
    """The mean number of classes per set.

    Raises:
        ValueError: ``sets`` is not a boolean ``[N, C]`` tensor.

    Example:
        >>> set_size(torch.tensor([[True, False], [True, True]]))
        tensor(1.5000)
    """
    return _check_sets(sets).sum(-1).float().mean()


__all__ = [
    "DEFAULT_K_REG",
    "DEFAULT_LAMBDA",
    "METHODS",
    "conformal_scores",
    "conformal_threshold",
    "fit_temperature",
    "prediction_sets",
    "set_coverage",
    "set_size",
    "temperature_nll",
]
