"""Acquisition functions for active learning with MC dropout (pure PyTorch).

Every score takes the probabilities of ``S`` stochastic passes over ``N`` pool examples,
``probs`` shaped ``[S, N, C]`` (for instance ``mc_predict(..., return_samples=True).samples``),
and returns one score per example, higher meaning more informative:

- :func:`bald`: the mutual information between the prediction and the weights, the entropy
  of the mean minus the mean entropy of the passes (Houlsby et al. 2011; Gal, Islam and
  Ghahramani, "Deep Bayesian Active Learning with Image Data", ICML 2017).
- :func:`max_entropy`: the entropy of the mean prediction.
- :func:`variation_ratio`: one minus the share of passes that vote for the modal class.
- :func:`margin`: minus the gap between the two most probable classes of the mean.
- :func:`random`: uniform noise, the baseline.

:func:`select` takes the ``k`` highest scores. Two batch acquisitions return ``k`` indices
directly: :func:`batch_bald` (Kirsch, van Amersfoort and Gal, "BatchBALD", NeurIPS 2019)
grows the batch greedily by the joint mutual information of the batch, with the passes as
consistent sub-networks, so that near-duplicates are not all taken; :func:`power_bald`
(Kirsch et al., "Stochastic Batch Acquisition", TMLR 2023) samples ``k`` examples without
replacement with probabilities proportional to ``bald ** beta``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_dropout._validation import check_int, check_positive, check_positive_int

# Joint-entropy tensors of one candidate chunk stay below this many elements.
_CHUNK_ELEMENTS = 1 << 22


def _check_probs(probs: Tensor) -> Tensor:
    if not isinstance(probs, Tensor):
        raise TypeError(f"probs must be a tensor [S, N, C], got {type(probs).__name__}")
    if probs.dim() != 3 or probs.shape[0] < 1 or probs.shape[2] < 2:
        raise ValueError(
            "probs must be MC class probabilities [S, N, C] with S >= 1 and C >= 2, "
            f"got shape {tuple(probs.shape)}"
        )
    if not probs.is_floating_point():
        raise TypeError(f"probs must be floating point, got {probs.dtype}")
    return probs


def _entropy(probs: Tensor) -> Tensor:
    # xlogy gives 0 * log 0 = 0; adding 0.0 turns the -0.0 of a certain prediction into 0.0.
    return -torch.special.xlogy(probs, probs).sum(-1) + 0.0


def max_entropy(probs: Tensor) -> Tensor:
    """The entropy (nats) of the mean prediction of every example: total uncertainty.

    Args:
        probs: class probabilities of the passes, ``[S, N, C]``.

    Raises:
        TypeError: ``probs`` is not a floating-point tensor.
        ValueError: ``probs`` is not shaped ``[S, N, C]`` with at least two classes.

    Example:
        >>> probs = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])
        >>> max_entropy(probs)
        tensor([0.6931, 0.0000])
    """
    return _entropy(_check_probs(probs).mean(0))


def bald(probs: Tensor) -> Tensor:
    """The mutual information between an example's label and the weights (BALD), in nats.

    The entropy of the mean prediction minus the mean entropy of the passes: high where the
    passes are individually confident but disagree, the epistemic part of the uncertainty.

    Args:
        probs: class probabilities of the passes, ``[S, N, C]``.

    Raises:
        TypeError: ``probs`` is not a floating-point tensor.
        ValueError: ``probs`` is not shaped ``[S, N, C]`` with at least two classes.

    Example:
        >>> probs = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]])
        >>> bald(probs)
        tensor([0.6931, 0.0000])
    """
    probs = _check_probs(probs)
    return (_entropy(probs.mean(0)) - _entropy(probs).mean(0)).clamp_min(0.0)


def variation_ratio(probs: Tensor) -> Tensor:
    """One minus the share of passes whose most probable class is the modal one.

    Gal et al. (2017)'s ``1 - f_m / S``; ties between classes go to the lowest index.

    Args:
        probs: class probabilities of the passes, ``[S, N, C]``.

    Raises:
        TypeError: ``probs`` is not a floating-point tensor.
        ValueError: ``probs`` is not shaped ``[S, N, C]`` with at least two classes.

    Example:
        >>> probs = torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]], [[0.6, 0.4]], [[0.7, 0.3]]])
        >>> variation_ratio(probs)
        tensor([0.2500])
    """
    probs = _check_probs(probs)
    votes = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).sum(0)
    return 1.0 - votes.max(-1).values.to(probs.dtype) / probs.shape[0]


def margin(probs: Tensor) -> Tensor:
    """Minus the gap between the two most probable classes of the mean prediction.

    Args:
        probs: class probabilities of the passes, ``[S, N, C]``.

    Raises:
        TypeError: ``probs`` is not a floating-point tensor.
        ValueError: ``probs`` is not shaped ``[S, N, C]`` with at least two classes.

    Example:
        >>> probs = torch.tensor([[[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]])
        >>> margin(probs)
        tensor([-0.5000, -0.0500])
    """
    top = _check_probs(probs).mean(0).topk(2, dim=-1).values
    return top[:, 1] - top[:, 0]


def random(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform scores in [0, 1): acquisition at random, the baseline.

    Args:
        probs: class probabilities of the passes, ``[S, N, C]`` (only ``N`` is read).
        generator: the random source (on ``probs``' device); None for torch's global one.

    Raises:
        TypeError: ``probs`` is not a floating-point tensor.
        ValueError: ``probs`` is not shaped ``[S, N, C]`` with at least two classes.

    Example:
        >>> probs = torch.full((4, 3, 2), 0.5)
        >>> a = random(probs, torch.Generator().manual_seed(0))
        >>> torch.equal(a, random(probs, torch.Generator().manual_seed(0))), a.shape
        (True, torch.Size([3]))
    """
    probs = _check_probs(probs)
    return torch.rand(probs.shape[1], generator=generator, device=probs.device, dtype=probs.dtype)


def select(scores: Tensor, k: int) -> Tensor:
    """The indices of the ``k`` highest ``scores``, highest first.

    Args:
        scores: one score per example, ``[N]``.
        k: how many to take, at most ``N``.

    Raises:
        TypeError: ``k`` is not an int or ``scores`` not a tensor.
        ValueError: ``scores`` is not one-dimensional, or ``k`` is negative or above ``N``.

    Example:
        >>> select(torch.tensor([0.1, 0.9, 0.5]), 2)
        tensor([1, 2])
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a tensor [N], got {type(scores).__name__}")
    if scores.dim() != 1:
        raise ValueError(f"scores must be one-dimensional [N], got shape {tuple(scores.shape)}")
    k = _check_k(k, scores.shape[0])
    return scores.topk(k).indices


def _check_k(k: int, n: int) -> int:
    k = check_int("k", k, minimum=0)
    if k > n:
        raise ValueError(f"k must be at most the {n} examples scored, got {k}")
    return k


def power_bald(probs: Tensor, k: int, beta: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """``k`` examples drawn without replacement with probabilities proportional to ``bald ** beta``.

    Stochastic (power) batch acquisition: taking the top ``k`` of a one-point score picks
    near-duplicates; sampling spreads the batch at the cost of nothing. The draw is the
    Gumbel-top-k trick: the ``k`` largest ``beta * log(bald) + Gumbel noise``, which is
    sampling without replacement in proportion to ``bald ** beta`` (Kool et al. 2019).
    Examples with a BALD score of zero are drawn only after every other one.

    Args:
        probs: class probabilities of the passes, ``[S, N, C]``.
        k: how many examples to acquire, at most ``N``.
        beta: the power; large values approach top-k BALD, zero is uniform sampling.
        generator: the random source (on ``probs``' device); None for torch's global one.

    Raises:
        TypeError: a wrongly typed argument.
        ValueError: a badly shaped ``probs``, ``k`` outside [0, N], or ``beta`` <= 0.

    Example:
        >>> probs = torch.tensor([[[1.0, 0.0]] * 5, [[0.0, 1.0]] * 5])
        >>> picks = power_bald(probs, 3, generator=torch.Generator().manual_seed(0))
        >>> picks.shape, len(set(picks.tolist()))
        (torch.Size([3]), 3)
    """
    scores = bald(probs)
    k = _check_k(k, scores.shape[0])
    beta = check_positive("beta", beta)
    uniform = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    gumbel = -(-uniform.clamp_min(tiny).log()).log()
    keys = beta * scores.double().log() + gumbel  # log(0) = -inf: drawn last
    return keys.topk(k).indices


def batch_bald(
    probs: Tensor,
    k: int,
    max_configurations: int = 10_000,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``k`` examples chosen greedily by the mutual information of the batch (BatchBALD).

    The score of a batch is ``H(y_1, ..., y_n) - sum_i E_w H(y_i | w)``: the joint entropy
    of the labels under the mean of the passes, the passes acting as consistent
    sub-networks (pass ``s`` is one weight sample for every example), minus the mean
    entropy of each pass. Greedy growth is within ``1 - 1/e`` of the best batch, since the
    score is submodular. The joint distribution of the ``n - 1`` labels chosen so far has
    ``C ** (n - 1)`` configurations: it is enumerated exactly while ``C ** n`` stays at or
    below ``max_configurations``, and estimated from ``max_configurations // C`` sampled
    configurations beyond (importance sampling from the joint, as Kirsch et al. do).

    Args:
        probs: class probabilities of the passes, ``[S, N, C]``.
        k: how many examples to acquire, at most ``N``.
        max_configurations: the largest joint enumerated exactly, and the number of
            configurations sampled beyond it (times ``C``).
        generator: the random source for sampled configurations (CPU); None for torch's
            global one.

    Raises:
        TypeError: a wrongly typed argument.
        ValueError: a badly shaped ``probs``, ``k`` outside [0, N], or
            ``max_configurations`` below the number of classes.

    Example:
        >>> votes = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 0, 1]])  # 4 passes' labels
        >>> probs = torch.nn.functional.one_hot(votes.T, 2).float()  # [S=4, N=3, C=2]
        >>> bald(probs)  # each alone is as informative as the others
        tensor([0.6931, 0.6931, 0.6931])
        >>> batch_bald(probs, 2).tolist()  # the copy of the first adds nothing: the third is taken
        [0, 2]
    """
    probs = _check_probs(probs)
    n_samples, n_pool, n_classes = probs.shape
    k = _check_k(k, n_pool)
    max_configurations = check_positive_int("max_configurations", max_configurations)
    if max_configurations < n_classes:
        raise ValueError(
            f"max_configurations must be at least the {n_classes} classes, got {max_configurations}"
        )
    work = probs.double()
    conditional = _entropy(work).mean(0)  # E_w H(y_i | w), [N]
    chosen: list[int] = []
    available = torch.ones(n_pool, dtype=torch.bool, device=probs.device)
    # joint[s, m]: probability under pass s of configuration m of the labels chosen so far;
    # weights[m]: each configuration's weight in the entropy sum (1 when enumerated,
    # 1 / (M p(m)) when sampled from the joint).
    joint = torch.ones(n_samples, 1, dtype=torch.float64, device=probs.device)
    weights = torch.ones(1, dtype=torch.float64, device=probs.device)
    for _ in range(k):
        entropies = _joint_entropies(joint, weights, work)
        gains = entropies - conditional  # the chosen ones' conditional entropy is a constant
        gains[~available] = -math.inf
        best = int(gains.argmax())
        chosen.append(best)
        available[best] = False
        if joint.shape[1] * n_classes * n_classes <= max_configurations:
            joint = (joint[:, :, None] * work[:, best, None, :]).reshape(n_samples, -1)
        else:
            joint, weights = _sampled_joint(
                work[:, chosen], max(1, max_configurations // n_classes), generator
            )
    return torch.tensor(chosen, dtype=torch.long, device=probs.device)


def _joint_entropies(joint: Tensor, weights: Tensor, probs: Tensor) -> Tensor:
    """``H(y_chosen, y_x)`` for every candidate ``x``, chunked over the candidates."""
    n_samples, n_configurations = joint.shape
    n_pool, n_classes = probs.shape[1:]
    chunk = max(1, _CHUNK_ELEMENTS // (n_configurations * n_classes))
    out = []
    for start in range(0, n_pool, chunk):
        part = probs[:, start : start + chunk]
        # p(m, c | x) = 1/S sum_s joint[s, m] p_s(c | x)
        together = torch.einsum("sm,snc->nmc", joint, part) / n_samples
        out.append(-(torch.special.xlogy(together, together).sum(-1) * weights).sum(-1))
    return torch.cat(out)


def _sampled_joint(
    chosen_probs: Tensor, n_configurations: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """``n_configurations`` label configurations of the chosen examples drawn from their
    joint (a pass uniformly, then each label from that pass), with their per-pass
    probabilities ``[S, M]`` and importance weights ``1 / (M p(m))``."""
    n_samples, n_chosen, n_classes = chosen_probs.shape
    device = chosen_probs.device
    passes = torch.randint(n_samples, (n_configurations,), generator=generator)
    flat = chosen_probs.cpu()[passes].reshape(-1, n_classes)  # [M * n, C]
    labels = torch.multinomial(flat, 1, generator=generator).reshape(n_configurations, n_chosen).to(device)
    # per_pass[s, m] = prod_i p_s(labels[m, i] | x_i)
    picked = chosen_probs.gather(2, labels.T[None].expand(n_samples, -1, -1))  # [S, n, M]
    per_pass = picked.prod(1)
    return per_pass, 1.0 / (n_configurations * per_pass.mean(0))


SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    "bald": bald,
    "max_entropy": max_entropy,
    "variation_ratio": variation_ratio,
    "margin": margin,
}
