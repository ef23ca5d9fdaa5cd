"""ConcreteDropout: P(z > 1/2) = p, unbiased output, gradients to p, the regulariser, and a
learned p that falls on a task without overfitting pressure and stays in (0, 1)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_dropout import ConcreteDropout
from lightning_dropout.layers import concrete_dropout

SIGMAS = 5.0


def expected_keep_scale(p: float, temperature: float) -> float:
    """E[(1 - z) / (1 - p)] by quadrature over the logistic noise's quantiles."""
    u = (torch.arange(1_000_000, dtype=torch.float64) + 0.5) / 1_000_000
    z = torch.sigmoid((math.log(p / (1 - p)) + u.logit()) / temperature)
    return ((1 - z) / (1 - p)).mean().item()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_relaxed_drops_at_rate_p_and_nearly_unbiased(p: float) -> None:
    """P(z > 1/2) = p exactly; the mean scale is E[(1 - z) / (1 - p)], within 1% of 1 at
    the paper's temperature 0.1 (exactly 1 only as the temperature tends to 0)."""
    torch.manual_seed(0)
    layer = ConcreteDropout(p)
    n = 200_000
    x = torch.rand(n) + 0.5
    y = layer(x)
    dropped, observed = layer.drop_counts(x, y)
    assert int(observed) == n
    assert abs(int(dropped) / n - p) <= SIGMAS * math.sqrt(p * (1 - p) / n)
    ratio = (y / x).double()
    expected = expected_keep_scale(layer.p, 0.1)
    assert abs(expected - 1.0) < 0.01
    assert abs(ratio.mean().item() - expected) <= SIGMAS * ratio.std().item() / math.sqrt(n)
    assert torch.equal(layer.eval()(x), x)


def test_low_temperatures_approach_bernoulli() -> None:
    torch.manual_seed(1)
    keep = concrete_dropout(torch.ones(100_000), torch.tensor(0.0), temperature=0.01) * 0.5
    assert ((keep < 0.01) | (keep > 0.99)).double().mean().item() > 0.9
    assert abs(keep.mean().item() - 0.5) < 0.01


def test_gradients_reach_p_and_stay_finite_at_extreme_logits() -> None:
    for logit in (-40.0, 0.0, 40.0):
        torch.manual_seed(2)
        p_logit = torch.tensor(logit, requires_grad=True)
        x = torch.randn(1000, requires_grad=True)
        y = concrete_dropout(x, p_logit)
        y.square().sum().backward()
        assert y.isfinite().all() and x.grad.isfinite().all()  # type: ignore[union-attr]
        assert p_logit.grad is not None and p_logit.grad.isfinite()
    assert concrete_dropout(torch.ones(3, dtype=torch.bfloat16), torch.tensor(0.0)).dtype == torch.bfloat16


def test_the_regularizer_is_the_papers_kl_term() -> None:
    layer = ConcreteDropout(0.25)
    weight = torch.randn(4, 6)
    n, length, tau = 1000, 0.1, 2.0
    p = layer.p
    expected = length**2 / (tau * n) * weight.square().sum() / (1 - p) + 2 * 6 / (tau * n) * (
        p * math.log(p) + (1 - p) * math.log(1 - p)
    )
    got = layer.regularizer(weight, n, length_scale=length, precision=tau)
    torch.testing.assert_close(got, expected.float())
    two = layer.regularizer([weight, weight], n, length_scale=length, precision=tau, units=3)
    expected_two = length**2 / (tau * n) * 2 * weight.square().sum() / (1 - p) + 2 * 3 / (tau * n) * (
        p * math.log(p) + (1 - p) * math.log(1 - p)
    )
    torch.testing.assert_close(two, expected_two.float())
    with pytest.raises(ValueError, match="units"):
        layer.regularizer(torch.ones(3), n)
    with pytest.raises(ValueError, match="length_scale"):
        layer.regularizer(weight, n, length_scale=0.0)


def test_p_falls_without_overfitting_pressure_and_stays_in_the_open_interval() -> None:
    """Noise-free linear regression with plenty of data: dropout only hurts the fit, so
    the data loss plus the regulariser push p down from 0.5."""
    torch.manual_seed(3)
    n = 100_000
    true_weight = torch.randn(1, 8)
    drop, fc = ConcreteDropout(0.5), nn.Linear(8, 1)
    optimizer = torch.optim.Adam([*drop.parameters(), *fc.parameters()], lr=0.05)
    history = []
    for _ in range(150):
        x = torch.randn(256, 8)
        loss = (fc(drop(x)) - x @ true_weight.T).square().mean() + drop.regularizer(fc.weight, n)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(drop.p)
    assert history[-1] < 0.1 < 0.5
    assert all(0.0 < p < 1.0 for p in history)


def test_p_is_a_logit_parameter_and_is_validated() -> None:
    layer = ConcreteDropout(0.3, temperature=0.2)
    assert [n for n, _ in layer.named_parameters()] == ["p_logit"]
    assert layer.p == pytest.approx(0.3) and layer.p_tensor.dtype == torch.float64
    layer.p = 0.6
    assert layer.p_logit.item() == pytest.approx(math.log(0.6 / 0.4))
    assert repr(layer) == "ConcreteDropout(p=0.6, temperature=0.2)"
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            ConcreteDropout(bad)
    with pytest.raises(ValueError, match="temperature"):
        ConcreteDropout(0.1, temperature=0.0)
    with pytest.raises(TypeError, match="p must be a float"):
        ConcreteDropout("0.1")  # type: ignore[arg-type]
