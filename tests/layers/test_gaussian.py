"""Gaussian dropout: moments, identities and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_dropout import GaussianDropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_noise_has_bernoulli_dropouts_mean_and_variance(p: float) -> None:
    n = 400_000
    y = GaussianDropout(p)(torch.ones(n, dtype=torch.float64))
    variance = p / (1 - p)
    assert abs(float(y.mean()) - 1.0) < 5 * math.sqrt(variance / n)
    # Var of the sample variance of a Gaussian: 2 sigma^4 / (n - 1).
    assert abs(float(y.var()) - variance) < 5 * math.sqrt(2 * variance**2 / (n - 1))


def test_identities_and_p_one() -> None:
    x = torch.randn(10)
    assert GaussianDropout(0.0)(x) is x
    assert GaussianDropout(0.5).eval()(x) is x
    z = torch.full((5,), float("inf"), requires_grad=True)
    out = GaussianDropout(1.0)(z)
    assert torch.equal(out, torch.zeros(5))
    out.sum().backward()
    assert z.grad is not None and torch.equal(z.grad, torch.zeros(5))


def test_gradcheck_with_fixed_noise() -> None:
    layer = GaussianDropout(0.3)

    def fixed_noise(x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1)
        return layer(x)

    assert torch.autograd.gradcheck(
        fixed_noise, (torch.randn(4, 3, dtype=torch.float64, requires_grad=True),)
    )


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="p must be in"):
        GaussianDropout(2.0)
    with pytest.raises(TypeError, match="floating-point"):
        GaussianDropout(0.5)(torch.ones(2, dtype=torch.int32))
