"""Every acquisition function against a brute-force reference on small cases."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from lightning_dropout.active import (
    bald,
    batch_bald,
    margin,
    max_entropy,
    power_bald,
    random,
    select,
    variation_ratio,
)
from lightning_dropout.active.acquisition import _joint_entropies, _sampled_joint
from lightning_dropout.mc import MCOutput


def dirichlet_probs(s: int, n: int, c: int, seed: int, concentration: float = 0.5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    gamma = torch._standard_gamma(torch.full((s, n, c), concentration, dtype=torch.float64), generator)
    return gamma / gamma.sum(-1, keepdim=True)


def entropy(p: list[float]) -> float:
    return -sum(q * math.log(q) for q in p if q > 0)


def mean_probs(probs: torch.Tensor, i: int) -> list[float]:
    s, _, c = probs.shape
    return [sum(float(probs[k, i, j]) for k in range(s)) / s for j in range(c)]


def joint_mutual_information(probs: torch.Tensor, batch: list[int]) -> float:
    """I(y_batch; w) by enumerating every label configuration of the batch."""
    s, _, c = probs.shape
    joint = 0.0
    for labels in itertools.product(range(c), repeat=len(batch)):
        p = (
            sum(
                math.prod(float(probs[k, i, y]) for i, y in zip(batch, labels, strict=True)) for k in range(s)
            )
            / s
        )
        joint -= p * math.log(p) if p > 0 else 0.0
    conditional = sum(entropy(probs[k, i].tolist()) for i in batch for k in range(s)) / s
    return joint - conditional


PROBS = dirichlet_probs(6, 7, 3, seed=0)


def test_entropy_and_bald_match_brute_force_and_mc_output() -> None:
    for i in range(PROBS.shape[1]):
        total = entropy(mean_probs(PROBS, i))
        assert float(max_entropy(PROBS)[i]) == pytest.approx(total, abs=1e-12)
        assert float(bald(PROBS)[i]) == pytest.approx(joint_mutual_information(PROBS, [i]), abs=1e-12)
    summary = MCOutput.from_samples(PROBS, output="probs")
    assert torch.allclose(bald(PROBS), summary.mutual_information)
    assert torch.allclose(max_entropy(PROBS), summary.entropy)


def test_variation_ratio_and_margin_match_brute_force() -> None:
    s = PROBS.shape[0]
    for i in range(PROBS.shape[1]):
        votes = Counter(int(PROBS[k, i].argmax()) for k in range(s))
        assert float(variation_ratio(PROBS)[i]) == pytest.approx(1 - max(votes.values()) / s)
        first, second = sorted(mean_probs(PROBS, i), reverse=True)[:2]
        assert float(margin(PROBS)[i]) == pytest.approx(second - first)


def test_random_is_uniform_and_reproducible() -> None:
    a = random(PROBS, torch.Generator().manual_seed(3))
    assert a.shape == (7,) and bool(((a >= 0) & (a < 1)).all())
    assert torch.equal(a, random(PROBS, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, random(PROBS, torch.Generator().manual_seed(4)))


def test_select_takes_the_highest() -> None:
    scores = torch.tensor([0.3, 0.9, 0.1, 0.5])
    assert select(scores, 3).tolist() == [1, 3, 0]
    assert select(scores, 0).tolist() == []
    with pytest.raises(ValueError, match="k must be at most"):
        select(scores, 5)
    with pytest.raises(TypeError, match="k must be an int"):
        select(scores, True)
    with pytest.raises(ValueError, match="one-dimensional"):
        select(scores[None], 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_bald_is_greedy_joint_mutual_information(seed: int) -> None:
    probs = dirichlet_probs(8, 6, 3, seed=seed)
    chosen: list[int] = []
    for _ in range(3):  # greedy over the exactly enumerated joint of up to 3 points
        rest = [i for i in range(6) if i not in chosen]
        chosen.append(max(rest, key=lambda i: joint_mutual_information(probs, [*chosen, i])))
    assert batch_bald(probs, 3).tolist() == chosen
    assert batch_bald(probs.float(), 3).tolist() == chosen


def test_batch_bald_first_pick_is_bald_and_duplicates_are_skipped() -> None:
    probs = dirichlet_probs(10, 5, 4, seed=5)
    probs = torch.cat([probs, probs[:, :1]], 1)  # example 5 copies example 0
    picks = batch_bald(probs, 4).tolist()
    assert picks[0] == int(bald(probs).argmax())
    assert len(set(picks)) == 4 and not {0, 5} <= set(picks)


def test_sampled_joint_entropy_estimates_the_exact_one() -> None:
    probs = dirichlet_probs(8, 4, 3, seed=7)
    chosen = probs[:, :3]  # the joint of 3 chosen points with each candidate: 81 configurations
    exact_joint = torch.ones(8, 1, dtype=torch.float64)
    for i in range(3):
        exact_joint = (exact_joint[:, :, None] * chosen[:, i, None, :]).reshape(8, -1)
    exact = _joint_entropies(exact_joint, torch.ones(exact_joint.shape[1], dtype=torch.float64), probs)
    brute = (
        joint_mutual_information(probs, [0, 1, 2, 3])
        + sum(entropy(probs[k, i].tolist()) for i in range(4) for k in range(8)) / 8
    )
    assert float(exact[3]) == pytest.approx(brute, abs=1e-9)
    estimates = []
    for repeat in range(20):
        joint, weights = _sampled_joint(chosen, 2000, torch.Generator().manual_seed(repeat))
        estimates.append(_joint_entropies(joint, weights, probs))
    stacked = torch.stack(estimates)
    error = stacked.std(0) / math.sqrt(len(estimates))
    assert bool(((stacked.mean(0) - exact).abs() <= 4 * error + 1e-9).all())  # 4 sigma
    assert bool((error < 0.05).all())


def test_batch_bald_beyond_the_exact_limit_still_picks_distinct_informative_points() -> None:
    probs = dirichlet_probs(10, 30, 10, seed=2)
    picks = batch_bald(probs, 5, max_configurations=1000, generator=torch.Generator().manual_seed(0))
    assert len(set(picks.tolist())) == 5
    exact = batch_bald(probs, 2)  # within the exact limit both agree
    assert picks[:2].tolist() == exact.tolist()


def test_power_bald_is_reproducible_with_its_seed() -> None:
    probs = dirichlet_probs(5, 50, 3, seed=1)
    a = power_bald(probs, 10, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, power_bald(probs, 10, generator=torch.Generator().manual_seed(11)))
    assert not torch.equal(a, power_bald(probs, 10, generator=torch.Generator().manual_seed(12)))
    assert len(set(a.tolist())) == 10


@pytest.mark.parametrize("beta", [1.0, 3.0])
def test_power_bald_samples_in_proportion_to_bald_to_the_beta(beta: float) -> None:
    probs = dirichlet_probs(4, 5, 3, seed=3)
    expected = bald(probs) ** beta
    expected = expected / expected.sum()
    generator = torch.Generator().manual_seed(0)
    draws = 4000
    counts = Counter(int(power_bald(probs, 1, beta, generator)[0]) for _ in range(draws))
    for i, p in enumerate(expected.tolist()):
        sigma = math.sqrt(draws * p * (1 - p))
        assert abs(counts[i] - draws * p) <= 4 * sigma + 1  # 4 sigma


def test_power_bald_without_replacement_first_pair_probability() -> None:
    # P(first two draws are {a, b}) = p_a p_b / (1 - p_a) + p_b p_a / (1 - p_b), brute force
    probs = dirichlet_probs(4, 3, 2, seed=4)
    p = (bald(probs) / bald(probs).sum()).tolist()
    generator = torch.Generator().manual_seed(1)
    draws = 4000
    counts = Counter(frozenset(power_bald(probs, 2, generator=generator).tolist()) for _ in range(draws))
    for a, b in itertools.combinations(range(3), 2):
        q = p[a] * p[b] / (1 - p[a]) + p[b] * p[a] / (1 - p[b])
        sigma = math.sqrt(draws * q * (1 - q))
        assert abs(counts[frozenset((a, b))] - draws * q) <= 4 * sigma + 1


def test_bad_probabilities_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[S, N, C\]"):
        bald(torch.rand(3, 4))
    with pytest.raises(ValueError, match="C >= 2"):
        max_entropy(torch.ones(3, 4, 1))
    with pytest.raises(TypeError, match="floating point"):
        margin(torch.ones(3, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="beta"):
        power_bald(PROBS, 2, beta=0.0)
    with pytest.raises(ValueError, match="max_configurations"):
        batch_bald(PROBS, 2, max_configurations=2)
