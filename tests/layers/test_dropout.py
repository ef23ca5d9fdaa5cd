"""Element dropout: the slides' examples, statistics, gradients and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_dropout import Dropout
from lightning_dropout.layers import dropout


def test_slides_example_values_and_gradients() -> None:
    torch.manual_seed(3)
    x = torch.ones(3, 5, requires_grad=True)
    y = Dropout(p=0.75)(x)
    assert set(y.detach().unique().tolist()) <= {0.0, 4.0}
    y.norm(2, 1).sum().backward()
    assert x.grad is not None
    for row, grad_row in zip(y.detach(), x.grad, strict=True):
        kept = row != 0
        k = int(kept.sum())
        if k == 0:
            continue
        torch.testing.assert_close(grad_row[kept], torch.full((k,), 4 / math.sqrt(k)))
        assert bool((grad_row[~kept] == 0).all())


@pytest.mark.parametrize(("k", "expected"), [(1, 4.0), (2, 2.8284), (3, 2.3094)])
def test_slides_gradient_numbers(k: int, expected: float) -> None:
    # Find a seed whose first row keeps exactly k entries, then check the slide's number.
    for seed in range(1000):
        torch.manual_seed(seed)
        x = torch.ones(3, 5, requires_grad=True)
        y = Dropout(p=0.75)(x)
        if int((y[0] != 0).sum()) == k:
            y.norm(2, 1).sum().backward()
            assert x.grad is not None
            assert x.grad[0][y[0] != 0].tolist() == pytest.approx([expected] * k, abs=1e-4)
            return
    pytest.fail(f"no seed kept exactly {k} entries")


def test_train_false_is_recursive_and_eval_is_identity() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(Dropout(0.5), nn.ReLU()))
    model.train(False)
    assert all(not m.training for m in model.modules())
    x = torch.randn(8, 4)
    assert model[1][0](x) is x


@pytest.mark.parametrize("p", [0.1, 0.3333, 0.5, 0.75, 0.9])
def test_keep_rate_within_five_sigma(p: float) -> None:
    n = 1_000_000
    y = Dropout(p)(torch.ones(n))
    kept = float((y != 0).float().mean())
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma


@pytest.mark.parametrize("inverted", [True, False])
def test_unbiased_training_mean_equals_eval_output(inverted: bool) -> None:
    p, draws = 0.3, 4000
    layer = Dropout(p, inverted=inverted)
    x = torch.randn(64, dtype=torch.float64)
    mean = torch.stack([layer(x) for _ in range(draws)]).mean(0)
    layer.eval()
    expected = layer(x)
    # Per element: Var = x^2 s^2 p (1 - p), with s the training scale.
    scale = 1 / (1 - p) if inverted else 1.0
    sigma = (x.abs() * scale * math.sqrt(p * (1 - p) / draws)).clamp_min(1e-12)
    assert bool(((mean - expected).abs() < 5 * sigma).all())


def test_original_variant_scales_at_eval_only() -> None:
    layer = Dropout(0.75, inverted=False)
    y = layer(torch.ones(100))
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    layer.eval()
    assert torch.equal(layer(torch.ones(3)), torch.full((3,), 0.25))


def test_gradcheck_with_fixed_mask() -> None:
    layer = Dropout(0.4)

    def fixed_mask(x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(7)
        return layer(x)

    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fixed_mask, (x,))


def test_p_one_gives_zeros_never_nan() -> None:
    x = torch.tensor([1.0, float("inf"), -float("inf"), float("nan")], requires_grad=True)
    y = Dropout(1.0)(x)
    assert torch.equal(y, torch.zeros(4))
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros(4))


def test_p_one_original_variant_and_inf_in_dropped_positions() -> None:
    torch.manual_seed(0)
    x = torch.full((1000,), float("inf"), requires_grad=True)
    y = Dropout(0.5)(x)
    assert not bool(y.isnan().any())
    y.sum().backward()
    assert x.grad is not None and not bool(x.grad.isnan().any())


def test_p_zero_and_eval_are_exact_identities() -> None:
    x = torch.randn(5, 7)
    assert Dropout(0.0)(x) is x
    assert Dropout(0.5).eval()(x) is x


def test_inplace_overwrites_input() -> None:
    x = torch.ones(1000)
    y = Dropout(0.5, inplace=True)(x)
    assert y.data_ptr() == x.data_ptr()
    assert set(x.unique().tolist()) <= {0.0, 2.0}


def test_p_is_mutable_and_validated() -> None:
    layer = Dropout(0.5)
    layer.p = 0.25
    assert layer.p == 0.25
    with pytest.raises(ValueError, match="p must be in"):
        layer.p = 1.5
    assert "p=0.25" in repr(layer)


@pytest.mark.parametrize(
    ("p", "error"),
    [
        (-0.1, ValueError),
        (1.01, ValueError),
        (float("nan"), ValueError),
        ("0.5", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_bad_p_is_refused_naming_the_argument(p: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="p must be"):
        Dropout(p)  # type: ignore[arg-type]
    with pytest.raises(error, match="p must be"):
        dropout(torch.ones(2), p)  # type: ignore[arg-type]


def test_a_layers_p_is_a_float_and_a_functions_p_a_float_or_a_0d_tensor() -> None:
    """A layer's p is a float (a tensor would move the mask draw to its device and make
    each comparison a sync); the function also takes the 0-d tensor compiled layers pass,
    without reading its value."""
    with pytest.raises(TypeError, match="p must be"):
        Dropout(torch.tensor(0.5))  # type: ignore[arg-type]
    y = dropout(torch.ones(1000), torch.tensor(0.75, dtype=torch.float64))
    assert set(y.unique().tolist()) == {0.0, 4.0}
    assert torch.equal(dropout(torch.ones(3), torch.tensor(1.0)), torch.zeros(3))
    with pytest.raises(ValueError, match="p must be a 0-d tensor"):
        dropout(torch.ones(2), torch.tensor([0.5]))
    with pytest.raises(TypeError, match="p must be a floating-point tensor"):
        dropout(torch.ones(2), torch.tensor(0))


def test_bad_flags_and_inputs_are_refused() -> None:
    with pytest.raises(TypeError, match="inplace must be a bool"):
        Dropout(0.5, inplace=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="inverted must be a bool"):
        Dropout(0.5, inverted="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating-point"):
        Dropout(0.5)(torch.ones(3, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        Dropout(0.5)([1.0, 2.0])  # type: ignore[arg-type]


def test_same_seed_same_mask() -> None:
    torch.manual_seed(11)
    a = Dropout(0.5)(torch.ones(1000))
    torch.manual_seed(11)
    b = Dropout(0.5)(torch.ones(1000))
    assert torch.equal(a, b)
